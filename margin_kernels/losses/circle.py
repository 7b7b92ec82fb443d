"""Class-level Circle loss (Sun et al. 2020) with one positive per row, in softmax cross-entropy form."""
from __future__ import annotations

import torch

from .base import MarginLoss, RowInputs, in_range, positive
from .negatives import NegativeKind


class CircleLoss(MarginLoss):
    """z_iy = gamma alpha_p (c_iy - (1 - m)), alpha_p = relu(1 + m - c_iy);
    z_ij = gamma alpha_n (c_ij - m), alpha_n = relu(c_ij + m); both alphas detached.
    log(1 + sum_j exp(z_ij - z_iy)) is exactly the cross-entropy of these logits."""

    negative_kind = NegativeKind.CIRCLE

    params = {"m": in_range(0.0, 1.0)}

    def __init__(self, gamma: float = 256.0, m: float = 0.25):
        """``gamma`` is the paper's name for the scale: it is stored as ``s``, the scale of every loss."""
        super().__init__(positive("gamma", gamma))
        self.m = m

    @property
    def gamma(self) -> float:
        return self.s

    @gamma.setter
    def gamma(self, value) -> None:
        self.s = positive("gamma", value)

    def negative_constants(self):
        return self.m, 0.0

    def target_logit(self, rows: RowInputs):
        c = rows.cos
        alpha_p = torch.relu(1.0 + self.m - c.detach())
        return self.s * alpha_p * (c - (1.0 - self.m))

    def _hparams(self):
        return {"gamma": self.s, "m": self.m}
