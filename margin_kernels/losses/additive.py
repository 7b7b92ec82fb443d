"""Additive margins: CosFace / AM-Softmax, ArcFace and insightface's combined margin."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import (MarginLoss, RowInputs, arc_target, check_margin_am, cos_plus_margin, flag, in_range,
                   one_of, optional_flag, straight_through)
from .negatives import NegativeKind

#: ArcFace's modes, each named after the code it reproduces (docs/losses.md, "Which code each mode reproduces")
ARCFACE_MODES = ("insightface_legacy", "insightface", "facexzoo")
#: CombinedMargin's modes
COMBINED_MODES = ("insightface", "paddle")


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
    """z_iy = s cos(theta_iy + m) (Deng et al. 2019), in the form of the code named by ``mode``:

    * ``"insightface_legacy"`` (default): insightface arcface_torch before 2022-12 and most papers' code: the
      th/mm rule past theta + m = pi (or ``easy_margin=True``), exact gradient;
    * ``"insightface"``: arcface_torch today (``CombinedMarginLoss`` arc branch): no rule past pi, and the
      margin applied under ``torch.no_grad()``, so the gradient is that of s * c_iy (straight-through);
    * ``"facexzoo"``: FaceX-Zoo's ``ArcFace`` head: ``c - margin_am`` past pi - m, exact gradient.

    ``straight_through=None`` follows the mode's code; True/False force the gradient (True on another mode
    gives that mode's value with the straight-through gradient, a hybrid no original code computes). The
    attribute keeps what was asked (None included) and the rule in force is derived on every call
    (``uses_straight_through``), so an assigned ``mode`` brings its own gradient rule, as a fresh loss would.
    """

    params = {"m": in_range(0.0, math.pi / 2), "easy_margin": flag, "straight_through": optional_flag,
              "mode": one_of(*ARCFACE_MODES), "margin_am": in_range(0.0, 2.0)}

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False,
                 straight_through: Optional[bool] = None, mode: str = "insightface_legacy", margin_am: float = 0.0):
        super().__init__(s)
        self.m, self.mode, self.margin_am, self.easy_margin = m, mode, margin_am, easy_margin
        self.straight_through = straight_through

    def check_params(self) -> None:
        check_margin_am(self.margin_am, self.mode)
        if self.easy_margin and self.mode != "insightface_legacy":
            raise ValueError(f"easy_margin is a rule of mode='insightface_legacy'; mode={self.mode!r} has none")

    def rule(self) -> str:
        """The ``ARC_RULES`` entry of this mode (what the target does past theta + m = pi)."""
        if self.mode == "insightface":
            return "none"
        if self.mode == "facexzoo":
            return "margin_am"
        return "easy" if self.easy_margin else "th_mm"

    def uses_straight_through(self) -> bool:
        """The gradient rule in force: ``straight_through`` as set, or (None) the mode's: insightface's
        margin under no_grad."""
        return self.mode == "insightface" if self.straight_through is None else self.straight_through

    def target_logit(self, rows: RowInputs):
        value = arc_target(rows.cos, self.m, self.rule(), self.margin_am)
        if self.uses_straight_through():
            value = straight_through(value, rows.cos)
        return self.s * value

    def _hparams(self):
        return {"s": self.s, "m": self.m, "easy_margin": self.easy_margin, "straight_through": self.straight_through,
                "mode": self.mode, "margin_am": self.margin_am}


class CombinedMargin(MarginLoss):
    """insightface's combined margin, in the form of the code named by ``mode``:

    * ``"insightface"`` (default): arcface_torch's ``CombinedMarginLoss``. Its arc branch (m1 == 1, m3 == 0)
      is z_iy = s cos(theta_iy + m2), no rule past pi, margin under no_grad (straight-through gradient); its
      CosFace branch (m3 > 0) is z_iy = s (c_iy - m3), *ignoring m1 and m2*; any other setting raises there,
      so it raises here (ValueError) and points at ``mode="paddle"``;
    * ``"paddle"``: PaddlePaddle's ``margin_cross_entropy`` (PLSC's ``MarginLoss``):
      z_iy = s (cos(m1 theta_iy + m2) - m3) for every setting, exact gradient.

    ``interclass_filtering_threshold`` tau > 0 (insightface only) sets negatives with c_ij > tau to 0 (no
    gradient). ``straight_through=None`` follows the mode's code (derived on every call, so assigned ``mode``,
    ``m1`` or ``m3`` bring their branch's gradient rule); True/False force the gradient.
    """

    params = {"m1": in_range(0.0, 10.0), "m2": in_range(0.0, math.pi), "m3": in_range(0.0, 2.0),
              "interclass_filtering_threshold": in_range(0.0, 1.0), "straight_through": optional_flag,
              "mode": one_of(*COMBINED_MODES)}

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0, straight_through: Optional[bool] = None,
                 mode: str = "insightface"):
        super().__init__(s)
        self.mode = mode
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.straight_through = straight_through

    def check_params(self) -> None:
        arc_branch = self.m1 == 1.0 and self.m3 == 0.0
        if self.mode == "insightface" and not (arc_branch or self.m3 > 0):
            raise ValueError(f"CombinedMargin(mode='insightface') has insightface's two branches, m1 == 1 with "
                             f"m3 == 0 (ArcFace) or m3 > 0 (CosFace); m1={self.m1}, m3={self.m3} is neither "
                             f"(insightface raises): use mode='paddle' for s (cos(m1 theta + m2) - m3)")
        if self.mode == "paddle" and self.interclass_filtering_threshold > 0:
            raise ValueError("interclass_filtering_threshold is insightface's; mode='paddle' has no filter")

    @property
    def negative_kind(self) -> NegativeKind:
        """FILTER while a threshold is set (it may be assigned after construction), else IDENTITY."""
        return NegativeKind.FILTER if self.interclass_filtering_threshold > 0 else NegativeKind.IDENTITY

    def negative_constants(self):
        return self.interclass_filtering_threshold, 0.0

    def uses_straight_through(self) -> bool:
        """The gradient rule in force: ``straight_through`` as set, or (None) the mode's: insightface's arc
        branch (m1 == 1, m3 == 0) applies its margin under no_grad."""
        if self.straight_through is not None:
            return self.straight_through
        return self.mode == "insightface" and self.m1 == 1.0 and self.m3 == 0.0

    def target_logit(self, rows: RowInputs):
        c = rows.cos
        if self.mode == "insightface" and self.m3 > 0:
            value = c - self.m3  # insightface's CosFace branch: m1 and m2 play no part
        elif self.m1 == 1.0:
            value = cos_plus_margin(c, self.m2) - self.m3
        else:
            # keep arccos' derivative finite at |c| = 1
            theta = torch.acos(c.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
            value = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.uses_straight_through():
            value = straight_through(value, c)
        return self.s * value

    def _hparams(self):
        return {"s": self.s, "m1": self.m1, "m2": self.m2, "m3": self.m3,
                "interclass_filtering_threshold": self.interclass_filtering_threshold,
                "straight_through": self.straight_through, "mode": self.mode}
