"""The Triton backend: the loss fused into GEMM epilogues (kernels in triton_forward / triton_backward).

Implements the backend contract (see ``backends/__init__.py``) on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter, how CI tests it; the variable must be set before the process
first imports triton). Forward: one kernel (triton_forward). Backward: three GEMM-shaped kernels per class
chunk, each of its three products done once (triton_backward's docstring has the design and why). Memory
besides dW: a (splits, B) forward partial; in backward the B x chunk dL/dcos buffer (at most
``triton_configs.BACKWARD_BUFFER_BYTES``), its per-class partials and (splits, B, d) dx partials; no B x C
matrix, no copy of W or of W[class_index]. ``chunk_size`` (the torch backend's knob) is ignored: tile sizes
and the backward's chunk come from triton_configs.

Precision: W and x are read in their storage dtype (fp32, bf16, fp16, fp64) and every product accumulates in
the accumulation dtype of ``row_params`` (fp32; fp64 for fp64 inputs). fp32 storage multiplies as
``product`` says (margin_kernels.precision: autocast's dtype, else torch.get_float32_matmul_precision():
IEEE, TF32 or bf16), the operands cast in registers after the load. The backward's gradient GEMMs take
dL/dcos rounded to their operand dtype (bf16/fp16 tensor cores; for fp16 it is first multiplied by one power
of two, ``_dc_factor``, so small gradients do not flush to zero).

Gradient filtering (``grad_filter = tau > 0``): a (row block x class tile) whose every |dL/dcos| is below tau
skips its dx and dW products. Every skipped entry is < tau in magnitude, so per row and class
    ||dx_i - exact|| <= tau * sum_j ||w_j|| / ||w_j||_(normalised: 1)   over the row's skipped columns j,
    ||dW_j - exact|| <= tau * (1 + [normalised]) * sum_i ||x_i|| / ||w_j||_(raw: 1)   over the skipped rows i
(the second term is the ||w|| Jacobian, |c_ij| <= 1). The loss is unchanged (the forward never filters).
Skipped and visited tiles (row block x class tile) are added to ``filter_stats`` as device tensors (no
sync).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
import triton  # an ImportError here makes the registry report the backend as unavailable

from . import filter_stats, gradient_scale
from . import triton_configs as configs
from ..losses.reductions import ReductionKind
from ..precision import CAST_DTYPES, FLOAT_DTYPES, PRODUCTS
from .chunk_loop import finite_lse, num_columns, zero_shift

_autotuned: dict = {}


def _interpret_requested() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the variable through knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its interpreter in this process.

    That is fixed when triton is first imported: its own library functions (tl.sum, tl.max, tl.cdiv ...) are
    @triton.jit functions decorated then, for the interpreter only if TRITON_INTERPRET=1 was already set."""
    return type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"


def unavailable_reason():
    if _interpret_requested() != interpret_mode():
        return ("TRITON_INTERPRET changed after triton was imported; Triton's interpreter works only when the "
                "variable is set before the first `import triton` of the process")
    if interpret_mode() or torch.cuda.is_available():
        return None
    return ("the 'triton' backend needs a CUDA device (or TRITON_INTERPRET=1, set before triton is imported, to "
            "run its kernels on the CPU in Triton's interpreter)")


def _kernels():
    """(forward module, backward module), imported on first use (importing them decorates the kernels)."""
    forward = importlib.import_module(f"{__package__}.triton_forward")
    backward = importlib.import_module(f"{__package__}.triton_backward")
    return forward, backward


def _autotuned_kernel(kernel):
    """The forward kernel wrapped in triton.autotune over the H100 list (cached). The key is the batch bucket,
    d, the product mode and what restricts the candidate tilings (sub-centers, the epilogue's kind and
    reduction, keeping tiles: ``prune_forward``), and implicitly the dtypes; never the class count: a new C or
    Partial FC sample size reuses the tuned config instead of timing every config again."""
    if kernel not in _autotuned:
        _autotuned[kernel] = triton.autotune(configs=configs.forward_autotune_configs(),
                                             key=["B_BUCKET", "D", "PRODUCT", "SUB_CENTERS", "KIND", "REDUCTION",
                                                  "KEEP"],
                                             prune_configs_by={"early_config_prune": configs.prune_forward})(kernel)
    return _autotuned[kernel]


@functools.lru_cache(maxsize=64)
def _constants(scale: float, a: float, b: float, clamp: float, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """(scale, a, b, the binary reduction's clamp) as a tensor in the accumulation dtype: Triton passes Python floats as fp32, which would
    round fp64 runs' constants. Cached, so steady-state calls create no tensor (CUDA-graph friendly)."""
    return torch.tensor([scale, a, b, clamp], dtype=dtype, device=device)


def _check_inputs(x, weight, row_params, interpret: bool) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if not interpret and x.device.type != "cuda":
        raise RuntimeError(f"the 'triton' backend runs on CUDA tensors, got x on {x.device}; set "
                           "TRITON_INTERPRET=1 before importing triton to run its kernels on the CPU")
    if x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"the 'triton' backend takes x and weight of one dtype among fp16, bf16, fp32, fp64; "
                        f"got x {x.dtype}, weight {weight.dtype}")
    if row_params.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"row_params must be fp32 or fp64 (the accumulation dtype), got {row_params.dtype}")


def _common_args(x, weight, labels, row_params, class_index, spec):
    """Pointer arguments shared by all kernels, made contiguous where the kernels assume it (O(B) tensors
    only: x and W are passed with their strides, never copied)."""
    acc = row_params.dtype
    labels = labels.to(torch.int64).contiguous()
    index = labels if class_index is None else class_index.to(torch.int64).contiguous()  # unused if no index
    consts = _constants(float(spec.scale), float(spec.a), float(spec.b), float(spec.clamp), acc, x.device)
    return (x, weight, labels, row_params.contiguous(), consts, index)


def _common_meta(x, class_index, spec, normalize_weight, interpret: bool, product: str) -> dict:
    return dict(KIND=int(spec.kind), REDUCTION=int(spec.reduction), NORMALIZE=bool(normalize_weight),
                HAS_INDEX=class_index is not None,
                UPCAST=interpret and (x.dtype == torch.bfloat16 or product == "bf16"),
                PRODUCT=PRODUCTS.index(product))


def _backward_layout(x, num_cols: int, acc, product: str, interpret: bool, spec, sub_centers: int = 1):
    """(tiles, dL/dcos buffer dtype, classes per chunk) of the backward; the forward needs the chunk too, to
    lay out the tiles it keeps (``kept_tiles``) as the backward will read them."""
    tiles = configs.backward_tiles(interpret, x.element_size(), x.device, int(spec.kind), int(spec.reduction),
                                   sub_centers, x.dtype == torch.float16)
    # dL/dcos in the gradient GEMMs' operand dtype: 16-bit storage, or the 16-bit product of fp32 storage
    # (tensor cores); else the accumulation dtype
    buffer_dtype = x.dtype if x.element_size() == 2 else CAST_DTYPES.get(product, acc)
    chunk = configs.backward_chunk(tiles, x.shape[0], num_cols, torch.finfo(buffer_dtype).bits // 8 * sub_centers,
                                   interpret)
    return tiles, buffer_dtype, chunk


#: the kernels keep K = 1 tiles only (``_store_args``): the op allocates no tiles for sub-center losses here
KEEPS_SUB_CENTER_TILES = False
#: the forward writes the inverse norms only when it keeps tiles: without a budget the op allocates none
NORMS_ONLY_WITH_TILES = True


def _store_args(store, chunk: int, fallback: torch.Tensor, sub_centers: int):
    """(norms, tiles, kept columns) pointers and count of a kept-tile store; ``fallback`` for absent parts (the
    kernels never read them then). Sub-center tiles are never kept here (the kernels keep K = 1 tiles only):
    with K > 1 the store is left unused and every chunk is recomputed."""
    if store is None or sub_centers > 1 and not KEEPS_SUB_CENTER_TILES:
        return fallback, fallback, 0
    kept = store.use_chunk(chunk)
    norms = fallback if store.inv_norm is None else store.inv_norm
    return norms, (store.tiles if kept else fallback), kept


def lse_forward(inputs, config, state):
    """The forward kernel over every class (``config.chunk_size`` is not used: tiles come from triton_configs)."""
    x, weight, labels, row_params, class_index = inputs
    spec, normalize_weight, product, sub_centers = (config.spec, config.normalize_weight, config.product,
                                                    config.sub_centers)
    interpret = interpret_mode()
    _check_inputs(x, weight, row_params, interpret)
    forward, _ = _kernels()
    acc = row_params.dtype
    batch, dim = x.shape
    num_cols = num_columns(weight, class_index, sub_centers)
    splits = configs.class_splits(x.device, interpret, batch, num_cols, acc.itemsize)
    partial = torch.empty((splits, batch), dtype=acc, device=x.device)
    chunk = _backward_layout(x, num_cols, acc, product, interpret, spec, sub_centers)[2]
    norms, kept_tiles, kept = _store_args(state.store, chunk, partial, sub_centers)
    args = _common_args(x, weight, labels, row_params, class_index, spec) + (
        partial, norms, kept_tiles, batch, num_cols, dim, x.stride(0), x.stride(1), weight.stride(0),
        weight.stride(1), splits, configs.batch_bucket(batch), zero_shift(state.shift, row_params), kept, chunk)
    meta = _common_meta(x, class_index, spec, normalize_weight, interpret, product)
    meta["SUB_CENTERS"] = sub_centers
    # the norms only for a backward that reads kept tiles (recomputed chunks form them in the dcos kernel):
    # without a budget the forward is the very kernel variant `python -m bench kernels --check` compiles
    meta.update(SAVE_NORMS=kept > 0 and normalize_weight, KEEP=kept > 0, FAST=not interpret)
    tiles = configs.forward_tiles(interpret, x.element_size(), product in ("bf16", "fp16"), sub_centers,
                                  meta["KIND"], meta["REDUCTION"], kept > 0, x.device)
    if tiles is None:
        grid = lambda META: (triton.cdiv(batch, META["BLOCK_B"]), splits)  # noqa: E731
        _autotuned_kernel(forward.lse_forward_kernel)[grid](*args, **meta)
    else:
        forward.lse_forward_kernel[(triton.cdiv(batch, tiles.block_b), splits)](
            *args, **meta, BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_K=tiles.block_k,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    # fixed-order merge of the class splits (logsumexp of all -inf is -inf: rows without negatives)
    if splits == 1:
        return partial[0]
    return partial.sum(dim=0) if spec.reduction == ReductionKind.SOFTPLUS_SUM else torch.logsumexp(partial, dim=0)


def _dc_factor(buffer_dtype, spec, row_params, g_lse, g_cos_target) -> torch.Tensor:
    """dC's power-of-two factor (gradient_scale; 1 unless the buffer is fp16). dC is stored without 1/|w_j|:
    the kernels apply it in registers, so the bound needs no column scale."""
    if not gradient_scale.needs_factor(buffer_dtype):
        return row_params.new_ones(1)
    return gradient_scale.operand_factor(spec, row_params, g_lse, g_cos_target)


def lse_backward(inputs, config, grads, state):
    """The three kernels of triton_backward, chunk by chunk over the classes (see its docstring). With K
    sub-centers the dcos kernel runs over classes and the gradient GEMMs over their K rows each. With a
    ``sink`` (a fused optimizer) the dW kernel writes each chunk's rows into a (chunk K) x d buffer in the
    accumulation dtype, handed to ``sink.store`` after the dx kernel has read the chunk's weight rows: the update
    rule stays the one written in torch ops (optim.rules) for every backend, at the cost of one chunk-sized
    write and read per chunk, small beside the update's own traffic over W and its state."""
    x, weight, labels, row_params, class_index = inputs
    spec, normalize_weight, product, grad_filter = (config.spec, config.normalize_weight, config.product,
                                                    config.grad_filter)
    lse, g_lse, g_cos_target = grads
    store, sink = state.store, state.sink
    interpret = interpret_mode()
    _check_inputs(x, weight, row_params, interpret)
    _, backward = _kernels()
    acc = row_params.dtype
    batch, dim = x.shape
    k = config.sub_centers
    num_cols = num_columns(weight, class_index, k)
    common = _common_args(x, weight, labels, row_params, class_index, spec)
    index = common[5]
    lse = finite_lse(lse).to(acc).contiguous()
    g_lse, g_cos_target = g_lse.to(acc).contiguous(), g_cos_target.to(acc).contiguous()
    meta = _common_meta(x, class_index, spec, normalize_weight, interpret, product)
    use_filter = grad_filter > 0 and k == 1  # triton_backward: no filtering with sub-centers
    tiles, buffer_dtype, chunk = _backward_layout(x, num_cols, acc, product, interpret, spec, k)
    launch = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    row_blocks = triton.cdiv(batch, tiles.block_b)
    col_tiles = triton.cdiv(chunk * k, tiles.block_c)  # the gradient GEMMs' K steps: tiles of weight rows
    d_tiles = triton.cdiv(dim, tiles.out_d)  # the gradient GEMMs' output tiles over d
    splits = configs.dx_splits(x.device, interpret, row_blocks * d_tiles, col_tiles, batch, dim)

    factor = _dc_factor(buffer_dtype, spec, row_params, g_lse, g_cos_target)
    # whole row blocks: the dcos kernel stores its tiles unmasked (the padded rows' dc is 0)
    dc = torch.empty((row_blocks * tiles.block_b, chunk * k), dtype=buffer_dtype, device=x.device)
    col_dot = torch.empty((row_blocks, chunk * k), dtype=acc, device=x.device)
    inv_norm = torch.empty(chunk * k, dtype=acc, device=x.device)
    norms, kept_tiles, kept = _store_args(store, chunk, inv_norm, k)
    # gradient filtering: the dcos kernel's flags per (row block, class tile) of a chunk, and the K-step lists
    # active_lists_kernel makes of them for the dx kernel (per row block) and the dW kernel (per class group)
    groups = triton.cdiv(col_tiles, tiles.dw_group)
    flags = torch.ones(row_blocks * col_tiles if use_filter else 1, dtype=torch.int8, device=x.device)
    tile_lists = torch.empty(row_blocks * col_tiles if use_filter else 1, dtype=torch.int32, device=x.device)
    tile_counts = torch.empty(row_blocks if use_filter else 1, dtype=torch.int32, device=x.device)
    block_lists = torch.empty(groups * row_blocks if use_filter else 1, dtype=torch.int32, device=x.device)
    block_counts = torch.empty(groups if use_filter else 1, dtype=torch.int32, device=x.device)
    if sink is None:
        # with a class subset only the sampled rows of dW are written, the rest must read as zero
        dweight = torch.empty_like(weight) if class_index is None else torch.zeros_like(weight)
    else:
        dweight = torch.empty((chunk * k, dim), dtype=acc, device=x.device)
    partial = torch.zeros((splits, batch, dim), dtype=acc, device=x.device)
    gemm_meta = dict(NORMALIZE=meta["NORMALIZE"], HAS_INDEX=meta["HAS_INDEX"], UPCAST=meta["UPCAST"],
                     PRODUCT=meta["PRODUCT"], FILTER=use_filter, SUB_CENTERS=k)
    skipped, visited = [], 0
    shift = zero_shift(state.shift, row_params)
    binary = spec.reduction == ReductionKind.SOFTPLUS_SUM
    # the binary reduction's per-(row block, class tile) sums of dL/dz, one buffer per chunk (summed in order)
    shift_partials = []
    for col0 in range(0, num_cols, chunk):
        width = min(chunk, num_cols - col0)
        tiles_here = triton.cdiv(width, tiles.block_c)
        row_tiles = triton.cdiv(width * k, tiles.block_c)  # == tiles_here without sub-centers
        visited += row_blocks * tiles_here
        shift_partial = torch.empty(row_blocks * tiles_here if binary else 1, dtype=acc, device=x.device)
        if binary:
            shift_partials.append(shift_partial)
        backward.dcos_kernel[(row_blocks, tiles_here)](
            *common, lse, g_lse, g_cos_target, factor, dc, col_dot, inv_norm, flags, norms, kept_tiles, batch,
            num_cols, dim, col0, chunk, kept, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            float(grad_filter), shift, shift_partial, **meta, FILTER=use_filter,
            **configs.backward_kernel_tiles(tiles, "dcos"), SUB_CENTERS=k, LOADED=col0 + width <= kept,
            FAST=not interpret, **launch)
        groups_here = triton.cdiv(row_tiles, tiles.dw_group)
        if use_filter:
            backward.active_lists_kernel[(row_blocks + groups_here,)](
                flags, tile_lists, tile_counts, block_lists, block_counts, row_blocks, row_tiles,
                GROUP=tiles.dw_group, BLOCK_T=triton.next_power_of_2(col_tiles),
                BLOCK_R=triton.next_power_of_2(row_blocks))
            skipped.append(row_blocks * tiles_here - tile_counts.sum())
        # the gradient GEMMs count weight rows: K per class
        backward.dweight_kernel[(groups_here, d_tiles)](
            x, weight, index, dc, col_dot, inv_norm, block_lists, block_counts, factor, dweight, batch, num_cols * k,
            dim, col0 * k, chunk * k, row_blocks, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            dweight.stride(0), dweight.stride(1), **gemm_meta, **configs.backward_kernel_tiles(tiles, "dweight"),
            LOCAL_OUT=sink is not None, **launch)
        backward.dx_kernel[(row_blocks, d_tiles, splits)](
            weight, index, dc, inv_norm, tile_lists, tile_counts, factor, partial, batch, num_cols * k, dim, col0 * k,
            chunk * k, row_tiles, weight.stride(0), weight.stride(1), splits, **gemm_meta,
            **configs.backward_kernel_tiles(tiles, "dx"), **launch)
        if sink is not None:  # after the dx kernel has read the chunk's weight rows
            sink.store(col0, col0 + width, dweight[:width * k])
    dx = partial[0] if splits == 1 else partial.sum(dim=0)  # the splits' partials in a fixed order
    if use_filter:
        filter_stats.record(torch.stack(skipped).sum(), visited)
    dshift = torch.cat(shift_partials).sum().reshape(1) if shift_partials else torch.zeros(1, dtype=acc,
                                                                                           device=x.device)
    return dx.to(x.dtype), (dweight if sink is None else None), dshift
