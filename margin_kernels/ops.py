"""The core op as a registered PyTorch custom op, so torch.compile sees one opaque node with a known
backward instead of tracing (or breaking on) kernel launches.

``margin_lse`` returns, per row: the reduced negatives (their log-sum-exp, or for the binary family,
``ReductionKind.SOFTPLUS_SUM``, the sum of softplus(clamp(z_ij + shift))), the target pair's cosine and the
target class's weight norm. The target pair (``TargetPairs``: cosine, norm and the weight row it was taken
from) is computed once per call, before the op (the loss's state update needs it first), and passed in; the op
hands cosine and norm back as outputs so that their gradient flows into the op's backward, where dW is written
by the backend in one place and the B target rows' share is added to it, at the rows passed in (never
recomputed). In the model-parallel head the pair passed in is the global one (summed over the owning ranks)
while the op's labels mark only this shard's targets, so only the owner applies the target gradient, with no
collective in backward for it. ``shift`` (a (1,) tensor, zero for softmax losses) is differentiable: its
gradient, sum_ij dL/dz_ij, comes back from the backend's backward in a fixed order.

The op's arguments are the five input tensors (``backends.contract.OpInputs``), the target pair, the shift,
and the call's options as one value (``OpConfig``), flattened into the schema by ``OpConfig.pack`` and rebuilt
by ``OpConfig.unpack``: the schema below is generated from those, written nowhere else.

There is one backward (``backward``). Its ``sink`` argument (``backends.sinks``: where each chunk's dW rows
go) is None for the dense dW that autograd receives; the op's autograd formula passes an ``AccumulateSink``
when ``weight.grad`` already exists (micro-batch accumulation in place), and ``margin_lse(..., sink_factory=)``
(a fused optimizer, eager only) runs the same forward and backward through an ``autograd.Function`` that
carries the factory, since a registered op's arguments cannot be Python objects.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import subcenters
from .backends import get_backend, stores_norms
from .backends.chunk_loop import num_columns
from .backends.contract import CallState, OpConfig, OpInputs, RowGrads
from .backends.kept_tiles import KeptTiles, saved_numel
from .backends.sinks import AccumulateSink, ChunkSink
from .norms import floored, row_norms

#: (class_index, positions, values, sub_centers) -> a ChunkSink taking the chunks' dW rows and the B target
#: rows' norm gradient ``values`` at ``positions`` (column * K + sub-center) of the loop's row order
SinkFactory = Callable[[Optional[Tensor], Tensor, Tensor, int], ChunkSink]


class TargetPairs(NamedTuple):
    """Each row's target pair, computed once per call (``target_pairs``)."""

    cos: Tensor    # (B,) cosine (dot with raw weights) of the row and its target; 0 on rows without a target
    norm: Tensor   # (B,) ||w_y||; 1 on rows without a target
    rows: Tensor   # (B,) int64 weight row of the pair (the winning sub-center with K > 1); in range, any row
    #               on rows without a target (their gradient is zero)


def clamped_index(class_index: Optional[Tensor], num_classes: int) -> Optional[Tensor]:
    """Class ids clamped into [0, C) before any backend gathers W rows with them (the Triton kernels gather
    in-kernel): a bad id is never an out-of-bounds read. O(K); the driver turns bad ids into a NaN loss."""
    return None if class_index is None else class_index.clamp(0, num_classes - 1)


def weight_rows(weight: Tensor, class_index: Optional[Tensor], sub_centers: int) -> int:
    """The weight rows a call multiplies (K per column with sub-centers): what a kept-tile store counts."""
    return num_columns(weight, class_index, sub_centers) * sub_centers


def target_pairs(x: Tensor, weight: Tensor, labels: Tensor, class_index: Optional[Tensor], normalize_weight: bool,
                 acc_dtype: torch.dtype, sub_centers: int = 1) -> TargetPairs:
    """The target pair of each row (labels: column ids, -1 for none). Labels and class ids are clamped, so none
    can address memory outside W: the driver (functional.safe_columns) hands over ids in range, and gives bad
    ones a NaN loss."""
    valid = labels >= 0
    classes = labels.clamp(0, max(num_columns(weight, class_index, sub_centers) - 1, 0))
    if class_index is not None:
        classes = class_index[classes].clamp(0, weight.shape[0] // sub_centers - 1)
    if sub_centers > 1:
        cos, norm, rows = subcenters.target_pairs(x, weight, classes, normalize_weight, sub_centers, acc_dtype)
    else:
        w = weight.index_select(0, classes).to(acc_dtype)
        dot = (x.to(acc_dtype) * w).sum(dim=1)
        norm = row_norms(w, acc_dtype)
        cos, rows = (dot / floored(norm) if normalize_weight else dot), classes
    return TargetPairs(torch.where(valid, cos, torch.zeros_like(cos)),
                       torch.where(valid, norm, torch.ones_like(norm)), rows)


def kept_tile_layout(inputs: OpInputs, config: OpConfig) -> tuple[int, int, int, bool]:
    """(batch, weight rows, keep_cols, holds the inverse norms): the kept-tile buffer's layout
    (``kept_tiles.KeptTiles``), one formula for the op, its fake and the backward, which must agree on its size."""
    return (inputs.x.shape[0], weight_rows(inputs.weight, inputs.class_index, config.sub_centers), config.keep_cols,
            stores_norms(config.backend, config.normalize_weight, config.keep_cols))


def _safe_inputs(inputs: OpInputs, config: OpConfig) -> OpInputs:
    """The inputs with the class ids clamped (``clamped_index``), as every backend receives them."""
    return inputs._replace(class_index=clamped_index(inputs.class_index,
                                                     inputs.weight.shape[0] // config.sub_centers))


# ---- the two halves, written once ---------------------------------------------------------------------------
def forward(inputs: OpInputs, targets: TargetPairs, shift: Tensor, config: OpConfig):
    """(reduced negatives, target cos, target norm, kept-tile buffer). The pair comes back as copies (a custom
    op's outputs may not alias its inputs), now differentiable through the op. The fourth output is the flat
    kept-tile buffer (``backends.kept_tiles``: the inverse weight norms and the tiles of the first
    ``keep_cols`` weight rows), saved for the backward, not differentiable."""
    inputs = _safe_inputs(inputs, config)
    store = KeptTiles.allocate(*kept_tile_layout(inputs, config), inputs.row_params.dtype, inputs.x.device)
    lse = get_backend(config.backend).lse_forward(inputs, config, CallState(shift=shift, store=store))
    return lse, targets.cos.clone(), targets.norm.clone(), store.flat


def backward(inputs: OpInputs, config: OpConfig, grads: RowGrads, g_norm: Tensor, targets: TargetPairs,
             shift: Tensor, saved: Tensor, sink_factory: Optional[SinkFactory] = None):
    """(dx, dW, d shift): the backend's backward plus the target norms' share of dW,
    d||w_y||/dw_y = g_norm w_y / ||w_y|| at the pairs' rows (zero on rows without a target). Without a sink
    dW is dense and that share is added with index_put (sorted, deterministic); with one (``sink_factory``)
    the sink takes both, chunk by chunk, and dW is None."""
    inputs = _safe_inputs(inputs, config)
    x, weight, labels, row_params, class_index = inputs
    k = config.sub_centers
    valid = labels >= 0
    grads = grads._replace(g_cos=torch.where(valid, grads.g_cos, torch.zeros_like(grads.g_cos)))
    coef = torch.where(valid, g_norm, torch.zeros_like(g_norm)) / floored(targets.norm.to(g_norm.dtype))
    values = coef.unsqueeze(1) * weight.index_select(0, targets.rows).to(g_norm.dtype)
    sink = None
    if sink_factory is not None:
        # the target rows' places in the loop's row order: column * K + the winning sub-center
        columns = num_columns(weight, class_index, k)
        positions = labels.clamp(0, max(columns - 1, 0)) * k + targets.rows % k
        sink = sink_factory(class_index, positions, values, k)
    store = KeptTiles(saved, *kept_tile_layout(inputs, config))
    dx, dweight, dshift = get_backend(config.backend).lse_backward(inputs, config, grads,
                                                                   CallState(shift=shift, store=store, sink=sink))
    if sink is not None:
        sink.finish()
    else:
        dweight.index_put_((targets.rows,), values.to(dweight.dtype), accumulate=True)
    return dx, dweight, dshift.reshape(shift.shape).to(shift.dtype)


# ---- the registered ops: schemas generated from OpInputs and OpConfig ------------------------------------------
_INPUTS = "Tensor x, Tensor weight, Tensor labels, Tensor row_params, Tensor? class_index"
_TARGETS = "Tensor target_cos, Tensor target_norm, Tensor target_rows"
_N_INPUTS, _N_TARGETS = len(OpInputs._fields), len(TargetPairs._fields)
assert _INPUTS.count("Tensor") == _N_INPUTS and _TARGETS.count("Tensor") == _N_TARGETS
torch.library.define("margin_kernels::margin_lse",
                     f"({_INPUTS}, {_TARGETS}, Tensor shift, {OpConfig.schema()}) -> (Tensor, Tensor, Tensor, Tensor)")
torch.library.define("margin_kernels::margin_lse_backward",
                     f"({_INPUTS}, Tensor target_norm, Tensor target_rows, Tensor shift, Tensor lse, Tensor g_lse, "
                     f"Tensor g_cos, Tensor g_norm, Tensor saved, {OpConfig.schema()}) -> (Tensor, Tensor, Tensor)")
#: the op's arguments before the packed config: inputs, target pair, shift
_N_TENSORS = _N_INPUTS + _N_TARGETS + 1


def _split(args):
    """(inputs, target pair, shift, the rest) of the op's flat arguments."""
    inputs = OpInputs(*args[:_N_INPUTS])
    targets = TargetPairs(*args[_N_INPUTS:_N_INPUTS + _N_TARGETS])
    return inputs, targets, args[_N_TENSORS - 1], args[_N_TENSORS:]


def _forward_kernel(*args):
    inputs, targets, shift, rest = _split(args)
    return forward(inputs, targets, shift, OpConfig.unpack(rest))


def _forward_fake(*args):
    inputs, targets, shift, rest = _split(args)
    config = OpConfig.unpack(rest)
    x, acc = inputs.x, inputs.row_params.dtype
    saved = x.new_empty((saved_numel(*kept_tile_layout(inputs, config)),), dtype=acc)
    return x.new_empty((x.shape[0],), dtype=acc), torch.empty_like(targets.cos), torch.empty_like(targets.norm), \
        saved


def _backward_kernel(*args):
    norm, rows, shift, lse, g_lse, g_cos, g_norm, saved, *packed = args[_N_INPUTS:]
    return backward(OpInputs(*args[:_N_INPUTS]), OpConfig.unpack(packed), RowGrads(lse, g_lse, g_cos), g_norm,
                    TargetPairs(None, norm, rows), shift, saved)


def _backward_fake(*args):
    x, weight, shift = args[0], args[1], args[_N_INPUTS + 2]
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(shift)


for _name, _kernel, _fake in (("margin_lse", _forward_kernel, _forward_fake),
                              ("margin_lse_backward", _backward_kernel, _backward_fake)):
    torch.library.impl(f"margin_kernels::{_name}", "CompositeExplicitAutograd", _kernel)
    torch.library.register_fake(f"margin_kernels::{_name}", _fake)


# ---- autograd ------------------------------------------------------------------------------------------------
def _save(ctx, args, outputs) -> None:
    """What the backward needs, for the registered op and the sink Function alike."""
    inputs, targets, shift, rest = _split(args)
    ctx.config = OpConfig.unpack(rest)
    ctx.save_for_backward(*inputs, targets.norm, targets.rows, shift, outputs[0], outputs[3])


def _saved(ctx):
    """(inputs, target pair (its cosine unused), shift, lse, kept-tile buffer) as saved by ``_save``."""
    *inputs, norm, rows, shift, lse, saved = ctx.saved_tensors
    return OpInputs(*inputs), TargetPairs(None, norm, rows), shift, lse, saved


def _filled(lse: Tensor, *grads):
    """Incoming gradients with None (an output not used) as zeros: materialising is off for the kept tiles."""
    return [lse.new_zeros(lse.shape) if g is None else g for g in grads]


def _input_grads(dx, dweight, dshift) -> tuple:
    """The op's gradient per argument: x, weight and shift only."""
    grads = [None] * (_N_TENSORS + len(OpConfig().pack()))
    grads[0], grads[1], grads[_N_TENSORS - 1] = dx, dweight, dshift
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" as large as the kept tiles
    _save(ctx, inputs, output)


def _autograd_backward(ctx, g_lse, g_cos, g_norm, _g_saved):
    inputs, targets, shift, lse, saved = _saved(ctx)
    g_lse, g_cos, g_norm = _filled(lse, g_lse, g_cos, g_norm)
    if ctx.needs_input_grad[1] and accumulates_in_place(inputs.weight):  # beta = 1 into the existing gradient
        with torch.no_grad():
            dx, _, dshift = backward(inputs, ctx.config, RowGrads(lse, g_lse, g_cos), g_norm, targets, shift, saved,
                                     functools.partial(AccumulateSink, inputs.weight.grad))
        return _input_grads(dx, None, dshift)
    dx, dweight, dshift = torch.ops.margin_kernels.margin_lse_backward(
        *inputs, targets.norm, targets.rows, shift, lse, g_lse, g_cos, g_norm, saved, *ctx.config.pack())
    return _input_grads(dx, dweight, dshift)


torch.library.register_autograd("margin_kernels::margin_lse", _autograd_backward, setup_context=_setup_context)


def accumulates_in_place(weight: Tensor) -> bool:
    """Whether the backward can add into ``weight.grad`` in place: eager, a dense gradient of the weight's shape,
    dtype and device already there, and this backward pass would accumulate into it (``loss.backward()``, not
    ``torch.autograd.grad(loss, weight)`` nor ``backward(inputs=...)`` without it)."""
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


class _SinkOp(torch.autograd.Function):
    """The op with a gradient sink (a fused optimizer updating the weight in its backward): the same forward
    and backward as the registered op, eager only (heads refuse torch.compile in fused mode: it mutates the
    weight and the optimizer state, which the op's schema does not declare)."""

    @staticmethod
    def forward(ctx, sink_factory, *args):
        outputs = _forward_kernel(*args)
        ctx.sink_factory = sink_factory
        ctx.mark_non_differentiable(outputs[3])
        ctx.set_materialize_grads(False)
        _save(ctx, args, outputs)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lse, g_cos, g_norm, _g_saved):
        inputs, targets, shift, lse, saved = _saved(ctx)
        g_lse, g_cos, g_norm = _filled(lse, g_lse, g_cos, g_norm)
        dx, _, dshift = backward(inputs, ctx.config, RowGrads(lse, g_lse, g_cos), g_norm, targets, shift, saved,
                                 ctx.sink_factory)
        return (None,) + _input_grads(dx, None, dshift)


def margin_lse(inputs: OpInputs, targets: TargetPairs, shift: Tensor, config: OpConfig,
               sink_factory: Optional[SinkFactory] = None):
    """(reduced negatives, target cos, target norm, kept-tile buffer), differentiable in x, weight, shift and
    through the target pair's cosine and norm. ``sink_factory``: a fused optimizer's sink (eager only); dW then
    goes to it instead of autograd."""
    args = (*inputs, *targets, shift, *config.pack())
    if sink_factory is None:
        return torch.ops.margin_kernels.margin_lse(*args)
    return _SinkOp.apply(sink_factory, *args)
