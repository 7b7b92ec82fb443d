"""Forward kernel: per-row log-sum-exp of the negative logits, the B x C logits never leaving registers.

Grid: (row blocks, class splits). A program owns BLOCK_B rows and a contiguous range of class tiles; for each
class tile it forms the cosines (``triton_tiles.cosine_tile``: x . w on the tensor cores with fp32
accumulation, ||w||^2 from the same loaded W tile; with K sub-centers ``max_cosine_tile``, one such GEMM per
sub-center and the max over them in registers), applies the negative function and scale, drops the
target and padded columns, and merges into an online max / sum (the binary reduction, REDUCTION =
SOFTPLUS_SUM: sums the softplus terms instead; its splits are merged by a fixed-order sum). Each split
writes its partial LSE; the host merges the splits with a fixed order ``logsumexp`` over a (splits, B)
tensor, so the result is deterministic for a given config.

The arithmetic (bench/gpu_model.py, B = 512, C = 1e6, d = 512, bf16, H100): the product is 5.2e11 FLOP,
0.78 ms on wgmma at Triton's 0.85 of cuBLAS; a BLOCK_B x BLOCK_C tile reads B C d (1/BLOCK_B + 1/BLOCK_C)
operand elements from L2, 0.88 ms at 128 x 256 (the autotuner's likely pick there: 237 registers, one CTA per
SM) and 1.2 ms at 128 x 128; the epilogue issues ~17 instructions per element (a multiply for z, the max, the
difference times log2 e, a bare ex2 (``exp2_tile``), the sum, the target and padding masks), 0.30 ms at one CTA
per SM, where it does not overlap the MMAs. W crosses HBM once (0.34 ms), hidden under the rest.

With a memory budget (``backends/kept_tiles.py``; K = 1 only, the host never keeps sub-center tiles) the
kernel also writes what the backward would recompute: SAVE_NORMS, 1/||w_j|| of every column (the programs of
row block 0); KEEP, the cosine tile of the columns below KEEP_COLS, in the store's chunk-major layout for
backward chunks of KEEP_CH columns. Both are constexpr: without a budget the compiled kernel is unchanged.
"""
import triton
import triton.language as tl

from .triton_tiles import (LN2, LOG2E, SOFTPLUS_SUM, class_rows, exp2_tile, keep_tile, load_binary_constants,
                           load_constants, load_row_inputs, max_cosine_tile, negative_logits, softplus_tile)


@triton.jit
def tile_cosines(x_ptr, x_off, stride_xd, rows, row_ok, w_ptr, index_ptr, stride_wc, stride_wd, norms_ptr,
                 keep_ptr, tile, pid_b, B, N, D, KEEP_COLS, KEEP_CH, acc_dtype: tl.constexpr,
                 NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr, PRODUCT: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, SUB_CENTERS: tl.constexpr,
                 SAVE_NORMS: tl.constexpr, KEEP: tl.constexpr):
    """(cols, col_ok, cos) of class tile ``tile``: the part both reduction loops share (inlined into each, so
    each loop still compiles to its own register footprint), with the memory budget's norm and tile stores."""
    cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    cls = class_rows(index_ptr, cols, col_ok, HAS_INDEX)
    cos, _ = max_cosine_tile(x_ptr, x_off, stride_xd, row_ok, w_ptr, cls, stride_wc, stride_wd, col_ok, D,
                             acc_dtype, NORMALIZE, UPCAST, PRODUCT, BLOCK_B, BLOCK_C, BLOCK_K, SUB_CENTERS,
                             norms_ptr, cols, col_ok & (cols * 0 + pid_b == 0), SAVE_NORMS)
    if KEEP:
        keep_tile(keep_ptr, cos, rows, cols, row_ok, B, KEEP_COLS, KEEP_CH)
    return cols, col_ok, cos


@triton.jit
def lse_forward_kernel(x_ptr, w_ptr, labels_ptr, rp_ptr, consts_ptr, index_ptr, partial_ptr, norms_ptr, keep_ptr,
                       B, N, D, stride_xb, stride_xd, stride_wc, stride_wd, SPLITS, B_BUCKET, shift_ptr,
                       KEEP_COLS, KEEP_CH,
                       KIND: tl.constexpr, NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr,
                       UPCAST: tl.constexpr, PRODUCT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr, SUB_CENTERS: tl.constexpr = 1, REDUCTION: tl.constexpr = 0,
                       SAVE_NORMS: tl.constexpr = False, KEEP: tl.constexpr = False, FAST: tl.constexpr = False):
    # B_BUCKET (the batch rounded up to a power of two) is only the autotuner's key
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_dtype = rp_ptr.dtype.element_ty
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    x_off = rows.to(tl.int64) * stride_xb
    labels, T, U = load_row_inputs(labels_ptr, rp_ptr, rows, row_ok)
    scale, a, b = load_constants(consts_ptr)

    num_tiles = tl.cdiv(N, BLOCK_C)
    per_split = tl.cdiv(num_tiles, SPLITS)
    tile_end = tl.minimum(pid_s * per_split + per_split, num_tiles)
    run_max = tl.full((BLOCK_B,), float("-inf"), acc_dtype)
    run_sum = tl.zeros((BLOCK_B,), acc_dtype)
    if REDUCTION == SOFTPLUS_SUM:  # the binary reduction: a plain sum of softplus terms, no running max
        clamp, beta = load_binary_constants(consts_ptr, shift_ptr)
        for tile in range(pid_s * per_split, tile_end):
            cols, col_ok, cos = tile_cosines(x_ptr, x_off, stride_xd, rows, row_ok, w_ptr, index_ptr, stride_wc,
                                             stride_wd, norms_ptr, keep_ptr, tile, pid_b, B, N, D, KEEP_COLS,
                                             KEEP_CH, acc_dtype, NORMALIZE, HAS_INDEX, UPCAST, PRODUCT, BLOCK_B,
                                             BLOCK_C, BLOCK_K, SUB_CENTERS, SAVE_NORMS, KEEP)
            run_sum += tl.sum(softplus_tile(cos, cols, col_ok, labels, T, U, scale, a, b, clamp, beta, KIND), 1)
        tl.store(partial_ptr + pid_s * B + rows, run_sum, mask=row_ok)
    else:  # a loop of its own: the log-sum-exp's compiled code (and registers) as without the binary branch
        for tile in range(pid_s * per_split, tile_end):
            cols, col_ok, cos = tile_cosines(x_ptr, x_off, stride_xd, rows, row_ok, w_ptr, index_ptr, stride_wc,
                                             stride_wd, norms_ptr, keep_ptr, tile, pid_b, B, N, D, KEEP_COLS,
                                             KEEP_CH, acc_dtype, NORMALIZE, HAS_INDEX, UPCAST, PRODUCT, BLOCK_B,
                                             BLOCK_C, BLOCK_K, SUB_CENTERS, SAVE_NORMS, KEEP)
            z, _ = negative_logits(cos, cols, col_ok, labels, T, U, scale, a, b, KIND)
            new_max = tl.maximum(run_max, tl.max(z, 1))
            # rows with nothing merged yet keep max -inf: shift by 0 there so ex2 never sees inf - inf
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            # exp(z - shift) as ex2((z - shift) log2 e): the difference first, where the large terms cancel (an
            # FMA z log2 e - shift log2 e leaves shift log2 e's rounding, up to 1e23 at a scale of 1e30)
            run_sum = (run_sum * exp2_tile((run_max - shift) * LOG2E, FAST)
                       + tl.sum(exp2_tile((z - shift[:, None]) * LOG2E, FAST), 1))
            run_max = new_max
        tl.store(partial_ptr + pid_s * B + rows, run_max + tl.log2(run_sum) * LN2, mask=row_ok)
