"""What a loss may ask for before its target is formed: a statistic of each row's negatives (AdaCos's
log-sum-exp, NPCFace's hard negatives). The request is part of the loss description; ``row_statistics``
computes it over the class chunks, ``reference`` from the full cosine matrix."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .negatives import NegativeSpec

NEGATIVE_LSE = "negative_lse"
HARD_NEGATIVES = "hard_negatives"


@dataclass(frozen=True)
class StatisticsRequest:
    kind: str
    #: the negatives' spec (NEGATIVE_LSE; ignored by HARD_NEGATIVES)
    spec: NegativeSpec
    #: (B, 2) row params: the spec's for NEGATIVE_LSE, the threshold T_i in column 0 for HARD_NEGATIVES
    row_params: torch.Tensor
