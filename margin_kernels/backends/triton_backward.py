"""Backward kernels: three GEMM-shaped kernels per class chunk, each product done once.

The backward needs three products of B x C x d (the recomputed cosines, dx = dC . W_hat and dW = dC^T . X),
where dC = dL/dcos is a B x C tile set. The earlier design formed dC twice (once in a dW kernel looping over
every row block, once in a dx kernel looping over class splits): five GEMM-equivalents per step with the
forward, whole embedding rows in fp32 registers (BLOCK_D = next_pow2(d) wide accumulators: 255 registers
and spills at d = 512 on sm_90) and w tiles kept alive across the row loop. Here dC is formed once per
class chunk and handed to two plain GEMMs through a buffer (Cut Cross-Entropy's and flash-attention's
approach to their probability tiles, without atomics):

1. ``dcos_kernel``, grid (row blocks, class tiles of the chunk): the cosine GEMM (``cosine_tile``), then
   dC in registers, written once in the GEMMs' operand dtype (bf16/fp16 storage, or fp32 storage whose
   products are bf16/fp16: tensor-core operands; otherwise the accumulation dtype) to a B x chunk buffer; per class a partial of
   sum_i dc_ij c_ij (the ||w|| Jacobian term) per row block, and 1/||w_j||.
2. ``dweight_kernel``, grid (class tiles, d tiles): dW_chunk = dC^T . X with K = B, and the normalisation
   backward in its epilogue, dW_j = (sum_i dc_ij x_i - (sum_i dc_ij c_ij) w_j/||w_j||) / ||w_j||,
   summing the row-block partials in a fixed order. Each program owns its output tile: no atomics.
3. ``dx_kernel``, grid (row blocks, d tiles, class splits): dx += dC . (W / ||W||) with K = the chunk's
   classes, split over SPLITS programs whose fp32 partials persist across chunks (each (split, row block,
   d tile) is owned by one program, chunks run in stream order) and are summed in a fixed order at the end.

Deterministic for a given tiling; every accumulator is an ordinary (BLOCK x BLOCK) GEMM tile, so the
compiled kernels keep the register use of a GEMM. Memory besides dW: the buffer (B x chunk, at most
``triton_configs.BACKWARD_BUFFER_BYTES``), the partials ((B/BLOCK_B) x chunk fp32) and the dx partials
(SPLITS x B x d fp32).

fp16 storage: dC is multiplied by one power-of-two ``factor`` (a device scalar) that puts its bound near
2^14 before it is rounded to fp16 (small entries would flush to zero), and both GEMMs divide it out. bf16
shares fp32's range and uses factor 1.

Gradient filtering (FILTER): a (row block x class tile) of dC whose every |dc| is below the threshold is
written as zeros, flagged inactive, and both GEMMs skip its products; the kernels then share one tiling
(BLOCK_B, BLOCK_C), so the flags line up with their K steps.
"""
import triton
import triton.language as tl

from .triton_tiles import (class_rows, cosine_tile, dcos_tile, load_constants, load_row_inputs, load_tile, mma,
                           tile_is_active)


@triton.jit
def load_row_grads(lse_ptr, g_lse_ptr, g_target_ptr, rows, row_ok):
    """Per-row finite LSE and incoming gradients; padded rows get g = 0, so their dc is 0."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
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
def tile_flag(flags_ptr, row_block, col_tile, n_col_tiles, FILTER: tl.constexpr):
    """Whether the dcos kernel kept this (row block, class tile) of dC (always, without filtering)."""
    if FILTER:
        return tl.load(flags_ptr + row_block * n_col_tiles + col_tile) != 0
    else:
        return True


@triton.jit
def dcos_kernel(x_ptr, w_ptr, labels_ptr, rp_ptr, consts_ptr, index_ptr, lse_ptr, g_lse_ptr, g_target_ptr,
                factor_ptr, dc_ptr, col_dot_ptr, inv_norm_ptr, flags_ptr, B, N, D, col0, CH,
                stride_xb, stride_xd, stride_wc, stride_wd, filter_threshold,
                KIND: tl.constexpr, NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
                PRODUCT: tl.constexpr, FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_dtype = rp_ptr.dtype.element_ty
    scale, a, b = load_constants(consts_ptr)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    local, cols, col_ok = chunk_columns(col0, CH, N, pid_c, BLOCK_C)
    w_off = class_rows(index_ptr, cols, col_ok, HAS_INDEX) * stride_wc
    cos, inv_norm = cosine_tile(x_ptr, rows.to(tl.int64) * stride_xb, stride_xd, row_ok, w_ptr, w_off, stride_wd,
                                col_ok, D, acc_dtype, NORMALIZE, UPCAST, PRODUCT, BLOCK_B, BLOCK_C, BLOCK_K)
    labels, T, U = load_row_inputs(labels_ptr, rp_ptr, rows, row_ok)
    lse, g_lse, g_target = load_row_grads(lse_ptr, g_lse_ptr, g_target_ptr, rows, row_ok)
    dc = dcos_tile(cos, cols, col_ok, labels, T, U, lse, g_lse, g_target, scale, a, b, KIND)
    dc = tl.where(row_ok[:, None] & col_ok[None, :], dc, 0.0)
    if FILTER:
        active = tile_is_active(dc, filter_threshold, FILTER)
        tl.store(flags_ptr + pid_b * tl.num_programs(1) + pid_c, active.to(tl.int8))
        dc = tl.where(active, dc, 0.0)
    tl.store(col_dot_ptr + pid_b.to(tl.int64) * CH + local, tl.sum(dc * cos, 0), mask=local < CH)
    if pid_b == 0:
        tl.store(inv_norm_ptr + local, inv_norm, mask=local < CH)
    factor = tl.load(factor_ptr)
    offs = rows.to(tl.int64)[:, None] * CH + local[None, :]
    tl.store(dc_ptr + offs, (dc * factor).to(dc_ptr.dtype.element_ty), mask=row_ok[:, None] & (local < CH)[None, :])


@triton.jit
def dweight_kernel(x_ptr, w_ptr, index_ptr, dc_ptr, col_dot_ptr, inv_norm_ptr, flags_ptr, factor_ptr, dw_ptr,
                   B, N, D, col0, CH, n_row_blocks, n_col_tiles, stride_xb, stride_xd, stride_wc, stride_wd,
                   stride_dwc, stride_dwd,
                   NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr, PRODUCT: tl.constexpr,
                   FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   LOCAL_OUT: tl.constexpr = False):
    """LOCAL_OUT: dW row j of the chunk goes to row j of dw_ptr (a chunk buffer for a fused optimizer's sink)
    instead of to the class's row of a dense dW."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    acc_dtype = col_dot_ptr.dtype.element_ty
    local, cols, col_ok = chunk_columns(col0, CH, N, pid_c, BLOCK_C)
    ks = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < D
    acc = tl.zeros((BLOCK_C, BLOCK_D), acc_dtype)
    for row_block in range(0, tl.cdiv(B, BLOCK_B)):
        if tile_flag(flags_ptr, row_block, pid_c, n_col_tiles, FILTER):
            rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            dc = tl.load(dc_ptr + rows.to(tl.int64)[:, None] * CH + local[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            x = load_tile(x_ptr, rows.to(tl.int64) * stride_xb, stride_xd, ks, row_ok, k_ok)
            acc = mma(tl.trans(dc), x.to(dc.dtype), acc, UPCAST, PRODUCT)
    dw = acc * (1.0 / tl.load(factor_ptr))
    cls = class_rows(index_ptr, cols, col_ok, HAS_INDEX)
    if NORMALIZE:
        col_dot = tl.zeros((BLOCK_C,), acc_dtype)
        for row_block in range(0, n_row_blocks):  # the dcos kernel's partials, summed in a fixed order
            col_dot += tl.load(col_dot_ptr + row_block * CH + local, mask=col_ok, other=0.0)
        inv_norm = tl.load(inv_norm_ptr + local, mask=col_ok, other=0.0)
        w = load_tile(w_ptr, cls * stride_wc, stride_wd, ks, col_ok, k_ok).to(acc_dtype)
        dw = (dw - (col_dot * inv_norm)[:, None] * w) * inv_norm[:, None]
    out_rows = local.to(tl.int64) if LOCAL_OUT else cls
    offs = (out_rows * stride_dwc)[:, None] + ks.to(tl.int64)[None, :] * stride_dwd
    tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])


@triton.jit
def dx_kernel(w_ptr, index_ptr, dc_ptr, inv_norm_ptr, flags_ptr, factor_ptr, partial_ptr, B, N, D, col0, CH,
              n_col_tiles, stride_wc, stride_wd, SPLITS,
              NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr, PRODUCT: tl.constexpr,
              FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    acc_dtype = partial_ptr.dtype.element_ty
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ks = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < D
    per_split = tl.cdiv(n_col_tiles, SPLITS)
    acc = tl.zeros((BLOCK_B, BLOCK_D), acc_dtype)
    for tile in range(pid_s * per_split, tl.minimum(pid_s * per_split + per_split, n_col_tiles)):
        if tile_flag(flags_ptr, pid_b, tile, n_col_tiles, FILTER):
            local, cols, col_ok = chunk_columns(col0, CH, N, tile, BLOCK_C)
            dc = tl.load(dc_ptr + rows.to(tl.int64)[:, None] * CH + local[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            cls = class_rows(index_ptr, cols, col_ok, HAS_INDEX)
            w = load_tile(w_ptr, cls * stride_wc, stride_wd, ks, col_ok, k_ok)
            if NORMALIZE:  # W / ||W|| in registers (rows of unit norm: no fp16 overflow), never a copy of W
                inv_norm = tl.load(inv_norm_ptr + local, mask=col_ok, other=0.0)
                w = (w.to(acc_dtype) * inv_norm[:, None]).to(dc.dtype)
            acc = mma(dc, w.to(dc.dtype), acc, UPCAST, PRODUCT)
    offs = (pid_s * B + rows).to(tl.int64)[:, None] * D + ks[None, :]
    mask = row_ok[:, None] & k_ok[None, :]
    previous = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    tl.store(partial_ptr + offs, previous + acc * (1.0 / tl.load(factor_ptr)), mask=mask)
