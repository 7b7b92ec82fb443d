"""Multiplicative angular margins: L-Softmax (Liu et al. 2016) and SphereFace / A-Softmax (Liu et al. 2017).

Both replace cos(theta) in the target by psi_m(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi),
with cos(m theta) the Chebyshev polynomial T_m(c) (so the gradient never goes through arccos), and blend it
with the plain target logit while training starts: z = (lambda z_plain + z_psi) / (1 + lambda),
lambda = max(lambda_min, lambda_base (1 + gamma iter)^-power). ``iteration`` is a buffer, advanced once per
call in training mode before lambda is computed (as SphereFace's Caffe layer does). ``s`` (default 1) scales
every logit, as pytorch-metric-learning's ``scale`` does.
"""
from __future__ import annotations

import math

import torch

from .base import MarginLoss, floored, RowInputs, in_range, integer_in


def chebyshev(c: torch.Tensor, m: int) -> torch.Tensor:
    """T_m(c) = cos(m arccos c) as a polynomial, by the three-term recurrence."""
    previous, current = torch.ones_like(c), c
    if m == 0:
        return previous
    for _ in range(m - 1):
        previous, current = current, 2.0 * c * current - previous
    return current


def psi(c: torch.Tensor, m: int) -> torch.Tensor:
    """psi_m(theta) of docs/losses.md, monotonically decreasing over [0, pi]; differentiable in c."""
    c = c.clamp(-1.0, 1.0)
    with torch.no_grad():
        k = torch.floor(m * torch.acos(c) / math.pi).clamp(0, m)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * chebyshev(c, m) - 2.0 * k


class _AnnealedMultiplicative(MarginLoss):
    params = {"m": integer_in(1, 10), "lambda_base": in_range(0.0, math.inf), "lambda_gamma": in_range(0.0, math.inf),
              "lambda_power": in_range(0.0, math.inf), "lambda_min": in_range(0.0, math.inf)}

    def __init__(self, m: int, lambda_base: float, lambda_gamma: float, lambda_power: float, lambda_min: float,
                 s: float = 1.0):
        super().__init__(s)
        self.m = m
        self.lambda_base, self.lambda_gamma = lambda_base, lambda_gamma
        self.lambda_power, self.lambda_min = lambda_power, lambda_min
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    def update_state(self, rows: RowInputs) -> None:
        self.iteration.add_(1)

    def current_lambda(self) -> torch.Tensor:
        it = self.iteration.to(torch.float64)
        lam = self.lambda_base * (1.0 + self.lambda_gamma * it) ** (-self.lambda_power)
        return lam.clamp_min(self.lambda_min)

    def _blend(self, plain: torch.Tensor, with_margin: torch.Tensor) -> torch.Tensor:
        lam = self.current_lambda().to(plain.dtype)
        return self.s * (lam * plain + with_margin) / (1.0 + lam)

    def _hparams(self):
        return {"s": self.s, "m": self.m, "lambda_base": self.lambda_base, "lambda_gamma": self.lambda_gamma,
                "lambda_power": self.lambda_power, "lambda_min": self.lambda_min}


class LSoftmax(_AnnealedMultiplicative):
    """z_iy = ||w_y|| ||x_i|| psi_m(theta_iy), z_ij = x_i . w_j (raw features and weights)."""

    normalize_features = False
    normalize_weight = False

    def __init__(self, m: int = 4, lambda_base: float = 1000.0, lambda_gamma: float = 0.12,
                 lambda_power: float = 1.0, lambda_min: float = 5.0, s: float = 1.0):
        super().__init__(m, lambda_base, lambda_gamma, lambda_power, lambda_min, s)

    def target_logit(self, rows: RowInputs):
        scale = rows.feature_norm * rows.weight_norm
        cos = rows.cos / floored(scale)
        return self._blend(rows.cos, scale * psi(cos, self.m))


class SphereFace(_AnnealedMultiplicative):
    """A-Softmax: z_iy = ||x_i|| psi_m(theta_iy), z_ij = ||x_i|| c_ij (weights normalised, feature norm kept)."""

    normalize_features = False

    def __init__(self, m: int = 4, lambda_base: float = 1000.0, lambda_gamma: float = 0.12,
                 lambda_power: float = 1.0, lambda_min: float = 5.0, s: float = 1.0):
        super().__init__(m, lambda_base, lambda_gamma, lambda_power, lambda_min, s)

    def target_logit(self, rows: RowInputs):
        cos = rows.cos / floored(rows.feature_norm)
        return self._blend(rows.cos, rows.feature_norm * psi(cos, self.m))
