"""MV-Softmax (Wang et al. 2020, FaceX-Zoo): mis-classified negatives get a larger weight."""
from __future__ import annotations

import math

import torch

from .base import MarginLoss, RowInputs, cos_plus_margin, in_range, one_of
from .negatives import NegativeKind


class MVSoftmax(MarginLoss):
    """MV-AM / MV-Arc. Target: AM s (c_iy - m) if c_iy > m else s c_iy; Arc s cos(theta_iy + m) if c_iy > 0
    else s c_iy. A negative is hard when c_ij > c_iy - m (AM) or c_ij > cos(theta_iy + m) (Arc); hard
    negatives become s (w c_ij + w - 1) with w = mv_weight."""

    negative_kind = NegativeKind.MV

    params = {"m": in_range(0.0, math.pi / 2), "mv_weight": in_range(1.0, 10.0), "variant": one_of("am", "arc")}

    def __init__(self, s: float = 32.0, m: float = 0.35, mv_weight: float = 1.12, variant: str = "am"):
        super().__init__(s)
        self.m, self.mv_weight, self.variant = m, mv_weight, variant

    def negative_constants(self):
        return self.mv_weight, 0.0

    def _margin_cos(self, c: torch.Tensor) -> torch.Tensor:
        return c - self.m if self.variant == "am" else cos_plus_margin(c, self.m)

    def row_params(self, rows: RowInputs) -> torch.Tensor:
        threshold = self._margin_cos(rows.cos)
        return torch.stack([threshold, torch.zeros_like(threshold)], dim=1)

    def target_logit(self, rows: RowInputs):
        c = rows.cos
        keep = c > (self.m if self.variant == "am" else 0.0)
        return self.s * torch.where(keep, self._margin_cos(c), c)

    def _hparams(self):
        return {"s": self.s, "m": self.m, "mv_weight": self.mv_weight, "variant": self.variant}
