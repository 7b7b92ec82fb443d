"""AdaFace (Kim et al. 2022): the margin adapts to image quality, estimated by the feature norm."""
from __future__ import annotations

import math

import torch

from .base import MarginLoss, RowInputs, in_range, masked_mean
from .negatives import NegativeKind

EPS = 1e-3


class AdaFace(MarginLoss):
    """z_iy = s (cos(clamp(theta_iy + g_ang, eps, pi - eps)) - g_add), z_ij = s clamp(c_ij, -1+eps, 1-eps).

    n_i = clamp(||x_i||, 1e-3, 100), detached. In training mode the buffers batch_mean / batch_std (initial
    20 and 100, as the paper's code) follow the batch mean and unbiased std of n over the non-ignored rows:
    mu <- t_alpha mean + (1 - t_alpha) mu (likewise sigma; sigma is kept when fewer than 2 rows are valid).
    s_hat_i = clip(h (n_i - mu) / (sigma + eps), -1, 1); g_ang = -m s_hat_i; g_add = m + m s_hat_i.
    """

    negative_kind = NegativeKind.CLAMP

    params = {"m": in_range(0.0, math.pi / 2), "h": in_range(0.0, 10.0), "t_alpha": in_range(0.0, 1.0)}

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 1.0):
        super().__init__(s)
        self.m, self.h, self.t_alpha = m, h, t_alpha
        self.register_buffer("batch_mean", torch.full((), 20.0))
        self.register_buffer("batch_std", torch.full((), 100.0))

    def negative_constants(self):
        return -1.0 + EPS, 1.0 - EPS

    @staticmethod
    def safe_norms(rows: RowInputs) -> torch.Tensor:
        return rows.feature_norm.detach().clamp(1e-3, 100.0)

    def update_state(self, rows: RowInputs) -> None:
        n, valid = self.safe_norms(rows), rows.valid
        count = valid.sum()
        mean = masked_mean(n, valid)
        var = torch.where(valid, (n - mean) ** 2, torch.zeros_like(n)).sum() / (count - 1).clamp_min(1)
        alpha = self.t_alpha
        new_mean = alpha * mean.to(self.batch_mean.dtype) + (1 - alpha) * self.batch_mean
        new_std = alpha * var.sqrt().to(self.batch_std.dtype) + (1 - alpha) * self.batch_std
        self.batch_mean.copy_(torch.where(count > 0, new_mean, self.batch_mean))
        self.batch_std.copy_(torch.where(count > 1, new_std, self.batch_std))

    def target_logit(self, rows: RowInputs):
        n = self.safe_norms(rows)
        mean, std = self.batch_mean.to(n.dtype), self.batch_std.to(n.dtype)
        scaler = (self.h * (n - mean) / (std + EPS)).clamp(-1.0, 1.0)
        g_angular, g_additive = -self.m * scaler, self.m + self.m * scaler
        theta = torch.acos(rows.cos.clamp(-1.0 + EPS, 1.0 - EPS))
        return self.s * (torch.cos((theta + g_angular).clamp(EPS, math.pi - EPS)) - g_additive)

    def _hparams(self):
        return {"s": self.s, "m": self.m, "h": self.h, "t_alpha": self.t_alpha}
