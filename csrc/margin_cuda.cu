// CUDA epilogues of the chunked margin-softmax loop (API: margin_cuda.h). The GEMMs are cuBLAS calls made by
// the Python chunk driver; these kernels do the elementwise work on its fp32 (or fp64) B x n tiles with the
// per-element math of margin_math.h, the same functions the CPU kernels run. No torch headers.
//
// Deterministic: every reduction has a fixed order (a block per row with a fixed tree for the forward's
// log-sum-exp, a fixed 32-column strip per block summed over rows in a fixed order for the backward's
// sum_i dc*c); the only atomic is a max, which is order-independent. Offsets are int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "margin_cuda.h"
#include "margin_math.h"

namespace {

constexpr int kForwardThreads = 256;   // one block per tile row; power of two for the tree reduction
constexpr int kStripCols = 32;         // backward: one warp-wide strip of columns per block ...
constexpr int kStripRows = 8;          // ... and this many row phases
constexpr int kNormWarps = 8;          // norms: one warp per weight row
constexpr int kElementwiseThreads = 256;

// switches to `device` for the scope of a launcher and back, so a caller on another device is unaffected
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceScope() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  cudaError_t status_;
};

// storage -> float (half, bf16) or itself (float, double); the caller casts to the accumulation type
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// accumulation type -> storage (round to nearest even), the inverse of widen
template <typename To, typename T>
__device__ __forceinline__ To narrow(T v) {
  if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

// *p, or 1 for a null pointer (the optional device scalars)
template <typename T>
__device__ __forceinline__ T scalar_or_one(const T* p) {
  return p != nullptr ? *p : T(1);
}

// non-negative floats order like their bit patterns: an integer atomicMax is an exact float max
__device__ __forceinline__ void atomic_max_nonneg(float* address, float value) {
  atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
}
__device__ __forceinline__ void atomic_max_nonneg(double* address, double value) {
  atomicMax(reinterpret_cast<unsigned long long*>(address),
            static_cast<unsigned long long>(__double_as_longlong(value)));
}

template <typename Tin, typename Tacc>
__global__ void inv_norms_kernel(const Tin* __restrict__ w, int64_t n, int64_t dim, int64_t ld,
                                 Tacc* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;  // a whole warp shares its row, so the shuffles below stay converged
  const Tin* p = w + row * ld;
  Tacc sumsq = Tacc(0);
  for (int64_t k = lane; k < dim; k += 32) {
    const Tacc v = static_cast<Tacc>(widen(p[k]));
    sumsq += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, offset);
  if (mk::sumsq_overflowed(sumsq)) {  // warp-uniform (every lane holds the sum): the rare rescue, margin_math.h
    const auto get = [p](int64_t k) { return static_cast<Tacc>(widen(p[k])); };
    Tacc top = mk::max_abs_strided<Tacc>(get, lane, dim, 32);
    for (int offset = 16; offset > 0; offset /= 2) top = mk::max_of(top, __shfl_xor_sync(0xffffffffu, top, offset));
    Tacc unit = mk::unit_sumsq_strided<Tacc>(get, lane, dim, 32, top);
    for (int offset = 16; offset > 0; offset /= 2) unit += __shfl_xor_sync(0xffffffffu, unit, offset);
    if (lane == 0) out[row] = mk::inv_norm_rescaled(top, unit);
    return;
  }
  if (lane == 0) out[row] = mk::inv_norm_from_sumsq(sumsq);
}

// BINARY: the binary reduction (a plain sum of softplus terms of z + shift, in the same fixed tree)
template <int KIND, bool NORM, bool BINARY, typename T>
__global__ void forward_epilogue_kernel(const T* __restrict__ tile, int64_t cols, int64_t ld,
                                        const T* __restrict__ inv_norm, const int64_t* __restrict__ labels,
                                        int64_t col0, const T* __restrict__ row_params,
                                        mk::NegativeConsts<T> k, const T* __restrict__ shift_ptr, T clamp,
                                        T* run_max, T* run_sum) {
  __shared__ T shared_max[kForwardThreads];
  __shared__ T shared_sum[kForwardThreads];
  const int64_t i = blockIdx.x;
  const T* row = tile + i * ld;
  const T thr = row_params[2 * i], aux = row_params[2 * i + 1];
  const int64_t target = labels[i] - col0;
  T m = mk::neg_infinity<T>(), s = T(0);
  const T shift = BINARY ? *shift_ptr : T(0);
  for (int64_t j = threadIdx.x; j < cols; j += kForwardThreads) {
    if (j == target) continue;
    T c = row[j];
    if (NORM) c *= inv_norm[j];
    if (BINARY) {
      s += mk::softplus_term(mk::negative_logit<KIND>(c, thr, aux, k) + shift, clamp);
    } else {
      mk::lse_push(m, s, mk::negative_logit<KIND>(c, thr, aux, k));
    }
  }
  if (BINARY) {  // the same tree over the partial sums
    shared_sum[threadIdx.x] = s;
    __syncthreads();
    for (int stride = kForwardThreads / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) shared_sum[threadIdx.x] += shared_sum[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) run_sum[i] += shared_sum[0];
    return;
  }
  shared_max[threadIdx.x] = m;
  shared_sum[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kForwardThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      T m1 = shared_max[threadIdx.x], s1 = shared_sum[threadIdx.x];
      mk::lse_merge(m1, s1, shared_max[threadIdx.x + stride], shared_sum[threadIdx.x + stride]);
      shared_max[threadIdx.x] = m1;
      shared_sum[threadIdx.x] = s1;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) mk::lse_merge(run_max[i], run_sum[i], shared_max[0], shared_sum[0]);
}

// `out` may be the tile itself (in place: each element is read, then written, by the same thread).
// BINARY: dL/dz = g sigmoid(z + shift) (the binary reduction), its per-column sums into col_shift
template <int KIND, bool NORM, bool BINARY, typename T, typename Tout>
__global__ void backward_epilogue_kernel(const T* tile, int64_t rows, int64_t cols, int64_t ld,
                                         const T* __restrict__ inv_norm, const int64_t* __restrict__ labels,
                                         int64_t col0, const T* __restrict__ row_params,
                                         mk::NegativeConsts<T> k, const T* __restrict__ lse,
                                         const T* __restrict__ g_lse, const T* __restrict__ g_cos_target,
                                         T* __restrict__ col_dot, T* max_abs, const T* __restrict__ shift_ptr,
                                         T clamp, T* __restrict__ col_shift, Tout* out, int64_t ld_out,
                                         const T* __restrict__ factor) {
  __shared__ T shared_dot[kStripRows][kStripCols + 1];
  __shared__ T shared_max[kStripRows][kStripCols + 1];
  __shared__ T shared_dz[kStripRows][kStripCols + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kStripCols + threadIdx.x;
  const T shift = BINARY ? *shift_ptr : T(0);
  T dot = T(0), amax = T(0), dzs = T(0);
  if (j < cols) {
    const T inv = NORM ? inv_norm[j] : T(1);
    const T out_scale = inv * scalar_or_one(factor);  // 1/|w_j| folded into dL/d(x.w), then the fp16 factor
    for (int64_t i = threadIdx.y; i < rows; i += kStripRows) {
      T c = tile[i * ld + j];
      if (NORM) c *= inv;
      T dc;
      if (labels[i] - col0 == j) {
        dc = g_cos_target[i];
      } else if (BINARY) {
        T dz;
        dc = mk::binary_negative_grad<KIND>(c, row_params[2 * i], row_params[2 * i + 1], k, shift, clamp,
                                            g_lse[i], dz);
        dzs += dz;
      } else {
        dc = mk::negative_grad<KIND>(c, row_params[2 * i], row_params[2 * i + 1], k, lse[i], g_lse[i]);
      }
      dot += dc * c;
      amax = mk::max_of(amax, dc < T(0) ? -dc : dc);
      out[i * ld_out + j] = narrow<Tout>(dc * out_scale);
    }
  }
  shared_dot[threadIdx.y][threadIdx.x] = dot;
  shared_max[threadIdx.y][threadIdx.x] = amax;
  shared_dz[threadIdx.y][threadIdx.x] = dzs;
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int y = 1; y < kStripRows; ++y) {  // fixed order: row phase 0, 1, ... 7
    dot += shared_dot[y][threadIdx.x];
    amax = mk::max_of(amax, shared_max[y][threadIdx.x]);
    dzs += shared_dz[y][threadIdx.x];
  }
  if (NORM && j < cols) col_dot[j] = dot;
  if (BINARY && j < cols) col_shift[j] = dzs;
  if (max_abs != nullptr) {
    for (int offset = 16; offset > 0; offset /= 2)
      amax = mk::max_of(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (threadIdx.x == 0) atomic_max_nonneg(max_abs, amax);
  }
}

// `out` may be g itself (in place)
template <bool NORM, typename T, typename Tw, typename Tout>
__global__ void finish_dw_kernel(const T* g, int64_t n, int64_t dim, int64_t ld_g, const Tw* __restrict__ w,
                                 int64_t ld_w, const T* __restrict__ col_dot, const T* __restrict__ inv_norm,
                                 const T* __restrict__ inv_factor, Tout* out, int64_t ld_out) {
  const T unscale = scalar_or_one(inv_factor);
  const int64_t total = n * dim;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t j = e / dim, col = e - j * dim;
    T v = g[j * ld_g + col] * unscale;
    if (NORM)
      v = mk::dw_normalize(v, static_cast<T>(widen(w[j * ld_w + col])), mk::dw_norm_coef(col_dot[j], inv_norm[j]),
                           inv_norm[j]);
    out[j * ld_out + col] = narrow<Tout>(v);
  }
}

unsigned int grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride loops cover the rest
}

// sub-centers: one thread per (row, class) element of the reduced tile
template <typename T>
__global__ void sub_center_max_kernel(const T* __restrict__ tile, int64_t rows, int64_t classes, int64_t ld,
                                      const T* __restrict__ inv_norm, int K, T* __restrict__ values,
                                      int32_t* __restrict__ winner) {
  const int64_t total = rows * classes;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t i = e / classes, j = e - i * classes;
    winner[e] = mk::sub_center_best(tile + i * ld + j * K, inv_norm ? inv_norm + j * K : nullptr, K, values + e);
  }
}

template <typename T>
__global__ void sub_center_scatter_kernel(const T* __restrict__ grad, const int32_t* __restrict__ winner,
                                          const T* __restrict__ inv_norm, int64_t rows, int64_t classes, int K,
                                          T* __restrict__ out, int64_t ld_out) {
  const int64_t total = rows * classes;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t i = e / classes, j = e - i * classes;
    T* row = out + i * ld_out + j * K;
    const int won = winner[e];
    for (int k = 0; k < K; ++k) row[k] = k == won ? (inv_norm ? grad[e] * inv_norm[j * K + k] : grad[e]) : T(0);
  }
}

// one thread per weight row r = jK + k, summing over the tile's rows in order (deterministic)
template <typename T>
__global__ void sub_center_col_dot_kernel(const T* __restrict__ grad, const T* __restrict__ values,
                                          const int32_t* __restrict__ winner, int64_t rows, int64_t classes, int K,
                                          T* __restrict__ col_dot) {
  const int64_t total = classes * K;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < total; r += step) {
    const int64_t j = r / K;
    const int k = static_cast<int>(r - j * K);
    T acc = T(0);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t at = i * classes + j;
      if (winner[at] == k) acc += grad[at] * values[at];
    }
    col_dot[r] = acc;
  }
}

template <typename T>
int sub_center_max_for(const void* tile, int64_t rows, int64_t classes, int64_t ld, const void* inv_norm, int K,
                       void* values, int32_t* winner, cudaStream_t stream) {
  sub_center_max_kernel<T><<<grid_for(rows * classes, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
      static_cast<const T*>(tile), rows, classes, ld, static_cast<const T*>(inv_norm), K, static_cast<T*>(values),
      winner);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int sub_center_scatter_for(const void* grad, const void* values, const int32_t* winner, const void* inv_norm,
                           int64_t rows, int64_t classes, int K, void* out, int64_t ld_out, void* col_dot,
                           cudaStream_t stream) {
  if (rows > 0)
    sub_center_scatter_kernel<T><<<grid_for(rows * classes, kElementwiseThreads), kElementwiseThreads, 0,
                                   stream>>>(static_cast<const T*>(grad), winner, static_cast<const T*>(inv_norm),
                                             rows, classes, K, static_cast<T*>(out), ld_out);
  if (col_dot != nullptr)
    sub_center_col_dot_kernel<T><<<grid_for(classes * K, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(values), winner, rows, classes, K,
        static_cast<T*>(col_dot));
  return static_cast<int>(cudaGetLastError());
}

template <typename Tacc, typename Tin>
int launch_inv_norms(const void* w, int64_t n, int64_t dim, int64_t ld, void* out, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>((n + kNormWarps - 1) / kNormWarps);
  inv_norms_kernel<Tin, Tacc><<<blocks, kNormWarps * 32, 0, stream>>>(static_cast<const Tin*>(w), n, dim, ld,
                                                                     static_cast<Tacc*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <typename Tacc>
int inv_norms_for(const void* w, int w_dtype, int64_t n, int64_t dim, int64_t ld, void* out,
                  cudaStream_t stream) {
  switch (w_dtype) {
    case MK_DTYPE_F32: return launch_inv_norms<Tacc, float>(w, n, dim, ld, out, stream);
    case MK_DTYPE_F64: return launch_inv_norms<Tacc, double>(w, n, dim, ld, out, stream);
    case MK_DTYPE_F16: return launch_inv_norms<Tacc, __half>(w, n, dim, ld, out, stream);
    case MK_DTYPE_BF16: return launch_inv_norms<Tacc, __nv_bfloat16>(w, n, dim, ld, out, stream);
    default: return MK_CUDA_ERR_BAD_DTYPE;
  }
}

template <typename T>
int forward_for(const mk_tile_args& g, void* run_max, void* run_sum) {
  const mk::NegativeConsts<T> k{static_cast<T>(g.scale), static_cast<T>(g.a), static_cast<T>(g.b)};
  const cudaStream_t stream = static_cast<cudaStream_t>(g.stream);
  const bool binary = g.reduction == mk::kSoftplusSum;
  const bool known = mk::dispatch_kind(g.kind, [&](auto kind) {
    constexpr int K = decltype(kind)::value;
    const auto kernel = binary ? (g.inv_norm ? forward_epilogue_kernel<K, true, true, T>
                                             : forward_epilogue_kernel<K, false, true, T>)
                               : (g.inv_norm ? forward_epilogue_kernel<K, true, false, T>
                                             : forward_epilogue_kernel<K, false, false, T>);
    kernel<<<static_cast<unsigned int>(g.rows), kForwardThreads, 0, stream>>>(
        static_cast<const T*>(g.tile), g.cols, g.ld, static_cast<const T*>(g.inv_norm), g.labels, g.col0,
        static_cast<const T*>(g.row_params), k, static_cast<const T*>(g.shift), static_cast<T>(g.clamp),
        static_cast<T*>(run_max), static_cast<T*>(run_sum));
  });
  return known ? static_cast<int>(cudaGetLastError()) : MK_CUDA_ERR_UNKNOWN_KIND;
}

template <typename T, typename Tout>
int backward_for(const mk_tile_args& g, const void* lse, const void* g_lse, const void* g_cos_target,
                 void* col_dot, void* max_abs, void* col_shift, void* out, int64_t ld_out, const void* factor) {
  const mk::NegativeConsts<T> k{static_cast<T>(g.scale), static_cast<T>(g.a), static_cast<T>(g.b)};
  const cudaStream_t stream = static_cast<cudaStream_t>(g.stream);
  if (max_abs != nullptr) {
    const cudaError_t status = cudaMemsetAsync(max_abs, 0, sizeof(T), stream);
    if (status != cudaSuccess) return static_cast<int>(status);
  }
  const dim3 block(kStripCols, kStripRows);
  const unsigned int blocks = static_cast<unsigned int>((g.cols + kStripCols - 1) / kStripCols);
  const bool binary = g.reduction == mk::kSoftplusSum;
  if (binary && col_shift == nullptr) return MK_CUDA_ERR_MISSING_OUTPUT;
  const bool known = mk::dispatch_kind(g.kind, [&](auto kind) {
    constexpr int K = decltype(kind)::value;
    const auto kernel = binary ? (g.inv_norm ? backward_epilogue_kernel<K, true, true, T, Tout>
                                             : backward_epilogue_kernel<K, false, true, T, Tout>)
                               : (g.inv_norm ? backward_epilogue_kernel<K, true, false, T, Tout>
                                             : backward_epilogue_kernel<K, false, false, T, Tout>);
    kernel<<<blocks, block, 0, stream>>>(
        static_cast<const T*>(g.tile), g.rows, g.cols, g.ld, static_cast<const T*>(g.inv_norm), g.labels, g.col0,
        static_cast<const T*>(g.row_params), k, static_cast<const T*>(lse), static_cast<const T*>(g_lse),
        static_cast<const T*>(g_cos_target), static_cast<T*>(col_dot), static_cast<T*>(max_abs),
        static_cast<const T*>(g.shift), static_cast<T>(g.clamp), static_cast<T*>(col_shift),
        static_cast<Tout*>(out), ld_out, static_cast<const T*>(factor));
  });
  return known ? static_cast<int>(cudaGetLastError()) : MK_CUDA_ERR_UNKNOWN_KIND;
}

template <typename T, typename Tw, typename Tout>
int finish_dw_for(const mk_dw_args& a) {
  const auto kernel = a.col_dot != nullptr ? finish_dw_kernel<true, T, Tw, Tout> : finish_dw_kernel<false, T, Tw, Tout>;
  kernel<<<grid_for(a.n * a.dim, kElementwiseThreads), kElementwiseThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.g), a.n, a.dim, a.ld_g, static_cast<const Tw*>(a.w), a.ld_w,
      static_cast<const T*>(a.col_dot), static_cast<const T*>(a.inv_norm), static_cast<const T*>(a.inv_factor),
      static_cast<Tout*>(a.out), a.ld_out);
  return static_cast<int>(cudaGetLastError());
}

// f(T{}) for the fp32 accumulation type's 16-bit and 32-bit storage types, fp64 only with itself
template <typename F>
int dispatch_storage_f32(int dtype, F&& f) {
  switch (dtype) {
    case MK_DTYPE_F32: return f(float{});
    case MK_DTYPE_F16: return f(__half{});
    case MK_DTYPE_BF16: return f(__nv_bfloat16{});
    default: return MK_CUDA_ERR_BAD_DTYPE;
  }
}

}  // namespace

extern "C" {

int mk_cuda_inv_norms(const void* w, int w_dtype, int64_t n, int64_t dim, int64_t ld, void* out, int out_dtype,
                      int device, void* stream) {
  if (n <= 0) return 0;
  if (n > static_cast<int64_t>(kNormWarps) * 0x7fffffff) return MK_CUDA_ERR_TOO_MANY_ROWS;
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (out_dtype == MK_DTYPE_F32) return inv_norms_for<float>(w, w_dtype, n, dim, ld, out, s);
  if (out_dtype == MK_DTYPE_F64) return inv_norms_for<double>(w, w_dtype, n, dim, ld, out, s);
  return MK_CUDA_ERR_BAD_DTYPE;
}

int mk_cuda_forward_epilogue(const mk_tile_args* args, void* run_max, void* run_sum) {
  if (args->rows <= 0 || args->cols <= 0) return 0;
  if (args->rows > 0x7fffffff) return MK_CUDA_ERR_TOO_MANY_ROWS;  // one block per row
  DeviceScope scope(args->device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  if (args->dtype == MK_DTYPE_F32) return forward_for<float>(*args, run_max, run_sum);
  if (args->dtype == MK_DTYPE_F64) return forward_for<double>(*args, run_max, run_sum);
  return MK_CUDA_ERR_BAD_DTYPE;
}

int mk_cuda_backward_epilogue(const mk_tile_args* args, const void* lse, const void* g_lse,
                              const void* g_cos_target, void* col_dot, void* max_abs, void* col_shift,
                              const mk_grad_out* out) {
  DeviceScope scope(args->device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  if (args->rows <= 0 || args->cols <= 0) {
    // nothing to scan: the maximum is still defined (0), and col_dot must not keep stale values
    const size_t width = args->dtype == MK_DTYPE_F64 ? sizeof(double) : sizeof(float);
    const cudaStream_t s = static_cast<cudaStream_t>(args->stream);
    cudaError_t status = cudaSuccess;
    if (max_abs != nullptr) status = cudaMemsetAsync(max_abs, 0, width, s);
    if (status == cudaSuccess && col_dot != nullptr && args->cols > 0)
      status = cudaMemsetAsync(col_dot, 0, width * static_cast<size_t>(args->cols), s);
    if (status == cudaSuccess && col_shift != nullptr && args->cols > 0)
      status = cudaMemsetAsync(col_shift, 0, width * static_cast<size_t>(args->cols), s);
    return static_cast<int>(status);
  }
  const mk_grad_out in_place{args->tile, args->ld, args->dtype, nullptr};
  const mk_grad_out& o = out != nullptr ? *out : in_place;
  if (args->dtype == MK_DTYPE_F64) {
    if (o.dtype != MK_DTYPE_F64) return MK_CUDA_ERR_BAD_DTYPE;
    return backward_for<double, double>(*args, lse, g_lse, g_cos_target, col_dot, max_abs, col_shift, o.data,
                                        o.ld, o.factor);
  }
  if (args->dtype != MK_DTYPE_F32) return MK_CUDA_ERR_BAD_DTYPE;
  return dispatch_storage_f32(o.dtype, [&](auto tag) {
    using Tout = decltype(tag);
    return backward_for<float, Tout>(*args, lse, g_lse, g_cos_target, col_dot, max_abs, col_shift, o.data, o.ld,
                                     o.factor);
  });
}

int mk_cuda_finish_dw(const mk_dw_args* args) {
  const mk_dw_args& a = *args;
  if (a.n <= 0 || a.dim <= 0) return 0;
  if ((a.col_dot == nullptr) != (a.inv_norm == nullptr)) return MK_CUDA_ERR_BAD_ARGUMENT;
  DeviceScope scope(a.device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  if (a.dtype == MK_DTYPE_F64) {
    if (a.w_dtype != MK_DTYPE_F64 || a.out_dtype != MK_DTYPE_F64) return MK_CUDA_ERR_BAD_DTYPE;
    return finish_dw_for<double, double, double>(a);
  }
  if (a.dtype != MK_DTYPE_F32) return MK_CUDA_ERR_BAD_DTYPE;
  return dispatch_storage_f32(a.w_dtype, [&](auto w_tag) {
    return dispatch_storage_f32(a.out_dtype, [&](auto out_tag) {
      return finish_dw_for<float, decltype(w_tag), decltype(out_tag)>(a);
    });
  });
}

int mk_cuda_sub_center_max(const void* tile, int64_t rows, int64_t classes, int64_t ld, const void* inv_norm,
                           int K, void* values, int32_t* winner, int dtype, int device, void* stream) {
  if (rows <= 0 || classes <= 0) return 0;
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == MK_DTYPE_F32) return sub_center_max_for<float>(tile, rows, classes, ld, inv_norm, K, values, winner, s);
  if (dtype == MK_DTYPE_F64)
    return sub_center_max_for<double>(tile, rows, classes, ld, inv_norm, K, values, winner, s);
  return MK_CUDA_ERR_BAD_DTYPE;
}

int mk_cuda_sub_center_scatter(const void* grad, const void* values, const int32_t* winner, const void* inv_norm,
                               int64_t rows, int64_t classes, int K, void* out, int64_t ld_out, void* col_dot,
                               int dtype, int device, void* stream) {
  if (classes <= 0) return 0;
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == MK_DTYPE_F32)
    return sub_center_scatter_for<float>(grad, values, winner, inv_norm, rows, classes, K, out, ld_out, col_dot, s);
  if (dtype == MK_DTYPE_F64)
    return sub_center_scatter_for<double>(grad, values, winner, inv_norm, rows, classes, K, out, ld_out, col_dot, s);
  return MK_CUDA_ERR_BAD_DTYPE;
}

const char* mk_cuda_error_string(int code) {
  switch (code) {
    case MK_CUDA_ERR_UNKNOWN_KIND: return "unknown negative-function kind";
    case MK_CUDA_ERR_BAD_DTYPE: return "unsupported dtype code";
    case MK_CUDA_ERR_TOO_MANY_ROWS: return "too many rows for one launch";
    case MK_CUDA_ERR_BAD_ARGUMENT: return "col_dot and inv_norm must be given together";
    case MK_CUDA_ERR_MISSING_OUTPUT: return "the binary reduction needs col_shift";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

}  // extern "C"
