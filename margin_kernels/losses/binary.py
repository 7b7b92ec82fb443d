"""The binary (one-vs-all) family: every class is a sigmoid classifier of its own, so a row's loss is a sum of
softplus terms over the classes (reductions.ReductionKind.SOFTPLUS_SUM) instead of a softmax over them.

A row's loss is  w_pos * softplus(-z_iy) + w_neg * sum_{j != y} softplus(z_ij)  with z_ij = s g(c_ij) + beta:
the kernels return the sum over the negatives (with the learnable scalar beta and, for UniFace, the clamp),
the target term is formed here on B-vectors. The bias is an ``nn.Parameter`` of the loss (a module inside
either head), so an optimiser over ``head.parameters()`` trains it and ``state_dict`` saves it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import MarginLoss, RowInputs, _check_positive, _check_range, straight_through
from .negatives import NegativeKind, power_base
from .reductions import ReductionKind, clamp_logits, softplus

#: opensphere's SphereFace2 clamps of the target angle (model/head/sphereface2.py)
ANGLE_EPS, ANGLE_MAX = 1e-5, 3.14159


class BinaryMarginLoss(MarginLoss):
    """Base of the binary family: the softplus-sum reduction and a learnable bias in the logits."""

    reduction_kind = ReductionKind.SOFTPLUS_SUM

    def logit_shift_parameter(self) -> nn.Parameter:
        """The learnable bias itself (``b`` of SphereFace2, ``bias`` of UniFace)."""
        raise NotImplementedError

    def _bias_parameter(self, value: float) -> nn.Parameter:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"the bias must be a finite number, got {value!r}")
        return nn.Parameter(torch.tensor([float(value)]))  # shape (1,), as the authors' Parameter(Tensor(1))


def _check_classes(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 2):
        raise ValueError(f"{name} must be an int >= 2 (the number of classes) or None, got {value!r}")


class SphereFace2(BinaryMarginLoss):
    """SphereFace2 (Wen et al., ICLR 2022) as opensphere's ``model/head/sphereface2.py``.

    z_iy = r (h(c_iy) with the target margin) + b, z_ij = r (h(c_ij) + m [C only]) + b, h(c) = 2((c+1)/2)^t - 1:
    ``magn_type`` 'C' subtracts m from the target's h (and adds it to the negatives'), 'A' adds m to the target
    angle, 'M' multiplies it by m. Loss per row (lw / r) [alpha softplus(-z_iy) + (1 - alpha) sum_j softplus(z_ij)]
    (the code's mean BCE over B x C with weights lw C / r times alpha or 1 - alpha). ``b`` is learnable; without
    an explicit ``b`` it is initialised by the code's formula from ``num_class`` (0 if neither is given).

    ``straight_through=True`` (the code): the adjustment h and the margins are computed under ``no_grad``, so
    the gradient is that of r c. False: the exact gradient (opensphere's ``sphereface2c.py`` for 'C').
    """

    no_partial_fc_reason = (
        "opensphere trains SphereFace2 on every class, and a uniform sample of the negatives (the batch's classes "
        "always kept) gives no unbiased estimate of its sum over the classes without per-class weights; use "
        "sample_rate=1.0")

    fixed_after_init = ("num_class",)  # only the initial bias b (assign b itself)

    @property
    def r(self) -> float:
        """The paper's scale r: the base's ``s`` under its name here (one value for the kernels and the target)."""
        return self.s

    @r.setter
    def r(self, value) -> None:
        self.s = value

    def __init__(self, magn_type: str = "C", alpha: float = 0.7, r: float = 40.0, m: float = 0.4, t: float = 3.0,
                 lw: float = 50.0, num_class: Optional[int] = None, b: Optional[float] = None,
                 straight_through: bool = True):
        super().__init__(r)
        if magn_type not in ("C", "A", "M"):
            raise ValueError(f"magn_type must be 'C', 'A' or 'M' (opensphere's margin types), got {magn_type!r}")
        _check_range("alpha", alpha, 1e-6, 1.0 - 1e-6)
        _check_range("m", m, 0.0, 2.0 if magn_type != "M" else 8.0)
        _check_range("t", t, 1.0, 64.0)  # t >= 1 keeps h' = t ((c+1)/2)^(t-1) bounded at c = -1
        _check_positive("lw", lw)
        _check_classes("num_class", num_class)
        self.magn_type, self.alpha, self.r, self.m, self.t, self.lw = magn_type, float(alpha), float(r), \
            float(m), float(t), float(lw)
        self.num_class, self.straight_through = num_class, bool(straight_through)
        if b is None:
            b = 0.0 if num_class is None else self.initial_bias(num_class)
        self.b = self._bias_parameter(b)

    @property
    def negative_kind(self) -> NegativeKind:  # type: ignore[override]
        return NegativeKind.POWER_ST if self.straight_through else NegativeKind.POWER

    def negative_constants(self):
        return self.t, (self.m if self.magn_type == "C" else 0.0)

    def initial_bias(self, num_class: int) -> float:
        """opensphere's initial b: where the expected target and negative terms balance (paper's Eqn. 7)."""
        r, m, t, alpha = self.r, self.m, self.t, self.alpha
        z = alpha / ((1.0 - alpha) * (num_class - 1.0))
        if self.magn_type == "C":
            ay, ai = r * (2.0 * 0.5 ** t - 1.0 - m), r * (2.0 * 0.5 ** t - 1.0 + m)
        else:
            theta_y = min(math.pi, math.pi / 2.0 + m) if self.magn_type == "A" else min(math.pi, m * math.pi / 2.0)
            ay, ai = r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0), r * (2.0 * 0.5 ** t - 1.0)
        temp = (1.0 - z) ** 2 + 4.0 * z * math.exp(ay - ai)
        return math.log(2.0 * z) - ai - math.log(1.0 - z + math.sqrt(temp))

    def _adjust(self, c: torch.Tensor) -> torch.Tensor:
        return 2.0 * power_base(c) ** self.t - 1.0

    def target_logit(self, rows: RowInputs):
        c = rows.cos
        if self.magn_type == "C":
            value = self._adjust(c) - self.m
        else:
            theta = torch.acos(c.clamp(-1.0 + ANGLE_EPS, 1.0 - ANGLE_EPS))
            theta = theta + self.m if self.magn_type == "A" else theta * self.m
            value = self._adjust(torch.cos(theta.clamp(ANGLE_EPS, ANGLE_MAX)))
        if self.straight_through:
            value = straight_through(value, c)
        return self.r * value + self.b.to(c.dtype)

    def logit_shift(self):
        return self.b

    def logit_shift_parameter(self):
        return self.b

    def row_loss(self, target, negatives):
        return (self.lw / self.r) * (self.alpha * softplus(-target) + (1.0 - self.alpha) * negatives)

    def _hparams(self):
        return {"magn_type": self.magn_type, "alpha": self.alpha, "r": self.r, "m": self.m, "t": self.t,
                "lw": self.lw, "num_class": self.num_class, "straight_through": self.straight_through}


class UniFace(BinaryMarginLoss):
    """UniFace's unified cross-entropy (Zhou et al., ICCV 2023) as the authors' ``Unified_Cross_Entropy_Loss``
    (CVI-SZU/UniFace, head.py).

    z_iy = s (c_iy - m) - bias, z_ij = s c_ij - bias, each clamped to [-s, s] (zero gradient outside: the
    code's clamp); loss per row softplus(-z_iy) + l sum_j softplus(z_ij). ``bias`` is the learnable unified
    threshold, initialised as the code does to log(out_features r 10) (0 if neither it nor ``out_features``
    is given); ``r`` is the code's Partial FC sampling ratio, used only for that initialisation here (sample
    with the head's ``sample_rate``: the sampled negatives enter the sum unweighted, as in the code).
    """

    fixed_after_init = ("r", "out_features")  # only the initial bias (assign bias itself)

    def __init__(self, s: float = 64.0, m: float = 0.4, l: float = 1.0, r: float = 1.0,  # noqa: E741
                 out_features: Optional[int] = None, bias: Optional[float] = None):
        super().__init__(s)
        _check_range("m", m, 0.0, 2.0)
        _check_positive("l", l)
        _check_range("r", r, 1e-9, 1.0)
        _check_classes("out_features", out_features)
        self.m, self.l, self.r, self.out_features = float(m), float(l), float(r), out_features
        if bias is None:
            bias = 0.0 if out_features is None else math.log(out_features * self.r * 10)
        self.bias = self._bias_parameter(bias)

    def logit_clamp(self):
        return self.s

    def target_logit(self, rows: RowInputs):
        return self.s * (rows.cos - self.m) - self.bias.to(rows.cos.dtype)

    def logit_shift(self):
        return -self.bias

    def logit_shift_parameter(self):
        return self.bias

    def row_loss(self, target, negatives):
        return softplus(-clamp_logits(target, self.s)) + self.l * negatives

    def _hparams(self):
        return {"s": self.s, "m": self.m, "l": self.l, "r": self.r, "out_features": self.out_features}
