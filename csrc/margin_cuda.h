/* CUDA epilogues of the chunked margin-softmax loop: a C API over raw device pointers, so neither side needs
 * the other's headers (margin_cuda.cu has no torch headers; bindings.cpp needs no CUDA headers). Every call
 * launches on ``stream`` (a cudaStream_t) with ``device`` made current for its duration, and returns 0 or an
 * error code that mk_cuda_error_string() describes (a cudaError_t, or one of MK_CUDA_ERR_* below). */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dtypes of the pointers below */
enum { MK_DTYPE_F32 = 0, MK_DTYPE_F64 = 1, MK_DTYPE_F16 = 2, MK_DTYPE_BF16 = 3 };

/* errors found before any launch (values above every cudaError_t) */
enum {
  MK_CUDA_ERR_UNKNOWN_KIND = 100001,
  MK_CUDA_ERR_BAD_DTYPE = 100002,
  MK_CUDA_ERR_TOO_MANY_ROWS = 100003,
  MK_CUDA_ERR_BAD_ARGUMENT = 100004, /* an inconsistent set of optional pointers */
  MK_CUDA_ERR_MISSING_OUTPUT = 100005,
};

/* one B x n tile of dot products x_i . w_j and what the epilogue needs to turn it into logits or gradients */
typedef struct mk_tile_args {
  void* tile;            /* rows x cols, row-major, leading dimension ld (elements); backward overwrites it */
  int64_t rows, cols, ld;
  const void* inv_norm;  /* cols entries 1/max(|w_j|, eps), or NULL for raw weights */
  const int64_t* labels; /* rows entries; row i's excluded (target) column is labels[i] - col0 if in range */
  int64_t col0;
  const void* row_params; /* rows x 2, contiguous: (T_i, U_i) of the negative function */
  int kind;              /* NegativeKind */
  double scale, a, b;
  int reduction;         /* ReductionKind: 0 log-sum-exp, 1 the binary family's softplus sum */
  double clamp;          /* the binary reduction's logit clamp (inf: none) */
  const void* shift;     /* the binary reduction's logit shift, one element of the tile's dtype (device) */
  int dtype;             /* MK_DTYPE_F32 or MK_DTYPE_F64: of the tile, inv_norm, row_params, every row vector */
  int device;            /* CUDA device ordinal of every pointer */
  void* stream;          /* cudaStream_t */
} mk_tile_args;

/* out[j] = 1 / max(|w_j|, eps), w in any MK_DTYPE_*, out in F32 or F64 */
int mk_cuda_inv_norms(const void* w, int w_dtype, int64_t n, int64_t dim, int64_t ld, void* out, int out_dtype,
                      int device, void* stream);

/* merge the tile's negative logits (target column excluded) into run_max/run_sum (rows entries, in place); the
 * binary reduction adds the row's softplus terms to run_sum instead */
int mk_cuda_forward_epilogue(const mk_tile_args* args, void* run_max, void* run_sum);

/* where the backward epilogue writes dL/d(x_i . w_j): a rows x cols matrix (leading dimension ld) of
 * out_dtype (the tile's own dtype, or F16/BF16: the operand of tensor-core gradient GEMMs), each value
 * multiplied by *factor (one element of the tile's dtype on the device, or NULL for 1) before rounding */
typedef struct mk_grad_out {
  void* data;
  int64_t ld;
  int dtype;
  const void* factor;
} mk_grad_out;

/* dL/d(x_i . w_j) of the tile (see margin_cpu.h's backward_tile), over the tile itself (out NULL) or into
 * *out; col_dot (cols entries) is written when inv_norm is given; *max_abs (one element, zeroed here) gets
 * max |dL/dc| when not NULL; the binary reduction writes col_shift[j] = sum_i dL/dz_ij (cols entries,
 * required) */
int mk_cuda_backward_epilogue(const mk_tile_args* args, const void* lse, const void* g_lse,
                              const void* g_cos_target, void* col_dot, void* max_abs, void* col_shift,
                              const mk_grad_out* out);

/* the epilogue of the dW GEMM: out_j = g_j * inv_factor - col_dot_j / |w_j|^2 * w_j for the n x dim GEMM output
 * g (dtype F32/F64, leading dimension ld_g); w (any MK_DTYPE_*) are the chunk's weight rows; col_dot and
 * inv_norm (n entries of g's dtype) are both NULL for raw weights (no normalisation term); inv_factor is one
 * element of g's dtype or NULL for 1; out (out_dtype: g's, or the gradient's 16-bit dtype) may be g itself */
typedef struct mk_dw_args {
  const void* g;
  int64_t n, dim, ld_g;
  int dtype;
  const void* w;
  int64_t ld_w;
  int w_dtype;
  const void* col_dot;
  const void* inv_norm;
  const void* inv_factor;
  void* out;
  int64_t ld_out;
  int out_dtype;
  int device;
  void* stream;
} mk_dw_args;

int mk_cuda_finish_dw(const mk_dw_args* args);

/* sub-centers (K adjacent weight rows per class), see margin_cpu.h's sub_center_max / sub_center_scatter:
 * values/winner (rows x classes, contiguous) = each class's best normalised dot product and its sub-center;
 * out (rows x classes K, leading dimension ld_out) = grad at each class's winning row times its 1/|w|, 0 at the
 * others, col_dot (classes K entries, when not NULL) = sum_i grad * values over the rows each row won, summed
 * in row order. dtype: MK_DTYPE_F32 or MK_DTYPE_F64 of every floating pointer; inv_norm may be NULL. */
int mk_cuda_sub_center_max(const void* tile, int64_t rows, int64_t classes, int64_t ld, const void* inv_norm,
                           int K, void* values, int32_t* winner, int dtype, int device, void* stream);
int mk_cuda_sub_center_scatter(const void* grad, const void* values, const int32_t* winner, const void* inv_norm,
                               int64_t rows, int64_t classes, int K, void* out, int64_t ld_out, void* col_dot,
                               int dtype, int device, void* stream);

const char* mk_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
