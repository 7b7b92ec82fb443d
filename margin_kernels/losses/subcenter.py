"""Sub-center ArcFace (Deng et al., ECCV 2020): K weight rows per class, the class's cosine the best of them.

The weight has C * K rows, class j owning rows [j K, (j + 1) K) (pytorch-metric-learning's and insightface's
layout: their B x C K cosines are viewed as B x C x K). Every backend takes the max over a class's K rows inside
its tile (``margin_kernels.subcenters``); the loss itself is ArcFace's on those per-class cosines, so only the
target formula lives here.
"""
from __future__ import annotations

import math

import torch

from .base import MarginLoss, RowInputs, cos_plus_margin, in_range, integer_in, one_of

#: PML's ArcFaceLoss.get_angles clamps the cosine by this before acos (so its gradient is 0 beyond it)
PML_ACOS_CLAMP = 1e-7
MODES = ("pml", "insightface")


class SubCenterArcFace(MarginLoss):
    """z_iy = s cos(theta_iy + m), z_ij = s c_ij, with c_ij = max_k cos(x_i, w_{jK+k}).

    ``sub_centers`` (K, pytorch-metric-learning's name; insightface's ``loss_K``): rows per class.
    ``m`` is in radians (PML's ``margin`` is in degrees: its default 28.6 is m = 0.499).
    Both authors' codes apply the margin plainly, without ArcFace's easy-margin / th-mm rules, and
    differentiate it exactly; they differ only next to |c| = 1:

    * ``mode="pml"`` (pytorch-metric-learning's SubCenterArcFaceLoss): theta = acos(clamp(c, -1 + 1e-7,
      1 - 1e-7)), so the target's gradient is 0 where |c| > 1 - 1e-7;
    * ``mode="insightface"`` (insightface's SubCenter-ArcFace, its combined margin with m1 = 1, m3 = 0):
      cos(arccos(c) + m) unclamped, written as c cos m - sin(theta) sin m with 1 - c^2 floored at 1e-12, so
      the gradient stays finite at |c| = 1 where MXNet's arccos gradient is infinite.
    """

    params = {"m": in_range(0.0, math.pi / 2), "sub_centers": integer_in(1, 1 << 20), "mode": one_of(*MODES)}

    def __init__(self, s: float = 64.0, m: float = 0.5, sub_centers: int = 3, mode: str = "pml"):
        super().__init__(s)
        self.m, self.sub_centers, self.mode = m, sub_centers, mode

    def target_logit(self, rows: RowInputs) -> torch.Tensor:
        if self.mode == "pml":
            theta = torch.acos(rows.cos.clamp(-1.0 + PML_ACOS_CLAMP, 1.0 - PML_ACOS_CLAMP))
            return self.s * torch.cos(theta + self.m)
        return self.s * cos_plus_margin(rows.cos, self.m)

    def _hparams(self):
        return {"s": self.s, "m": self.m, "sub_centers": self.sub_centers, "mode": self.mode}
