"""NPCFace (Zeng et al., 2020): hard negatives are emphasised (t c + a) and the target's angular margin grows
with the row's mean hard-negative cosine."""
from __future__ import annotations

import math

import torch

from .statistics import HARD_NEGATIVES, StatisticsRequest
from .base import MarginLoss, RowInputs, cos_plus_margin, in_range
from .negatives import NegativeKind, NegativeSpec


class NPCFace(MarginLoss):
    """FaceX-Zoo's NPCFace head. With T_i = cos(theta_iy + margin) (no easy-margin rule):

        z_ij = s (t c_ij + a) if c_ij > T_i else s c_ij                      (negative kind AFFINE)
        h_i  = mean of c_ij over the hard negatives j != y_i with c_ij > T_i  (0 when there is none)
        z_iy = s cos(theta_iy + m0 + m1 h_i) if c_iy > 0 else s c_iy

    h_i is a statistic of the row's negatives over every class, without gradient: one extra no-grad pass over
    the classes (``row_statistics.HARD_NEGATIVES``) computes its sum and count before the target is formed;
    sharded, the sums add over shards. The margin's branch has the exact gradient of its formula. No state.
    Parameter names and defaults as FaceX-Zoo (``scale`` is the s of the other losses).
    """

    negative_kind = NegativeKind.AFFINE
    params = {"margin": in_range(0.0, math.pi / 2), "m0": in_range(0.0, math.pi / 2),
              "m1": in_range(0.0, math.pi / 2), "t": in_range(0.0, 10.0), "a": in_range(-1.0, 1.0)}

    def __init__(self, margin: float = 0.5, scale: float = 64.0, m0: float = 0.40, m1: float = 0.20,
                 t: float = 1.10, a: float = 0.20):
        super().__init__(scale)
        self.margin, self.m0, self.m1, self.t, self.a = margin, m0, m1, t, a
        self._hard_mean = None

    @property
    def scale(self) -> float:
        return self.s

    def negative_constants(self):
        return self.t, self.a

    def _threshold(self, rows: RowInputs) -> torch.Tensor:
        return cos_plus_margin(rows.cos, self.margin)

    def statistics_request(self, rows: RowInputs, num_classes: int):
        threshold = self._threshold(rows)
        return StatisticsRequest(HARD_NEGATIVES, self.negative_spec(),
                                 torch.stack([threshold, torch.zeros_like(threshold)], dim=1))

    def receive_statistics(self, rows: RowInputs, statistics: torch.Tensor) -> None:
        self._hard_mean = (statistics[:, 0] / statistics[:, 1].clamp_min(1.0)).detach()

    def row_params(self, rows: RowInputs) -> torch.Tensor:
        threshold = self._threshold(rows)
        return torch.stack([threshold, torch.zeros_like(threshold)], dim=1)

    def target_logit(self, rows: RowInputs):
        hard_mean = self._hard_mean
        if hard_mean is None or hard_mean.shape != rows.cos.shape:
            raise RuntimeError("NPCFace.target_logit needs the hard-negative statistic of the same batch")
        new_m = self.m0 + self.m1 * hard_mean.to(rows.cos.dtype)
        c = rows.cos
        return self.s * torch.where(c > 0, cos_plus_margin(c, new_m), c)

    def _hparams(self):
        return {"margin": self.margin, "scale": self.s, "m0": self.m0, "m1": self.m1, "t": self.t, "a": self.a}
