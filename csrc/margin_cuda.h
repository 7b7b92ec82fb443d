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
  MK_CUDA_ERR_MISSING_OUTPUT = 100004,
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

/* overwrite the tile with dL/d(x_i . w_j) (see margin_cpu.h's backward_tile); col_dot (cols entries) is
 * written when inv_norm is given; *max_abs (one element, zeroed here) gets max |dL/dc| when not NULL; the
 * binary reduction writes col_shift[j] = sum_i dL/dz_ij (cols entries, required) */
int mk_cuda_backward_epilogue(const mk_tile_args* args, const void* lse, const void* g_lse,
                              const void* g_cos_target, void* col_dot, void* max_abs, void* col_shift);

/* in place on the dW GEMM output g (n x dim, leading dimension ld_g): g_j -= col_dot_j / |w_j|^2 * w_j */
int mk_cuda_finish_dw(void* g, int64_t n, int64_t dim, int64_t ld_g, const void* w, int64_t ld_w,
                      const void* col_dot, const void* inv_norm, int dtype, int device, void* stream);

const char* mk_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
