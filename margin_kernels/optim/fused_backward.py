"""The backward of ``ops.margin_lse`` for a head with a fused optimizer: the backend's chunk loop with an
``UpdateSink`` in place of the dense dW. Eager only (heads refuse torch.compile in fused mode): it mutates
the weight and the optimizer state, which the op's schema does not declare."""
from __future__ import annotations

import torch

from ..backends import get_backend
from ..losses.negatives import NegativeKind, NegativeSpec
from . import binding
from .sink import UpdateSink


@torch.no_grad()
def fused_backward(slot, x, weight, labels, row_params, class_index, lse, g_lse, g_cos, g_norm, normalize_weight,
                   kind, scale, a, b, backend, chunk_size, grad_filter, product):
    """dx; the weight (and its optimizer state) updated in place by the optimizer bound to ``slot``."""
    from ..ops import target_norm_gradient
    optimizer, param = binding.lookup(slot)
    if param is not weight and param.data_ptr() != weight.data_ptr():
        raise RuntimeError("the fused optimizer is bound to another tensor than the weight this loss used")
    spec = NegativeSpec(NegativeKind(kind), scale, a, b)
    valid = labels >= 0
    g_cos = torch.where(valid, g_cos, torch.zeros_like(g_cos))
    # the target norms' share is added to the chunk holding each target column, before the update
    _, values = target_norm_gradient(weight, labels, class_index, g_norm)
    sink = UpdateSink(optimizer, param, class_index, labels.clamp_min(0), values)
    dx, _ = get_backend(backend).lse_backward(x, weight, labels, row_params, class_index, spec, normalize_weight,
                                              lse, g_lse, g_cos, chunk_size, grad_filter, product=product,
                                              sink=sink)
    sink.finish()
    return dx
