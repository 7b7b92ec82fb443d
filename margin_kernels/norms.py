"""The normalisation every backend shares, written once: x / max(||x||, eps), as ``F.normalize``.

``NORM_EPS`` is also read by the Triton kernels (``backends/triton_tiles.py``) and restated once in C++
(``csrc/margin_math.h``, ``kNormEps``; a test compares the compiled value with this one).
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12  # as F.normalize: x / max(||x||, eps); a zero row normalises to a zero row


def floored(norm: torch.Tensor) -> torch.Tensor:
    """max(norm, eps): the denominator of every normalisation."""
    return norm.clamp_min(NORM_EPS)


def inverse_norms(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(||r||, eps) for each row of ``rows`` (computed in ``dtype``)."""
    return 1.0 / floored(rows.to(dtype).norm(dim=1))
