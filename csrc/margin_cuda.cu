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

// BINARY: dL/dz = g sigmoid(z + shift) (the binary reduction), its per-column sums into col_shift
template <int KIND, bool NORM, bool BINARY, typename T>
__global__ void backward_epilogue_kernel(T* tile, int64_t rows, int64_t cols, int64_t ld,
                                         const T* __restrict__ inv_norm, const int64_t* __restrict__ labels,
                                         int64_t col0, const T* __restrict__ row_params,
                                         mk::NegativeConsts<T> k, const T* __restrict__ lse,
                                         const T* __restrict__ g_lse, const T* __restrict__ g_cos_target,
                                         T* __restrict__ col_dot, T* max_abs, const T* __restrict__ shift_ptr,
                                         T clamp, T* __restrict__ col_shift) {
  __shared__ T shared_dot[kStripRows][kStripCols + 1];
  __shared__ T shared_max[kStripRows][kStripCols + 1];
  __shared__ T shared_dz[kStripRows][kStripCols + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kStripCols + threadIdx.x;
  const T shift = BINARY ? *shift_ptr : T(0);
  T dot = T(0), amax = T(0), dzs = T(0);
  if (j < cols) {
    const T inv = NORM ? inv_norm[j] : T(1);
    for (int64_t i = threadIdx.y; i < rows; i += kStripRows) {
      T* p = tile + i * ld + j;
      T c = *p;
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
      *p = NORM ? dc * inv : dc;
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

template <typename T>
__global__ void finish_dw_kernel(T* g, int64_t n, int64_t dim, int64_t ld_g, const T* __restrict__ w,
                                 int64_t ld_w, const T* __restrict__ col_dot, const T* __restrict__ inv_norm) {
  const int64_t total = n * dim;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t j = e / dim, col = e - j * dim;
    T* out = g + j * ld_g + col;
    *out = mk::dw_normalize(*out, w[j * ld_w + col], mk::dw_norm_coef(col_dot[j], inv_norm[j]));
  }
}

unsigned int grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride loops cover the rest
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

template <typename T>
int backward_for(const mk_tile_args& g, const void* lse, const void* g_lse, const void* g_cos_target,
                 void* col_dot, void* max_abs, void* col_shift) {
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
    const auto kernel = binary ? (g.inv_norm ? backward_epilogue_kernel<K, true, true, T>
                                             : backward_epilogue_kernel<K, false, true, T>)
                               : (g.inv_norm ? backward_epilogue_kernel<K, true, false, T>
                                             : backward_epilogue_kernel<K, false, false, T>);
    kernel<<<blocks, block, 0, stream>>>(
        static_cast<T*>(g.tile), g.rows, g.cols, g.ld, static_cast<const T*>(g.inv_norm), g.labels, g.col0,
        static_cast<const T*>(g.row_params), k, static_cast<const T*>(lse), static_cast<const T*>(g_lse),
        static_cast<const T*>(g_cos_target), static_cast<T*>(col_dot), static_cast<T*>(max_abs),
        static_cast<const T*>(g.shift), static_cast<T>(g.clamp), static_cast<T*>(col_shift));
  });
  return known ? static_cast<int>(cudaGetLastError()) : MK_CUDA_ERR_UNKNOWN_KIND;
}

template <typename T>
int finish_dw_for(void* g, int64_t n, int64_t dim, int64_t ld_g, const void* w, int64_t ld_w, const void* col_dot,
                  const void* inv_norm, cudaStream_t stream) {
  finish_dw_kernel<T><<<grid_for(n * dim, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
      static_cast<T*>(g), n, dim, ld_g, static_cast<const T*>(w), ld_w, static_cast<const T*>(col_dot),
      static_cast<const T*>(inv_norm));
  return static_cast<int>(cudaGetLastError());
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
                              const void* g_cos_target, void* col_dot, void* max_abs, void* col_shift) {
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
  if (args->dtype == MK_DTYPE_F32)
    return backward_for<float>(*args, lse, g_lse, g_cos_target, col_dot, max_abs, col_shift);
  if (args->dtype == MK_DTYPE_F64)
    return backward_for<double>(*args, lse, g_lse, g_cos_target, col_dot, max_abs, col_shift);
  return MK_CUDA_ERR_BAD_DTYPE;
}

int mk_cuda_finish_dw(void* g, int64_t n, int64_t dim, int64_t ld_g, const void* w, int64_t ld_w,
                      const void* col_dot, const void* inv_norm, int dtype, int device, void* stream) {
  if (n <= 0 || dim <= 0) return 0;
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return static_cast<int>(scope.status());
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == MK_DTYPE_F32) return finish_dw_for<float>(g, n, dim, ld_g, w, ld_w, col_dot, inv_norm, s);
  if (dtype == MK_DTYPE_F64) return finish_dw_for<double>(g, n, dim, ld_g, w, ld_w, col_dot, inv_norm, s);
  return MK_CUDA_ERR_BAD_DTYPE;
}

const char* mk_cuda_error_string(int code) {
  switch (code) {
    case MK_CUDA_ERR_UNKNOWN_KIND: return "unknown negative-function kind";
    case MK_CUDA_ERR_BAD_DTYPE: return "unsupported dtype code";
    case MK_CUDA_ERR_TOO_MANY_ROWS: return "too many rows for one launch";
    case MK_CUDA_ERR_MISSING_OUTPUT: return "the binary reduction needs col_shift";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

}  // extern "C"
