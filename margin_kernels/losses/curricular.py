"""CurricularFace (Huang et al. 2020): hard negatives are re-weighted by a running estimate t."""
from __future__ import annotations

import math

import torch

from .base import MarginLoss, RowInputs, arc_target, cos_plus_margin, in_range, masked_mean
from .negatives import NegativeKind


class CurricularFace(MarginLoss):
    """z_iy = s * ArcFace target (th/mm rule); z_ij = s c_ij if c_ij <= cos(theta_iy + m) else s c_ij (t + c_ij).

    t <- 0.01 mean_i(c_iy) + 0.99 t is updated in training mode before it is used, without gradient, and is
    kept in a buffer. The hard-negative test uses the raw cos(theta_iy + m) as in the paper's code.
    """

    negative_kind = NegativeKind.CURRICULAR

    params = {"m": in_range(0.0, math.pi / 2)}

    def __init__(self, s: float = 64.0, m: float = 0.5):
        super().__init__(s)
        self.m = m
        self.register_buffer("t", torch.zeros(()))

    def update_state(self, rows: RowInputs) -> None:
        mean = masked_mean(rows.cos, rows.valid).to(self.t.dtype)
        any_valid = rows.valid.any()
        self.t.copy_(torch.where(any_valid, 0.01 * mean + 0.99 * self.t, self.t))

    def row_params(self, rows: RowInputs) -> torch.Tensor:
        threshold = cos_plus_margin(rows.cos, self.m)
        return torch.stack([threshold, self.t.to(threshold.dtype).expand_as(threshold)], dim=1)

    def target_logit(self, rows: RowInputs):
        return self.s * arc_target(rows.cos, self.m, "th_mm")

    def _hparams(self):
        return {"s": self.s, "m": self.m}
