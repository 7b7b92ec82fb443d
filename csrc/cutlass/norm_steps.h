// The fused forward's per-thread norm step (margin_sm90.cu NormMainloop), in a header of its own so that
// bench/cutlass_check.py compiles the very same code into its instruction-count probe: a 16-byte load of eight
// 16-bit weight entries from shared memory and their squares added in order to an fp32 running sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace mk_sm90 {

// 16 bytes at a shared-window address. volatile: stays after the stage's wait and before its release (both
// volatile asm too), so the loop reads the stage only while it is held
__device__ __forceinline__ uint4 load_shared16(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

// s + the squares of 8 consecutive 16-bit entries (bf16 when BF16, else fp16), in order. Each square is exact
// in fp32 (8 or 11 significant bits squared), so fma(v, v, s) is the plain s + v * v
template <bool BF16>
__device__ __forceinline__ float square_sum8(uint4 v, float s) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float lo, hi;
    if constexpr (BF16) {  // a bf16 is the top half of its fp32
      lo = __uint_as_float(words[i] << 16);
      hi = __uint_as_float(words[i] & 0xffff0000u);
    } else {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
      lo = f.x;
      hi = f.y;
    }
    s = fmaf(lo, lo, s);
    s = fmaf(hi, hi, s);
  }
  return s;
}

}  // namespace mk_sm90
