"""The negative functions: how a non-target cosine c_ij becomes a logit z_ij = s * g(c_ij).

Every loss in docs/losses.md uses one of eight shapes of g. Each backend implements this same table once (here in
PyTorch, in ``backends/triton_negatives.py`` for Triton, in ``csrc/margin_math.h`` for C++/CUDA); the kind is
passed to kernels as an int and its parameters as two constants ``a, b`` and two per-row values:
``T_i = row_params[i, 0]`` (a threshold derived from the row's target cosine, no gradient) and
``U_i = row_params[i, 1]`` (an auxiliary per-row value, e.g. CurricularFace's t broadcast, no gradient).

| kind        | g(c)                                        | dg/dc                         |
|-------------|---------------------------------------------|-------------------------------|
| IDENTITY    | c                                           | 1                             |
| CLAMP       | clamp(c, a, b)                              | 1 if a <= c <= b else 0       |
| CURRICULAR  | c if c <= T else c * (U + c)                | 1 or U + 2c                   |
| MV          | c if c <= T else a*c + a - 1                | 1 or a                        |
| CIRCLE      | relu(c + a) * (c - a)   (alpha detached)    | relu(c + a)                   |
| FILTER      | c if c <= a else 0                          | 1 or 0                        |
| ROW_SCALE   | U * c   (a per-row scale; spec scale 1)      | U                             |
| AFFINE      | c if c <= T else a*c + b                    | 1 or a                        |
| POWER       | 2 ((c+1)/2)^a - 1 + b                       | a ((c+1)/2)^(a-1)             |
| POWER_ST    | 2 ((c+1)/2)^a - 1 + b                       | 1 (straight-through)          |

ROW_SCALE lets a scale that is a tensor (AdaCos' dynamic scale, module state) reach the kernels without a
host sync: it rides in U. AFFINE is MV's shape with a free intercept (NPCFace's t*c + a on hard negatives).

POWER is SphereFace2's similarity adjustment h(c) with t = a and the negatives' margin b = +m; the base
(c+1)/2 is floored at 0 (a cosine rounded below -1 would give a NaN power for non-integer t). POWER_ST has the
same value with the derivative of c: opensphere computes the adjustment under ``no_grad``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import math

import torch

from .reductions import NO_CLAMP, ReductionKind


class NegativeKind(enum.IntEnum):
    IDENTITY = 0
    CLAMP = 1
    CURRICULAR = 2
    MV = 3
    CIRCLE = 4
    FILTER = 5
    ROW_SCALE = 6
    AFFINE = 7
    POWER = 8
    POWER_ST = 9


@dataclass(frozen=True)
class NegativeSpec:
    """What a kernel needs to know to turn a tile of cosines into logits (besides per-row params)."""

    kind: NegativeKind = NegativeKind.IDENTITY
    scale: float = 1.0
    a: float = 0.0
    b: float = 0.0
    #: how the row's negative logits are reduced (reductions.py); the binary family's softplus clamp
    reduction: ReductionKind = ReductionKind.LSE
    clamp: float = NO_CLAMP


def power_base(c: torch.Tensor) -> torch.Tensor:
    """(c + 1) / 2 floored at 0: the base of POWER's power."""
    return ((c + 1.0) * 0.5).clamp_min(0.0)


def negative_value(c: torch.Tensor, spec: NegativeSpec, row_params: torch.Tensor) -> torch.Tensor:
    """g(c) for a (B, n) tile of cosines; row_params is (B, 2). Differentiable where the table says so."""
    kind, a, b = spec.kind, spec.a, spec.b
    if kind == NegativeKind.IDENTITY:
        return c
    if kind == NegativeKind.CLAMP:
        return c.clamp(a, b)
    threshold = row_params[:, 0:1]
    if kind == NegativeKind.CURRICULAR:
        return torch.where(c > threshold, c * (row_params[:, 1:2] + c), c)
    if kind == NegativeKind.MV:
        return torch.where(c > threshold, a * c + (a - 1.0), c)
    if kind == NegativeKind.CIRCLE:
        return torch.relu(c.detach() + a) * (c - a)
    if kind == NegativeKind.FILTER:
        return torch.where(c > a, torch.zeros_like(c), c)
    if kind == NegativeKind.ROW_SCALE:
        return row_params[:, 1:2] * c
    if kind == NegativeKind.AFFINE:
        return torch.where(c > threshold, a * c + b, c)
    if kind == NegativeKind.POWER:
        return 2.0 * power_base(c) ** a - 1.0 + b
    if kind == NegativeKind.POWER_ST:
        value = 2.0 * power_base(c.detach()) ** a - 1.0 + b
        return c + (value - c.detach())
    raise ValueError(f"unknown negative kind {kind!r}")


def negative_derivative(c: torch.Tensor, spec: NegativeSpec, row_params: torch.Tensor) -> torch.Tensor:
    """dg/dc for the same tile (the hand-written backward's factor)."""
    kind, a, b = spec.kind, spec.a, spec.b
    if kind == NegativeKind.IDENTITY:
        return torch.ones_like(c)
    if kind == NegativeKind.CLAMP:
        return ((c >= a) & (c <= b)).to(c.dtype)
    threshold = row_params[:, 0:1]
    if kind == NegativeKind.CURRICULAR:
        return torch.where(c > threshold, row_params[:, 1:2] + 2.0 * c, torch.ones_like(c))
    if kind == NegativeKind.MV:
        return torch.where(c > threshold, torch.full_like(c, a), torch.ones_like(c))
    if kind == NegativeKind.CIRCLE:
        return torch.relu(c + a)
    if kind == NegativeKind.FILTER:
        return (c <= a).to(c.dtype)
    if kind == NegativeKind.ROW_SCALE:
        return row_params[:, 1:2].expand_as(c).clone()
    if kind == NegativeKind.AFFINE:
        return torch.where(c > threshold, torch.full_like(c, a), torch.ones_like(c))
    if kind == NegativeKind.POWER:
        return a * power_base(c) ** (a - 1.0)
    if kind == NegativeKind.POWER_ST:
        return torch.ones_like(c)
    raise ValueError(f"unknown negative kind {kind!r}")


def negative_logits(c: torch.Tensor, spec: NegativeSpec, row_params: torch.Tensor) -> torch.Tensor:
    """z = s * g(c), NaN where c is not finite. With finite features a non-finite x.w_j comes only from a
    NaN/Inf in w_j, and that class must make the row's loss NaN: a raw -inf logit would drop out of the sum
    and leave a finite, wrong loss. Every backend applies the same rule (docs/losses.md, "Bad values")."""
    z = spec.scale * negative_value(c, spec, row_params)
    return torch.where(torch.isfinite(c), z, torch.full_like(z, float("nan")))


def derivative_bound(spec: NegativeSpec, row_params: torch.Tensor) -> torch.Tensor:
    """An upper bound of |dg/dc| over c in [-1, 1], from the table above (a 0-d tensor on row_params' device;
    CURRICULAR's depends on the rows' U). What a kernel needs to scale dL/dcos into a narrow dtype."""
    if spec.kind == NegativeKind.CURRICULAR:  # U + 2c
        return 2.0 + row_params[:, 1].abs().max()
    if spec.kind == NegativeKind.ROW_SCALE:  # U
        return row_params[:, 1].abs().max() if row_params.shape[0] else row_params.new_tensor(1.0)
    if spec.kind in (NegativeKind.MV, NegativeKind.AFFINE):  # 1 or a
        return row_params.new_tensor(max(1.0, abs(spec.a)))
    if spec.kind == NegativeKind.CIRCLE:  # relu(c + a)
        return row_params.new_tensor(1.0 + abs(spec.a))
    if spec.kind == NegativeKind.POWER:  # a base^(a-1), base in [0, 1]: a for a >= 1, unbounded below 1
        return row_params.new_tensor(abs(spec.a) if spec.a >= 1.0 else math.inf)
    return row_params.new_tensor(1.0)  # IDENTITY, CLAMP, FILTER, POWER_ST: 0 or 1
