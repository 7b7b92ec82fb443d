"""Turning per-row losses into the returned loss, shared by the reference and the fused driver."""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_rows(per_row: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Ignored rows contribute 0; 'mean' divides by the number of non-ignored rows (0 rows -> loss 0)."""
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def empty_batch_loss(features, weight, reduction, rows: int = 0):
    """A batch with nothing to learn from (B = 0, or ``rows`` rows all without a target): loss 0 (or ``rows``
    zeros) connected to the features and to ``weight``, so backward gives zero gradients; ``weight`` None
    (a head with a fused optimizer) leaves the weight out of the graph: no dW is allocated, no update runs."""
    acc = accumulation_dtype(features.dtype)
    # sums of empty slices: exactly 0 even when weight holds a NaN (w.sum() * 0 would be NaN), still connected
    zero = features.reshape(-1)[:0].sum().to(acc)
    if weight is not None:
        zero = zero + weight.reshape(-1)[:0].sum().to(acc)
    return zero.expand(rows) if reduction == "none" else zero
