"""The backward of ``ops.margin_lse`` for a head with a fused optimizer: the backend's chunk loop with an
``UpdateSink`` in place of the dense dW. Eager only (heads refuse torch.compile in fused mode): it mutates
the weight and the optimizer state, which the op's schema does not declare."""
from __future__ import annotations

import torch

from ..backends import get_backend
from ..losses.negatives import NegativeKind, NegativeSpec
from . import binding
from .sink import AccumulateSink, UpdateSink


def _sink_backward(make_sink, x, weight, labels, row_params, class_index, lse, g_lse, g_cos, g_norm,
                   normalize_weight, kind, scale, a, b, backend, chunk_size, grad_filter, product):
    """The op's backward with ``make_sink(extra_columns, extra_values)`` receiving dW chunk by chunk: dx."""
    from ..ops import target_norm_gradient
    spec = NegativeSpec(NegativeKind(kind), scale, a, b)
    valid = labels >= 0
    g_cos = torch.where(valid, g_cos, torch.zeros_like(g_cos))
    # the target norms' share is added to the chunk holding each target column, before the sink uses it
    _, values = target_norm_gradient(weight, labels, class_index, g_norm)
    sink = make_sink(labels.clamp_min(0), values)
    dx, _ = get_backend(backend).lse_backward(x, weight, labels, row_params, class_index, spec, normalize_weight,
                                              lse, g_lse, g_cos, chunk_size, grad_filter, product=product,
                                              sink=sink)
    getattr(sink, "finish", lambda: None)()
    return dx


@torch.no_grad()
def fused_backward(slot, x, weight, labels, row_params, class_index, *rest):
    """dx; the weight (and its optimizer state) updated in place by the optimizer bound to ``slot``."""
    optimizer, param = binding.lookup(slot)
    if param is not weight and param.data_ptr() != weight.data_ptr():
        raise RuntimeError("the fused optimizer is bound to another tensor than the weight this loss used")
    return _sink_backward(lambda cols, values: UpdateSink(optimizer, param, class_index, cols, values),
                          x, weight, labels, row_params, class_index, *rest)


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
def accumulate_backward(x, weight, labels, row_params, class_index, *rest):
    """dx; dW added into ``weight.grad`` in place (the op's backward then returns None for the weight)."""
    grad = weight.grad
    return _sink_backward(lambda cols, values: AccumulateSink(grad, class_index, cols, values),
                          x, weight, labels, row_params, class_index, *rest)
