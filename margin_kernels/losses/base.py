"""The contract between a loss description and the backends that compute it.

A margin loss is softmax cross-entropy over logits z_ij (docs/losses.md). Every backend splits it the same way:

* the *negative* logits of all B x C pairs are ``scale * g(c_ij)`` with ``g`` one of the kinds in
  ``negatives.py``; kernels stream these in class tiles and return only the per-row log-sum-exp over the
  negatives (the target column excluded);
* the *target* logit of each row involves one pair, so it is computed here, outside any kernel, in plain
  differentiable PyTorch on B-vectors: any formula works and autograd differentiates it;
* per-row inputs that negatives need (a threshold from the target cosine, CurricularFace's t) are computed
  here without gradient, once per call, after the state update.

A subclass states its formulas in ``target_logit`` (and ``regularizer``); kernels never restate them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..norms import floored
from .negatives import NegativeKind, NegativeSpec
from .reductions import NO_CLAMP, ReductionKind



@dataclass
class RowInputs:
    """What a target formula may depend on, one entry per row (all B-vectors).

    ``cos`` is the kernel's cosine of the target pair: x_eff_i . w_{y_i} divided by ||w_{y_i}|| when the loss
    normalises weights, where x_eff is x/||x|| or x itself (see ``MarginLoss.normalize_features``). It is 0
    on ignored rows. ``feature_norm`` is ||x_i|| and ``weight_norm`` is ||w_{y_i}|| (1 on ignored rows).
    All three carry gradients in ``target_logit``; they are detached in ``update_state``/``row_params``.
    """

    cos: torch.Tensor
    feature_norm: torch.Tensor
    weight_norm: torch.Tensor
    valid: torch.Tensor

    def detach(self) -> "RowInputs":
        return RowInputs(self.cos.detach(), self.feature_norm.detach(), self.weight_norm.detach(), self.valid)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum().clamp_min(1)
    return torch.where(valid, values, torch.zeros_like(values)).sum() / count


def cos_plus_margin(c: torch.Tensor, m) -> torch.Tensor:
    """cos(theta + m) with theta = arccos(clamp(c, -1, 1)), written as c cos m - sin theta sin m.

    ``1 - c^2`` is floored at 1e-12 so the exact gradient stays finite at |c| = 1.
    """
    c = c.clamp(-1.0, 1.0)
    sin_theta = torch.sqrt((1.0 - c * c).clamp_min(1e-12))
    cos_m = math.cos(m) if isinstance(m, float) else torch.cos(m)
    sin_m = math.sin(m) if isinstance(m, float) else torch.sin(m)
    return c * cos_m - sin_theta * sin_m


def arc_target(c: torch.Tensor, m, easy_margin: bool) -> torch.Tensor:
    """ArcFace's cos(theta + m) with insightface's rules for where theta + m would pass pi.

    easy margin: keep c where c <= 0. Otherwise: where c <= cos(pi - m) use c - sin(pi - m) * m.
    ``m`` may be a float or a per-row tensor (MagFace).
    """
    cos_theta_m = cos_plus_margin(c, m)
    if easy_margin:
        return torch.where(c > 0, cos_theta_m, c)
    if isinstance(m, float):
        threshold, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    else:
        threshold, mm = torch.cos(math.pi - m), torch.sin(math.pi - m) * m
    return torch.where(c > threshold, cos_theta_m, c - mm)


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` forward, gradient of ``surrogate`` backward (insightface's no_grad margins)."""
    return surrogate + (value - surrogate).detach()


class MarginLoss(nn.Module):
    """Base of every loss description. Subclasses set the class attributes and override the hooks."""

    #: the kernels dot x/||x|| (True) or x itself (False) with the weights
    normalize_features: bool = True
    #: the kernels divide each class's dot product by ||w_j|| (True) or not
    normalize_weight: bool = True
    #: the shape of the negative function
    negative_kind: NegativeKind = NegativeKind.IDENTITY
    #: how the negatives are reduced per row: softmax's log-sum-exp, or the binary family's softplus sum
    reduction_kind: ReductionKind = ReductionKind.LSE
    #: why the heads refuse Partial FC (sample_rate < 1) for this loss; None: sampling is supported
    no_partial_fc_reason: Optional[str] = None

    def __init__(self, s: float = 1.0):
        super().__init__()
        _check_positive("s", s)
        self.s = float(s)

    # ---- what kernels see -------------------------------------------------------------------------------
    def negative_spec(self) -> NegativeSpec:
        a, b = self.negative_constants()
        return NegativeSpec(self.negative_kind, self.s, float(a), float(b), self.reduction_kind,
                            float(self.logit_clamp()))

    def logit_clamp(self) -> float:
        """The binary family's clamp of every logit before its softplus (reductions.py); inf: none."""
        return NO_CLAMP

    def logit_shift(self) -> Optional[torch.Tensor]:
        """A differentiable scalar added to every negative logit (the binary family's bias); None: 0."""
        return None

    def row_loss(self, target: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Per-row loss from the target logit and the reduced negatives (here their log-sum-exp): softmax
        cross-entropy, logaddexp(lse_neg, z_y) - z_y. The binary family overrides it."""
        return torch.logaddexp(negatives, target) - target

    def negative_constants(self) -> tuple[float, float]:
        return 0.0, 0.0

    # ---- per-call hooks, in the order the driver calls them ---------------------------------------------
    def prepare_features(self, features: torch.Tensor, acc_dtype: torch.dtype):
        """(x_eff in the storage dtype, ||x|| in acc_dtype), both differentiable."""
        norm = features.to(acc_dtype).norm(dim=1)
        if not self.normalize_features:
            return features, norm
        x_eff = features.to(acc_dtype) / floored(norm).unsqueeze(1)
        return x_eff.to(features.dtype), norm

    def update_state(self, rows: RowInputs) -> None:
        """Advance running state (training mode only; called once per call, under no_grad)."""

    def row_params(self, rows: RowInputs) -> torch.Tensor:
        """(B, 2) per-row inputs of the negative function: threshold T_i and auxiliary U_i (no gradient)."""
        return torch.zeros(rows.cos.shape[0], 2, dtype=rows.cos.dtype, device=rows.cos.device)

    def target_logit(self, rows: RowInputs) -> torch.Tensor:
        raise NotImplementedError

    def regularizer(self, rows: RowInputs) -> Optional[torch.Tensor]:
        """Per-row term added to each row's loss (MagFace's g(a)); None for most losses."""
        return None

    def begin_call(self, rows: RowInputs) -> torch.Tensor:
        """State update (if training) then the row params; the one entry point every backend uses."""
        with torch.no_grad():
            detached = rows.detach()
            if self.training:
                self.update_state(detached)
            return self.row_params(detached)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._hparams().items())

    def _hparams(self) -> dict:
        return {"s": self.s}


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_range(name: str, value, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
