"""The chunk loop every chunked backend runs: stream W in class chunks with an online log-sum-exp, recompute
chunks in backward. It is backend-neutral: the elementwise work is an *epilogue* passed in.

Memory: besides dW (C x d, the gradient itself) it allocates O(B x chunk) per chunk and O(B x d) for dx; no
B x C matrix and no normalised copy of W. Per chunk it runs two GEMMs in forward-recompute and two more in
backward (the GEMM floor of the whole loss is 4 x 2 B C d FLOPs: forward, recompute, dx, dW). With a
kept-tile store (``kept_tiles``, ``memory_budget=``) the forward's GEMM writes the kept chunks' tiles into it
and the backward reads them instead of recomputing (three GEMMs for those chunks); the inverse norms are
formed once per call, in forward, and read back in backward.

The loop is written once and takes an *epilogue*: the elementwise work on a (B x chunk) tile of fp32 dot
products (normalise, negatives, online log-sum-exp; in backward the gradient tile, the per-class sums of the
normalisation backward and the dW correction). ``torch_backend.TorchEpilogue`` does it with PyTorch ops
over ``losses/negatives.py``; the native backends (``cpu_backend``, ``cuda_backend``) pass fused C++/CUDA
epilogues (``native_epilogue``) that read each tile once. The chunk-size policy and the helpers shared with
the Triton backend (``num_columns``, ``finite_lse``) live here too.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import torch

from ..losses.negatives import NegativeSpec
from . import filter_stats
from .kept_tiles import KeptTiles, chunks

#: classes per chunk on CUDA: large enough to keep the GPU busy in every GEMM and elementwise launch
DEFAULT_CHUNK_SIZE = 8192
#: on CPU, elements of the B x chunk fp32 tile: 2 MiB stays in cache between the GEMM that writes it, the
#: epilogue and the two GEMMs that read it. Measured by the chunk-size script that `margin-bench chunks` replaced
#: (its floor: the 4 GEMMs full-size; B=256, C=1e5, d=512, fp32, 2 cores, idle): 1.05x the floor at chunk
#: 1024, 1.06x at 2048, 1.08x at 4096, 1.17x at 8192, 1.56x at 32768.
CPU_TILE_ELEMENTS = 1 << 19
CPU_MIN_CHUNK, CPU_MAX_CHUNK = 2048, 8192  # below: per-chunk overhead shows; above: W chunks leave the cache


def default_chunk_size(batch: int, device_type: str = "cpu") -> int:
    """CUDA: DEFAULT_CHUNK_SIZE. CPU: CPU_TILE_ELEMENTS / batch rounded down to a power of two, within
    [CPU_MIN_CHUNK, CPU_MAX_CHUNK] (2048 at B >= 256, 4096 at 128, 8192 at B <= 64)."""
    if device_type != "cpu":
        return DEFAULT_CHUNK_SIZE
    target = CPU_TILE_ELEMENTS // max(batch, 1)
    return max(CPU_MIN_CHUNK, min(CPU_MAX_CHUNK, 1 << max(target, 1).bit_length() - 1))


class TileGrad(NamedTuple):
    """What the backward epilogue hands back to the loop for one tile."""

    grad: torch.Tensor  #: dL/d(x_i . w_j), the operand of the dx and dW GEMMs (includes 1/|w_j| when normalised)
    col_dot: Optional[torch.Tensor]  #: sum_i dL/dc_ij * c_ij per class (normalised weights only)
    max_abs: Optional[torch.Tensor]  #: max |dL/dc_ij| over the tile (only when asked: gradient filtering)


class Epilogue(Protocol):
    """The elementwise work of the loop. ``inv_norm`` is None when the loss uses raw weights; ``cos`` holds
    the raw dot products x_i . w_j (the epilogue divides by |w_j| itself) and may be overwritten."""

    def inv_norms(self, w: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
        """1 / max(|w_j|, eps) for the rows of a chunk of W, in acc_dtype."""

    def forward_tile(self, cos: torch.Tensor, inv_norm: Optional[torch.Tensor], labels: torch.Tensor, col0: int,
                     row_params: torch.Tensor, spec: NegativeSpec, run_max: torch.Tensor,
                     run_sum: torch.Tensor) -> None:
        """Merge logits of the negatives of this tile into the running max/sum (in place)."""

    def backward_tile(self, cos: torch.Tensor, inv_norm: Optional[torch.Tensor], labels: torch.Tensor, col0: int,
                      row_params: torch.Tensor, spec: NegativeSpec, lse: torch.Tensor, g_lse: torch.Tensor,
                      g_cos_target: torch.Tensor, want_max_abs: bool) -> TileGrad:
        """dL/dcos for this tile (target column: g_cos_target), ready for the GEMMs."""

    def finish_dw(self, dw: torch.Tensor, w_acc: torch.Tensor, col_dot: torch.Tensor,
                  inv_norm: torch.Tensor) -> None:
        """In place: the normalisation backward on the dW GEMM output, dw_j -= col_dot_j / |w_j|^2 * w_j."""


def _matmul_acc(a: torch.Tensor, b_t: torch.Tensor, acc_dtype: torch.dtype,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b_t in acc_dtype: low-precision storage is multiplied with fp32 accumulation and fp32 output.
    ``out`` (a reusable buffer of the result's shape) is used when no dtype conversion is involved."""
    if a.dtype == acc_dtype and b_t.dtype == acc_dtype:
        return a @ b_t if out is None else torch.mm(a, b_t, out=out)
    if a.is_cuda and a.dtype == b_t.dtype:
        try:
            return torch.mm(a, b_t, out_dtype=acc_dtype)
        except (TypeError, RuntimeError):
            pass
    return a.to(acc_dtype) @ b_t.to(acc_dtype)


def _gemm_operand(t: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """CPU GEMMs have no mixed-precision path: convert once and reuse the copy for every product of a chunk
    (CUDA keeps the storage dtype and multiplies with fp32 output)."""
    return t if t.is_cuda else t.to(acc_dtype)


class _Scratch:
    """Per-call reusable buffers (tile B x chunk, dW chunk x d): one allocation per call instead of one per
    chunk; a shorter last chunk takes a contiguous view of the front of the same storage."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self._device, self._dtype, self._flat = device, dtype, {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        flat = self._flat.get(name)
        if flat is None or flat.numel() < rows * cols:
            flat = self._flat[name] = torch.empty(rows * cols, dtype=self._dtype, device=self._device)
        return flat[: rows * cols].view(rows, cols)


def _chunk_rows(weight: torch.Tensor, class_index: Optional[torch.Tensor], col0: int, col1: int) -> torch.Tensor:
    if class_index is None:
        return weight[col0:col1]
    return weight.index_select(0, class_index[col0:col1])


def num_columns(weight, class_index) -> int:
    """Columns of the problem: the classes of ``weight``, or the K entries of a Partial FC ``class_index``."""
    return weight.shape[0] if class_index is None else class_index.shape[0]


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows without negatives) replaced by 0, so exp(z - lse) is exp(-inf) = 0, never NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _forward_norms(weight, class_index, normalize_weight: bool, acc, epilogue: Epilogue, store):
    """1/||w_j|| of every column at once into the store when W needs no conversion (one pass, one parallel
    region, instead of one per chunk); None: the loop computes them per chunk (``_chunk_norms``)."""
    if not normalize_weight or store is None or class_index is not None or weight.dtype != acc:
        return None
    store.inv_norm.copy_(epilogue.inv_norms(weight, acc))
    return store.inv_norm


def _chunk_norms(w, col0: int, col1: int, normalize_weight: bool, acc, epilogue: Epilogue, store, known):
    """The chunk's inverse norms: from the per-call vector ``known`` (or the store, in backward), else computed
    from the chunk (and written into the store for the backward)."""
    if not normalize_weight:
        return None
    if known is not None:
        return known[col0:col1]
    inv_norm = epilogue.inv_norms(w, acc)
    if store is not None:
        store.inv_norm[col0:col1].copy_(inv_norm)
    return inv_norm


@torch.no_grad()
def chunked_forward(x, weight, labels, row_params, class_index, spec: NegativeSpec, normalize_weight: bool,
                    chunk_size: int, epilogue: Epilogue, store: Optional[KeptTiles] = None) -> torch.Tensor:
    """The forward pass. With a ``store`` (``kept_tiles``) its inverse norms are written once per call and the
    tiles of its kept columns are the GEMM's output buffers (the epilogue only reads them)."""
    acc = row_params.dtype
    batch = x.shape[0]
    run_max = torch.full((batch,), float("-inf"), dtype=acc, device=x.device)
    run_sum = torch.zeros(batch, dtype=acc, device=x.device)
    num_cols = num_columns(weight, class_index)
    x_mm = _gemm_operand(x, acc)
    scratch = _Scratch(x.device, acc)
    known = _forward_norms(weight, class_index, normalize_weight, acc, epilogue, store)
    if store is not None:
        store.use_chunk(chunk_size)
    for col0, col1 in chunks(num_cols, chunk_size):
        w = _gemm_operand(_chunk_rows(weight, class_index, col0, col1), acc)
        kept = None if store is None else store.tile(col0, col1)
        out = scratch.get("tile", batch, col1 - col0) if kept is None else kept
        cos = _matmul_acc(x_mm, w.t(), acc, out=out)
        if kept is not None and cos is not kept:  # a GEMM that could not write into the kept tile
            kept.copy_(cos)
        inv_norm = _chunk_norms(w, col0, col1, normalize_weight, acc, epilogue, store, known)
        epilogue.forward_tile(cos, inv_norm, labels, col0, row_params, spec, run_max, run_sum)
    return run_max + torch.log(run_sum)


@torch.no_grad()
def chunked_backward(x, weight, labels, row_params, class_index, spec: NegativeSpec, normalize_weight: bool,
                     lse, g_lse, g_cos_target, chunk_size: int, epilogue: Epilogue, grad_filter: float = 0.0,
                     store: Optional[KeptTiles] = None):
    """The backward pass: per chunk the forward's tile (kept in ``store``, else recomputed by a GEMM), the
    epilogue's dL/d(x.w), then the dx and dW GEMMs. The same chunk boundaries as the forward."""
    acc = row_params.dtype
    batch, dim = x.shape
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    # with a class subset only the sampled rows are written; the rest of dW must read as zero
    dweight = torch.empty_like(weight) if class_index is None else torch.zeros_like(weight)
    # the dW GEMM can write straight into dweight's rows (no copy) when they are a plain fp32/fp64 slice
    dw_in_place = class_index is None and weight.dtype == acc and dweight.is_contiguous()
    x_acc = x.to(acc)
    x_mm = _gemm_operand(x, acc)
    lse = finite_lse(lse)
    num_cols = num_columns(weight, class_index)
    scratch = _Scratch(x.device, acc)
    known = None if store is None else store.inv_norm
    if store is not None:
        store.use_chunk(chunk_size)
    skipped = 0
    for col0, col1 in chunks(num_cols, chunk_size):
        w = _gemm_operand(_chunk_rows(weight, class_index, col0, col1), acc)
        tile_buffer = scratch.get("tile", batch, col1 - col0)
        kept = None if store is None else store.tile(col0, col1)
        if kept is None:
            cos = _matmul_acc(x_mm, w.t(), acc, out=tile_buffer)
        else:  # the epilogue overwrites its tile; the saved one stays intact (retain_graph, a second backward)
            cos = tile_buffer.copy_(kept)
        inv_norm = _chunk_norms(w, col0, col1, normalize_weight, acc, epilogue, None, known)
        tile = epilogue.backward_tile(cos, inv_norm, labels, col0, row_params, spec, lse, g_lse,
                                      g_cos_target, grad_filter > 0)
        if grad_filter > 0 and bool(tile.max_abs < grad_filter):
            skipped += 1
            if class_index is None:
                dweight[col0:col1].zero_()
            continue
        w_acc = w.to(acc)
        dx.addmm_(tile.grad, w_acc)
        dw_out = dweight[col0:col1] if dw_in_place else scratch.get("dw", col1 - col0, dim)
        dw = torch.mm(tile.grad.t(), x_acc, out=dw_out)
        if normalize_weight:
            epilogue.finish_dw(dw, w_acc, tile.col_dot, inv_norm)
        if dw_in_place:
            continue
        if class_index is None:
            dweight[col0:col1].copy_(dw)
        else:
            dweight.index_copy_(0, class_index[col0:col1], dw.to(weight.dtype))
    if grad_filter > 0:
        filter_stats.record(skipped, -(-num_cols // chunk_size))
    return dx.to(x.dtype), dweight
