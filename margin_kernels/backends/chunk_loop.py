"""The chunk loop every chunked backend runs: stream W in class chunks with an online log-sum-exp, recompute
chunks in backward. It is backend-neutral: the elementwise work is an *epilogue* passed in.

Memory: besides dW (C x d, the gradient itself) it allocates O(B x chunk) per chunk and O(B x d) for dx; no
B x C matrix and no normalised copy of W. Where a chunk's dW rows go is a *gradient sink* (``ChunkSink``):
the dense dW by default (``DenseSink``), or a fused optimizer's update or an in-place add into an existing
``weight.grad`` (``margin_kernels.optim.sink``), which takes them from a chunk-sized buffer, with no dW at all.
Per chunk it runs two GEMMs in forward-recompute and two more in backward (the GEMM floor of the whole loss
is 4 x 2 B C d FLOPs: forward, recompute, dx, dW). With a kept-tile store (``kept_tiles``,
``memory_budget=``) the forward's GEMM writes the kept chunks' tiles into it and the backward reads them
instead of recomputing (three GEMMs for those chunks); the inverse norms are formed once per call, in
forward, and read back in backward.

The loop is written once and takes an *epilogue*: the elementwise work on a (B x chunk) tile of fp32 dot
products (normalise, negatives, online log-sum-exp; in backward the gradient tile, the per-class sums of the
normalisation backward and the dW correction). ``torch_backend.TorchEpilogue`` does it with PyTorch ops
over ``losses/negatives.py``; the native backends (``cpu_backend``, ``cuda_backend``) pass fused C++/CUDA
epilogues (``native_epilogue``) that read each tile once. The chunk-size policy and the helpers shared with
the Triton backend (``num_columns``, ``finite_lse``) live here too.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..losses.negatives import NegativeSpec
from ..losses.reductions import ReductionKind
from ..precision import CAST_DTYPES
from . import filter_stats
from .contract import CallState, OpConfig, OpInputs, RowGrads
from .epilogue import Epilogue
from .kept_tiles import chunks
from .sinks import ChunkSink, DenseSink, chunk_row_ids
from .subcenter_epilogue import SubCenterEpilogue

#: classes per chunk on CUDA at B = 512 (what memory_model assumes; ``default_chunk_size`` scales it with B)
DEFAULT_CHUNK_SIZE = 8192
#: on CUDA, bytes of one chunk's B x chunk tiles that should stay in L2 (50 MB on H100, 40 MB on A100) between
#: the GEMM that writes them and the epilogue and GEMMs that read them: the fp32 tile and the 16-bit dL/dcos,
#: 6 bytes per element (24 MiB: 8192 classes at B = 512)
CUDA_TILE_BYTES = 24 << 20
CUDA_TILE_BYTES_PER_ELEMENT = 6
CUDA_MIN_CHUNK, CUDA_MAX_CHUNK = 1024, 16384  # below: the GEMMs get thin; above: no gain, more memory
#: on CPU, elements of the B x chunk fp32 tile: 2 MiB stays in cache between the GEMM that writes it, the
#: epilogue and the two GEMMs that read it. Measured by the chunk-size script that `python -m bench chunks` replaced
#: (its floor: the 4 GEMMs full-size; B=256, C=1e5, d=512, fp32, 2 cores, idle): 1.05x the floor at chunk
#: 1024, 1.06x at 2048, 1.08x at 4096, 1.17x at 8192, 1.56x at 32768.
CPU_TILE_ELEMENTS = 1 << 19
CPU_MIN_CHUNK, CPU_MAX_CHUNK = 2048, 8192  # below: per-chunk overhead shows; above: W chunks leave the cache
#: the fused (CUTLASS) backward keeps this many chunks' fp32 dx products in a buffer and adds their sum into dx
#: once per group (two launches per group instead of one add per chunk; DX_GROUP x B x d fp32 of memory)
DX_GROUP = 16
#: the fused backward's chunk: its B x chunk 16-bit dL/dcos (2 bytes per element: no fp32 tile exists) stays in
#: L2 between the recompute GEMM that writes it and the dx and dW GEMMs that read it (32 MiB: 32768 classes at
#: B = 512 in H100's 50 MB L2), within [FUSED_MIN_CHUNK, FUSED_MAX_CHUNK]. Each chunk costs three launches and
#: the loop's host ops, so it is as wide as L2 allows (at 8192, the cuBLAS path's width, the host's ~5 ops per
#: chunk would take longer than the GPU's work)
FUSED_GRAD_BYTES = 32 << 20
FUSED_MIN_CHUNK, FUSED_MAX_CHUNK = 4096, 65536
#: the fused forward writes nothing B x C: its only per-chunk memory is one 8-byte (max, sum) pair per row and
#: FUSED_FORWARD_TILE_N-column tile (margin_sm90.cu TileShape), merged after. Its chunk bounds that scratch to
#: FUSED_FORWARD_PARTS_BYTES (64 MiB: 4 Mi classes at B = 512, so C = 1e6 is one launch)
FUSED_FORWARD_PARTS_BYTES = 64 << 20
FUSED_FORWARD_TILE_N = 256
#: storage dtypes whose rows the fused forward multiplies as they are stored, so its kernel forms their inverse
#: norms itself (from the W tiles it already holds: no separate pass over W); fp32 storage under a 16-bit
#: product keeps the norms of the stored fp32 rows, computed by _forward_norms / _chunk_norms
FUSED_NORM_DTYPES = (torch.float16, torch.bfloat16)


def filter_skips_on_host(device: torch.device) -> bool:
    """Gradient filtering decides on the host (a skipped chunk runs no GEMM) where reading the decision is
    free, on the CPU; elsewhere the chunk's dL/dcos is zeroed on the device instead, with no sync."""
    return device.type == "cpu"


def _power_of_two_within(target: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(target, 1).bit_length() - 1))


def default_chunk_size(batch: int, device_type: str = "cpu", sub_centers: int = 1) -> int:
    """The tile of one chunk sized to stay in cache, rounded down to a power of two. CUDA: CUDA_TILE_BYTES
    within [CUDA_MIN_CHUNK, CUDA_MAX_CHUNK] (8192 at B = 512, 4096 at 1024, 16384 at B <= 256). CPU:
    CPU_TILE_ELEMENTS within [CPU_MIN_CHUNK, CPU_MAX_CHUNK] (2048 at B >= 256, 4096 at 128, 8192 at B <= 64).
    In classes: with K sub-centers a chunk's tile has K columns per class, so the width is divided by K."""
    if device_type != "cpu":
        target = CUDA_TILE_BYTES // (CUDA_TILE_BYTES_PER_ELEMENT * max(batch, 1))
        width = _power_of_two_within(target, CUDA_MIN_CHUNK, CUDA_MAX_CHUNK)
    else:
        width = _power_of_two_within(CPU_TILE_ELEMENTS // max(batch, 1), CPU_MIN_CHUNK, CPU_MAX_CHUNK)
    return max(1, width // sub_centers)


def fused_chunk_sizes(batch: int, partial_fc: bool = False) -> tuple[int, int]:
    """(forward, backward) chunk widths of the fused (CUTLASS) path, in classes: the backward's 16-bit dL/dcos
    chunk sized to L2 (``FUSED_GRAD_BYTES``: 32768 at B = 512, 16384 at 1024, 65536 at B <= 256), the forward
    as wide as its partials allow (``FUSED_FORWARD_PARTS_BYTES``). With Partial FC the forward takes the
    backward's width too: each chunk's sampled rows are gathered into a copy that the GEMM then reads from L2."""
    backward = _power_of_two_within(FUSED_GRAD_BYTES // (2 * max(batch, 1)), FUSED_MIN_CHUNK, FUSED_MAX_CHUNK)
    if partial_fc:
        return backward, backward
    pairs_per_row = FUSED_FORWARD_PARTS_BYTES // (8 * max(batch, 1))
    return max(backward, _power_of_two_within(pairs_per_row * FUSED_FORWARD_TILE_N, 1, 1 << 30)), backward


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


def _gemm_operand(t: torch.Tensor, acc_dtype: torch.dtype, operand_dtype: Optional[torch.dtype] = None):
    """CPU GEMMs have no mixed-precision path: convert once and reuse the copy for every product of a chunk.
    CUDA keeps the storage dtype and multiplies with fp32 output, or casts fp32 storage to ``operand_dtype``
    (the 16-bit product of margin_kernels.precision: autocast, matmul precision "medium"), one chunk at a time
    (never a C x d copy)."""
    if not t.is_cuda:
        return t.to(acc_dtype)
    return t if operand_dtype is None else t.to(operand_dtype)


def product_operand_dtype(product: str, x: torch.Tensor) -> Optional[torch.dtype]:
    """The 16-bit dtype fp32 CUDA operands are cast to for ``product`` (margin_kernels.precision), else None:
    CPU GEMMs multiply fp32 exactly, and "ieee"/"tf32" are torch.mm's own global setting on CUDA."""
    return CAST_DTYPES.get(product) if x.is_cuda and x.dtype == torch.float32 else None


#: torch.mm(a, b, out_dtype=...) (16-bit operands, fp32 output: cuBLAS on tensor cores); absent in older torch
_MIXED_MM = "dtype" in torch.ops.aten.mm.overloads()


def gradient_operand_dtype(w_mm: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the backward epilogue writes dL/dcos in for the dx and dW GEMMs: the chunk's 16-bit CUDA GEMM
    operand dtype when torch can multiply it with fp32 output, so both GEMMs run on tensor cores and the tile
    they read is half the size; None (the fp32 tile, overwritten in place) otherwise."""
    if _MIXED_MM and w_mm.is_cuda and w_mm.dtype in (torch.float16, torch.bfloat16):
        return w_mm.dtype
    return None


def mixed_mm(a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b of 16-bit operands, accumulated and returned in acc_dtype (on CPU, where this runs only in tests,
    by widening first: the products of 16-bit values are exact in fp32, so it is the same computation), into
    ``out`` when given."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc_dtype) if out is None else torch.mm(a, b, out_dtype=acc_dtype, out=out)
    return torch.mm(a.to(acc_dtype), b.to(acc_dtype), out=out) if out is not None else a.to(acc_dtype) @ b.to(acc_dtype)


class _GroupedDx:
    """dx += sum of the chunks' dx products, DX_GROUP chunks at a time: each product goes into a slot of a
    (DX_GROUP, B, d) buffer and a full buffer is summed (fixed order: deterministic) into dx."""

    def __init__(self, dx: torch.Tensor, scratch: Scratch):
        self._dx, self._scratch, self._used = dx, scratch, 0

    def slot(self) -> torch.Tensor:
        batch, dim = self._dx.shape
        return self._scratch.get("dx_parts", DX_GROUP * batch, dim)[self._used * batch:(self._used + 1) * batch]

    def added(self) -> None:
        self._used += 1
        if self._used == DX_GROUP:
            self.flush()

    def flush(self) -> None:
        if self._used:
            batch, dim = self._dx.shape
            parts = self._scratch.get("dx_parts", DX_GROUP * batch, dim)[:self._used * batch]
            self._dx.add_(parts.view(self._used, batch, dim).sum(0))
            self._used = 0


class Scratch:
    """Per-call reusable buffers (tile B x chunk, dW chunk x d): one allocation per call instead of one per
    chunk; a shorter last chunk takes a contiguous view of the front of the same storage."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self._device, self._dtype, self._flat = device, dtype, {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        flat = self._flat.get(name)
        if flat is None or flat.numel() < rows * cols:
            flat = self._flat[name] = torch.empty(rows * cols, dtype=self._dtype, device=self._device)
        return flat[: rows * cols].view(rows, cols)


def _chunk_rows(weight: torch.Tensor, class_index: Optional[torch.Tensor], col0: int, col1: int,
                sub_centers: int = 1) -> torch.Tensor:
    """The weight rows of columns [col0, col1) themselves (a view without a class subset)."""
    rows = chunk_row_ids(class_index, col0, col1, sub_centers)
    return weight[rows[0]:rows[1]] if isinstance(rows, tuple) else weight.index_select(0, rows)


def _with_sub_centers(epilogue: Epilogue, sub_centers: int) -> Epilogue:
    """The epilogue itself, or wrapped to take each class's max over its K rows (subcenter_epilogue)."""
    return epilogue if sub_centers == 1 else SubCenterEpilogue(epilogue, sub_centers)


def num_columns(weight, class_index, sub_centers: int = 1) -> int:
    """Columns of the problem: the classes of ``weight`` (its rows / K with K sub-centers), or the entries of a
    Partial FC ``class_index``."""
    return weight.shape[0] // sub_centers if class_index is None else class_index.shape[0]


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows without negatives) replaced by 0, so exp(z - lse) is exp(-inf) = 0, never NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def zero_shift(shift: Optional[torch.Tensor], row_params: torch.Tensor) -> torch.Tensor:
    """The (1,) logit shift in the accumulation dtype, contiguous (zeros when the caller passes none)."""
    if shift is None:
        return row_params.new_zeros(1)
    return shift.reshape(1).to(row_params.dtype).contiguous()


def reduced_negatives(run_max: torch.Tensor, run_sum: torch.Tensor, spec: NegativeSpec) -> torch.Tensor:
    """The row's value from its running pair: log-sum-exp, or the binary reduction's plain sum."""
    if spec.reduction == ReductionKind.SOFTPLUS_SUM:
        return run_sum
    return run_max + torch.log(run_sum)


def _forward_norms(weight, class_index, normalize_weight: bool, acc, epilogue: Epilogue, store, whole=False):
    """1/||w_j|| of every weight row at once into the store when W needs no conversion (one pass, one parallel
    region, instead of one per chunk), or when ``whole`` (the fused forward of fp32 storage under a 16-bit
    product: its chunk spans most of W; with 16-bit storage its kernel forms them itself, and this is not
    called); None: the loop computes them per chunk (``_chunk_norms``). The norms are always those of the stored
    rows (a cast product operand would round them first)."""
    if not normalize_weight or store is None or class_index is not None or (weight.dtype != acc and not whole):
        return None
    store.inv_norm.copy_(epilogue.inv_norms(weight, acc))
    return store.inv_norm


def _chunk_norms(w_stored, row0: int, row1: int, normalize_weight: bool, acc, epilogue: Epilogue, store, known):
    """The chunk's inverse norms (weight rows [row0, row1)): from the per-call vector ``known`` (or the store,
    in backward), else computed from the chunk's stored rows (and written into the store for the backward)."""
    if not normalize_weight:
        return None
    if known is not None:
        return known[row0:row1]
    inv_norm = epilogue.inv_norms(w_stored, acc)
    if store is not None:
        store.inv_norm[row0:row1].copy_(inv_norm)
    return inv_norm


def _unpacked(inputs: OpInputs, config: OpConfig, epilogue: Epilogue, fused: bool = False, backward: bool = False):
    """The loop's locals from the call: (x, weight, labels, row_params, class_index, spec, normalise, chunk,
    epilogue with the sub-center adapter where K > 1). The chunk: the call's, else the default of the path
    (``fused_chunk_sizes`` for the fused one, forward or ``backward``). The fused kernels read row_params as two
    contiguous columns: they get a column-major copy once per call, not two copies per chunk."""
    x, weight, labels, row_params, class_index = inputs
    k = config.sub_centers
    if config.chunk_size:
        chunk = config.chunk_size
    elif fused:
        chunk = fused_chunk_sizes(x.shape[0], class_index is not None)[1 if backward else 0]
    else:
        chunk = default_chunk_size(x.shape[0], x.device.type, k)
    if fused:
        row_params = row_params.t().contiguous().t()
    return (x, weight, labels, row_params, class_index, config.spec, config.normalize_weight, chunk,
            _with_sub_centers(epilogue, k))


@torch.no_grad()
def chunked_forward(inputs: OpInputs, config: OpConfig, state: CallState, epilogue: Epilogue,
                    operand_dtype: Optional[torch.dtype] = None, fused: bool = False) -> torch.Tensor:
    """The rows' reduced negatives (log-sum-exp, or the binary family's softplus sum). ``operand_dtype``: see
    _gemm_operand. ``config.chunk_size`` counts columns (classes); with K sub-centers a chunk's tile is
    B x (chunk K). With a ``state.store`` (``kept_tiles``, counting weight rows) its inverse norms are written
    once per call and the tiles of its kept rows are the GEMM's output buffers (the epilogue only reads them).
    ``fused``: the epilogue's ``fused_forward`` forms each chunk's product and epilogue in one kernel (the cuda
    backend's CUTLASS path: 16-bit operands, no sub-centers, no kept tiles); with 16-bit storage
    (``FUSED_NORM_DTYPES``) that kernel also forms the chunk's inverse norms into the store's slice, which the
    backward then reads: no separate pass over W."""
    x, weight, labels, row_params, class_index, spec, normalize_weight, chunk_size, epilogue = \
        _unpacked(inputs, config, epilogue, fused)
    k, store = config.sub_centers, state.store
    acc = row_params.dtype
    shift = zero_shift(state.shift, row_params)
    batch = x.shape[0]
    run_max = torch.full((batch,), float("-inf"), dtype=acc, device=x.device)
    run_sum = torch.zeros(batch, dtype=acc, device=x.device)
    num_cols = num_columns(weight, class_index, k)
    x_mm = _gemm_operand(x, acc, operand_dtype)
    scratch = Scratch(x.device, acc)
    kernel_norms = fused and normalize_weight and weight.dtype in FUSED_NORM_DTYPES
    known = None if kernel_norms else _forward_norms(weight, class_index, normalize_weight, acc, epilogue, store,
                                                     whole=fused)
    if store is not None:
        store.use_chunk(chunk_size * k)
    for col0, col1 in chunks(num_cols, chunk_size):
        w_stored = _chunk_rows(weight, class_index, col0, col1, k)
        w = _gemm_operand(w_stored, acc, operand_dtype)
        if kernel_norms:  # the fused kernel forms the chunk's norms into the store (the backward reads them)
            out = store.inv_norm[col0:col1] if store is not None else scratch.get("norms", 1, col1 - col0)[0]
            epilogue.fused_forward(x_mm, w, None, labels, col0, row_params, spec, run_max, run_sum, shift,
                                   inv_norm_out=out)
            continue
        if fused:  # no tile to keep; the inverse norms still go to a store (its backward reads them there)
            inv_norm = _chunk_norms(w_stored, col0, col1, normalize_weight, acc, epilogue, store, known)
            epilogue.fused_forward(x_mm, w, inv_norm, labels, col0, row_params, spec, run_max, run_sum, shift)
            continue
        kept = None if store is None else store.tile(col0 * k, col1 * k)
        # the sub-center adapter normalises its tile in place: it gets a scratch copy of a kept tile
        out = kept if kept is not None and k == 1 else scratch.get("tile", batch, (col1 - col0) * k)
        cos = _matmul_acc(x_mm, w.t(), acc, out=out)
        if kept is not None and cos is not kept:  # a GEMM that could not write into the kept tile
            kept.copy_(cos)
        inv_norm = _chunk_norms(w_stored, col0 * k, col1 * k, normalize_weight, acc, epilogue, store, known)
        epilogue.forward_tile(cos, inv_norm, labels, col0, row_params, spec, run_max, run_sum, shift)
    return reduced_negatives(run_max, run_sum, spec)


@torch.no_grad()
def chunked_backward(inputs: OpInputs, config: OpConfig, grads: RowGrads, state: CallState, epilogue: Epilogue,
                     operand_dtype: Optional[torch.dtype] = None, fused: bool = False):
    """(dx, dW, d shift). Per chunk: the forward's fp32 tile (kept in ``state.store``, else recomputed by a GEMM),
    the epilogue's dL/dcos, then the dx and dW GEMMs, either on the fp32 tile (CPU, fp32/fp64 storage,
    sub-centers) or on a 16-bit copy the epilogue writes instead (``gradient_operand_dtype``: tensor cores, half
    the bytes), whose fp32 outputs ``finish_dw`` unscales, normalises and stores in the gradient's dtype in one
    pass. d shift sums the tiles' shares in chunk order (deterministic; zero for LSE). With a ``state.sink``
    (``sinks.ChunkSink``: an in-place add into ``weight.grad``, a fused optimizer) each chunk's finished dW rows
    go to ``sink.store`` from a chunk-sized buffer, and dW is None. ``fused``: the epilogue's ``fused_backward``
    recomputes the product and writes the 16-bit dL/dcos in one kernel; with 16-bit storage ``fused_dw`` then
    runs the dW GEMM with finish_dw in its epilogue straight into the sink's rows (the column sums read from
    the recompute GEMM's per-row-tile partials); the dx GEMM and the sinks are the 16-bit path's."""
    x, weight, labels, row_params, class_index, spec, normalize_weight, chunk_size, epilogue = \
        _unpacked(inputs, config, epilogue, fused, backward=True)
    k, store, sink, grad_filter = config.sub_centers, state.store, state.sink, config.grad_filter
    lse, g_lse, g_cos_target = grads
    acc = row_params.dtype
    shift = zero_shift(state.shift, row_params)
    dshift = torch.zeros(1, dtype=acc, device=x.device)
    batch, dim = x.shape
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    if sink is not None and sink.sub_centers != k:
        raise ValueError(f"sink: made for {sink.sub_centers} sub-centers, the call has {k}")
    dw_sink = DenseSink(weight, class_index, acc, k) if sink is None else sink
    x_mm = _gemm_operand(x, acc, operand_dtype)
    x_acc = None  # the fp32 path's dW operand, made on first use
    lse = finite_lse(lse)
    num_cols = num_columns(weight, class_index, k)
    scratch = Scratch(x.device, acc)
    known = None if store is None else store.inv_norm
    if store is not None:
        store.use_chunk(chunk_size * k)
    skipped = 0
    grouped_dx = _GroupedDx(dx, scratch)
    for col0, col1 in chunks(num_cols, chunk_size):
        w_stored = _chunk_rows(weight, class_index, col0, col1, k)
        w = _gemm_operand(w_stored, acc, operand_dtype)
        # the fused dW GEMM reads the stored rows as its C operand: 16-bit storage (the operand dtype itself);
        # fp32 storage under a 16-bit product takes the cuBLAS dW GEMM and finish_dw
        dw_fused = fused and w_stored.dtype in (torch.float16, torch.bfloat16)
        if fused:
            inv_norm = _chunk_norms(w_stored, col0, col1, normalize_weight, acc, epilogue, None, known)
            tile = epilogue.fused_backward(x_mm, w, inv_norm, labels, col0, row_params, spec, lse, g_lse,
                                           g_cos_target, shift=shift, col_parts=dw_fused)
            grad_dtype = tile.grad.dtype  # the operand dtype: the 16-bit path below
        else:
            tile_buffer = scratch.get("tile", batch, (col1 - col0) * k)
            kept = None if store is None else store.tile(col0 * k, col1 * k)
            if kept is None:
                cos = _matmul_acc(x_mm, w.t(), acc, out=tile_buffer)
            else:  # the epilogue overwrites its tile; the saved one stays intact (retain_graph, a second backward)
                cos = tile_buffer.copy_(kept)
            inv_norm = _chunk_norms(w_stored, col0 * k, col1 * k, normalize_weight, acc, epilogue, None, known)
            # the sub-center adapter hands back the fp32 row gradient (its scatter has no 16-bit output)
            grad_dtype = gradient_operand_dtype(w) if k == 1 else None
            tile = epilogue.backward_tile(cos, inv_norm, labels, col0, row_params, spec, lse, g_lse,
                                          g_cos_target, grad_filter > 0, grad_dtype=grad_dtype, shift=shift)
        if tile.shift_grad is not None:  # before any filtering: the forward never filters, nor does d shift
            dshift += tile.shift_grad
        if grad_filter > 0:
            below = tile.max_abs < grad_filter
            if filter_skips_on_host(below.device):  # reading it costs nothing: skip the chunk's two GEMMs
                if bool(below):
                    skipped += 1
                    dw_sink.skip(col0, col1, scratch, dim)
                    continue
            else:  # on a GPU a branch would be a device-to-host sync per chunk: zero the tile instead. Its
                # entries are finite when below (|dc| < tau), so its GEMMs add exactly 0 to dx and write zero
                # dW rows, as a skip does; the filter then saves memory traffic only where the other backends'
                # kernels skip (triton: its K-step lists)
                keep = (~below).to(tile.grad.dtype)
                tile.grad.mul_(keep)
                if tile.col_dot is not None:
                    tile.col_dot.mul_(keep.to(tile.col_dot.dtype))
                skipped = skipped + below.to(torch.int64)
        if grad_dtype is not None:  # 16-bit dL/dcos: both GEMMs on tensor cores, fp32 outputs
            if dw_fused:  # the dx product into the group buffer, summed into dx once per DX_GROUP chunks
                dx_part = mixed_mm(tile.grad, w, acc, out=grouped_dx.slot())
                if tile.inv_factor is not None:
                    dx_part.mul_(tile.inv_factor)
                grouped_dx.added()
            else:
                dx_part = mixed_mm(tile.grad, w, acc)
                dx.add_(dx_part if tile.inv_factor is None else dx_part.mul_(tile.inv_factor))
            rows = dw_sink.rows_buffer(col0, col1, w_stored, scratch)
            if dw_fused:  # the dW GEMM with finish_dw (and the column sums) in its epilogue, into the rows
                epilogue.fused_dw(tile.grad, x_mm, w_stored, tile.col_dot, inv_norm, tile.inv_factor, rows)
            else:
                dw = mixed_mm(tile.grad.t(), x_mm, acc)
                epilogue.finish_dw(dw, w_stored, tile.col_dot, inv_norm, tile.inv_factor, out=rows)
            dw_sink.store(col0, col1, rows)
            continue
        if x_acc is None:
            x_acc = x_mm.to(acc)  # the operands as multiplied (a cast product rounds x too)
        w_acc = w.to(acc)
        dx.addmm_(tile.grad, w_acc)
        dw = torch.mm(tile.grad.t(), x_acc, out=dw_sink.acc_buffer(col0, col1, scratch, dim))
        if normalize_weight:
            epilogue.finish_dw(dw, w_acc, tile.col_dot, inv_norm)
        dw_sink.store(col0, col1, dw)
    grouped_dx.flush()
    if grad_filter > 0:
        filter_stats.record(skipped, -(-num_cols // chunk_size))
    return dx.to(x.dtype), (dw_sink.dweight if sink is None else None), dshift
