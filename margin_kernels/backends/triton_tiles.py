"""Device functions shared by the forward and backward Triton kernels: loading row and class tiles, the
tensor-core product, and the epilogue that turns a tile of cosines into logits or into dL/dcos.

Conventions: ``rows`` / ``cols`` are int32 index vectors of a tile, ``cls`` the int64 weight rows of its
columns (``class_index[cols]`` for Partial FC, else ``cols``); every pointer offset is formed in int64 so
C * d > 2^31 elements is addressed correctly. Masked-out rows and columns load as zeros.
"""
import triton
import triton.language as tl

from .. import norms
from ..losses.reductions import ReductionKind
from ..precision import PRODUCTS
from .triton_negatives import IDENTITY, POWER_ST, negative_derivative, negative_value

NORM_EPS = tl.constexpr(norms.NORM_EPS)  # w / max(||w||, eps), the one value every backend uses
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def class_rows(index_ptr, cols, col_ok, HAS_INDEX: tl.constexpr, SUB_CENTERS: tl.constexpr = 1):
    """int64 weight row of each column: gathered from class_index inside the kernel (no W[index] copy).

    With SUB_CENTERS = K > 1, for kernels whose columns are weight rows (the backward's two gradient GEMMs):
    column r is sub-center r % K of the problem's class r // K, i.e. weight row class_index[r // K] K + r % K."""
    if SUB_CENTERS == 1:
        if HAS_INDEX:
            return tl.load(index_ptr + cols, mask=col_ok, other=0).to(tl.int64)
        else:
            return cols.to(tl.int64)
    else:
        if HAS_INDEX:
            cls = tl.load(index_ptr + cols // SUB_CENTERS, mask=col_ok, other=0).to(tl.int64)
            return cls * SUB_CENTERS + (cols % SUB_CENTERS).to(tl.int64)
        else:
            return cols.to(tl.int64)


@triton.jit
def load_row_inputs(labels_ptr, rp_ptr, rows, row_ok):
    """Labels (-1 = none, so padded rows have no target) and the negative function's per-row T, U."""
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    threshold = tl.load(rp_ptr + rows * 2, mask=row_ok, other=0.0)
    aux = tl.load(rp_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
    return labels, threshold[:, None], aux[:, None]


@triton.jit
def load_constants(consts_ptr):
    """(scale, a, b) in the accumulation dtype (a tensor, so fp64 runs get fp64 constants)."""
    return tl.load(consts_ptr), tl.load(consts_ptr + 1), tl.load(consts_ptr + 2)


@triton.jit
def load_binary_constants(consts_ptr, shift_ptr):
    """(clamp L, shift beta) of the binary reduction: L is the 4th constant, beta the (1,) shift tensor."""
    return tl.load(consts_ptr + 3), tl.load(shift_ptr)


@triton.jit
def load_tile(ptr, row_off, stride_k, ks, row_ok, k_ok):
    """(len(row_off), len(ks)) tile in storage dtype; row_off are int64 element offsets of the rows."""
    offs = row_off[:, None] + ks.to(tl.int64)[None, :] * stride_k
    return tl.load(ptr + offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)


# the product modes of margin_kernels.precision.PRODUCTS, as the PRODUCT constexpr numbers them
STORAGE = tl.constexpr(PRODUCTS.index("storage"))
IEEE = tl.constexpr(PRODUCTS.index("ieee"))
TF32 = tl.constexpr(PRODUCTS.index("tf32"))
BF16 = tl.constexpr(PRODUCTS.index("bf16"))
FP16 = tl.constexpr(PRODUCTS.index("fp16"))


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRODUCT: tl.constexpr = 0):
    """acc + a @ b with fp32 (fp64) accumulation, the operands multiplied as PRODUCT says (precision.py): in
    their own dtype (STORAGE; fp32 as exact IEEE products), IEEE fp32, TF32, or cast to bf16 / fp16 in
    registers (fp32 weights under autocast or "medium" precision). fp64 names its accumulator dtype
    (``out_dtype``), without which Triton 3.6+ refuses to compile an fp64 dot.

    UPCAST multiplies in fp32: the Triton interpreter's dot reads bf16 bit patterns as integers (triton 3.9),
    so the backend sets it for bf16 under TRITON_INTERPRET; bf16 x bf16 products are exact in fp32 anyway.
    """
    if PRODUCT == BF16:
        a = a.to(tl.bfloat16)
        b = b.to(tl.bfloat16)
    elif PRODUCT == FP16:
        a = a.to(tl.float16)
        b = b.to(tl.float16)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float64:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    elif a.dtype == tl.float32 and PRODUCT == TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


#: 2^-64: W entries times it square without overflow up to fp32's largest norm (3.4e38 x 2^-64 ~ 1.8e19, whose
#: square is 3.4e38); 2^64 undoes it on the inverse norm
OVERFLOW_SCALE = tl.constexpr(2.0 ** -64)


@triton.jit
def cosine_tile(x_ptr, x_off, stride_xd, row_ok, w_ptr, w_off, stride_wd, col_ok, D, acc_dtype: tl.constexpr,
                NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRODUCT: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """(cos, 1/||w||) of a (BLOCK_B rows x BLOCK_C classes) tile: a K loop over d (masked tail, any d) that
    accumulates x . w on the tensor cores and ||w||^2 from the same loaded W tile (storage dtype, never a
    normalised copy of W). The one GEMM of the forward kernel and of the backward's dcos kernel.

    Norms that cannot overflow (norms.py's rule). fp32: beside ||w||^2 the loop sums (2^-64 w)^2, which no
    finite fp32 row overflows, and a row whose plain sum overflowed (norm > ~1.8e19) takes 2^-64 / sqrt of that
    instead; its small entries may underflow there, at under 2^-126 of the sum they join. Two multiplies per W
    element and one BLOCK_C vector, without a branch or a second pass over W (a rescue pass under an ``if``
    kept more registers live and made the wide 16-bit tiles spill). fp64 (no 2^-512 constant in Triton's fp32
    literals): a tile holding an overflowed row sums it again divided by its largest entry."""
    dots = tl.zeros((BLOCK_B, BLOCK_C), acc_dtype)
    sumsq = tl.zeros((BLOCK_C,), acc_dtype)
    scaled = tl.zeros((BLOCK_C,), acc_dtype)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = load_tile(x_ptr, x_off, stride_xd, ks, row_ok, k_ok)
        w = load_tile(w_ptr, w_off, stride_wd, ks, col_ok, k_ok)
        dots = mma(x, tl.trans(w), dots, UPCAST, PRODUCT)
        w_acc = w.to(acc_dtype)
        sumsq += tl.sum(w_acc * w_acc, 1)
        if NORMALIZE and acc_dtype == tl.float32:
            w_small = w_acc * OVERFLOW_SCALE
            scaled += tl.sum(w_small * w_small, 1)
    inv_norm = inverse_norms(sumsq, NORMALIZE)
    if NORMALIZE:
        overflowed = sumsq == float("inf")
        if acc_dtype == tl.float32:
            inv_norm = tl.where(overflowed, OVERFLOW_SCALE / tl.sqrt(scaled), inv_norm)
        elif tl.max(overflowed.to(tl.int32), 0) > 0:  # fp64 (norm > ~1.3e154): rare, and no spill rule there
            inv_norm = rescued_inverse_norms(w_ptr, w_off, stride_wd, col_ok, D, overflowed, inv_norm, acc_dtype,
                                             BLOCK_C, BLOCK_K)
    return dots * inv_norm[None, :], inv_norm


@triton.jit
def rescued_inverse_norms(w_ptr, w_off, stride_wd, col_ok, D, overflowed, inv_norm, acc_dtype: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """1/||w|| of the rows whose sum of squares overflowed, summed again divided by their largest |entry|
    (norms.py's rule, mk::inv_norm_rescaled in C++): (1 / sqrt(sum (w/top)^2)) / top, two more passes over the
    tile's W rows, taken only by a tile holding such a row. A row holding inf (top = inf) keeps 1/inf = 0."""
    top = tl.zeros((BLOCK_C,), acc_dtype)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = load_tile(w_ptr, w_off, stride_wd, ks, col_ok, ks < D).to(acc_dtype)
        top = tl.maximum(top, tl.max(tl.abs(w), 1))
    rescue = overflowed & (top < float("inf"))
    top = tl.where(rescue, top, 1.0)
    unit = tl.zeros((BLOCK_C,), acc_dtype)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = load_tile(w_ptr, w_off, stride_wd, ks, col_ok, ks < D).to(acc_dtype) / top[:, None]
        unit += tl.sum(w * w, 1)
    return tl.where(rescue, (1.0 / tl.sqrt(unit)) / top, inv_norm)


@triton.jit
def max_cosine_tile(x_ptr, x_off, stride_xd, row_ok, w_ptr, cls, stride_wc, stride_wd, col_ok, D,
                    acc_dtype: tl.constexpr, NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRODUCT: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                    SUB_CENTERS: tl.constexpr, inv_norm_ptr, inv_off, inv_ok, STORE_INV: tl.constexpr):
    """(cos, winning sub-center) of a (BLOCK_B rows x BLOCK_C classes) tile: class j's cosine is the max over
    its K weight rows cls_j K + k (``margin_kernels.subcenters``), one ``cosine_tile`` GEMM per k, the max and
    the argmax kept in registers (never a B x C x K tensor). The scan over k = 0 .. K-1 keeps the first
    maximum (strict >), the tie rule of every backend. K = 1 is exactly ``cosine_tile`` (winner 0).
    STORE_INV writes each row's 1/||w|| at inv_norm_ptr + inv_off * K + k (the backward's per-row norms)."""
    best, inv = cosine_tile(x_ptr, x_off, stride_xd, row_ok, w_ptr, (cls * SUB_CENTERS) * stride_wc, stride_wd,
                            col_ok, D, acc_dtype, NORMALIZE, UPCAST, PRODUCT, BLOCK_B, BLOCK_C, BLOCK_K)
    if STORE_INV:
        tl.store(inv_norm_ptr + inv_off * SUB_CENTERS, inv, mask=inv_ok)
    winner = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
    for k in tl.static_range(1, SUB_CENTERS):
        cos, inv = cosine_tile(x_ptr, x_off, stride_xd, row_ok, w_ptr, (cls * SUB_CENTERS + k) * stride_wc,
                               stride_wd, col_ok, D, acc_dtype, NORMALIZE, UPCAST, PRODUCT, BLOCK_B, BLOCK_C,
                               BLOCK_K)
        if STORE_INV:
            tl.store(inv_norm_ptr + inv_off * SUB_CENTERS + k, inv, mask=inv_ok)
        better = (cos > best) | (cos != cos)  # a NaN wins and sticks, as torch.max: never skipped
        best = tl.where(better, cos, best)
        winner = tl.where(better, k, winner)
    return best, winner


@triton.jit
def inverse_norms(sumsq, NORMALIZE: tl.constexpr):
    """1 / max(||w||, eps) from the accumulated squared norms (1 when the loss keeps raw weights)."""
    if NORMALIZE:
        return 1.0 / tl.maximum(tl.sqrt(sumsq), NORM_EPS)
    else:
        return tl.full(sumsq.shape, 1.0, sumsq.dtype)


@triton.jit
def negative_logits(cos, cols, col_ok, labels, T, U, scale, a, b, KIND: tl.constexpr):
    """z = scale g(cos) (rounded as every backend rounds it: the forward and the backward must exponentiate the
    same z) with the target column and padded columns set to -inf; also the target mask. A non-finite cosine
    (a NaN/Inf weight row) gives z = NaN, as in every backend (losses/negatives.py): c - c is 0, or NaN for an
    infinite or NaN c, one add where a compare and a select would take two instructions."""
    is_target = cols[None, :] == labels[:, None]
    z = scale * negative_value(cos, T, U, a, b, KIND) + (cos - cos)
    return tl.where(col_ok[None, :] & (~is_target), z, float("-inf")), is_target


SOFTPLUS_SUM = tl.constexpr(int(ReductionKind.SOFTPLUS_SUM))


@triton.jit
def log1p_exp_neg(abs_z):
    """log(1 + exp(-|z|)) accurate for tiny exp(-|z|) (no libdevice log1p in every Triton): with v = 1 + u,
    log(v) * u / (v - 1) cancels the rounding of v (Goldberg's trick), and is u itself once v rounds to 1."""
    u = tl.exp(-abs_z)
    v = 1.0 + u
    return tl.where(v == 1.0, u, tl.log(v) * (u / tl.where(v == 1.0, 1.0, v - 1.0)))


@triton.jit
def binary_logits(cos, cols, col_ok, labels, T, U, scale, a, b, shift, KIND: tl.constexpr):
    """z + beta of the binary reduction and the mask of the tile's negatives (target and padding excluded)."""
    is_target = cols[None, :] == labels[:, None]
    z = scale * negative_value(cos, T, U, a, b, KIND) + shift
    return z, col_ok[None, :] & (~is_target), is_target


@triton.jit
def softplus_tile(cos, cols, col_ok, labels, T, U, scale, a, b, clamp, shift, KIND: tl.constexpr):
    """softplus(clamp(z + beta, L)) of the tile's negatives, 0 at the target and padded columns. A non-finite
    cosine (a NaN/Inf weight row) gives a NaN term, as in every backend: min/max and the power kinds' floored
    base may turn a NaN into a number (PTX min/max return the other operand), so the rule is applied last."""
    z, negative, _ = binary_logits(cos, cols, col_ok, labels, T, U, scale, a, b, shift, KIND)
    z = tl.minimum(tl.maximum(z, -clamp), clamp)
    terms = tl.maximum(z, 0.0) + log1p_exp_neg(tl.abs(z))
    terms = tl.where((cos == cos) & (tl.abs(cos) < float("inf")), terms, float("nan"))
    return tl.where(negative, terms, 0.0)


@triton.jit
def binary_dcos_tile(cos, cols, col_ok, labels, T, U, g_lse, g_target, scale, a, b, clamp, shift,
                     KIND: tl.constexpr):
    """(dL/dcos, dL/dz) of a tile under the binary reduction: dz = g_lse sigmoid(z + beta) inside the clamp
    (0 outside it, at the target and padding), dc = scale g'(c) dz, and g_target at the target column."""
    z, negative, is_target = binary_logits(cos, cols, col_ok, labels, T, U, scale, a, b, shift, KIND)
    inside = (z >= -clamp) & (z <= clamp) & negative
    dz = tl.where(inside, g_lse[:, None] / (1.0 + tl.exp(-z)), 0.0)
    dc = dz * (scale * negative_derivative(cos, T, U, a, b, KIND))
    return tl.where(is_target, g_target[:, None], dc), dz


@triton.jit
def exp2_tile(t, FAST: tl.constexpr):
    """2^t elementwise. FAST (fp32 on a GPU): one MUFU.EX2 through ``ex2.approx.ftz.f32``; Triton's tl.exp2
    lowers to the non-ftz instruction, which ptxas wraps in a range fix-up for results below 2^-126 (a compare,
    two multiplies and a select around the MUFU: 5-6 instructions per element). Flushing those results to 0
    changes a sum of at most C of them by C x 2^-126, far below fp32's rounding of anything it is added to.
    The interpreter (no inline PTX) and fp64 take tl.exp2."""
    if FAST and t.dtype == tl.float32:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [t], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(t)


@triton.jit
def dcos_tile(cos, cols, col_ok, labels, T, U, lse, gs, g_target, scale, a, b, KIND: tl.constexpr,
              FAST: tl.constexpr):
    """dL/dcos of a tile, times the rows' factors: gs_i g'(c) exp(scale g(c) - lse_i) with gs = g_lse scale
    (x the fp16 buffer's factor), ``g_target`` at the target column, 0 at padded columns. Rows need no mask: a
    padded row's x is 0 and its gs is 0, and its lse is +inf.

    The epilogue runs once per B x C element, so every instruction counts (``python -m bench kernels``):
    the exp is a bare ex2 (FAST), g' is skipped for the kinds whose g' is 1, the
    target column is only overwritten (its exp need not be masked to 0 first), and a non-finite cosine (a
    NaN/Inf weight row) still gives NaN with one add: c - c is 0, or NaN for an infinite or NaN c.

    ``lse`` must be finite for real rows (rows without negatives pass 0: p does not matter there)."""
    is_target = cols[None, :] == labels[:, None]
    # exp(z - lse) as ex2((z - lse) log2 e), z rounded as the forward rounded it and the difference taken before
    # any product with log2 e: folding scale log2 e into one FMA (and lse log2 e per row) rounded both large
    # terms separately, 2-4x the gradient error at s = 1e4 (tests/test_bad_values.py)
    p = exp2_tile((scale * negative_value(cos, T, U, a, b, KIND) - lse[:, None]) * LOG2E, FAST)
    dc = p * gs[:, None]
    if KIND != IDENTITY and KIND != POWER_ST:  # g' = 1 there (POWER_ST: opensphere's detached adjustment)
        dc = dc * negative_derivative(cos, T, U, a, b, KIND)
    dc = dc + (cos - cos)  # 0, or NaN where the cosine is not finite: one add instead of a compare and select
    dc = tl.where(is_target, g_target[:, None], dc)
    return tl.where(col_ok[None, :], dc, 0.0)


@triton.jit
def tile_is_active(dc, threshold, FILTER: tl.constexpr):
    """Gradient filtering: False when every |dc| of the tile is below the threshold (its products are skipped)."""
    if FILTER:
        return tl.max(tl.max(tl.abs(dc), 1), 0) >= threshold
    else:
        return True


@triton.jit
def kept_offsets(rows, cols, B, KEEP_COLS, KEEP_CH):
    """int64 offsets of (rows x cols) in a kept-tile store (``backends/kept_tiles.py``): column j lives in the
    chunk starting at c0 = j - j % KEEP_CH, a row-major B x min(KEEP_CH, KEEP_COLS - c0) block at B * c0."""
    c0 = (cols // KEEP_CH * KEEP_CH).to(tl.int64)
    width = tl.minimum(KEEP_CH, KEEP_COLS - c0)
    return c0[None, :] * B + rows.to(tl.int64)[:, None] * width[None, :] + (cols - c0)[None, :]


@triton.jit
def keep_tile(keep_ptr, cos, rows, cols, row_ok, B, KEEP_COLS, KEEP_CH):
    """The forward's store of a cosine tile into the kept-tile store (only its columns below KEEP_COLS)."""
    tl.store(keep_ptr + kept_offsets(rows, cols, B, KEEP_COLS, KEEP_CH), cos,
             mask=row_ok[:, None] & (cols < KEEP_COLS)[None, :])
