"""The normalisation every backend shares, written once: x / max(||x||, eps), as ``F.normalize``, with norms
that cannot overflow for any finite row.

Why not ``x.norm()``: it sums the squares in the computing dtype, so an fp32 row of norm > ~1.8e19 (sqrt of
fp32's largest value) has an infinite norm, and x / inf a zero cosine: a finite, wrong loss. Rows whose squares
could overflow are divided by their largest |entry| first (LAPACK nrm2's scaling); every other row is divided
by exactly 1, so its norm and its normalised row are bit for bit the plain ones, gradients included. Squares
that underflow need no care: they only occur in rows of norm < ~1e-19 (fp32), far below ``NORM_EPS``, where
the floor decides the result anyway.

``NORM_EPS`` is also read by the Triton kernels (``backends/triton_tiles.py``) and restated once in C++
(``csrc/margin_math.h``, ``kNormEps``; a test compares the compiled value with this one). Those kernels apply
the same rule to their own sums of squares (``triton_tiles.inverse_norms``, ``mk::inv_norm_rescaled``).
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12  # as F.normalize: x / max(||x||, eps); a zero row normalises to a zero row

#: the largest row length the overflow threshold covers (2^32 entries; d is far smaller in practice)
_MAX_LOG2_LENGTH = 32
#: inverse_norms works on blocks of at most this many elements, so its scaled copy is never W-sized
_BLOCK_ELEMENTS = 1 << 20


def floored(norm: torch.Tensor) -> torch.Tensor:
    """max(norm, eps): the denominator of every normalisation."""
    return norm.clamp_min(NORM_EPS)


def overflow_threshold(dtype: torch.dtype) -> float:
    """The largest |entry| below which no row's sum of squares can overflow: sqrt(max / 2^32) of the dtype the
    squares are summed in (fp32 for the 16-bit dtypes, whose reductions accumulate in fp32). ~2.8e14 in fp32."""
    summed = torch.promote_types(dtype, torch.float32)
    return torch.finfo(summed).max ** 0.5 / 2.0 ** (_MAX_LOG2_LENGTH / 2)


def row_scales(rows: torch.Tensor) -> torch.Tensor:
    """(..., 1): max |r| for rows with an entry above ``overflow_threshold`` (finite ones only: a row holding
    inf/NaN keeps its non-finite norm), exactly 1 elsewhere. Never differentiated: the norm is homogeneous."""
    top = torch.linalg.vector_norm(rows.detach(), ord=float("inf"), dim=-1, keepdim=True)
    scaled = (top > overflow_threshold(rows.dtype)) & torch.isfinite(top)
    return torch.where(scaled, top, torch.ones_like(top))


def row_norms(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """||r|| over the last dimension, computed in ``dtype`` (differentiable). Infinite only when the norm itself
    exceeds the dtype's range (an fp32 row of 3e38 entries), never because a square overflowed."""
    r = rows.to(dtype)
    scale = row_scales(r)
    return torch.linalg.vector_norm(r / scale, dim=-1) * scale.squeeze(-1)


def normalized(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(r / max(||r||, eps), ||r||) over the last dimension, in ``dtype`` (both differentiable). A scaled row's
    largest entry is exactly 1 after the division, so its norm is >= 1 and the floor cannot apply to it."""
    r = rows.to(dtype)
    scale = row_scales(r)
    unit = r / scale
    norm = torch.linalg.vector_norm(unit, dim=-1, keepdim=True)
    return unit / floored(norm), (norm * scale).squeeze(-1)


def inverse_norms(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(||r||, eps) for each row of a 2-D ``rows`` (computed in ``dtype``), in row blocks written into
    the one output vector, so the scaled copy stays at ``_BLOCK_ELEMENTS`` (4 MiB in fp32) and nothing W-sized
    or C-sized is allocated twice. Formed as (1 / scaled norm) / scale: right (down to fp32's subnormals) even
    for rows whose norm itself exceeds the dtype's range."""
    out = torch.empty(rows.shape[0], dtype=dtype, device=rows.device)
    step = max(1, _BLOCK_ELEMENTS // max(1, rows.shape[1]))
    for first in range(0, rows.shape[0], step):
        r = rows[first:first + step].to(dtype)
        scale = row_scales(r)
        torch.div(1.0 / floored(torch.linalg.vector_norm(r / scale, dim=1)), scale.squeeze(1),
                  out=out[first:first + step])
    return out
