"""Ring loss (Zheng et al., CVPR 2018): a soft constraint pulling every feature norm towards a learned radius R.

Per row, with a = ||x_i||, as the authors' code (Paralysis/ringloss) computes it, times lambda / 2 (so that
the "l2" variant is the paper's lambda / (2B) sum_i (a_i - R)^2 under the head's "mean"; the code's
``loss_weight`` is lambda / 2):

* ``"l2"``:     (a_i - R)^2                       (the code's default branch)
* ``"auto"``:   ((a_i - R) / max(mean_i a_i, 0.5))^2, the batch mean detached (the code's 'auto'/'ratio',
                whose recommended weight is 1 instead of 0.01)
* ``"l1"``:     2 smooth_l1(a_i - R)              (the code adds smooth_l1(a, R) and smooth_l1(R, a))

R is a parameter (``head.regularizers[k].radius``) trained by the optimizer with the features. Like the
authors' code, a radius left at its default (None) is set to the batch's mean feature norm at the first call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..batch_reduction import accumulation_dtype
from ..losses.base import _check_positive
from .base import BatchRows, Regularizer, check_nonnegative

VARIANTS = ("l2", "auto", "l1")
#: the authors' floor on the batch mean norm of the "auto" variant
AUTO_MIN_NORM = 0.5


class RingLoss(Regularizer):
    """``RingLoss(weight=0.01, variant="l2", radius=None)``: ``weight`` is lambda; ``radius`` the initial R
    (None: the first batch's mean feature norm)."""

    def __init__(self, weight: float = 0.01, *, variant: str = "l2", radius: Optional[float] = None):
        super().__init__()
        check_nonnegative("weight", weight)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if radius is not None:
            _check_positive("radius", radius)
        self.weight, self.variant = float(weight), variant
        self.radius = nn.Parameter(torch.tensor(1.0 if radius is None else float(radius)))
        self.register_buffer("initialized", torch.tensor(radius is not None))

    def bind(self, *, num_classes, embedding_dim, shard_range, seed, dtype, device):
        super().bind()
        with torch.no_grad():  # R in the head's accumulation dtype, on its device
            self.radius.data = self.radius.data.to(dtype=accumulation_dtype(dtype or torch.get_default_dtype()),
                                                   device=device)
            self.initialized.data = self.initialized.data.to(device)

    def per_row(self, rows: BatchRows) -> torch.Tensor:
        norm = rows.feature_norm.to(rows.acc)
        count = rows.valid.sum().clamp_min(1)
        mean_norm = torch.where(rows.valid, norm.detach(), torch.zeros_like(norm)).sum() / count
        with torch.no_grad():  # the authors' first-call radius, without a host sync
            # a batch without valid rows has no mean norm: it leaves R and the flag as they are
            take = ~self.initialized & rows.valid.any()
            self.radius.copy_(torch.where(take, mean_norm.to(self.radius.dtype), self.radius))
            self.initialized.logical_or_(take)
        diff = norm - self.radius.to(rows.acc)
        if self.variant == "auto":
            diff = diff / mean_norm.clamp_min(AUTO_MIN_NORM)
        if self.variant == "l1":
            return self.weight * F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none")
        return (0.5 * self.weight) * diff * diff

    def extra_repr(self) -> str:
        return f"weight={self.weight}, variant={self.variant!r}"
