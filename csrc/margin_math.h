// Per-element math of the fused margin-softmax epilogues, shared by the CUDA kernels (margin_cuda.cu) and the
// CPU kernels (margin_cpu.cpp): the negative-function kinds of margin_kernels/losses/negatives.py (value
// and derivative, same table, same kind numbers), exp, the online log-sum-exp merge, the binary reduction's
// softplus terms, the per-element backward (p -> dL/dcos), the weight-normalisation backward and the
// sub-center max. Written once so the math that runs on GPUs is the math
// the CPU tests check. Plain C++17 without CUDA; __host__ __device__ under nvcc. No torch headers.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#if defined(__CUDACC__)
#define MK_HD static __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU kernels are compiled in several ISA clones (target_clones); an out-of-line call would
// run the baseline-ISA body from inside an AVX-512 loop and stop it from vectorising
#define MK_HD static inline __attribute__((always_inline))
#else
#define MK_HD static inline
#endif

namespace mk {

// must match margin_kernels.losses.negatives.NegativeKind (tests/test_constants.py compares them)
enum NegativeKind : int {
  kIdentity = 0,
  kClamp = 1,
  kCurricular = 2,
  kMV = 3,
  kCircle = 4,
  kFilter = 5,
  kRowScale = 6,
  kAffine = 7,
  kPower = 8,
  kPowerSt = 9,
};
constexpr int kNumNegativeKinds = 10;

// must match margin_kernels.losses.reductions.ReductionKind: how a row's negative logits are reduced
enum ReductionKind : int {
  kLse = 0,          // log-sum-exp (the softmax family)
  kSoftplusSum = 1,  // sum of softplus(clamp(z + shift)) (the binary family: SphereFace2, UniFace)
};
constexpr int kNumReductionKinds = 2;

// as margin_kernels.norms.NORM_EPS (F.normalize's eps): 1 / max(||w||, eps)
constexpr double kNormEps = 1e-12;

// bumped whenever an entry point of the compiled extension changes, so a stale build is detected at import
constexpr int kAbiVersion = 9;

// ---- bit casts --------------------------------------------------------------------------------------------
// A 32-bit value's bits as the other 32-bit type (float <-> int32): the exp and log polynomials below build and
// take apart floats by their exponent field. memcpy on the host (no aliasing trouble; compiled to a move).
template <typename To, typename From>
MK_HD To bit_cast32(From x) {
  static_assert(sizeof(To) == 4 && sizeof(From) == 4, "float <-> int32 only");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<To, float>) {
    return __int_as_float(x);
  } else {
    return __float_as_int(x);
  }
#else
  To out;
  memcpy(&out, &x, sizeof(out));
  return out;
#endif
}

// ---- exp --------------------------------------------------------------------------------------------------

// exp in float from a degree-6 polynomial (Cephes' expf, ~1 ulp) made only of arithmetic and a bit cast, so a
// CPU loop calling it vectorises without -ffast-math or a vector libm, and the GPU computes the same values.
// exp(-inf) and anything below the float range give exactly 0 (masked logits); NaN gives NaN.
MK_HD float mk_exp(float x) {
  const float lo = -87.33654f, hi = 88.37626f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  // n = round(x / ln2) by the 1.5 * 2^23 trick: no rounding-mode intrinsic, vectorises on every ISA
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln2 split in two for an exact first product
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float y = p * bit_cast32<float>((static_cast<int32_t>(n) + 127) << 23);
  // NaN in, NaN out, spelled out: a vectorised or fmaxf/fminf clamp above may turn a NaN into lo or hi
  return x < lo ? 0.0f : (x == x ? y : x);
}

MK_HD double mk_exp(double x) { return exp(x); }

// exp for the per-element steps of the GEMM epilogues of csrc/cutlass/ (every element of a B x C block, under
// the tensor cores: mk_exp's ~20 SASS instructions there outweigh the MMA): on the GPU 2^(x log2 e) by the SFU's
// ex2.approx.ftz.f32 (one FMUL and one MUFU.EX2; relative error ~2^-22 plus the product's rounding, |x| 2^-24:
// below 1e-6 for the |x| < 20 where a softmax weight is not negligible), -inf and anything below 2^-126 give 0,
// NaN gives NaN; on the host mk_exp (the CPU tests run the same step with the polynomial)
MK_HD float mk_exp_sfu(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#else
  return mk_exp(x);
#endif
}
MK_HD double mk_exp_sfu(double x) { return exp(x); }

// mk_exp (SFU false: the CPU and margin_cuda.cu kernels, whose values the tests pin) or mk_exp_sfu (the CUTLASS
// epilogues)
template <bool SFU, typename T>
MK_HD T exp_of(T x) {
  if constexpr (SFU) {
    return mk_exp_sfu(x);
  } else {
    return mk_exp(x);
  }
}

// ---- log, log1p, pow ----------------------------------------------------------------------------------------

// log in float for a normal x > 0 (Cephes' logf, ~1 ulp), arithmetic and bit casts only like mk_exp: the
// binary reduction's softplus (log1p) and SphereFace2's power call it per element, and libm's log1pf / powf
// would keep those CPU loops scalar (no vector libm without -ffast-math).
MK_HD float mk_log_normal(float x) {
  const int32_t bits = bit_cast32<int32_t>(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = bit_cast32<float>((bits & 0x007fffff) | 0x3f000000);  // x = m 2^e, m in [0.5, 1)
  // m in [sqrt(1/2), sqrt(2)) after this; both arms computed first: GCC if-converts (vectorises) a select of
  // values, not one of floating-point expressions (-ftrapping-math forbids evaluating them speculatively)
  const bool low = m < 0.707106781186547524f;
  const float twice = m + m - 1.0f, once = m - 1.0f;
  e = low ? e - 1 : e;
  m = low ? twice : once;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y = y - 2.12194440e-4f * fe;  // ln2 split in two, as in mk_exp
  y = y - 0.5f * z;
  const float r = (m + y) + 0.693359375f * fe;
  return x < INFINITY ? r : x;  // NaN (false compare) and +inf pass through, as logf's
}

// log1p in float for x >= 0 (softplus's log1p(exp(-|z|)), x in [0, 1]): log(1 + x) with the rounding of 1 + x
// corrected to first order, exact for x below 2^-24
MK_HD float mk_log1p(float x) {
  const float v = 1.0f + x;
  return mk_log_normal(v) + (x - (v - 1.0f)) / v;
}
MK_HD double mk_log1p(double x) { return log1p(x); }

// x^e in float for x >= 0 (SphereFace2's ((c + 1) / 2)^t), as exp(e log x): a few ulp (e |log x| ulp of the
// log), 0^e as powf gives it (0 for e > 0, 1 for e = 0)
MK_HD float mk_pow(float x, float e) {
  const float r = mk_exp(e * mk_log_normal(x < 1.17549435e-38f ? 1.0f : x));
  return x < 1.17549435e-38f ? (e > 0.0f ? 0.0f : (e == 0.0f ? 1.0f : INFINITY)) : r;
}
MK_HD double mk_pow(double x, double e) { return pow(x, e); }

MK_HD float mk_sqrt(float x) { return sqrtf(x); }
MK_HD double mk_sqrt(double x) { return sqrt(x); }

template <typename T>
MK_HD T neg_infinity() {
  return static_cast<T>(-INFINITY);
}

template <typename T>
MK_HD T max_of(T a, T b) {
  return a > b ? a : b;
}

// ---- the negative functions g(c) and dg/dc (table in negatives.py) ------------------------------------------
// SphereFace2's base (c + 1) / 2 floored at 0 (negatives.power_base); a NaN cosine stays NaN (max_of would
// turn it into 0: a finite logit from a non-finite weight row)
template <typename T>
MK_HD T power_base(T c) {
  const T base = (c + T(1)) * T(0.5);
  return base < T(0) ? T(0) : base;
}

// thr = T_i = row_params[i, 0], aux = U_i = row_params[i, 1]; a, b the spec's constants.
template <int KIND, typename T>
MK_HD T negative_value(T c, T thr, T aux, T a, T b) {
  if constexpr (KIND == kIdentity) {
    return c;
  } else if constexpr (KIND == kClamp) {
    return c < a ? a : (c > b ? b : c);
  } else if constexpr (KIND == kCurricular) {
    return c > thr ? c * (aux + c) : c;
  } else if constexpr (KIND == kMV) {
    return c > thr ? a * c + (a - T(1)) : c;
  } else if constexpr (KIND == kCircle) {
    // the weight relu(c + a) is detached in the original: it scales the logit but is not differentiated
    T alpha = c + a > T(0) ? c + a : T(0);
    return alpha * (c - a);
  } else if constexpr (KIND == kFilter) {
    return c > a ? T(0) : c;
  } else if constexpr (KIND == kRowScale) {
    return aux * c;  // the row's own scale (AdaCos' dynamic one); the spec's scale is 1
  } else if constexpr (KIND == kAffine) {
    return c > thr ? a * c + b : c;
  } else {
    // SphereFace2's 2 ((c+1)/2)^t - 1 + m with t = a, m = b; the base floored at 0 (negatives.power_base)
    static_assert(KIND == kPower || KIND == kPowerSt, "unknown negative kind");
    return T(2) * mk_pow(power_base(c), a) - T(1) + b;
  }
}

template <int KIND, typename T>
MK_HD T negative_derivative(T c, T thr, T aux, T a, T b) {
  if constexpr (KIND == kIdentity) {
    return T(1);
  } else if constexpr (KIND == kClamp) {
    return (c >= a && c <= b) ? T(1) : T(0);
  } else if constexpr (KIND == kCurricular) {
    return c > thr ? aux + T(2) * c : T(1);
  } else if constexpr (KIND == kMV) {
    return c > thr ? a : T(1);
  } else if constexpr (KIND == kCircle) {
    return c + a > T(0) ? c + a : T(0);
  } else if constexpr (KIND == kFilter) {
    return c <= a ? T(1) : T(0);
  } else if constexpr (KIND == kRowScale) {
    return aux;
  } else if constexpr (KIND == kAffine) {
    return c > thr ? a : T(1);
  } else if constexpr (KIND == kPower) {
    return a * mk_pow(power_base(c), a - T(1));
  } else {
    static_assert(KIND == kPowerSt, "unknown negative kind");
    return T(1);  // opensphere computes the adjustment under no_grad: the gradient of c
  }
}

// the spec of one call: kind is a template argument of every caller, the rest rides along
template <typename T>
struct NegativeConsts {
  T scale, a, b;
};

// true for finite c (c - c is 0), false for +-inf and NaN (c - c is NaN); no -ffast-math anywhere, so the
// compiler may not fold it
template <typename T>
MK_HD bool is_finite(T c) {
  return c - c == T(0);
}

// a product rounded to T before anything else uses it: the backward's p = exp(z - lse) is a softmax only if z
// is the very value the forward's lse was taken over, and a fused multiply-add of scale * g(c) - lse skips
// that rounding (at s = 1e4 the exponent moves by up to ulp(z) / 2 ~ 5e-4: a 1e-4 gradient error; at s = 1e30
// exp overflows and the gradient turns NaN). nvcc contracts across statements, hence __fmul_rn; the host
// compilers get -ffp-contract=off (margin_kernels/native_build.py), under which a plain product is rounded.
MK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MK_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// z = scale * g(c); NaN when c itself is not finite. A finite feature row gives a non-finite x.w_j only when
// w_j holds a NaN or an Inf, and such a class must make the row's loss NaN, never drop out of it (a raw -inf
// logit would add exp(-inf) = 0 to the sum and leave a finite, wrong loss): the forward flags a bad weight
// row in the pass that reads it anyway.
template <int KIND, typename T>
MK_HD T negative_logit(T c, T thr, T aux, NegativeConsts<T> k) {
  const T z = mul_rn(k.scale, negative_value<KIND>(c, thr, aux, k.a, k.b));
  return is_finite(c) ? z : static_cast<T>(NAN);
}

// backward of one negative pair: p = exp(z - lse) * g_lse is the softmax weight times the incoming gradient of
// the row's lse; dL/dc = scale * g'(c) * p. ``lse`` must be finite (rows without negatives pass 0).
template <int KIND, typename T, bool SFU = false>
MK_HD T negative_grad(T c, T thr, T aux, NegativeConsts<T> k, T lse, T g_lse) {
  T z = negative_logit<KIND>(c, thr, aux, k);
  T p = exp_of<SFU>(z - lse) * g_lse;
  return p * negative_derivative<KIND>(c, thr, aux, k.a, k.b) * k.scale;
}

// ---- the negative function by a run-time kind -----------------------------------------------------------------
// One switch over the same per-kind functions: the CUTLASS epilogue (csrc/cutlass/margin_sm90.cu) takes the kind
// as a kernel argument, so one compiled GEMM serves every loss (the kind is uniform across a launch, so every
// thread takes the same branch). An unknown kind gives NaN (the host checks kinds before any launch).
template <typename T>
MK_HD T negative_logit_rt(int kind, T c, T thr, T aux, NegativeConsts<T> k) {
  switch (kind) {
    case kIdentity: return negative_logit<kIdentity>(c, thr, aux, k);
    case kClamp: return negative_logit<kClamp>(c, thr, aux, k);
    case kCurricular: return negative_logit<kCurricular>(c, thr, aux, k);
    case kMV: return negative_logit<kMV>(c, thr, aux, k);
    case kCircle: return negative_logit<kCircle>(c, thr, aux, k);
    case kFilter: return negative_logit<kFilter>(c, thr, aux, k);
    case kRowScale: return negative_logit<kRowScale>(c, thr, aux, k);
    case kAffine: return negative_logit<kAffine>(c, thr, aux, k);
    case kPower: return negative_logit<kPower>(c, thr, aux, k);
    case kPowerSt: return negative_logit<kPowerSt>(c, thr, aux, k);
    default: return static_cast<T>(NAN);
  }
}

template <typename T>
MK_HD T negative_derivative_rt(int kind, T c, T thr, T aux, T a, T b) {
  switch (kind) {
    case kIdentity: return negative_derivative<kIdentity>(c, thr, aux, a, b);
    case kClamp: return negative_derivative<kClamp>(c, thr, aux, a, b);
    case kCurricular: return negative_derivative<kCurricular>(c, thr, aux, a, b);
    case kMV: return negative_derivative<kMV>(c, thr, aux, a, b);
    case kCircle: return negative_derivative<kCircle>(c, thr, aux, a, b);
    case kFilter: return negative_derivative<kFilter>(c, thr, aux, a, b);
    case kRowScale: return negative_derivative<kRowScale>(c, thr, aux, a, b);
    case kAffine: return negative_derivative<kAffine>(c, thr, aux, a, b);
    case kPower: return negative_derivative<kPower>(c, thr, aux, a, b);
    case kPowerSt: return negative_derivative<kPowerSt>(c, thr, aux, a, b);
    default: return static_cast<T>(NAN);
  }
}

// negative_grad with a run-time kind (the same arithmetic in the same order)
template <typename T, bool SFU = false>
MK_HD T negative_grad_rt(int kind, T c, T thr, T aux, NegativeConsts<T> k, T lse, T g_lse) {
  T z = negative_logit_rt(kind, c, thr, aux, k);
  T p = exp_of<SFU>(z - lse) * g_lse;
  return p * negative_derivative_rt(kind, c, thr, aux, k.a, k.b) * k.scale;
}

// ---- the binary reduction (reductions.py) ------------------------------------------------------------------
// softplus(clamp(z, -L, L)), stable for any z (L = inf: no clamp)
template <typename T>
MK_HD T clamp_logit(T z, T clamp) {
  return z < -clamp ? -clamp : (z > clamp ? clamp : z);
}

template <typename T>
MK_HD T softplus_term(T z, T clamp) {
  z = clamp_logit(z, clamp);
  return max_of(z, T(0)) + mk_log1p(mk_exp(z < T(0) ? z : -z));
}

// d softplus(clamp(z)) / dz: the sigmoid inside the clamp (boundaries included, as torch.clamp), 0 outside
template <typename T>
MK_HD T softplus_term_grad(T z, T clamp) {
  if (z < -clamp || z > clamp) return T(0);
  return T(1) / (T(1) + mk_exp(-z));
}

// backward of one negative pair under the binary reduction: dz = g * sigmoid(z + shift) is the pair's share of
// the shift's gradient, and dL/dc = scale * g'(c) * dz
template <int KIND, typename T>
MK_HD T binary_negative_grad(T c, T thr, T aux, NegativeConsts<T> k, T shift, T clamp, T g, T& dz) {
  dz = softplus_term_grad(negative_logit<KIND>(c, thr, aux, k) + shift, clamp) * g;
  return dz * negative_derivative<KIND>(c, thr, aux, k.a, k.b) * k.scale;
}

// binary_negative_grad with a run-time kind
template <typename T>
MK_HD T binary_negative_grad_rt(int kind, T c, T thr, T aux, NegativeConsts<T> k, T shift, T clamp, T g, T& dz) {
  dz = softplus_term_grad(negative_logit_rt(kind, c, thr, aux, k) + shift, clamp) * g;
  return dz * negative_derivative_rt(kind, c, thr, aux, k.a, k.b) * k.scale;
}

// ---- online log-sum-exp -------------------------------------------------------------------------------------
// A partial log-sum-exp is a pair (max, sum of exp(z - max)); (-inf, 0) is the empty set.
template <typename T>
MK_HD void lse_merge(T& run_max, T& run_sum, T other_max, T other_sum) {
  T m = max_of(run_max, other_max);
  if (m == neg_infinity<T>()) {
    // no finite max on either side: keep exp away from -inf - -inf. The sums are 0 for empty sets, but a
    // NaN logit leaves max -inf with sum NaN (NaN compares false in every max), and the NaN must survive
    run_sum = run_sum + other_sum;
    return;
  }
  run_sum = run_sum * mk_exp(run_max - m) + other_sum * mk_exp(other_max - m);
  run_max = m;
}

// one element into a running pair with a single exp (the per-thread step of the GPU reduction; SFU: the
// CUTLASS epilogue's exp, see mk_exp_sfu)
template <typename T, bool SFU = false>
MK_HD void lse_push(T& run_max, T& run_sum, T z) {
  if (z > run_max) {
    run_sum = run_sum * exp_of<SFU>(run_max - z) + T(1);
    run_max = z;
  } else if (z != neg_infinity<T>()) {
    run_sum += exp_of<SFU>(z - run_max);
  }
}

// ---- weight normalisation ---------------------------------------------------------------------------------
template <typename T>
MK_HD T inv_norm_from_sumsq(T sumsq) {
  T norm = mk_sqrt(sumsq);
  return T(1) / max_of(norm, T(kNormEps));
}

// A row's sum of squares overflows (+inf from finite entries) once its norm passes sqrt(max): ~1.8e19 in fp32.
// Such a row (and only such a row: the plain sum costs one pass, the rescue two more) is summed again divided
// by its largest |entry| (LAPACK nrm2's scaling, margin_kernels/norms.py's rule), so no square can overflow.
// A row holding inf also sums to inf: its largest entry is inf, and the rescue keeps the plain result.
template <typename T>
MK_HD bool sumsq_overflowed(T sumsq) {
  return sumsq == static_cast<T>(INFINITY);
}

// The rescue's two passes over entries get(k), k = begin, begin + step, .. < end (one lane's share on a GPU):
// the largest |entry|, then the sum of (entry / top)^2.
template <typename T, typename Get>
MK_HD T max_abs_strided(Get get, int64_t begin, int64_t end, int64_t step) {
  T top = T(0);
  for (int64_t k = begin; k < end; k += step) {
    const T v = get(k);
    top = max_of(top, v < T(0) ? -v : v);
  }
  return top;
}

template <typename T, typename Get>
MK_HD T unit_sumsq_strided(Get get, int64_t begin, int64_t end, int64_t step, T top) {
  T sumsq = T(0);
  for (int64_t k = begin; k < end; k += step) {
    const T v = get(k) / top;
    sumsq += v * v;
  }
  return sumsq;
}

// 1/||w|| from the rescue's largest |entry| and sum of (w / top)^2: (1 / sqrt(s)) / top, which forms neither
// ||w|| (beyond the dtype's range for a row of near-max entries) nor 1/top. No eps floor: ||w|| > ~1e19 here.
// A top of inf (the row holds inf) keeps the plain sum's 1/inf = 0.
template <typename T>
MK_HD T inv_norm_rescaled(T top, T unit_sumsq) {
  if (top == static_cast<T>(INFINITY)) return T(0);
  return (T(1) / mk_sqrt(unit_sumsq)) / top;
}

// c_ij = x_i.w_j / |w_j| gives dW_j = (sum_i dc_ij x_i - (sum_i dc_ij c_ij) w_j / |w_j|) / |w_j|. The kernels
// fold one 1/|w_j| into dc before the dW GEMM, whose output g_j = sum_i dc_ij x_i / |w_j| then needs
// dW_j = g_j - coef_j (w_j / |w_j|) with coef_j = (sum_i dc_ij c_ij) / |w_j|: one 1/|w_j| on each side, never
// 1/|w_j|^2 (which underflows to 0 in fp32 for |w_j| > ~1e19, dropping the radial term).
template <typename T>
MK_HD T dw_norm_coef(T col_dot, T inv_norm) {
  return col_dot * inv_norm;
}

template <typename T>
MK_HD T dw_normalize(T g, T w, T coef, T inv_norm) {
  return g - coef * (w * inv_norm);
}

// ---- sub-centers (margin_kernels/subcenters.py): a class's cosine is the best of its K adjacent rows ---------
// The best of one row's K dot products of a class (times their 1/|w| when inv is given): its value in *best and
// its sub-center index returned; ties go to the lowest index (strict >, k = 0 .. K-1), every backend's rule.
// A NaN wins and sticks (torch.max's rule), so a non-finite weight row makes the class NaN, never skipped.
template <typename T>
MK_HD int sub_center_best(const T* dots, const T* inv, int K, T* best) {
  T b = inv ? dots[0] * inv[0] : dots[0];
  int winner = 0;
  for (int k = 1; k < K; ++k) {
    const T c = inv ? dots[k] * inv[k] : dots[k];
    if (c > b || c != c) {
      b = c;
      winner = k;
    }
  }
  *best = b;
  return winner;
}

// ---- host-side dispatch ----------------------------------------------------------------------------------
// Calls f(std::integral_constant<int, KIND>()) for a runtime kind, so each kind gets its own branch-free loop;
// returns false for an unknown kind (the caller reports it).
template <typename F>
inline bool dispatch_kind(int kind, F&& f) {
  switch (kind) {
    case kIdentity: f(std::integral_constant<int, kIdentity>()); return true;
    case kClamp: f(std::integral_constant<int, kClamp>()); return true;
    case kCurricular: f(std::integral_constant<int, kCurricular>()); return true;
    case kMV: f(std::integral_constant<int, kMV>()); return true;
    case kCircle: f(std::integral_constant<int, kCircle>()); return true;
    case kFilter: f(std::integral_constant<int, kFilter>()); return true;
    case kRowScale: f(std::integral_constant<int, kRowScale>()); return true;
    case kAffine: f(std::integral_constant<int, kAffine>()); return true;
    case kPower: f(std::integral_constant<int, kPower>()); return true;
    case kPowerSt: f(std::integral_constant<int, kPowerSt>()); return true;
    default: return false;
  }
}

}  // namespace mk
