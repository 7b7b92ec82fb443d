// The fused forward's per-thread norm steps (margin_sm90.cu NormMainloop, Sm90NormNode), in a header of its own
// so that bench/cutlass_check.py compiles the very same code into its instruction-count probes: a 16-byte load
// of eight 16-bit weight entries from shared memory and their squares added in order to an fp32 running sum;
// the cluster exchange's asynchronous store, arrivals and wait (distributed shared memory, mbarriers). The
// barrier steps are CUTLASS's ClusterBarrier / ClusterTransactionBarrier instructions plus a "memory" clobber,
// which theirs lack: the slots they guard are read and written by plain C++ accesses the compiler must not move
// across them.
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

// a float into CTA `cta`'s copy of a shared variable, asynchronously (st.async: distributed shared memory),
// its 4 bytes counted on that CTA's copy of the barrier `bar` when they land (complete_tx): no fence
__device__ __forceinline__ void store_async_cluster(float* local, uint64_t* bar, uint32_t cta, float v) {
  asm volatile(
      "{\n\t.reg .b32 dst, mbar;\n\t"
      "mapa.shared::cluster.u32 dst, %0, %2;\n\t"
      "mapa.shared::cluster.u32 mbar, %1, %2;\n\t"
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [dst], %3, [mbar];\n\t}"
      :
      : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(local))),
        "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(cta), "r"(__float_as_uint(v))
      : "memory");
}

// the local barrier's one arrival of a phase, expecting `bytes` of st.async stores before the phase completes
__device__ __forceinline__ void arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               :
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(bytes)
               : "memory");
}

// arrive on CTA `cta`'s copy of a barrier (as CUTLASS's ClusterBarrier::arrive: a consumer's release)
__device__ __forceinline__ void arrive_cluster(uint64_t* bar, uint32_t cta) {
  asm volatile(
      "{\n\t.reg .b32 remote;\n\t"
      "mapa.shared::cluster.u32 remote, %0, %1;\n\t"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n\t}"
      :
      : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(cta)
      : "memory");
}

// wait until the local barrier's phase of this parity has completed
__device__ __forceinline__ void wait_parity(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  }
}

}  // namespace mk_sm90
