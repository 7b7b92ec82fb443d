"""Backward kernels: recompute cosine tiles, form dL/dcos in registers, and accumulate dx and dW.

Both kernels hold whole embedding rows (d padded to BLOCK_D, the next power of two, with masks), since each
accumulates full gradient rows in registers:

* ``dweight_kernel``: one program per class tile, looping over every row block. It owns its dW rows, so it
  writes them once, with no atomics, in a fixed order (deterministic). Per class it also sums dc_ij * c_ij,
  the term of the ||w|| Jacobian:  dW_j = (sum_i dc_ij x_i - (sum_i dc_ij c_ij) w_j/||w_j||) / ||w_j||.
  With Partial FC it reads and writes only the rows class_index[cols].
* ``dx_kernel``: one program per (row block, class split), looping over the split's class tiles:
  dx_i = sum_j dc_ij w_j / ||w_j||. Each split writes a partial; the host sums the splits in a fixed order.

With gradient filtering (FILTER) a tile whose every |dc| is below the threshold skips its products; the dW
kernel counts skipped and visited tiles per program (int32 device tensors the host sums without a sync).
"""
import triton
import triton.language as tl

from .triton_tiles import (class_rows, dcos_tile, grad_mma, inverse_norms, load_constants, load_row_inputs,
                           load_tile, mma, tile_is_active)


@triton.jit
def load_row_grads(lse_ptr, g_lse_ptr, g_target_ptr, rows, row_ok):
    """Per-row finite LSE and incoming gradients; padded rows get g = 0, so their dc is 0."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lse = tl.load(g_lse_ptr + rows, mask=row_ok, other=0.0)
    g_target = tl.load(g_target_ptr + rows, mask=row_ok, other=0.0)
    return lse, g_lse, g_target


@triton.jit
def dweight_kernel(x_ptr, w_ptr, labels_ptr, rp_ptr, consts_ptr, index_ptr, lse_ptr, g_lse_ptr, g_target_ptr,
                   dw_ptr, stats_ptr, B, N, D, stride_xb, stride_xd, stride_wc, stride_wd, stride_dwc,
                   stride_dwd, filter_threshold,
                   KIND: tl.constexpr, NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
                   RESCALE: tl.constexpr, FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    acc_dtype = rp_ptr.dtype.element_ty
    scale, a, b = load_constants(consts_ptr)
    ks = tl.arange(0, BLOCK_D)
    k_ok = ks < D
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    cls = class_rows(index_ptr, cols, col_ok, HAS_INDEX)
    w = load_tile(w_ptr, cls * stride_wc, stride_wd, ks, col_ok, k_ok)
    w_acc = w.to(acc_dtype)
    inv_norm = inverse_norms(tl.sum(w_acc * w_acc, 1), NORMALIZE)

    dw = tl.zeros((BLOCK_C, BLOCK_D), acc_dtype)
    col_dot = tl.zeros((BLOCK_C,), acc_dtype)
    skipped = tl.zeros((), tl.int32)
    for row0 in range(0, B, BLOCK_B):
        rows = row0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x = load_tile(x_ptr, rows.to(tl.int64) * stride_xb, stride_xd, ks, row_ok, k_ok)
        labels, T, U = load_row_inputs(labels_ptr, rp_ptr, rows, row_ok)
        lse, g_lse, g_target = load_row_grads(lse_ptr, g_lse_ptr, g_target_ptr, rows, row_ok)
        cos = mma(x, tl.trans(w), tl.zeros((BLOCK_B, BLOCK_C), acc_dtype), UPCAST) * inv_norm[None, :]
        dc = dcos_tile(cos, cols, col_ok, labels, T, U, lse, g_lse, g_target, scale, a, b, KIND)
        if tile_is_active(dc, filter_threshold, FILTER):
            dw = grad_mma(tl.trans(dc), x, dw, UPCAST, RESCALE)
            if NORMALIZE:
                col_dot += tl.sum(dc * cos, 0)
        else:
            skipped += 1

    if NORMALIZE:
        dw = (dw - (col_dot * inv_norm)[:, None] * w_acc) * inv_norm[:, None]
    dw_offs = (cls * stride_dwc)[:, None] + ks.to(tl.int64)[None, :] * stride_dwd
    tl.store(dw_ptr + dw_offs, dw.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])
    if FILTER:
        tl.store(stats_ptr + pid * 2, skipped)
        tl.store(stats_ptr + pid * 2 + 1, tl.cdiv(B, BLOCK_B))


@triton.jit
def dx_kernel(x_ptr, w_ptr, labels_ptr, rp_ptr, consts_ptr, index_ptr, lse_ptr, g_lse_ptr, g_target_ptr,
              partial_ptr, B, N, D, stride_xb, stride_xd, stride_wc, stride_wd, SPLITS, filter_threshold,
              KIND: tl.constexpr, NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
              RESCALE: tl.constexpr, FILTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_dtype = rp_ptr.dtype.element_ty
    scale, a, b = load_constants(consts_ptr)
    ks = tl.arange(0, BLOCK_D)
    k_ok = ks < D
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    x = load_tile(x_ptr, rows.to(tl.int64) * stride_xb, stride_xd, ks, row_ok, k_ok)
    labels, T, U = load_row_inputs(labels_ptr, rp_ptr, rows, row_ok)
    lse, g_lse, g_target = load_row_grads(lse_ptr, g_lse_ptr, g_target_ptr, rows, row_ok)

    num_tiles = tl.cdiv(N, BLOCK_C)
    per_split = tl.cdiv(num_tiles, SPLITS)
    tile_end = tl.minimum(pid_s * per_split + per_split, num_tiles)
    dx = tl.zeros((BLOCK_B, BLOCK_D), acc_dtype)
    for tile in range(pid_s * per_split, tile_end):
        cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < N
        cls = class_rows(index_ptr, cols, col_ok, HAS_INDEX)
        w = load_tile(w_ptr, cls * stride_wc, stride_wd, ks, col_ok, k_ok)
        w_acc = w.to(acc_dtype)
        inv_norm = inverse_norms(tl.sum(w_acc * w_acc, 1), NORMALIZE)
        cos = mma(x, tl.trans(w), tl.zeros((BLOCK_B, BLOCK_C), acc_dtype), UPCAST) * inv_norm[None, :]
        dc = dcos_tile(cos, cols, col_ok, labels, T, U, lse, g_lse, g_target, scale, a, b, KIND)
        if tile_is_active(dc, filter_threshold, FILTER):
            dx = grad_mma(dc * inv_norm[None, :], w, dx, UPCAST, RESCALE)

    offs = (pid_s * B + rows).to(tl.int64)[:, None] * D + ks[None, :]
    tl.store(partial_ptr + offs, dx, mask=row_ok[:, None] & k_ok[None, :])
