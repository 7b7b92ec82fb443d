"""Losses without a margin: the plain FC + CE bottleneck, L2-Softmax (CrystalLoss) and NormFace."""
from __future__ import annotations

from .base import MarginLoss, RowInputs


class Softmax(MarginLoss):
    """z_ij = x_i . w_j: no normalisation, no scale (an FC layer without bias, then cross-entropy)."""

    normalize_features = False
    normalize_weight = False

    def __init__(self):
        super().__init__(1.0)

    def target_logit(self, rows: RowInputs):
        return rows.cos

    def _hparams(self):
        return {}


class L2Softmax(MarginLoss):
    """z_ij = s * x_i/||x_i|| . w_j: features normalised and scaled, weights raw (Ranjan et al. 2017)."""

    normalize_weight = False

    def __init__(self, s: float = 16.0):
        super().__init__(s)

    def target_logit(self, rows: RowInputs):
        return self.s * rows.cos


class NormFace(MarginLoss):
    """z_ij = s * cos(x_i, w_j) (Wang et al. 2017)."""

    def __init__(self, s: float = 30.0):
        super().__init__(s)

    def target_logit(self, rows: RowInputs):
        return self.s * rows.cos
