"""MagFace (Meng et al. 2021): the margin grows with the feature norm, plus a norm regulariser."""
from __future__ import annotations

import torch

import math

from .base import MarginLoss, RowInputs, arc_target, check_margin_am, flag, in_range, one_of, positive

#: MagFace's modes: the authors' code (IrvingMeng/MagFace) or FaceX-Zoo's MagFace head
MAGFACE_MODES = ("magface", "facexzoo")


class MagFace(MarginLoss):
    """z_iy = s cos(theta_iy + m(a_i)), a_i = clamp(||x_i||, l_a, u_a), m(a) linear from l_m to u_m.

    a_i is *not* detached: the norm receives gradient through the margin and through the regulariser
    lambda_g (a_i / u_a^2 + 1 / a_i), added to each row's loss (so the mean adds lambda_g mean_i g(a_i)).
    ``mode="magface"`` (default) is the authors' code: easy margin, or th/mm with ``easy_margin=False``;
    ``mode="facexzoo"`` is FaceX-Zoo's head: ``c - margin_am`` where c <= cos(pi - m(a_i)).
    """

    params = {"l_a": positive, "u_a": positive, "l_m": positive, "u_m": positive,
              "lambda_g": in_range(0.0, math.inf), "easy_margin": flag, "mode": one_of(*MAGFACE_MODES),
              "margin_am": in_range(0.0, 2.0)}

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 35.0, easy_margin: bool = True, mode: str = "magface",
                 margin_am: float = 0.0):
        super().__init__(s)
        self.l_a, self.u_a, self.l_m, self.u_m = l_a, u_a, l_m, u_m
        self.mode, self.margin_am = mode, margin_am
        # easy_margin=True is the default of the authors' code; FaceX-Zoo's head has no such rule
        self.lambda_g, self.easy_margin = lambda_g, bool(easy_margin) and mode == "magface"

    def check_params(self) -> None:
        if not self.u_a > self.l_a:
            raise ValueError(f"u_a must be greater than l_a, got l_a={self.l_a}, u_a={self.u_a}")
        check_margin_am(self.margin_am, self.mode)

    def rule(self) -> str:
        if self.mode == "facexzoo":
            return "margin_am"
        return "easy" if self.easy_margin else "th_mm"

    def magnitude(self, rows: RowInputs) -> torch.Tensor:
        return rows.feature_norm.clamp(self.l_a, self.u_a)

    def margin(self, a: torch.Tensor) -> torch.Tensor:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def target_logit(self, rows: RowInputs):
        return self.s * arc_target(rows.cos, self.margin(self.magnitude(rows)), self.rule(), self.margin_am)

    def regularizer(self, rows: RowInputs):
        a = self.magnitude(rows)
        return self.lambda_g * (a / self.u_a ** 2 + 1.0 / a)

    def _hparams(self):
        return {"s": self.s, "l_a": self.l_a, "u_a": self.u_a, "l_m": self.l_m, "u_m": self.u_m,
                "lambda_g": self.lambda_g, "easy_margin": self.easy_margin, "mode": self.mode, "margin_am": self.margin_am}
