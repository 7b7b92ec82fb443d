// CPU epilogues of the chunked margin-softmax loop (margin_kernels/backends/torch_chunked.py): the elementwise
// work on one B x n tile of fp32 (or fp64) dot products between the GEMMs. Raw pointers, no torch headers;
// instantiated for float and double. OpenMP over rows (forward) or class strips (backward); every reduction
// runs in a fixed order independent of the thread count, so results are deterministic.
#pragma once

#include <stdint.h>

namespace mk_cpu {

enum Status : int {
  kOk = 0,
  kUnknownKind = 1,
  kMissingOutput = 2,
};

template <typename T>
struct TileArgs {
  T* tile;                // rows x cols, row-major, leading dimension ld: x_i . w_j (backward overwrites it)
  int64_t rows, cols, ld;
  const T* inv_norm;      // cols entries 1/max(|w_j|, eps), or nullptr when the loss uses raw weights
  const int64_t* labels;  // rows entries; the row's excluded (target) column is labels[i] - col0 if in range
  int64_t col0;
  const T* row_params;    // rows x 2, contiguous: (T_i, U_i) of the negative function
  int kind;               // mk::NegativeKind
  T scale, a, b;
  int reduction;          // mk::ReductionKind
  T clamp;                // the binary reduction's logit clamp (inf: none)
  const T* shift;         // the binary reduction's logit shift (one element; unused for kLse)
};

// out[j] = 1 / max(|w_j|, eps) for the n rows of w (leading dimension ld)
template <typename T>
void inv_norms(const T* w, int64_t n, int64_t dim, int64_t ld, T* out, int threads);

// merge the tile's negative logits (target column excluded) into run_max/run_sum (rows entries, in place);
// the binary reduction adds the row's softplus terms to run_sum instead (run_max untouched)
template <typename T>
int forward_tile(const TileArgs<T>& args, T* run_max, T* run_sum, int threads);

// overwrite the tile with dL/d(x_i . w_j): dL/dc_ij (target column: g_cos_target_i) times 1/|w_j| when
// normalised; col_dot[j] = sum_i dL/dc_ij * c_ij (needed, and only written, when inv_norm is given);
// *max_abs = max |dL/dc_ij| when max_abs is not null (gradient filtering). lse must be finite. The binary
// reduction (lse unused) also writes col_shift[j] = sum_i dL/dz_ij over the negatives (cols entries, required).
template <typename T>
int backward_tile(const TileArgs<T>& args, const T* lse, const T* g_lse, const T* g_cos_target, T* col_dot,
                  T* max_abs, T* col_shift, int threads);

// in place on the dW GEMM output g (n x dim, leading dimension ld_g): g_j -= col_dot_j / |w_j|^2 * w_j
template <typename T>
void finish_dw(T* g, int64_t n, int64_t dim, int64_t ld_g, const T* w, int64_t ld_w, const T* col_dot,
               const T* inv_norm, int threads);

// ---- sub-centers (K adjacent weight rows per class) ------------------------------------------------------
// values[i, j] (rows x classes, contiguous) = max_k tile[i, jK + k] * inv_norm[jK + k] (no factor without
// inv_norm), winner[i, j] = its k (ties: the lowest)
template <typename T>
void sub_center_max(const T* tile, int64_t rows, int64_t classes, int64_t ld, const T* inv_norm, int K, T* values,
                    int32_t* winner, int threads);

// out (rows x classes K, leading dimension ld_out) = grad[i, j] * inv_norm[jK + w] at each class's winning row
// jK + w (w = winner[i, j]; no factor without inv_norm) and 0 at its other rows; col_dot[jK + k] =
// sum_i grad[i, j] * values[i, j] over the rows i won by sub-center k (only when col_dot is given), summed in
// row order. grad, values, winner: rows x classes, contiguous.
template <typename T>
void sub_center_scatter(const T* grad, const T* values, const int32_t* winner, const T* inv_norm, int64_t rows,
                        int64_t classes, int K, T* out, int64_t ld_out, T* col_dot, int threads);

// ---- the header's per-element math, exposed for direct tests ----------------------------------------------
// value[i, j] = g(c_ij) and deriv[i, j] = g'(c_ij) for a contiguous rows x cols tile
template <typename T>
int negative_eval(const T* c, int64_t rows, int64_t cols, const T* row_params, int kind, T a, T b, T* value,
                  T* deriv);

template <typename T>
void exp_eval(const T* x, int64_t n, T* out);

// pairwise (run_max, run_sum) <- merge((run_max, run_sum), (other_max, other_sum)), in place
template <typename T>
void lse_merge_eval(T* run_max, T* run_sum, const T* other_max, const T* other_sum, int64_t n);

}  // namespace mk_cpu
