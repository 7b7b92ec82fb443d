"""Additive margins: CosFace / AM-Softmax, ArcFace and insightface's combined margin."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import MarginLoss, RowInputs, arc_target, cos_plus_margin, flag, in_range, straight_through
from .negatives import NegativeKind


class CosFace(MarginLoss):
    """z_iy = s (c_iy - m), z_ij = s c_ij (Wang et al. 2018; AM-Softmax)."""

    params = {"m": in_range(0.0, 2.0)}

    def __init__(self, s: float = 64.0, m: float = 0.35):
        super().__init__(s)
        self.m = m

    def target_logit(self, rows: RowInputs):
        return self.s * (rows.cos - self.m)

    def _hparams(self):
        return {"s": self.s, "m": self.m}


class ArcFace(MarginLoss):
    """z_iy = s cos(theta_iy + m) with insightface's easy-margin / th-mm rules (Deng et al. 2019).

    ``straight_through=True`` reproduces insightface's arcface_torch, which computes the margin under
    ``torch.no_grad()``: the loss value is the same, the gradient is that of s * c_iy. Default: exact.
    """

    params = {"m": in_range(0.0, math.pi / 2), "easy_margin": flag, "straight_through": flag}

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False, straight_through: bool = False):
        super().__init__(s)
        self.m, self.easy_margin, self.straight_through = m, easy_margin, straight_through

    def target_logit(self, rows: RowInputs):
        value = arc_target(rows.cos, self.m, self.easy_margin)
        if self.straight_through:
            value = straight_through(value, rows.cos)
        return self.s * value

    def _hparams(self):
        return {"s": self.s, "m": self.m, "easy_margin": self.easy_margin, "straight_through": self.straight_through}


class CombinedMargin(MarginLoss):
    """z_iy = s (cos(m1 theta_iy + m2) - m3), insightface's CombinedMarginLoss.

    ``interclass_filtering_threshold`` tau > 0 sets negatives with c_ij > tau to 0 (no gradient).
    ``straight_through=None`` follows insightface: its arc branch (m1 == 1, m3 == 0) applies the margin under
    no_grad, so the gradient passes through as if the logit were s c_iy; other settings are differentiated
    exactly. Pass True/False to force either.
    """

    params = {"m1": in_range(0.0, 10.0), "m2": in_range(0.0, math.pi), "m3": in_range(0.0, 2.0),
              "interclass_filtering_threshold": in_range(0.0, 1.0), "straight_through": flag}

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0, straight_through: Optional[bool] = None):
        super().__init__(s)
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        if straight_through is None:
            straight_through = self.m1 == 1.0 and self.m3 == 0.0
        self.straight_through = straight_through

    @property
    def negative_kind(self) -> NegativeKind:
        """FILTER while a threshold is set (it may be assigned after construction), else IDENTITY."""
        return NegativeKind.FILTER if self.interclass_filtering_threshold > 0 else NegativeKind.IDENTITY

    def negative_constants(self):
        return self.interclass_filtering_threshold, 0.0

    def target_logit(self, rows: RowInputs):
        c = rows.cos
        if self.m1 == 1.0:
            value = cos_plus_margin(c, self.m2) - self.m3
        else:
            # keep arccos' derivative finite at |c| = 1
            theta = torch.acos(c.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
            value = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.straight_through:
            value = straight_through(value, c)
        return self.s * value

    def _hparams(self):
        return {"s": self.s, "m1": self.m1, "m2": self.m2, "m3": self.m3,
                "interclass_filtering_threshold": self.interclass_filtering_threshold,
                "straight_through": self.straight_through}
