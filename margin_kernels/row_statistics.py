"""Per-row statistics over a row's negatives that a loss needs *before* its target logit (or its state update),
computed in one no-grad pass over the classes, never as a B x C matrix.

Two kinds (``StatisticsRequest.kind``):

* ``NEGATIVE_LSE``: log sum_{j != y_i} exp(s g(c_ij)) under a given negative spec and row params: the backend's
  own forward kernel runs it, through the registered op ``margin_lse``. AdaCos' faithful mode needs it at the *previous* scale
  (B_avg of the current batch) before it can choose this call's scale.
* ``HARD_NEGATIVES``: (sum of c_ij, count) over the negatives with c_ij > T_i (T_i = row_params[i, 0]),
  returned as (B, 2): NPCFace's mean hard-negative cosine. A chunked pass of torch GEMMs (any device).

Both are additive over class shards: the lse by log-sum-exp, the hard sums by a plain sum (the model-parallel
head combines them with one all-reduce). The reference backend derives them from its full cosine matrix
(``from_cosines``), so every backend is compared with an independent computation of the same numbers.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .backends.contract import OpConfig, OpInputs
from .backends.chunk_loop import _chunk_rows, _gemm_operand, _matmul_acc, default_chunk_size, num_columns
from .losses.negatives import negative_logits
from .losses.statistics import HARD_NEGATIVES, NEGATIVE_LSE, StatisticsRequest  # noqa: F401 (re-exported)
from .norms import inverse_norms

def from_cosines(cos: torch.Tensor, is_target: torch.Tensor, request: StatisticsRequest) -> torch.Tensor:
    """The statistic from a full (B, C) cosine matrix (the reference backend); ``is_target`` masks each row's
    target column."""
    cos = cos.detach()
    row_params = request.row_params.to(cos.dtype)
    if request.kind == NEGATIVE_LSE:
        z = negative_logits(cos, request.spec, row_params).masked_fill(is_target, float("-inf"))
        return torch.logsumexp(z, dim=1)
    hard = (cos > row_params[:, 0:1]) & ~is_target
    return torch.stack([torch.where(hard, cos, torch.zeros_like(cos)).sum(dim=1), hard.sum(dim=1).to(cos.dtype)],
                       dim=1)


@torch.no_grad()
def chunked(x_eff: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor, class_index: Optional[torch.Tensor],
            request: StatisticsRequest, normalize_weight: bool, backend: str, chunk_size: Optional[int],
            product: str) -> torch.Tensor:
    """The statistic over the columns of ``weight`` (or ``class_index``) without the B x C matrix; ``columns``
    are the op's column labels (-1: no target column in this problem)."""
    acc = request.row_params.dtype
    if request.kind == NEGATIVE_LSE:
        # through the registered op (forward only here): torch.compile sees one opaque node, not the kernels
        dummy = torch.zeros(x_eff.shape[0], dtype=acc, device=x_eff.device)
        targets = ops.TargetPairs(dummy, dummy, torch.zeros_like(columns))  # no gradient is taken here
        # the softmax reduction, K = 1: no statistics loss is binary or has sub-centers
        config = OpConfig(request.spec, normalize_weight, backend, chunk_size or 0, product=product)
        inputs = OpInputs(x_eff.contiguous(), weight, columns, request.row_params.contiguous(), class_index)
        return ops.margin_lse(inputs, targets, torch.zeros(1, dtype=acc, device=x_eff.device), config)[0]
    batch = x_eff.shape[0]
    # unchecked bad ids (check_values=False) are never read: the driver makes their rows NaN (K = 1 here)
    class_index = ops.clamped_index(class_index, weight.shape[0])
    chunk = chunk_size or default_chunk_size(batch, x_eff.device.type)
    threshold = request.row_params[:, 0:1]
    out = torch.zeros(batch, 2, dtype=acc, device=x_eff.device)
    x_mm = _gemm_operand(x_eff, acc)
    for col0 in range(0, num_columns(weight, class_index), chunk):
        w = _gemm_operand(_chunk_rows(weight, class_index, col0, col0 + chunk), acc)
        cos = _matmul_acc(x_mm, w.t(), acc)
        if normalize_weight:
            cos.mul_(inverse_norms(w, acc))
        hard = cos > threshold
        local = columns - col0
        inside = (local >= 0) & (local < cos.shape[1])
        rows = inside.nonzero().squeeze(1)
        hard[rows, local[rows]] = False
        out[:, 0] += torch.where(hard, cos, torch.zeros_like(cos)).sum(dim=1)
        out[:, 1] += hard.sum(dim=1).to(acc)
    return out
