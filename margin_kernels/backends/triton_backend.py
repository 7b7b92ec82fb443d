"""The Triton backend: the loss fused into GEMM epilogues (kernels in triton_forward / triton_backward).

Implements the backend contract (see ``backends/__init__.py``) on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter, how CI tests it; the variable must be set before the process
first imports triton). Memory besides dW: a (splits, B) forward partial and (splits, B, d) dx partials; no
B x C matrix, no copy of W or of W[class_index]. ``chunk_size`` (the torch backend's knob) is ignored: tile
sizes come from triton_configs.

Precision: W and x are read in their storage dtype (fp32, bf16, fp16, fp64) and every product accumulates in
the accumulation dtype of ``row_params`` (fp32; fp64 for fp64 inputs); fp32 inputs use IEEE products (no
TF32). The backward's gradient GEMMs take dL/dcos rounded to the storage dtype (bf16/fp16 tensor cores; fp16
tiles are rescaled by a power of two first so small gradients do not flush to zero).

Gradient filtering (``grad_filter = tau > 0``): a (row block x class tile) whose every |dL/dcos| is below tau
skips its dx and dW products. Every skipped entry is < tau in magnitude, so per row and class
    ||dx_i - exact|| <= tau * sum_j ||w_j|| / ||w_j||_(normalised: 1)   over the row's skipped columns j,
    ||dW_j - exact|| <= tau * (1 + [normalised]) * sum_i ||x_i|| / ||w_j||_(raw: 1)   over the skipped rows i
(the second term is the ||w|| Jacobian, |c_ij| <= 1). The loss is unchanged (the forward never filters).
Skipped and visited tiles of the dW kernel are added to ``filter_stats`` as device tensors (no sync).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
import triton  # an ImportError here makes the registry report the backend as unavailable

from . import filter_stats
from . import triton_configs as configs
from .chunk_loop import finite_lse, num_columns

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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


def _autotuned_kernel(kernel, acc_name=None, loop_name=None):
    """The kernel wrapped in triton.autotune over the H100 list (cached per kernel object)."""
    if kernel not in _autotuned:
        if acc_name is None:
            tuner = triton.autotune(configs=configs.forward_autotune_configs(), key=["B", "N", "D"],
                                    prune_configs_by={"early_config_prune": configs.prune_forward})
        else:
            prune = functools.partial(configs.prune_backward, acc_name=acc_name, loop_name=loop_name)
            tuner = triton.autotune(configs=configs.backward_autotune_configs(acc_name, loop_name),
                                    key=["B", "N", "D"], prune_configs_by={"early_config_prune": prune},
                                    reset_to_zero=["stats_ptr"] if acc_name == "BLOCK_C" else None)
        _autotuned[kernel] = tuner(kernel)
    return _autotuned[kernel]


@functools.lru_cache(maxsize=64)
def _constants(scale: float, a: float, b: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(scale, a, b) as a tensor in the accumulation dtype: Triton passes Python floats as fp32, which would
    round fp64 runs' constants. Cached, so steady-state calls create no tensor (CUDA-graph friendly)."""
    return torch.tensor([scale, a, b], dtype=dtype, device=device)


def _check_inputs(x, weight, row_params, interpret: bool) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if not interpret and x.device.type != "cuda":
        raise RuntimeError(f"the 'triton' backend runs on CUDA tensors, got x on {x.device}; set "
                           "TRITON_INTERPRET=1 before importing triton to run its kernels on the CPU")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"the 'triton' backend takes x and weight of one dtype among fp16, bf16, fp32, fp64; "
                        f"got x {x.dtype}, weight {weight.dtype}")
    if row_params.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"row_params must be fp32 or fp64 (the accumulation dtype), got {row_params.dtype}")
    if not interpret:  # fail in the forward, not later in the backward, when no backward tiling fits (fp64, d > 512)
        configs.default_backward(x.shape[1], x.element_size())


def _common_args(x, weight, labels, row_params, class_index, spec):
    """Pointer arguments shared by all kernels, made contiguous where the kernels assume it (O(B) tensors
    only: x and W are passed with their strides, never copied)."""
    acc = row_params.dtype
    labels = labels.to(torch.int64).contiguous()
    index = labels if class_index is None else class_index.to(torch.int64).contiguous()  # unused if no index
    consts = _constants(float(spec.scale), float(spec.a), float(spec.b), acc, x.device)
    return (x, weight, labels, row_params.contiguous(), consts, index)


def _common_meta(x, class_index, spec, normalize_weight, interpret: bool) -> dict:
    return dict(KIND=int(spec.kind), NORMALIZE=bool(normalize_weight), HAS_INDEX=class_index is not None,
                UPCAST=interpret and x.dtype == torch.bfloat16)


def lse_forward(x, weight, labels, row_params, class_index, spec, normalize_weight, chunk_size):
    interpret = interpret_mode()
    _check_inputs(x, weight, row_params, interpret)
    forward, _ = _kernels()
    acc = row_params.dtype
    batch, dim = x.shape
    num_cols = num_columns(weight, class_index)
    splits = configs.class_splits(x.device, interpret, batch, num_cols, acc.itemsize)
    partial = torch.empty((splits, batch), dtype=acc, device=x.device)
    args = _common_args(x, weight, labels, row_params, class_index, spec) + (
        partial, batch, num_cols, dim, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), splits)
    meta = _common_meta(x, class_index, spec, normalize_weight, interpret)
    tiles = configs.forward_tiles(interpret, x.element_size())
    if tiles is None:
        grid = lambda META: (triton.cdiv(batch, META["BLOCK_B"]), splits)  # noqa: E731
        _autotuned_kernel(forward.lse_forward_kernel)[grid](*args, **meta)
    else:
        forward.lse_forward_kernel[(triton.cdiv(batch, tiles.block_b), splits)](
            *args, **meta, BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_K=tiles.block_k,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    # fixed-order merge of the class splits (logsumexp of all -inf is -inf: rows without negatives)
    return partial[0] if splits == 1 else torch.logsumexp(partial, dim=0)


def lse_backward(x, weight, labels, row_params, class_index, spec, normalize_weight, lse, g_lse, g_cos_target,
                 chunk_size, grad_filter=0.0):
    interpret = interpret_mode()
    _check_inputs(x, weight, row_params, interpret)
    _, backward = _kernels()
    acc = row_params.dtype
    batch, dim = x.shape
    num_cols = num_columns(weight, class_index)
    common = _common_args(x, weight, labels, row_params, class_index, spec)
    lse = finite_lse(lse).to(acc).contiguous()
    grads = (lse, g_lse.to(acc).contiguous(), g_cos_target.to(acc).contiguous())
    strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1))
    meta = _common_meta(x, class_index, spec, normalize_weight, interpret)
    meta.update(RESCALE=x.dtype == torch.float16, FILTER=grad_filter > 0, BLOCK_D=configs.block_d(dim))
    tiles = configs.backward_tiles(interpret, dim, x.element_size())
    threshold = float(grad_filter)

    # dW: one program per class tile; with a class subset only the sampled rows are written, the rest is zero
    dweight = torch.empty_like(weight) if class_index is None else torch.zeros_like(weight)
    # per-program (skipped, visited) tile counts, one row per possible program of any config (zeros beyond)
    stats_rows = triton.cdiv(num_cols, configs.smallest_class_tile(tiles)) if grad_filter > 0 else 1
    stats = torch.zeros((stats_rows, 2), dtype=torch.int32, device=x.device)
    dw_args = common + grads + (dweight, stats, batch, num_cols, dim) + strides + (
        dweight.stride(0), dweight.stride(1), threshold)
    if tiles is None:
        grid = lambda META: (triton.cdiv(num_cols, META["BLOCK_C"]),)  # noqa: E731
        _autotuned_kernel(backward.dweight_kernel, "BLOCK_C", "BLOCK_B")[grid](*dw_args, **meta)
    else:
        backward.dweight_kernel[(triton.cdiv(num_cols, tiles.acc_rows),)](
            *dw_args, **meta, BLOCK_C=tiles.acc_rows, BLOCK_B=tiles.loop_rows, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages)

    # dx: one program per (row block, class split); the splits' partials are summed in a fixed order
    splits = configs.class_splits(x.device, interpret, batch, num_cols, dim * acc.itemsize)
    partial = torch.empty((splits, batch, dim), dtype=acc, device=x.device)
    dx_args = common + grads + (partial, batch, num_cols, dim) + strides + (splits, threshold)
    if tiles is None:
        grid = lambda META: (triton.cdiv(batch, META["BLOCK_B"]), splits)  # noqa: E731
        _autotuned_kernel(backward.dx_kernel, "BLOCK_B", "BLOCK_C")[grid](*dx_args, **meta)
    else:
        backward.dx_kernel[(triton.cdiv(batch, tiles.acc_rows), splits)](
            *dx_args, **meta, BLOCK_B=tiles.acc_rows, BLOCK_C=tiles.loop_rows, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages)
    dx = partial[0] if splits == 1 else partial.sum(dim=0)

    if grad_filter > 0:
        filter_stats.record(stats[:, 0].sum(), stats[:, 1].sum())
    return dx.to(x.dtype), dweight
