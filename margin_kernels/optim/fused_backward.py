"""The backward of ``ops.margin_lse`` for a head with a fused optimizer: the backend's chunk loop with an
``UpdateSink`` in place of the dense dW. Eager only (heads refuse torch.compile in fused mode): it mutates
the weight and the optimizer state, which the op's schema does not declare."""
from __future__ import annotations

import torch

from ..backends import get_backend
from ..losses.negatives import NegativeKind, NegativeSpec
from ..losses.reductions import ReductionKind
from . import binding
from .sink import AccumulateSink, UpdateSink


def _sink_backward(make_sink, x, weight, labels, row_params, class_index, lse, g_lse, g_cos, g_norm, shift,
                   saved, normalize_weight, kind, scale, a, b, reduction, clamp, backend, chunk_size, grad_filter,
                   product, sub_centers, keep_cols):
    """The op's backward (``ops.margin_lse_backward``'s arguments) with ``make_sink(class_index, positions,
    values, sub_centers)`` receiving dW chunk by chunk: (dx, None, d shift)."""
    from ..backends.kept_tiles import KeptTiles
    from ..ops import clamped_index, kept_tile_layout, target_norm_gradient
    spec = NegativeSpec(NegativeKind(kind), scale, a, b, ReductionKind(reduction), clamp)
    k = sub_centers
    class_index = clamped_index(class_index, weight.shape[0] // k)
    valid = labels >= 0
    g_cos = torch.where(valid, g_cos, torch.zeros_like(g_cos))
    # the target norms' share is added to the chunk holding each target row, before the sink uses it: its
    # position in the loop's row order is column * K + the winning sub-center
    rows, values = target_norm_gradient(x, weight, labels, class_index, g_norm, normalize_weight, k,
                                        row_params.dtype)
    columns = weight.shape[0] // k if class_index is None else class_index.shape[0]
    positions = labels.clamp(0, max(columns - 1, 0)) * k + rows % k
    sink = make_sink(class_index, positions, values, k)
    store = KeptTiles(saved, *kept_tile_layout(x, weight, class_index, k, keep_cols, backend, normalize_weight))
    dx, _, dshift = get_backend(backend).lse_backward(x, weight, labels, row_params, class_index, spec,
                                                      normalize_weight, lse, g_lse, g_cos, chunk_size, grad_filter,
                                                      product=product, sub_centers=k, shift=shift, store=store,
                                                      sink=sink)
    sink.finish()
    return dx, None, dshift.reshape(shift.shape).to(shift.dtype)


@torch.no_grad()
def fused_backward(slot, x, weight, *rest):
    """(dx, None, d shift); the weight (and its optimizer state) updated in place by the optimizer bound to
    ``slot``."""
    optimizer, param = binding.lookup(slot)
    if param is not weight and param.data_ptr() != weight.data_ptr():
        raise RuntimeError("the fused optimizer is bound to another tensor than the weight this loss used")
    return _sink_backward(lambda index, pos, values, k: UpdateSink(optimizer, param, index, pos, values, k),
                          x, weight, *rest)


def accumulates_in_place(weight: torch.Tensor) -> bool:
    """Whether the unfused backward can add into ``weight.grad`` in place: eager, a dense gradient of the
    weight's shape, dtype and device already there, and this backward pass would accumulate into it
    (``loss.backward()``, not ``torch.autograd.grad(loss, weight)`` nor ``backward(inputs=...)`` without it)."""
    grad = weight.grad if weight.is_leaf else None
    if (grad is None or torch.compiler.is_compiling() or grad.layout != torch.strided
            or grad.shape != weight.shape or grad.dtype != weight.dtype or grad.device != weight.device):
        return False
    try:
        with torch.enable_grad():
            accumulate_node = weight.view_as(weight).grad_fn.next_functions[0][0]
        return bool(torch._C._will_engine_execute_node(accumulate_node))
    except (AttributeError, RuntimeError):  # an older torch without the query: take autograd's path
        return False


@torch.no_grad()
def accumulate_backward(x, weight, *rest):
    """(dx, None, d shift); dW added into ``weight.grad`` in place (the op's backward returns None for it)."""
    grad = weight.grad
    return _sink_backward(lambda index, pos, values, k: AccumulateSink(grad, index, pos, values, k),
                          x, weight, *rest)
