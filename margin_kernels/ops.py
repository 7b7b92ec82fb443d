"""The core op as a registered PyTorch custom op, so torch.compile sees one opaque node with a known
backward instead of tracing (or breaking on) kernel launches.

``margin_lse`` returns, per row: the log-sum-exp over the negative logits, and the target pair's cosine and
target class's weight norm. The target pair is computed once per call, before the op (``target_pairs``: the
loss's state update needs it first), and passed in; the op hands it back as outputs so that its gradient
flows into the op's backward, where dW is written by the backend in one place (no dense zero tensor added to
it) and the B target rows' share is added to it. In the model-parallel head the pair passed in is the global
one (summed over the owning ranks) while the op's labels mark only this shard's targets, so only the owner
applies the target gradient, with no collective in backward for it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import get_backend
from .losses.negatives import NegativeKind, NegativeSpec
from .norms import floored


def _target_rows(labels: Tensor, class_index: Optional[Tensor]) -> Tensor:
    rows = labels.clamp_min(0)
    return rows if class_index is None else class_index[rows]


def target_pairs(x: Tensor, weight: Tensor, labels: Tensor, class_index: Optional[Tensor], normalize_weight: bool,
                 acc_dtype: torch.dtype):
    """(cos, ||w_y||) of each row's target pair; 0 and 1 on rows without a target (label -1)."""
    valid = labels >= 0
    w = weight.index_select(0, _target_rows(labels, class_index)).to(acc_dtype)
    dot = (x.to(acc_dtype) * w).sum(dim=1)
    norm = w.norm(dim=1)
    cos = dot / floored(norm) if normalize_weight else dot
    return torch.where(valid, cos, torch.zeros_like(cos)), torch.where(valid, norm, torch.ones_like(norm))


@torch.library.custom_op("margin_kernels::margin_lse", mutates_args=())
def margin_lse(x: Tensor, weight: Tensor, labels: Tensor, row_params: Tensor, class_index: Optional[Tensor],
               target_cos: Tensor, target_norm: Tensor, normalize_weight: bool, kind: int, scale: float, a: float,
               b: float, backend: str, chunk_size: int, grad_filter: float, product: str,
               optimizer_slot: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    """``target_cos``/``target_norm`` come back unchanged (copies: a custom op's outputs may not alias its
    inputs), now differentiable through this op. ``grad_filter`` is only used by the backward (carried here so
    the autograd context has it). ``optimizer_slot >= 0`` (optim.binding: a fused optimizer, eager only): the
    backward updates the weight in place instead of returning dW."""
    spec = NegativeSpec(NegativeKind(kind), scale, a, b)
    lse = get_backend(backend).lse_forward(x, weight, labels, row_params, class_index, spec, normalize_weight,
                                           chunk_size, product=product)
    return lse, target_cos.clone(), target_norm.clone()


@margin_lse.register_fake
def _margin_lse_fake(x, weight, labels, row_params, class_index, target_cos, target_norm, normalize_weight, kind,
                     scale, a, b, backend, chunk_size, grad_filter, product, optimizer_slot=-1):
    return x.new_empty((x.shape[0],), dtype=row_params.dtype), torch.empty_like(target_cos), \
        torch.empty_like(target_norm)


@torch.library.custom_op("margin_kernels::margin_lse_backward", mutates_args=())
def margin_lse_backward(x: Tensor, weight: Tensor, labels: Tensor, row_params: Tensor,
                        class_index: Optional[Tensor], lse: Tensor, g_lse: Tensor, g_cos: Tensor, g_norm: Tensor,
                        normalize_weight: bool, kind: int, scale: float, a: float, b: float, backend: str,
                        chunk_size: int, grad_filter: float, product: str) -> tuple[Tensor, Tensor]:
    spec = NegativeSpec(NegativeKind(kind), scale, a, b)
    valid = labels >= 0
    g_cos = torch.where(valid, g_cos, torch.zeros_like(g_cos))
    dx, dweight = get_backend(backend).lse_backward(x, weight, labels, row_params, class_index, spec,
                                                    normalize_weight, lse, g_lse, g_cos, chunk_size,
                                                    grad_filter, product=product)
    # d||w_y||/dw_y = w_y/||w_y||: B rows added with index_put (sorted, deterministic accumulation)
    rows, values = target_norm_gradient(weight, labels, class_index, g_norm)
    dweight.index_put_((rows,), values.to(dweight.dtype), accumulate=True)
    return dx, dweight


def target_norm_gradient(weight: Tensor, labels: Tensor, class_index: Optional[Tensor], g_norm: Tensor):
    """(weight rows, their gradient rows) of the target norms' share of dW: g_norm_i w_y / ||w_y|| (zero on rows
    without a target), in g_norm's dtype."""
    valid = labels >= 0
    rows = _target_rows(labels, class_index)
    w = weight.index_select(0, rows).to(g_norm.dtype)
    coef = torch.where(valid, g_norm, torch.zeros_like(g_norm)) / floored(w.norm(dim=1))
    return rows, coef.unsqueeze(1) * w


@margin_lse_backward.register_fake
def _margin_lse_backward_fake(x, weight, labels, row_params, class_index, lse, g_lse, g_cos, g_norm,
                              normalize_weight, kind, scale, a, b, backend, chunk_size, grad_filter, product):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, labels, row_params, class_index, _target_cos, _target_norm, *constants = inputs
    ctx.constants, ctx.optimizer_slot = constants[:-1], constants[-1]
    ctx.save_for_backward(x, weight, labels, row_params, class_index, output[0])


def _backward(ctx, g_lse, g_cos, g_norm):
    x, weight, labels, row_params, class_index, lse = ctx.saved_tensors
    zeros = lse.new_zeros(lse.shape)
    g_lse = zeros if g_lse is None else g_lse
    g_cos = zeros if g_cos is None else g_cos
    g_norm = zeros if g_norm is None else g_norm
    if ctx.optimizer_slot >= 0:  # the fused optimizer has updated the weight: no dW
        from .optim.fused_backward import fused_backward
        dx = fused_backward(ctx.optimizer_slot, x, weight, labels, row_params, class_index, lse, g_lse, g_cos,
                            g_norm, *ctx.constants)
        return (dx, None) + (None,) * 15
    from .optim.fused_backward import accumulate_backward, accumulates_in_place
    if ctx.needs_input_grad[1] and accumulates_in_place(weight):  # beta = 1 into the existing gradient
        dx = accumulate_backward(x, weight, labels, row_params, class_index, lse, g_lse, g_cos, g_norm,
                                 *ctx.constants)
        return (dx, None) + (None,) * 15
    dx, dweight = margin_lse_backward(x, weight, labels, row_params, class_index, lse, g_lse, g_cos, g_norm,
                                      *ctx.constants)
    return (dx, dweight) + (None,) * 15


margin_lse.register_autograd(_backward, setup_context=_setup_context)
