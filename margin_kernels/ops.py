"""The core op as a registered PyTorch custom op, so torch.compile sees one opaque node with a known
backward instead of tracing (or breaking on) kernel launches.

``margin_lse`` returns, per row: the log-sum-exp over the negative logits, and the target pair's cosine and
target class's weight norm. The target pair is computed once per call, before the op (``target_pairs``: the
loss's state update needs it first), and passed in; the op hands it back as outputs so that its gradient
flows into the op's backward, where dW is written by the backend in one place (no dense zero tensor added to
it) and the B target rows' share is added to it. In the model-parallel head the pair passed in is the global
one (summed over the owning ranks) while the op's labels mark only this shard's targets, so only the owner
applies the target gradient, with no collective in backward for it.

The first output is the row's reduced negatives: their log-sum-exp, or for the binary family
(``reduction`` = ReductionKind.SOFTPLUS_SUM) the sum of softplus(clamp(z_ij + shift)). ``shift`` (a (1,)
tensor, zero for softmax losses) is differentiable: its gradient, sum_ij dL/dz_ij, comes back from the
backend's backward in a fixed order.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import get_backend, stores_norms
from .backends.chunk_loop import num_columns
from .backends.kept_tiles import KeptTiles, saved_numel
from .losses.negatives import NegativeKind, NegativeSpec
from . import subcenters
from .losses.reductions import ReductionKind
from .norms import floored, row_norms


def _target_rows(labels: Tensor, class_index: Optional[Tensor], num_rows: int) -> Tensor:
    """The class of each row's target (its weight row without sub-centers), ``num_rows`` classes. Clamped, so
    no label or class id can address memory outside W: the driver (functional.safe_columns) already hands the
    op only ids in range, and gives bad ones NaN."""
    columns = num_rows if class_index is None else class_index.shape[0]
    rows = labels.clamp(0, max(columns - 1, 0))
    return rows if class_index is None else class_index[rows].clamp(0, num_rows - 1)


def clamped_index(class_index: Optional[Tensor], num_classes: int) -> Optional[Tensor]:
    """Class ids clamped into [0, C) before any backend gathers W rows with them (the Triton kernels gather
    in-kernel): a bad id is never an out-of-bounds read. O(K); the driver turns bad ids into a NaN loss."""
    return None if class_index is None else class_index.clamp(0, num_classes - 1)


def weight_rows(weight: Tensor, class_index: Optional[Tensor], sub_centers: int) -> int:
    """The weight rows a call multiplies (K per column with sub-centers): what a kept-tile store counts."""
    return num_columns(weight, class_index, sub_centers) * sub_centers


def target_pairs(x: Tensor, weight: Tensor, labels: Tensor, class_index: Optional[Tensor], normalize_weight: bool,
                 acc_dtype: torch.dtype, sub_centers: int = 1):
    """(cos, ||w_y||) of each row's target pair; 0 and 1 on rows without a target (label -1). With sub-centers
    the pair is the target class's best row (``subcenters.target_pairs``)."""
    valid = labels >= 0
    classes = _target_rows(labels, class_index, weight.shape[0] // sub_centers)
    if sub_centers > 1:
        cos, norm, _ = subcenters.target_pairs(x, weight, classes, normalize_weight, sub_centers, acc_dtype)
    else:
        w = weight.index_select(0, classes).to(acc_dtype)
        dot = (x.to(acc_dtype) * w).sum(dim=1)
        norm = row_norms(w, acc_dtype)
        cos = dot / floored(norm) if normalize_weight else dot
    return torch.where(valid, cos, torch.zeros_like(cos)), torch.where(valid, norm, torch.ones_like(norm))


def kept_tile_layout(x: Tensor, weight: Tensor, class_index: Optional[Tensor], sub_centers: int, keep_cols: int,
                     backend: str, normalize_weight: bool) -> tuple[int, int, int, bool]:
    """(batch, weight rows, keep_cols, holds the inverse norms): the kept-tile buffer's layout
    (``kept_tiles.KeptTiles``), one formula for the op, its fake and the backwards, which must agree on its size."""
    return (x.shape[0], weight_rows(weight, class_index, sub_centers), keep_cols,
            stores_norms(backend, normalize_weight, keep_cols))


def _target_weight_rows(x: Tensor, weight: Tensor, labels: Tensor, class_index: Optional[Tensor],
                        normalize_weight: bool, sub_centers: int, acc_dtype: torch.dtype) -> Tensor:
    """The weight row of each row's target pair (the winning sub-center with K > 1: the forward's choice,
    recomputed from the same inputs)."""
    rows = _target_rows(labels, class_index, weight.shape[0] // sub_centers)
    if sub_centers == 1:
        return rows
    return subcenters.target_pairs(x, weight, rows, normalize_weight, sub_centers, acc_dtype)[2]


@torch.library.custom_op("margin_kernels::margin_lse", mutates_args=())
def margin_lse(x: Tensor, weight: Tensor, labels: Tensor, row_params: Tensor, class_index: Optional[Tensor],
               target_cos: Tensor, target_norm: Tensor, shift: Tensor, normalize_weight: bool, kind: int,
               scale: float, a: float, b: float, reduction: int, clamp: float, backend: str, chunk_size: int,
               grad_filter: float, product: str, sub_centers: int,
               keep_cols: int, optimizer_slot: int = -1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``target_cos``/``target_norm`` come back unchanged (copies: a custom op's outputs may not alias its
    inputs), now differentiable through this op. ``grad_filter`` is only used by the backward (carried here so
    the autograd context has it). The fourth output is the flat kept-tile buffer (``backends.kept_tiles``:
    the inverse weight norms and the tiles of the first ``keep_cols`` weight rows), saved for the backward, not
    differentiable. ``optimizer_slot >= 0`` (optim.binding: a fused optimizer, eager only): the backward
    updates the weight in place instead of returning dW (dx and d shift as without it)."""
    spec = NegativeSpec(NegativeKind(kind), scale, a, b, ReductionKind(reduction), clamp)
    class_index = clamped_index(class_index, weight.shape[0] // sub_centers)
    store = KeptTiles.allocate(*kept_tile_layout(x, weight, class_index, sub_centers, keep_cols, backend,
                                                 normalize_weight), row_params.dtype, x.device)
    lse = get_backend(backend).lse_forward(x, weight, labels, row_params, class_index, spec, normalize_weight,
                                           chunk_size, product=product, sub_centers=sub_centers, shift=shift,
                                           store=store)
    return lse, target_cos.clone(), target_norm.clone(), store.flat


@margin_lse.register_fake
def _margin_lse_fake(x, weight, labels, row_params, class_index, target_cos, target_norm, shift, normalize_weight,
                     kind, scale, a, b, reduction, clamp, backend, chunk_size, grad_filter, product, sub_centers,
                     keep_cols, optimizer_slot=-1):
    saved = x.new_empty((saved_numel(*kept_tile_layout(x, weight, class_index, sub_centers, keep_cols, backend,
                                                       normalize_weight)),), dtype=row_params.dtype)
    return x.new_empty((x.shape[0],), dtype=row_params.dtype), torch.empty_like(target_cos), \
        torch.empty_like(target_norm), saved


@torch.library.custom_op("margin_kernels::margin_lse_backward", mutates_args=())
def margin_lse_backward(x: Tensor, weight: Tensor, labels: Tensor, row_params: Tensor,
                        class_index: Optional[Tensor], lse: Tensor, g_lse: Tensor, g_cos: Tensor, g_norm: Tensor,
                        shift: Tensor, saved: Tensor, normalize_weight: bool, kind: int, scale: float, a: float,
                        b: float, reduction: int, clamp: float, backend: str, chunk_size: int, grad_filter: float,
                        product: str, sub_centers: int, keep_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    spec = NegativeSpec(NegativeKind(kind), scale, a, b, ReductionKind(reduction), clamp)
    class_index = clamped_index(class_index, weight.shape[0] // sub_centers)
    valid = labels >= 0
    g_cos = torch.where(valid, g_cos, torch.zeros_like(g_cos))
    store = KeptTiles(saved, *kept_tile_layout(x, weight, class_index, sub_centers, keep_cols, backend,
                                               normalize_weight))
    dx, dweight, dshift = get_backend(backend).lse_backward(x, weight, labels, row_params, class_index, spec,
                                                            normalize_weight, lse, g_lse, g_cos, chunk_size,
                                                            grad_filter, product=product, sub_centers=sub_centers,
                                                            shift=shift, store=store)
    # d||w_y||/dw_y = w_y/||w_y||: B rows added with index_put (sorted, deterministic accumulation)
    rows, values = target_norm_gradient(x, weight, labels, class_index, g_norm, normalize_weight, sub_centers,
                                        row_params.dtype)
    dweight.index_put_((rows,), values.to(dweight.dtype), accumulate=True)
    return dx, dweight, dshift.reshape(shift.shape).to(shift.dtype)


def target_norm_gradient(x: Tensor, weight: Tensor, labels: Tensor, class_index: Optional[Tensor], g_norm: Tensor,
                         normalize_weight: bool, sub_centers: int, acc_dtype: torch.dtype):
    """(weight rows, their gradient rows) of the target norms' share of dW: g_norm_i w_y / ||w_y|| (zero on rows
    without a target), in g_norm's dtype; with sub-centers w_y is the target class's winning row."""
    rows = _target_weight_rows(x, weight, labels, class_index, normalize_weight, sub_centers, acc_dtype)
    w = weight.index_select(0, rows).to(g_norm.dtype)
    coef = torch.where(labels >= 0, g_norm, torch.zeros_like(g_norm)) / floored(row_norms(w, g_norm.dtype))
    return rows, coef.unsqueeze(1) * w


@margin_lse_backward.register_fake
def _margin_lse_backward_fake(x, weight, labels, row_params, class_index, lse, g_lse, g_cos, g_norm, shift, saved,
                              normalize_weight, kind, scale, a, b, reduction, clamp, backend, chunk_size,
                              grad_filter, product, sub_centers, keep_cols):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(shift)


def _setup_context(ctx, inputs, output):
    x, weight, labels, row_params, class_index, _target_cos, _target_norm, shift, *constants = inputs
    ctx.constants, ctx.optimizer_slot = constants[:-1], constants[-1]
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" as large as the kept tiles
    ctx.save_for_backward(x, weight, labels, row_params, class_index, shift, output[0], output[3])


def _backward(ctx, g_lse, g_cos, g_norm, _g_saved):
    x, weight, labels, row_params, class_index, shift, lse, saved = ctx.saved_tensors
    zeros = lse.new_zeros(lse.shape)
    g_lse = zeros if g_lse is None else g_lse
    g_cos = zeros if g_cos is None else g_cos
    g_norm = zeros if g_norm is None else g_norm
    args = (x, weight, labels, row_params, class_index, lse, g_lse, g_cos, g_norm, shift, saved, *ctx.constants)
    if ctx.optimizer_slot >= 0:  # the fused optimizer updates the weight in the backward: no dW
        from .optim.fused_backward import fused_backward
        dx, dweight, dshift = fused_backward(ctx.optimizer_slot, *args)
    else:
        from .optim.fused_backward import accumulate_backward, accumulates_in_place
        if ctx.needs_input_grad[1] and accumulates_in_place(weight):  # beta = 1 into the existing gradient
            dx, dweight, dshift = accumulate_backward(*args)
        else:
            dx, dweight, dshift = margin_lse_backward(*args)
    return (dx, dweight) + (None,) * 5 + (dshift,) + (None,) * 14


margin_lse.register_autograd(_backward, setup_context=_setup_context)
