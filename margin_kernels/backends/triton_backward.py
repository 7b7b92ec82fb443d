"""Backward kernels: three GEMM-shaped kernels per class chunk, each product done once.

The backward needs three products of B x C x d (the recomputed cosines, dx = dC . W_hat and dW = dC^T . X),
where dC = dL/dcos is a B x C tile set. dC is formed once per class chunk and handed to two plain GEMMs
through a buffer (Cut Cross-Entropy's and flash-attention's approach to their probability tiles):

1. ``dcos_kernel``, grid (row blocks, class tiles of the chunk): the cosine GEMM (``cosine_tile``; LOADED:
   the tile and norms the forward kept, ``backends/kept_tiles.py``, read instead), then dC in registers
   (``triton_tiles.dcos_tile``), written once in the GEMMs' operand dtype (bf16/fp16 storage, or fp32 storage
   whose products are bf16/fp16: tensor-core operands; otherwise the accumulation dtype) to a buffer of whole
   row blocks x chunk; per class a partial of sum_i dc_ij c_ij (the ||w|| Jacobian term) per row block, and
   1/||w_j||.
2. ``dweight_kernel``, grid (class groups, d tiles): dW_chunk = dC^T . X with K = B, and the normalisation
   backward in its epilogue, dW_j = (sum_i dc_ij x_i - (sum_i dc_ij c_ij) w_j/||w_j||) / ||w_j||,
   summing the row-block partials in a fixed order. Each program owns its output tile (GROUP dcos class tiles
   tall, BLOCK_D wide).
3. ``dx_kernel``, grid (row blocks, d tiles, class splits): dx += dC . (W / ||W||) with K = the chunk's
   classes, split over SPLITS programs whose fp32 partials persist across chunks and are summed in a fixed
   order at the end. A program adds its tile to its partial with a relaxed atomic reduction: it is the slot's
   only writer in the launch and the chunks' launches run in stream order, so each element is the same fp32
   sum in the same order every run (deterministic; no register copy of the old partial beside the
   accumulator, which made the 128 x 256 tile spill).

The arithmetic that sets the tiles (bench/gpu_model.py, calibrated on the peers; B = 512, C = 1e6, d = 512,
bf16, H100): each product is 2 B C d = 5.2e11 FLOP, 0.66 ms at 790 TFLOP/s (0.78 ms at Triton's 0.85 of it);
a BM x BN output tile reads M N K (1/BM + 1/BN) operand elements from L2, 1.2 ms at 7 TB/s for 128 x 128
tiles and 0.88 ms for 128 x 256, against 2.3 ms for the 64 x 64 dW tiles of the first design. So: 128 x 128
dC tiles (the largest whose epilogue fits the registers: 204-254 per thread), 128 x 256 dW and dx output tiles
(245-255 registers, 0 spills). The dcos epilogue runs once per B x C element and issues ~28 instructions per
element (1769 per warp per tile: ex2 without range fix-up, constants folded per row, no masks on the stores;
the column sums' shuffles are a quarter of it): 0.46 ms at one CTA per SM, the largest term after L2. Memory
besides dW: the buffer (at most ``triton_configs.BACKWARD_BUFFER_BYTES``), the partials ((B/BLOCK_B) x chunk
fp32) and the dx partials (SPLITS x B x d fp32).

Sub-centers (SUB_CENTERS = K > 1): the dcos kernel's tile is BLOCK_C classes, their K rows each a cosine GEMM
(``triton_tiles.max_cosine_tile``, max and argmax in registers); it writes each class's dc at its winning row
of a B x (chunk K) buffer (0 at the other K - 1) with per-row partials and norms, so the two gradient GEMMs
run unchanged over chunk K weight rows (``class_rows`` maps a row back to class_index[r // K] K + r % K).
Gradient filtering is not applied then (its flags assume one tiling of classes for all three kernels).

fp16 storage: dC is multiplied by one power-of-two ``factor`` (a device scalar) that puts its bound near
2^14 before it is rounded to fp16 (small entries would flush to zero), and both GEMMs divide it out. bf16
shares fp32's range and uses factor 1.

The binary reduction (REDUCTION = SOFTPLUS_SUM): the dcos kernel forms dC from the per-element sigmoid,
g_lse_i sigmoid(z_ij + beta), and writes each (row block, class tile)'s sum of dL/dz to its own slot; the
host sums the slots in a fixed order for the shift's gradient.

Gradient filtering (FILTER): a (row block x class tile) of dC whose every |dc| is below the threshold is
written as zeros and flagged inactive; ``active_lists_kernel`` turns the flags into K-step lists (per row
block for dx, per class group for dW), and the two GEMMs loop over the listed steps only: no ``if`` around
their loads, so Triton still pipelines them, and no host sync.
"""
import triton
import triton.language as tl

from .triton_tiles import (SOFTPLUS_SUM, binary_dcos_tile, class_rows, dcos_tile, kept_offsets,
                           load_binary_constants, load_constants, load_row_inputs, load_tile, max_cosine_tile, mma,
                           tile_is_active)


@triton.jit
def load_row_grads(lse_ptr, g_lse_ptr, g_target_ptr, rows, row_ok):
    """Per-row finite LSE and incoming gradients; padded rows get g = 0 and lse = +inf, so their dc is 0."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    g_lse = tl.load(g_lse_ptr + rows, mask=row_ok, other=0.0)
    g_target = tl.load(g_target_ptr + rows, mask=row_ok, other=0.0)
    return lse, g_lse, g_target


@triton.jit
def chunk_columns(col0, CH, N, pid, BLOCK: tl.constexpr):
    """(positions in the chunk, global column ids, in-range mask) of one class tile of the chunk."""
    local = pid * BLOCK + tl.arange(0, BLOCK)
    cols = col0 + local
    return local, cols, (local < CH) & (cols < N)


@triton.jit
def active_lists_kernel(flags_ptr, tiles_ptr, tiles_count_ptr, blocks_ptr, blocks_count_ptr, n_row_blocks,
                        n_col_tiles, GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """Gradient filtering's K steps as lists, so the two GEMMs loop over what the dcos kernel kept without an
    ``if`` around their loads (an ``if`` there stops Triton from pipelining them: synchronous MMAs, 0 async
    copies in the compiled code). Program r < n_row_blocks: the kept class tiles of row block r, ascending
    (the dx kernel's K steps); program n_row_blocks + g: the row blocks that kept any of class group g's GROUP
    tiles, ascending (the dW kernel's). Each list starts at a fixed offset, its length beside it; one launch
    per chunk, no host sync."""
    pid = tl.program_id(0)
    if pid < n_row_blocks:
        t = tl.arange(0, BLOCK_T)
        kept = (tl.load(flags_ptr + pid * n_col_tiles + t, mask=t < n_col_tiles, other=0) != 0).to(tl.int32)
        tl.store(tiles_ptr + pid * n_col_tiles + tl.cumsum(kept, 0) - 1, t, mask=kept != 0)
        tl.store(tiles_count_ptr + pid, tl.sum(kept, 0))
    else:
        g = pid - n_row_blocks
        r = tl.arange(0, BLOCK_R)
        t = g * GROUP + tl.arange(0, GROUP)
        flags = tl.load(flags_ptr + r[:, None] * n_col_tiles + t[None, :],
                        mask=(r < n_row_blocks)[:, None] & (t < n_col_tiles)[None, :], other=0)
        kept = tl.max((flags != 0).to(tl.int32), 1)
        tl.store(blocks_ptr + g * n_row_blocks + tl.cumsum(kept, 0) - 1, r, mask=kept != 0)
        tl.store(blocks_count_ptr + g, tl.sum(kept, 0))


@triton.jit
def dcos_kernel(x_ptr, w_ptr, labels_ptr, rp_ptr, consts_ptr, index_ptr, lse_ptr, g_lse_ptr, g_target_ptr,
                factor_ptr, dc_ptr, col_dot_ptr, inv_norm_ptr, flags_ptr, norms_ptr, keep_ptr, B, N, D, col0, CH,
                KEEP_COLS, stride_xb, stride_xd, stride_wc, stride_wd, filter_threshold, shift_ptr,
                shift_partial_ptr,
                KIND: tl.constexpr, NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
                PRODUCT: tl.constexpr, FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_K: tl.constexpr, SUB_CENTERS: tl.constexpr = 1, REDUCTION: tl.constexpr = 0,
                LOADED: tl.constexpr = False, FAST: tl.constexpr = False):
    # columns are classes here (CH per chunk); the buffer, the partials and the norms are per weight row:
    # CH * SUB_CENTERS of them, a class's K rows adjacent
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_dtype = rp_ptr.dtype.element_ty
    scale, a, b = load_constants(consts_ptr)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    local, cols, col_ok = chunk_columns(col0, CH, N, pid_c, BLOCK_C)
    if LOADED:  # the forward kept this chunk's cosines and the norms (K = 1 only): no GEMM
        cos = tl.load(keep_ptr + kept_offsets(rows, cols, B, KEEP_COLS, CH),
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        winner = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
        if NORMALIZE:
            if pid_b == 0:  # the dW / dx kernels read the chunk's norms from inv_norm_ptr
                tl.store(inv_norm_ptr + local, tl.load(norms_ptr + cols, mask=col_ok, other=0.0), mask=local < CH)
    else:
        cls = class_rows(index_ptr, cols, col_ok, HAS_INDEX)
        cos, winner = max_cosine_tile(x_ptr, rows.to(tl.int64) * stride_xb, stride_xd, row_ok, w_ptr, cls,
                                      stride_wc, stride_wd, col_ok, D, acc_dtype, NORMALIZE, UPCAST, PRODUCT,
                                      BLOCK_B, BLOCK_C, BLOCK_K, SUB_CENTERS, inv_norm_ptr, local,
                                      (local < CH) & (local * 0 + pid_b == 0), True)
    labels, T, U = load_row_inputs(labels_ptr, rp_ptr, rows, row_ok)
    lse, g_lse, g_target = load_row_grads(lse_ptr, g_lse_ptr, g_target_ptr, rows, row_ok)
    # dc below is already times the buffer's factor (1 but for fp16): folded into per-row constants, so the
    # B x C elements take no multiply for it; the filter threshold and the column sums scale instead
    factor = tl.load(factor_ptr)
    if REDUCTION == SOFTPLUS_SUM:
        clamp, beta = load_binary_constants(consts_ptr, shift_ptr)
        dc, dz = binary_dcos_tile(cos, cols, col_ok, labels, T, U, g_lse, g_target, scale, a, b, clamp, beta, KIND)
        # this tile's share of the shift's gradient (padded rows have g_lse = 0), one slot per program
        dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
        tl.store(shift_partial_ptr + pid_b * tl.num_programs(1) + pid_c, tl.sum(tl.sum(dz, 1), 0))
        dc = tl.where(row_ok[:, None] & col_ok[None, :], dc, 0.0) * factor
    else:
        dc = dcos_tile(cos, cols, col_ok, labels, T, U, lse, g_lse * (scale * factor), g_target * factor,
                       scale, a, b, KIND, FAST)
    if FILTER:
        active = tile_is_active(dc, filter_threshold * factor, FILTER)
        tl.store(flags_ptr + pid_b * tl.num_programs(1) + pid_c, active.to(tl.int8))
        dc = tl.where(active, dc, 0.0)
    row_cols = CH * SUB_CENTERS
    for k in tl.static_range(SUB_CENTERS):  # each class's dc goes to its winning row, 0 to the others
        if SUB_CENTERS == 1:
            dk = dc
        else:
            dk = tl.where(winner == k, dc, 0.0)
        col = local * SUB_CENTERS + k
        tl.store(col_dot_ptr + pid_b.to(tl.int64) * row_cols + col, tl.sum(dk * cos, 0) * (1.0 / factor),
                 mask=local < CH)
        # no mask: the buffer has whole row blocks of rows and CH is whole class tiles (triton_configs.
        # backward_chunk), and padded rows and columns hold dc = 0: a mask would cost a predicate per element
        offs = rows.to(tl.int64)[:, None] * row_cols + col[None, :]
        tl.store(dc_ptr + offs, dk.to(dc_ptr.dtype.element_ty))


@triton.jit
def dweight_step(x_ptr, dc_ptr, row_block, local, col_ok, ks, k_ok, acc, B, CH, stride_xb, stride_xd,
                 UPCAST: tl.constexpr, PRODUCT: tl.constexpr, BLOCK_B: tl.constexpr):
    """acc + dC[rows, cols]^T . X[rows, ks] for the rows of one row block (a K step of the dW GEMM)."""
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    dc = tl.load(dc_ptr + rows.to(tl.int64)[:, None] * CH + local[None, :],
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    x = load_tile(x_ptr, rows.to(tl.int64) * stride_xb, stride_xd, ks, row_ok, k_ok)
    return mma(tl.trans(dc), x.to(dc.dtype), acc, UPCAST, PRODUCT)


@triton.jit
def dweight_kernel(x_ptr, w_ptr, index_ptr, dc_ptr, col_dot_ptr, inv_norm_ptr, blocks_ptr, blocks_count_ptr,
                   factor_ptr, dw_ptr, B, N, D, col0, CH, n_row_blocks, stride_xb, stride_xd, stride_wc, stride_wd,
                   stride_dwc, stride_dwd,
                   NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr, PRODUCT: tl.constexpr,
                   FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   SUB_CENTERS: tl.constexpr = 1, LOCAL_OUT: tl.constexpr = False, GROUP: tl.constexpr = 1):
    # columns are weight rows: N, col0 and CH count rows (classes x SUB_CENTERS). LOCAL_OUT: dW row j of the
    # chunk goes to row j of dw_ptr (a chunk buffer for a fused optimizer's sink) instead of to its weight row.
    # The output tile is GROUP dcos class tiles tall (BLOCK_C x GROUP rows of dW): K = B in steps of BLOCK_B,
    # with FILTER only the row blocks active_lists_kernel listed for this group
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    acc_dtype = col_dot_ptr.dtype.element_ty
    local, cols, col_ok = chunk_columns(col0, CH, N, pid_c, BLOCK_C * GROUP)
    ks = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < D
    acc = tl.zeros((BLOCK_C * GROUP, BLOCK_D), acc_dtype)
    if FILTER:
        for i in range(0, tl.load(blocks_count_ptr + pid_c)):
            row_block = tl.load(blocks_ptr + pid_c * n_row_blocks + i)
            acc = dweight_step(x_ptr, dc_ptr, row_block, local, col_ok, ks, k_ok, acc, B, CH, stride_xb,
                               stride_xd, UPCAST, PRODUCT, BLOCK_B)
    else:
        for row_block in range(0, n_row_blocks):
            acc = dweight_step(x_ptr, dc_ptr, row_block, local, col_ok, ks, k_ok, acc, B, CH, stride_xb,
                               stride_xd, UPCAST, PRODUCT, BLOCK_B)
    inv_factor = 1.0 / tl.load(factor_ptr)
    cls = class_rows(index_ptr, cols, col_ok, HAS_INDEX, SUB_CENTERS)
    if NORMALIZE:
        col_dot = tl.zeros((BLOCK_C * GROUP,), acc_dtype)
        for row_block in range(0, n_row_blocks):  # the dcos kernel's partials, summed in a fixed order
            col_dot += tl.load(col_dot_ptr + row_block * CH + local, mask=col_ok, other=0.0)
        inv_norm = tl.load(inv_norm_ptr + local, mask=col_ok, other=0.0)
        # (G / factor - (col_dot / ||w||) w) / ||w||, in this order: a row factor 1/||w||^2 underflows for
        # ||w|| > ~1e19 (tests/test_huge_norms.py), col_dot / ||w|| times w does not
        w = load_tile(w_ptr, cls * stride_wc, stride_wd, ks, col_ok, k_ok)
        dw = (acc * inv_factor - (col_dot * inv_norm)[:, None] * w.to(acc_dtype)) * inv_norm[:, None]
    else:
        dw = acc * inv_factor
    out_rows = local.to(tl.int64) if LOCAL_OUT else cls
    offs = (out_rows * stride_dwc)[:, None] + ks.to(tl.int64)[None, :] * stride_dwd
    tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])


@triton.jit
def dx_step(w_ptr, index_ptr, dc_ptr, inv_norm_ptr, tile, rows, row_ok, ks, k_ok, acc, N, col0, CH, stride_wc,
            stride_wd, NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
            PRODUCT: tl.constexpr, BLOCK_C: tl.constexpr, SUB_CENTERS: tl.constexpr):
    """acc + dC[rows, tile] . (W / ||W||)[tile, ks] (a K step of the dx GEMM: one class tile of the chunk)."""
    local, cols, col_ok = chunk_columns(col0, CH, N, tile, BLOCK_C)
    dc = tl.load(dc_ptr + rows.to(tl.int64)[:, None] * CH + local[None, :],
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    cls = class_rows(index_ptr, cols, col_ok, HAS_INDEX, SUB_CENTERS)
    w = load_tile(w_ptr, cls * stride_wc, stride_wd, ks, col_ok, k_ok)
    if NORMALIZE:  # W / ||W|| in registers (rows of unit norm: no fp16 overflow), never a copy of W
        inv_norm = tl.load(inv_norm_ptr + local, mask=col_ok, other=0.0)
        w = (w.to(acc.dtype) * inv_norm[:, None]).to(dc.dtype)
    return mma(dc, w.to(dc.dtype), acc, UPCAST, PRODUCT)


@triton.jit
def dx_kernel(w_ptr, index_ptr, dc_ptr, inv_norm_ptr, tiles_ptr, tiles_count_ptr, factor_ptr, partial_ptr, B, N,
              D, col0, CH, n_col_tiles, stride_wc, stride_wd, SPLITS,
              NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr, PRODUCT: tl.constexpr,
              FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              SUB_CENTERS: tl.constexpr = 1):
    # columns are weight rows, as in dweight_kernel. K = the chunk's class tiles (with FILTER the ones
    # active_lists_kernel listed for this row block), SPLITS programs each taking a contiguous share of them
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    acc_dtype = partial_ptr.dtype.element_ty
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ks = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < D
    acc = tl.zeros((BLOCK_B, BLOCK_D), acc_dtype)
    if FILTER:
        count = tl.load(tiles_count_ptr + pid_b)
        per_split = tl.cdiv(count, SPLITS)
        for i in range(pid_s * per_split, tl.minimum(pid_s * per_split + per_split, count)):
            tile = tl.load(tiles_ptr + pid_b * n_col_tiles + i)
            acc = dx_step(w_ptr, index_ptr, dc_ptr, inv_norm_ptr, tile, rows, row_ok, ks, k_ok, acc, N, col0, CH,
                          stride_wc, stride_wd, NORMALIZE, HAS_INDEX, UPCAST, PRODUCT, BLOCK_C, SUB_CENTERS)
    else:
        per_split = tl.cdiv(n_col_tiles, SPLITS)
        for tile in range(pid_s * per_split, tl.minimum(pid_s * per_split + per_split, n_col_tiles)):
            acc = dx_step(w_ptr, index_ptr, dc_ptr, inv_norm_ptr, tile, rows, row_ok, ks, k_ok, acc, N, col0, CH,
                          stride_wc, stride_wd, NORMALIZE, HAS_INDEX, UPCAST, PRODUCT, BLOCK_C, SUB_CENTERS)
    offs = (pid_s * B + rows).to(tl.int64)[:, None] * D + ks[None, :]
    mask = row_ok[:, None] & k_ok[None, :]
    # partial += acc as a reduction the memory system applies: no register copy of the previous partial beside
    # the accumulator (a load + store held both: 255 registers and spills at 128 x 256). Deterministic: this
    # program is the only writer of its slot during the launch and the chunks' launches run in stream order,
    # so each element is the same fp32 sum, previous + acc, in the same order every run
    tl.atomic_add(partial_ptr + offs, acc * (1.0 / tl.load(factor_ptr)), mask=mask, sem="relaxed")
