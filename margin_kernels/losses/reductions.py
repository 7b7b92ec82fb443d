"""How a row's negative logits are reduced: the softmax family's log-sum-exp or the binary (one-vs-all)
family's sum of softplus terms (SphereFace2, UniFace).

Every backend implements both over the same class tiles; the reduction is passed to kernels as an int
(``ReductionKind``), with two more inputs the binary family needs:

* ``shift`` beta: a learnable scalar added to every negative logit (SphereFace2's bias b, UniFace's -b~), a
  1-element tensor in the accumulation dtype, so its gradient sum_ij dL/dz_ij comes back from the op;
* ``clamp`` L: the logit is clamped to [-L, L] before the softplus, with zero gradient outside (UniFace's
  code clamps at +-s; inf: no clamp).

| kind         | row value over the negatives j        | dL/dz_ij (g_i: the row value's incoming gradient) |
|--------------|---------------------------------------|---------------------------------------------------|
| LSE          | log sum_j exp(z_ij)                   | g_i exp(z_ij - lse_i)                             |
| SOFTPLUS_SUM | sum_j softplus(clamp(z_ij + beta, L)) | g_i sigmoid(z_ij + beta) [abs(z_ij + beta) <= L]  |

(for LSE, beta = 0 and L = inf always.)
"""
from __future__ import annotations

import enum
import math

import torch


class ReductionKind(enum.IntEnum):
    LSE = 0
    SOFTPLUS_SUM = 1


NO_CLAMP = math.inf


def _unclamped(clamp) -> bool:
    """Whether the clamp is NO_CLAMP: a comparison, not math.isinf, so that dynamo can trace it when it has made
    the float a symbol (a scale that changed between calls)."""
    return clamp >= NO_CLAMP


def clamp_logits(z: torch.Tensor, clamp: float) -> torch.Tensor:
    """z clamped to [-L, L] (torch.clamp's gradient: 1 inside, boundaries included, 0 outside)."""
    return z if _unclamped(clamp) else z.clamp(-clamp, clamp)


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(z)) without overflow and without F.softplus's linear cut-off above 20 (which is off by
    ~2e-9 there, far beyond fp64 rounding); each branch sees only its own side, so neither produces an inf or
    a NaN gradient, and the gradient is the sigmoid everywhere (1/2 at 0)."""
    pos, neg = z.clamp_min(0.0), z.clamp_max(0.0)
    return torch.where(z > 0, pos + torch.log1p(torch.exp(-pos)), torch.log1p(torch.exp(neg)))


def softplus_terms(z: torch.Tensor, clamp: float) -> torch.Tensor:
    """softplus(clamp(z)), the binary family's per-element value (differentiable)."""
    return softplus(clamp_logits(z, clamp))


def softplus_grad(z: torch.Tensor, clamp: float) -> torch.Tensor:
    """d softplus(clamp(z)) / dz: the sigmoid where |z| <= L, else 0."""
    grad = torch.sigmoid(z)
    return grad if _unclamped(clamp) else torch.where(z.abs() <= clamp, grad, torch.zeros_like(grad))
