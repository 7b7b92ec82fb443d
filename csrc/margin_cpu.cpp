// CPU epilogues (see margin_cpu.h). The per-element math is margin_math.h's, shared with the CUDA kernels.
//
// Vectorisation without -ffast-math or -march=native: inner loops run over fixed blocks of kLanes independent
// accumulators (a reduction order that does not depend on the ISA), exp is margin_math.h's polynomial, and
// the hot loops are compiled in three ISA clones (AVX-512, AVX2+FMA, baseline x86-64) picked at load time by
// the dynamic linker (GCC target_clones), so one portable binary runs the widest loops the CPU has.
#include "margin_cpu.h"

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "margin_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(MK_NO_ISA_CLONES)
#define MK_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MK_ISA_CLONES
#endif

#if defined(__GNUC__)
#define MK_INLINE inline __attribute__((always_inline))
#else
#define MK_INLINE inline
#endif

namespace mk_cpu {
namespace {

constexpr int64_t kLanes = 16;      // independent accumulators of the vectorised reductions
constexpr int64_t kRowBlock = 512;  // forward: logits of this many columns wait in an L1 buffer
constexpr int64_t kStrip = 256;     // backward: columns per task; their sum_i dc*c accumulators stay in L1

int thread_count(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// max is exact in any order: let the compiler pick the vector width (fixed 16-lane blocks do not vectorise)
template <typename T>
MK_INLINE T lane_max(const T* p, int64_t n) {
  T m = mk::neg_infinity<T>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = mk::max_of(m, p[j]);
  return m;
}

template <typename T>
MK_INLINE T lane_sum_exp(const T* p, int64_t n, T shift) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += mk::mk_exp(p[j + l] - shift);
  for (; j < n; ++j) acc[0] += mk::mk_exp(p[j] - shift);
  T s = T(0);
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T>
MK_INLINE T lane_sum_squares(const T* p, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += p[j + l] * p[j + l];
  for (; j < n; ++j) acc[0] += p[j] * p[j];
  T s = T(0);
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// The binary reduction's row: the sum of the negatives' softplus terms. As forward_row, the terms of a block
// of columns are made in one vectorised pass into an L1 buffer (the target's set to 0); column j is then added
// into lane j mod kLanes (kRowBlock is a multiple of kLanes), so the order of every sum is fixed by the column
// alone, whatever the block.
template <int KIND, bool NORM, typename T>
MK_ISA_CLONES void forward_row_binary(const TileArgs<T>& g, int64_t i, T* run_sum) {
  static_assert(kRowBlock % kLanes == 0, "a block must start on lane 0");
  const T* __restrict row = g.tile + i * g.ld;
  const T* __restrict inv = g.inv_norm;
  const T thr = g.row_params[2 * i], aux = g.row_params[2 * i + 1];
  const mk::NegativeConsts<T> k{g.scale, g.a, g.b};
  const T shift = *g.shift, clamp = g.clamp;
  const int64_t target = g.labels[i] - g.col0;
  T acc[kLanes] = {};
  alignas(64) T buf[kRowBlock];
  for (int64_t j0 = 0; j0 < g.cols; j0 += kRowBlock) {
    const int64_t len = std::min(kRowBlock, g.cols - j0);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      T c = row[j0 + j];
      if constexpr (NORM) c *= inv[j0 + j];
      buf[j] = mk::softplus_term(mk::negative_logit<KIND>(c, thr, aux, k) + shift, clamp);
    }
    if (target >= j0 && target < j0 + len) buf[target - j0] = T(0);
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += buf[j + l];
    for (int64_t l = 0; j + l < len; ++l) acc[l] += buf[j + l];
  }
  T s = T(0);
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  run_sum[i] += s;
}

// One row of the tile: the row's negatives are read once, turned into logits in an L1 block buffer, and merged
// block by block into (M, S); the target column is masked to -inf (exp gives exactly 0).
template <int KIND, bool NORM, typename T>
MK_ISA_CLONES void forward_row(const TileArgs<T>& g, int64_t i, T* run_max, T* run_sum) {
  const T* __restrict row = g.tile + i * g.ld;
  const T* __restrict inv = g.inv_norm;
  const T thr = g.row_params[2 * i], aux = g.row_params[2 * i + 1];
  const mk::NegativeConsts<T> k{g.scale, g.a, g.b};
  const int64_t target = g.labels[i] - g.col0;  // outside [0, cols) when the row's class is not in this tile
  T M = mk::neg_infinity<T>(), S = T(0);
  alignas(64) T buf[kRowBlock];
  for (int64_t j0 = 0; j0 < g.cols; j0 += kRowBlock) {
    const int64_t len = std::min(kRowBlock, g.cols - j0);
    // a NaN logit (a non-finite weight row, margin_math.h's negative_logit) is flagged here, in the pass that
    // makes the logits: the max below is a vector max, which may drop a NaN instead of propagating it
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t j = 0; j < len; ++j) {
      T c = row[j0 + j];
      if constexpr (NORM) c *= inv[j0 + j];
      const T z = mk::negative_logit<KIND>(c, thr, aux, k);
      bad |= z != z;
      buf[j] = z;
    }
    if (target >= j0 && target < j0 + len) buf[target - j0] = mk::neg_infinity<T>();
    if (bad) {  // NaN in the sum survives every later merge (NaN * anything is NaN)
      M = S = static_cast<T>(NAN);
      break;
    }
    const T block_max = lane_max(buf, len);
    if (block_max == mk::neg_infinity<T>()) continue;
    if (block_max > M) {
      S *= mk::mk_exp(M - block_max);
      M = block_max;
    }
    S += lane_sum_exp(buf, len, M);
  }
  mk::lse_merge(run_max[i], run_sum[i], M, S);
}

// One strip of columns over all rows, in row order: the per-column sums (col_dot = sum_i dc*c; with the binary
// reduction also col_shift = sum_i dL/dz, the shift's gradient) are accumulated in a fixed order whatever the
// number of threads. BINARY: dL/dz = g_i sigmoid(z + shift) (binary_negative_grad) instead of the softmax's
// g_i exp(z - lse) (negative_grad); one template, so both reductions share the row walk and the stores.
template <int KIND, bool NORM, bool BINARY, typename T>
MK_ISA_CLONES void backward_strip(const TileArgs<T>& g, int64_t j0, const T* lse, const T* g_lse,
                                  const T* g_cos_target, T* col_dot, T* col_shift, T* strip_max) {
  const int32_t len = static_cast<int32_t>(std::min(kStrip, g.cols - j0));
  const mk::NegativeConsts<T> k{g.scale, g.a, g.b};
  const T shift = BINARY ? *g.shift : T(0), clamp = g.clamp;  // shift may be null for the softmax
  alignas(64) T inv[kStrip];
  alignas(64) T dot[kStrip];
  alignas(64) T dzs[kStrip];
  alignas(64) T amax[kStrip];
  for (int32_t j = 0; j < len; ++j) {
    inv[j] = NORM ? g.inv_norm[j0 + j] : T(1);
    dot[j] = dzs[j] = amax[j] = T(0);
  }
  for (int64_t i = 0; i < g.rows; ++i) {
    T* __restrict row = g.tile + i * g.ld + j0;
    const T thr = g.row_params[2 * i], aux = g.row_params[2 * i + 1];
    const T row_lse = BINARY ? T(0) : lse[i], row_g = g_lse[i], target_grad = g_cos_target[i];
    const int64_t t64 = g.labels[i] - g.col0 - j0;
    // 32-bit column ids: the target select vectorises at the float width
    const int32_t target = (t64 >= 0 && t64 < len) ? static_cast<int32_t>(t64) : -1;
    for (int32_t j = 0; j < len; ++j) {
      T c = row[j];
      if constexpr (NORM) c *= inv[j];
      T dc;
      if constexpr (BINARY) {
        T dz;
        dc = mk::binary_negative_grad<KIND>(c, thr, aux, k, shift, clamp, row_g, dz);
        dzs[j] += j == target ? T(0) : dz;
      } else {
        dc = mk::negative_grad<KIND>(c, thr, aux, k, row_lse, row_g);
      }
      dc = j == target ? target_grad : dc;
      if constexpr (NORM) dot[j] += dc * c;
      amax[j] = mk::max_of(amax[j], dc < T(0) ? -dc : dc);
      row[j] = NORM ? dc * inv[j] : dc;
    }
  }
  T m = T(0);
  for (int32_t j = 0; j < len; ++j) {
    if constexpr (NORM) col_dot[j0 + j] = dot[j];
    if constexpr (BINARY) col_shift[j0 + j] = dzs[j];
    m = mk::max_of(m, amax[j]);
  }
  *strip_max = m;
}

template <typename T>
MK_ISA_CLONES void inv_norm_row(const T* w, int64_t dim, T* out) {
  const T sumsq = lane_sum_squares(w, dim);
  if (!mk::sumsq_overflowed(sumsq)) {
    *out = mk::inv_norm_from_sumsq(sumsq);
    return;
  }
  const auto get = [w](int64_t k) { return w[k]; };  // the rare rescue (margin_math.h), scalar loops
  const T top = mk::max_abs_strided<T>(get, 0, dim, 1);
  *out = mk::inv_norm_rescaled(top, mk::unit_sumsq_strided<T>(get, 0, dim, 1, top));
}

template <typename T>
MK_ISA_CLONES void finish_dw_row(T* __restrict g, int64_t dim, const T* __restrict w, T coef, T inv_norm) {
  for (int64_t k = 0; k < dim; ++k) g[k] = mk::dw_normalize(g[k], w[k], coef, inv_norm);
}

}  // namespace

template <typename T>
void inv_norms(const T* w, int64_t n, int64_t dim, int64_t ld, T* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(thread_count(threads)) if (n * dim > 32768)
  for (int64_t j = 0; j < n; ++j) inv_norm_row(w + j * ld, dim, out + j);
}

template <typename T>
int forward_tile(const TileArgs<T>& args, T* run_max, T* run_sum, int threads) {
  const int nt = thread_count(threads);
  const bool known = mk::dispatch_kind(args.kind, [&](auto kind) {
    constexpr int K = decltype(kind)::value;
    if (args.reduction == mk::kSoftplusSum) {
      const auto row_fn = args.inv_norm ? &forward_row_binary<K, true, T> : &forward_row_binary<K, false, T>;
#pragma omp parallel for schedule(static) num_threads(nt)
      for (int64_t i = 0; i < args.rows; ++i) row_fn(args, i, run_sum);
      return;
    }
    const auto row_fn = args.inv_norm ? &forward_row<K, true, T> : &forward_row<K, false, T>;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < args.rows; ++i) row_fn(args, i, run_max, run_sum);
  });
  return known ? kOk : kUnknownKind;
}

template <typename T>
int backward_tile(const TileArgs<T>& args, const T* lse, const T* g_lse, const T* g_cos_target, T* col_dot,
                  T* max_abs, T* col_shift, int threads) {
  const int nt = thread_count(threads);
  const int64_t strips = (args.cols + kStrip - 1) / kStrip;
  std::vector<T> strip_max(static_cast<size_t>(std::max<int64_t>(strips, 1)), T(0));
  const bool binary = args.reduction == mk::kSoftplusSum;
  if (binary && col_shift == nullptr) return kMissingOutput;
  const bool known = mk::dispatch_kind(args.kind, [&](auto kind) {
    constexpr int K = decltype(kind)::value;
    const auto strip_fn = binary ? (args.inv_norm ? &backward_strip<K, true, true, T> : &backward_strip<K, false, true, T>)
                                 : (args.inv_norm ? &backward_strip<K, true, false, T> : &backward_strip<K, false, false, T>);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t s = 0; s < strips; ++s)
      strip_fn(args, s * kStrip, lse, g_lse, g_cos_target, col_dot, col_shift, &strip_max[static_cast<size_t>(s)]);
  });
  if (!known) return kUnknownKind;
  if (max_abs) *max_abs = *std::max_element(strip_max.begin(), strip_max.end());
  return kOk;
}

template <typename T>
void finish_dw(T* g, int64_t n, int64_t dim, int64_t ld_g, const T* w, int64_t ld_w, const T* col_dot,
               const T* inv_norm, int threads) {
#pragma omp parallel for schedule(static) num_threads(thread_count(threads)) if (n * dim > 32768)
  for (int64_t j = 0; j < n; ++j)
    finish_dw_row(g + j * ld_g, dim, w + j * ld_w, mk::dw_norm_coef(col_dot[j], inv_norm[j]), inv_norm[j]);
}

template <typename T>
void sub_center_max(const T* tile, int64_t rows, int64_t classes, int64_t ld, const T* inv_norm, int K, T* values,
                    int32_t* winner, int threads) {
#pragma omp parallel for schedule(static) num_threads(thread_count(threads)) if (rows * classes * K > 32768)
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = tile + i * ld;
    for (int64_t j = 0; j < classes; ++j)
      winner[i * classes + j] = mk::sub_center_best(row + j * K, inv_norm ? inv_norm + j * K : nullptr, K,
                                                    values + i * classes + j);
  }
}

template <typename T>
void sub_center_scatter(const T* grad, const T* values, const int32_t* winner, const T* inv_norm, int64_t rows,
                        int64_t classes, int K, T* out, int64_t ld_out, T* col_dot, int threads) {
  // strips of classes, each over all rows in order: col_dot's sums have a fixed order for any thread count
  const int64_t strip = std::max<int64_t>(1, kStrip / K);
  const int64_t strips = (classes + strip - 1) / strip;
#pragma omp parallel for schedule(static) num_threads(thread_count(threads)) if (rows * classes * K > 32768)
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t j0 = s * strip, j1 = std::min(classes, j0 + strip);
    if (col_dot)
      for (int64_t r = j0 * K; r < j1 * K; ++r) col_dot[r] = T(0);
    for (int64_t i = 0; i < rows; ++i) {
      T* row = out + i * ld_out;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t at = i * classes + j, won = j * K + winner[at];
        for (int64_t r = j * K; r < (j + 1) * K; ++r) row[r] = T(0);
        row[won] = inv_norm ? grad[at] * inv_norm[won] : grad[at];
        if (col_dot) col_dot[won] += grad[at] * values[at];
      }
    }
  }
}

template <typename T>
int negative_eval(const T* c, int64_t rows, int64_t cols, const T* row_params, int kind, T a, T b, T* value,
                  T* deriv) {
  const bool known = mk::dispatch_kind(kind, [&](auto kind_c) {
    constexpr int K = decltype(kind_c)::value;
    for (int64_t i = 0; i < rows; ++i) {
      const T thr = row_params[2 * i], aux = row_params[2 * i + 1];
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t at = i * cols + j;
        value[at] = mk::negative_value<K>(c[at], thr, aux, a, b);
        deriv[at] = mk::negative_derivative<K>(c[at], thr, aux, a, b);
      }
    }
  });
  return known ? kOk : kUnknownKind;
}

template <typename T>
void exp_eval(const T* x, int64_t n, T* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = mk::mk_exp(x[j]);
}

template <typename T>
void lse_merge_eval(T* run_max, T* run_sum, const T* other_max, const T* other_sum, int64_t n) {
  for (int64_t j = 0; j < n; ++j) mk::lse_merge(run_max[j], run_sum[j], other_max[j], other_sum[j]);
}

#define MK_INSTANTIATE(T)                                                                                     \
  template void inv_norms<T>(const T*, int64_t, int64_t, int64_t, T*, int);                                   \
  template int forward_tile<T>(const TileArgs<T>&, T*, T*, int);                                              \
  template int backward_tile<T>(const TileArgs<T>&, const T*, const T*, const T*, T*, T*, T*, int);           \
  template void finish_dw<T>(T*, int64_t, int64_t, int64_t, const T*, int64_t, const T*, const T*, int);      \
  template int negative_eval<T>(const T*, int64_t, int64_t, const T*, int, T, T, T*, T*);                     \
  template void exp_eval<T>(const T*, int64_t, T*);                                                           \
  template void lse_merge_eval<T>(T*, T*, const T*, const T*, int64_t);                                     \
  template void sub_center_max<T>(const T*, int64_t, int64_t, int64_t, const T*, int, T*, int32_t*, int);      \
  template void sub_center_scatter<T>(const T*, const T*, const int32_t*, const T*, int64_t, int64_t, int, T*,  \
                                      int64_t, T*, int);

MK_INSTANTIATE(float)
MK_INSTANTIATE(double)

}  // namespace mk_cpu
