"""The portable backend: stream W in class chunks with an online log-sum-exp, recompute chunks in backward.

Memory: besides dW (C x d, the gradient itself) it allocates O(B x chunk) per chunk and O(B x d) for dx; no
B x C matrix and no normalised copy of W. Per chunk it runs two GEMMs in forward-recompute and two more in
backward (the GEMM floor of the whole loss is 4 x 2 B C d FLOPs: forward, recompute, dx, dW).

The loop is written once and takes an *epilogue*: the elementwise work on a (B x chunk) tile of fp32 logits.
``TorchEpilogue`` does it with PyTorch ops over ``losses/negatives.py``; the native backends pass fused
C++/CUDA epilogues to the same loop.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from ..losses.base import NORM_EPS
from . import filter_stats
from ..losses.negatives import NegativeSpec, negative_derivative, negative_logits

DEFAULT_CHUNK_SIZE = 8192


class Epilogue(Protocol):
    def forward_tile(self, cos: torch.Tensor, labels: torch.Tensor, col0: int, row_params: torch.Tensor,
                     spec: NegativeSpec, run_max: torch.Tensor, run_sum: torch.Tensor) -> None:
        """Merge logits of the negatives of this tile into the running max/sum (in place)."""

    def backward_tile(self, cos: torch.Tensor, labels: torch.Tensor, col0: int, row_params: torch.Tensor,
                      spec: NegativeSpec, lse: torch.Tensor, g_lse: torch.Tensor,
                      g_cos_target: torch.Tensor) -> torch.Tensor:
        """dL/dcos for this tile (target column: g_cos_target)."""


def _target_columns(labels: torch.Tensor, col0: int, width: int):
    """(rows, local columns) of the target pairs whose class falls in [col0, col0 + width)."""
    inside = (labels >= col0) & (labels < col0 + width)
    rows = inside.nonzero().squeeze(1)
    return rows, labels[rows] - col0


class TorchEpilogue:
    def forward_tile(self, cos, labels, col0, row_params, spec, run_max, run_sum):
        z = negative_logits(cos, spec, row_params)
        rows, cols = _target_columns(labels, col0, cos.shape[1])
        z[rows, cols] = float("-inf")
        new_max = torch.maximum(run_max, z.amax(dim=1))
        # rows whose max is still -inf have nothing to merge; keep exp() away from inf - inf
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        run_sum.mul_(torch.exp(run_max - shift)).add_(torch.exp(z - shift.unsqueeze(1)).sum(dim=1))
        run_max.copy_(new_max)

    def backward_tile(self, cos, labels, col0, row_params, spec, lse, g_lse, g_cos_target):
        z = negative_logits(cos, spec, row_params)
        rows, cols = _target_columns(labels, col0, cos.shape[1])
        z[rows, cols] = float("-inf")
        p = torch.exp(z - lse.unsqueeze(1)) * g_lse.unsqueeze(1)
        dcos = p.mul_(negative_derivative(cos, spec, row_params)).mul_(spec.scale)
        dcos[rows, cols] = g_cos_target[rows]
        return dcos


def _matmul_acc(a: torch.Tensor, b_t: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """a @ b_t in acc_dtype: low-precision storage is multiplied with fp32 accumulation and fp32 output."""
    if a.dtype == acc_dtype and b_t.dtype == acc_dtype:
        return a @ b_t
    if a.is_cuda and a.dtype == b_t.dtype:
        try:
            return torch.mm(a, b_t, out_dtype=acc_dtype)
        except (TypeError, RuntimeError):
            pass
    return a.to(acc_dtype) @ b_t.to(acc_dtype)


def _chunk_rows(weight: torch.Tensor, class_index: Optional[torch.Tensor], col0: int, col1: int) -> torch.Tensor:
    if class_index is None:
        return weight[col0:col1]
    return weight.index_select(0, class_index[col0:col1])


def _inv_norms(w: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    return 1.0 / w.to(acc_dtype).norm(dim=1).clamp_min(NORM_EPS)


def _num_columns(weight, class_index) -> int:
    return weight.shape[0] if class_index is None else class_index.shape[0]


def chunked_forward(x, weight, labels, row_params, class_index, spec: NegativeSpec, normalize_weight: bool,
                    chunk_size: int, epilogue: Epilogue) -> torch.Tensor:
    acc = row_params.dtype
    batch = x.shape[0]
    run_max = torch.full((batch,), float("-inf"), dtype=acc, device=x.device)
    run_sum = torch.zeros(batch, dtype=acc, device=x.device)
    num_cols = _num_columns(weight, class_index)
    for col0 in range(0, num_cols, chunk_size):
        col1 = min(col0 + chunk_size, num_cols)
        w = _chunk_rows(weight, class_index, col0, col1)
        cos = _matmul_acc(x, w.t(), acc)
        if normalize_weight:
            cos.mul_(_inv_norms(w, acc))
        epilogue.forward_tile(cos, labels, col0, row_params, spec, run_max, run_sum)
    return run_max + torch.log(run_sum)


def chunked_backward(x, weight, labels, row_params, class_index, spec: NegativeSpec, normalize_weight: bool,
                     lse, g_lse, g_cos_target, chunk_size: int, epilogue: Epilogue, grad_filter: float = 0.0):
    acc = row_params.dtype
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    # with a class subset only the sampled rows are written; the rest of dW must read as zero
    dweight = torch.empty_like(weight) if class_index is None else torch.zeros_like(weight)
    x_acc = x if x.dtype == acc else None
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    num_cols = _num_columns(weight, class_index)
    skipped = 0
    for col0 in range(0, num_cols, chunk_size):
        col1 = min(col0 + chunk_size, num_cols)
        w = _chunk_rows(weight, class_index, col0, col1)
        cos = _matmul_acc(x, w.t(), acc)
        if normalize_weight:
            inv_norm = _inv_norms(w, acc)
            cos.mul_(inv_norm)
        dcos = epilogue.backward_tile(cos, labels, col0, row_params, spec, finite_lse, g_lse, g_cos_target)
        if grad_filter > 0 and bool(dcos.abs().amax() < grad_filter):
            skipped += 1
            if class_index is None:
                dweight[col0:col1].zero_()
            continue
        if normalize_weight:
            # d cos_ij / d w_j = (x_i - cos_ij w_j/|w_j|) / |w_j|: fold 1/|w_j| into dcos, the rest into a
            # per-class correction of the dW rows
            col_dot = (dcos * cos).sum(dim=0)
            dcos.mul_(inv_norm)
        w_acc = w.to(acc)
        dx.addmm_(dcos, w_acc)
        if x_acc is None:
            x_acc = x.to(acc)
        dw = dcos.t() @ x_acc
        if normalize_weight:
            dw.sub_((col_dot * inv_norm * inv_norm).unsqueeze(1) * w_acc)
        if class_index is None:
            dweight[col0:col1].copy_(dw)
        else:
            dweight.index_copy_(0, class_index[col0:col1], dw.to(weight.dtype))
    if grad_filter > 0:
        filter_stats.record(skipped, -(-num_cols // chunk_size))
    return dx.to(x.dtype), dweight


_TORCH_EPILOGUE = TorchEpilogue()


def lse_forward(x, weight, labels, row_params, class_index, spec, normalize_weight, chunk_size):
    return chunked_forward(x, weight, labels, row_params, class_index, spec, normalize_weight,
                           chunk_size or DEFAULT_CHUNK_SIZE, _TORCH_EPILOGUE)


def lse_backward(x, weight, labels, row_params, class_index, spec, normalize_weight, lse, g_lse, g_cos_target,
                 chunk_size, grad_filter=0.0):
    return chunked_backward(x, weight, labels, row_params, class_index, spec, normalize_weight, lse, g_lse,
                            g_cos_target, chunk_size or DEFAULT_CHUNK_SIZE, _TORCH_EPILOGUE, grad_filter)
