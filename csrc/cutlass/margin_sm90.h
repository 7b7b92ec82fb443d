/* The cuda backend's epilogue-fused GEMMs for sm_90a (CUTLASS 3.x, margin_sm90.cu): a C API over raw device
 * pointers like margin_cuda.h (no torch, no CUTLASS in this header), so margin_sm90.cu compiles standalone
 * with nvcc and bindings.cpp needs neither. Each call launches on ``stream`` on the current device and returns
 * 0 or an error code (a cudaError_t, an MK_CUDA_ERR_* of margin_cuda.h, or MK_SM90_ERR_* below).
 *
 * Operands: x (rows x dim) and w (cols x dim), both row-major with unit column stride, of one 16-bit dtype
 * (MK_DTYPE_F16 / MK_DTYPE_BF16 of margin_cuda.h), 16-byte aligned with leading dimensions a multiple of 8
 * (TMA). Every float vector is fp32 and contiguous. The negative function's kind and constants are run-time
 * arguments (one kernel serves every loss). Deterministic: per-tile partials in fixed-order trees, merged
 * after in tile order; no float atomics. */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  MK_SM90_ERR_BAD_DTYPE = 100101,        /* gemm->dtype is neither MK_DTYPE_F16 nor MK_DTYPE_BF16 */
  MK_SM90_ERR_CANNOT_IMPLEMENT = 100102, /* CUTLASS's can_implement refused the problem (alignment, sizes) */
  MK_SM90_ERR_INTERNAL = 100103,         /* CUTLASS's initialize or run failed */
};

/* the per-row inputs and the negative function of one call (as margin_cuda.h's mk_tile_args) */
typedef struct mk_sm90_epilogue {
  const float* inv_norm;   /* cols entries 1/max(|w_j|, eps), or NULL for raw weights */
  const int64_t* labels;   /* rows entries; row i's excluded (target) column is labels[i] - col0 if in range */
  int64_t col0;
  const float* thr;        /* rows entries: T_i = row_params[i, 0] */
  const float* aux;        /* rows entries: U_i = row_params[i, 1] */
  int kind;                /* NegativeKind */
  float scale, a, b;
  int reduction;           /* ReductionKind: 0 log-sum-exp, 1 the binary family's softplus sum */
  float clamp;             /* the binary reduction's logit clamp (inf: none) */
  const float* shift;      /* the binary reduction's logit shift (one fp32 on the device; NULL: 0) */
} mk_sm90_epilogue;

typedef struct mk_sm90_gemm {
  const void* x;
  const void* w;
  int64_t rows, cols, dim, ld_x, ld_w;
  int dtype; /* MK_DTYPE_F16 or MK_DTYPE_BF16 */
} mk_sm90_gemm;

/* forward: merges the negatives of the rows x cols block x.w^T into run_max/run_sum (rows entries, fp32, in
 * place: the log-sum-exp pair, or the binary reduction's sum in run_sum), without writing the block. The GEMM's
 * epilogue writes one (max, sum) pair per row and 256-column tile into a scratch buffer; a second kernel merges
 * them in tile order. inv_norm_out (cols entries, or NULL): the kernel forms the weight norms itself from the W
 * tiles it multiplies, writes them there and uses them (ep->inv_norm is then ignored): inv_norm_out[j] =
 * inv_norm_from_sumsq(s_j) of margin_math.h with s_j = h0 + h1 in fp32, h_b the running sum of w_jk^2 over
 * k = 64 t + 32 b + i (t = 0, 1, .., i = 0 .. 31, in that order), or, when s_j is inf, the rescue's
 * inv_norm_rescaled(max |w_jk|, sum_k (w_jk / max)^2) summed in k order. NULL: ep->inv_norm as given. */
int mk_sm90_forward(const mk_sm90_gemm* gemm, const mk_sm90_epilogue* ep, float* inv_norm_out, float* run_max,
                    float* run_sum, void* stream);

/* backward (the recompute GEMM): grad (rows x cols of the operand dtype, leading dimension ld_grad) =
 * dL/d(x_i.w_j) of margin_cuda.h's backward epilogue times inv_norm[j] times *factor (NULL: 1); col_dot[j] =
 * sum_i dL/dc_ij c_ij (cols entries, when inv_norm is given) and, for the binary reduction, col_shift[j] =
 * sum_i dL/dz_ij (cols entries, required then), each summed over 64-row tiles in order. lse, g_lse and
 * g_cos_target: rows entries (lse finite). */
int mk_sm90_backward(const mk_sm90_gemm* gemm, const mk_sm90_epilogue* ep, const float* lse, const float* g_lse,
                     const float* g_cos_target, const float* factor, void* grad, int64_t ld_grad, float* col_dot,
                     float* col_shift, void* stream);

/* the same, leaving the per-(64-row tile, class) partials (sum_i dc c, sum_i dz) in col_parts (fp32 pairs,
 * tiles x padded_cols of mk_sm90_col_parts_shape) instead of summing them into col_dot/col_shift: the dW
 * GEMM's epilogue sums them in place (mk_sm90_dw_args.col_dot), with no kernel in between */
int mk_sm90_backward_parts(const mk_sm90_gemm* gemm, const mk_sm90_epilogue* ep, const float* lse,
                           const float* g_lse, const float* g_cos_target, const float* factor, void* grad,
                           int64_t ld_grad, float* col_parts, void* stream);
void mk_sm90_col_parts_shape(int64_t rows, int64_t cols, int64_t* tiles, int64_t* padded_cols);

/* the dW GEMM of one chunk with finish_dw in its epilogue: out (cols x dim, leading dimension ld_out, out_dtype:
 * the operand dtype or MK_DTYPE_F32) row j = dw_normalize(G_j * *inv_factor, w_j, col_dot_j * inv_norm_j,
 * inv_norm_j) of margin_math.h, G = grad^T x (fp32 accumulation), grad the recompute GEMM's rows x cols output
 * (1/|w_j| and the fp16 factor already in it), w the chunk's stored weight rows (the GEMM's C operand, the
 * operand dtype), inv_factor NULL: 1. Raw weights: inv_norm and col_dot both NULL, out = G * *inv_factor. grad,
 * x, w and out: unit column stride, 16-byte aligned rows (TMA). */
typedef struct mk_sm90_dw_args {
  const void* grad;
  const void* x;
  const void* w;
  void* out;
  int64_t rows, cols, dim, ld_grad, ld_x, ld_w, ld_out;
  int dtype;     /* grad, x, w: MK_DTYPE_F16 or MK_DTYPE_BF16 */
  int out_dtype; /* dtype or MK_DTYPE_F32 */
  /* col_dot_j = sum_t col_dot[t * col_dot_tile_stride + j * col_dot_step], t = 0 .. col_dot_tiles - 1 in order:
   * a finished vector (tiles 1, step 1), or mk_sm90_backward's col_parts read in place (step 2, tile stride
   * 2 x padded_cols, tiles its row tiles: the same sum as its col_dot, bit for bit) */
  const float* col_dot;
  int64_t col_dot_step, col_dot_tile_stride, col_dot_tiles;
  const float* inv_norm;
  const float* inv_factor;
} mk_sm90_dw_args;

int mk_sm90_dw(const mk_sm90_dw_args* args, void* stream);

/* the tile shapes (M, N, K) of the forward and the backward kernels, for the reports */
void mk_sm90_tile_shape(int backward, int* m, int* n, int* k);

#ifdef __cplusplus
}
#endif
