// The cuda backend's epilogue-fused GEMMs for sm_90a (API: margin_sm90.h): CUTLASS 3.x TMA warp-specialized
// ping-pong persistent GEMMs whose epilogue visitor trees (EVT) apply the margin math of margin_math.h to the
// fp32 accumulators in registers, so the rows x cols block of dot products is never written:
//   forward:  x by w; per row and 256-column tile, the (max, sum) log-sum-exp pair of the negatives (the binary
//             family: the sum of its softplus terms), one 8-byte pair per (row, tile) into a scratch buffer,
//             merged in tile order by merge_row_parts_kernel (a fixed-order tree within a tile:
//             deterministic). Its mainloop also forms the inverse norms of the tile's W rows from the
//             shared-memory stages it multiplies, a quarter per CTA of the cluster, exchanged through
//             distributed shared memory (NormMainloop, Sm90NormNode; no separate pass over W);
//   backward: the recompute GEMM (x by w) whose EVT writes dL/dcos (times 1/|w_j| and the fp16 factor) in the
//             operand dtype (the D output, through TMA), and per column and 64-row tile (sum_i dc c, sum_i dz)
//             into a scratch buffer (summed after in row-tile order by sum_col_parts_kernel, or read in place by
//             the dW GEMM);
//   dW:       grad^T x with margin_cuda.cu's finish_dw in its epilogue (the unscale, the tangent projection with
//             the chunk's stored rows as its C operand, the column partials summed in row-tile order), into the
//             gradient sink's rows in the operand dtype or fp32. The dx GEMM stays cuBLAS.
// Eight GEMM instantiations: forward and backward x (fp16, bf16), dW x (fp16, bf16) x (16-bit, fp32 output); the
// negative kind and its constants are run-time arguments (margin_math.h's *_rt switch), not template parameters.
//
// Compiled for sm_90a only in effect: for any other target CUTLASS's sm90 kernels compile to an empty body, and
// the host (margin_kernels/backends/cuda_backend.py) calls these only on a compute capability 9.0 device.
// Build with -DNDEBUG (a device assert in the mainloop makes ptxas serialize wgmma: warning C7510).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_conversion.h"
#include "cutlass/util/packed_stride.hpp"

#include "../margin_cuda.h"
#include "../margin_math.h"
#include "margin_sm90.h"
#include "norm_steps.h"

// Which GEMMs this compile instantiates: bit 0 forward bf16, bit 1 forward fp16, bit 2 backward bf16, bit 3
// backward fp16, bits 4-7 the dW GEMM (bf16 -> bf16, bf16 -> fp32, fp16 -> fp16, fp16 -> fp32). The extension
// builds all eight; bench/cutlass_check.py compiles one at a time (each one's
// compile time and ptxas report), and MK_SM90_REPORT_MAIN adds a host main() printing their shared memory.
#ifndef MK_SM90_KERNELS
#define MK_SM90_KERNELS 0xFF
#endif

namespace mk_sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// fragment ``epi_v`` (FragmentSize values) of an epilogue subtile's per-thread register copy ``r``: what a
// broadcast-like node's visit returns
template <int FragmentSize, class RegisterTensor>
CUTLASS_DEVICE cutlass::Array<float, FragmentSize> register_fragment(RegisterTensor const& r, int epi_v) {
  cutlass::Array<float, FragmentSize> out;
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < FragmentSize; ++i) out[i] = r(epi_v * FragmentSize + i);
  return out;
}

// ---- the values the visitors reduce ----------------------------------------------------------------------------

// a partial log-sum-exp (max, sum of exp(z - max)); (-inf, 0) is the empty set. 8 bytes: CUTLASS's column
// reduction moves it through one 64-bit shuffle and stores it as one 64-bit word
struct alignas(8) LsePart {
  float m, s;
  CUTLASS_HOST_DEVICE LsePart() : m(-INFINITY), s(0.0f) {}
  CUTLASS_HOST_DEVICE LsePart(float m_, float s_) : m(m_), s(s_) {}
  // CUTLASS's reductions default-initialise their identity as ElementCompute(0): the empty set
  CUTLASS_HOST_DEVICE explicit LsePart(int) : m(-INFINITY), s(0.0f) {}
};

// one backward element: the value D gets, and its shares of the column sums
struct GradElem {
  float d, dot, dz;
};

// a class's backward partial: (sum_i dc_ij c_ij, sum_i dz_ij)
struct alignas(8) ColPart {
  float dot, dz;
  // the row reduction converts each visited element to its compute type: keep the column shares
  CUTLASS_HOST_DEVICE ColPart(GradElem const& e) : dot(e.dot), dz(e.dz) {}
  CUTLASS_HOST_DEVICE ColPart() : dot(0.0f), dz(0.0f) {}
  CUTLASS_HOST_DEVICE ColPart(float dot_, float dz_) : dot(dot_), dz(dz_) {}
  CUTLASS_HOST_DEVICE explicit ColPart(int) : dot(0.0f), dz(0.0f) {}
};

// element into a running pair. A visited element is (z, 1) (or the empty set (-inf, 0) for the target and
// out-of-range columns: skipped), so the register step is margin_math's lse_push with the SFU's exp
// (mk_exp_sfu: one exp per element in two instructions). The binary reduction's elements are (0, term): merged
// exactly (exp(0) = 1), as a sum; a NaN sum is merged, so it survives.
template <class T>
struct LsePush;
template <>
struct LsePush<LsePart> {
  CUTLASS_HOST_DEVICE LsePart operator()(LsePart run, LsePart e) const {
    if (e.s == 1.0f) {
      mk::lse_push<float, true>(run.m, run.s, e.m);
    } else if (e.s != 0.0f) {
      mk::lse_merge(run.m, run.s, e.m, e.s);
    }
    return run;
  }
};

// pair into pair (the shuffle and shared-memory trees)
template <class T>
struct LseMerge;
template <>
struct LseMerge<LsePart> {
  CUTLASS_HOST_DEVICE LsePart operator()(LsePart run, LsePart e) const {
    mk::lse_merge(run.m, run.s, e.m, e.s);
    return run;
  }
};
// an element merge lifted to the fragments the reduction trees also pass (arrays of N), element by element
template <template <class> class Merge, class Fragment>
CUTLASS_HOST_DEVICE Fragment merge_each(Fragment run, Fragment const& e) {
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < int(Fragment::kElements); ++i) run[i] = Merge<typename Fragment::Element>{}(run[i], e[i]);
  return run;
}
template <int N>
struct LseMerge<cutlass::Array<LsePart, N>> {
  CUTLASS_HOST_DEVICE auto operator()(cutlass::Array<LsePart, N> run, cutlass::Array<LsePart, N> const& e) const {
    return merge_each<::mk_sm90::LseMerge>(run, e);
  }
};

template <class T>
struct ColSum;
template <>
struct ColSum<ColPart> {
  CUTLASS_HOST_DEVICE ColPart operator()(ColPart run, ColPart e) const {
    return ColPart(run.dot + e.dot, run.dz + e.dz);
  }
};
template <int N>
struct ColSum<cutlass::Array<ColPart, N>> {
  CUTLASS_HOST_DEVICE auto operator()(cutlass::Array<ColPart, N> run, cutlass::Array<ColPart, N> const& e) const {
    return merge_each<::mk_sm90::ColSum>(run, e);
  }
};

// the forward's root: the tree stores nothing, the collective still expects one fp32 value per element
template <class T>
struct Discard;
template <int N>
struct Discard<cutlass::Array<LsePart, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<LsePart, N> const&) const {
    cutlass::Array<float, N> out;
    out.fill(0.0f);
    return out;
  }
};

// the backward's D value: the element's d
template <class T>
struct TakeGrad;
template <int N>
struct TakeGrad<cutlass::Array<GradElem, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<GradElem, N> const& e) const {
    cutlass::Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = e[i].d;
    return out;
  }
};

}  // namespace mk_sm90


namespace mk_sm90 {

// ---- the margin node: per element, from the accumulator and the broadcast row/column values ------------------

struct NegativeParams {
  int kind = 0;
  float scale = 1.0f, a = 0.0f, b = 0.0f;
  int binary = 0;
  float clamp = INFINITY;
  const float* shift = nullptr;
  int64_t col0 = 0;
  const float* factor = nullptr;  // backward: the fp16 operand factor (device scalar, NULL: 1)
};

// What every custom node of these trees shares: runtime parameters copied in as they are, no workspace, no
// shared memory, no producer (TMA) loads and no C operand of its own.
template <class P>
struct Sm90ParamsNode {
  struct SharedStorage {};
  using Arguments = P;
  using Params = P;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  CUTLASS_HOST_DEVICE Sm90ParamsNode() {}
  CUTLASS_HOST_DEVICE Sm90ParamsNode(Params const& params, SharedStorage const&) : params(params) {}

  Params params;

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::detail::ProducerLoadArgs<Args...> const&) {
    return fusion::detail::EmptyProducerLoadCallbacks{};
  }
};

// A compute node of the tree (its first input the accumulator, from Sm90AccFetch) that also knows each element's
// global column (the target column of a row is
// dropped, as margin_cuda.cu drops it): the collective hands every callback the thread's coordinate tensor
// (relative to the thread's first element) and the residue (the problem's (M, N) minus that first element).
// BACKWARD false: visit(acc, inv_norm_j, thr_i, aux_i, label_i) -> LsePart per element.
// BACKWARD true:  visit(acc, inv_norm_j, thr_i, aux_i, label_i, lse_i, g_lse_i, g_cos_target_i) -> GradElem.
template <bool BACKWARD>
struct Sm90MarginNode : Sm90ParamsNode<NegativeParams> {
  using Base = Sm90ParamsNode<NegativeParams>;
  using Base::Base;

  template <class CTensor, class ThrResidue>
  struct ConsumerStoreCallbacks : fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor tCcD_, ThrResidue residue_, int64_t first_col_, Params const& p)
        : tCcD(tCcD_), residue(residue_), first_col(first_col_), params(p) {}

    CTensor tCcD;        // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) coordinates relative to the thread's first element
    ThrResidue residue;  // (M, N) - the thread's first element
    int64_t first_col;   // the global column of the thread's first element, plus col0
    Params const& params;
    float shift = 0.0f, factor = 1.0f;

    CUTLASS_DEVICE void begin() {
      shift = params.shift != nullptr ? *params.shift : 0.0f;
      factor = params.factor != nullptr ? *params.factor : 1.0f;
    }

    template <typename ElementAccumulator, int FragmentSize, class... Inputs>
    CUTLASS_DEVICE auto visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m,
                              int epi_n, cutlass::Array<float, FragmentSize> const& frg_acc,
                              cutlass::Array<float, FragmentSize> const& inv,
                              cutlass::Array<float, FragmentSize> const& thr,
                              cutlass::Array<float, FragmentSize> const& aux,
                              cutlass::Array<int64_t, FragmentSize> const& label, Inputs const&... rest) {
      Tensor coords = tCcD(_, _, _, epi_m, epi_n);
      const mk::NegativeConsts<float> k{params.scale, params.a, params.b};
      if constexpr (!BACKWARD) {
        cutlass::Array<LsePart, FragmentSize> out;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < FragmentSize; ++i) {
          const auto crd = coords(epi_v * FragmentSize + i);
          const bool inside = elem_less(crd, residue);
          const int64_t col = first_col + get<1>(crd);
          const float c = static_cast<float>(frg_acc[i]) * inv[i];
          if (!inside || col == label[i]) {
            out[i] = LsePart();
          } else if (params.binary) {
            const float z = mk::negative_logit_rt(params.kind, c, thr[i], aux[i], k);
            out[i] = LsePart(0.0f, mk::softplus_term(z + shift, params.clamp));
          } else {
            out[i] = LsePart(mk::negative_logit_rt(params.kind, c, thr[i], aux[i], k), 1.0f);
          }
        }
        return out;
      } else {
        static_assert(sizeof...(Inputs) == 3, "backward: lse, g_lse, g_cos_target");
        return backward(frg_acc, epi_v, coords, k, inv, thr, aux, label, rest...);
      }
    }

    template <int FragmentSize, class Coords>
    CUTLASS_DEVICE cutlass::Array<GradElem, FragmentSize> backward(
        cutlass::Array<float, FragmentSize> const& frg_acc, int epi_v, Coords const& coords,
        mk::NegativeConsts<float> k, cutlass::Array<float, FragmentSize> const& inv,
        cutlass::Array<float, FragmentSize> const& thr, cutlass::Array<float, FragmentSize> const& aux,
        cutlass::Array<int64_t, FragmentSize> const& label, cutlass::Array<float, FragmentSize> const& lse,
        cutlass::Array<float, FragmentSize> const& g_lse, cutlass::Array<float, FragmentSize> const& g_target) {
      cutlass::Array<GradElem, FragmentSize> out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        const auto crd = coords(epi_v * FragmentSize + i);
        const bool inside = elem_less(crd, residue);
        const int64_t col = first_col + get<1>(crd);
        const float c = static_cast<float>(frg_acc[i]) * inv[i];
        float dc, dz = 0.0f;
        if (col == label[i]) {
          dc = g_target[i];
        } else if (params.binary) {
          dc = mk::binary_negative_grad_rt(params.kind, c, thr[i], aux[i], k, shift, params.clamp, g_lse[i], dz);
        } else {
          dc = mk::negative_grad_rt<float, true>(params.kind, c, thr[i], aux[i], k, lse[i], g_lse[i]);
        }
        // as margin_cuda.cu: 1/|w_j| folded into dL/d(x.w), then the fp16 factor, rounded once at the store
        out[i] = inside ? GradElem{dc * (inv[i] * factor), dc * c, dz} : GradElem{0.0f, 0.0f, 0.0f};
      }
      return out;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    const int64_t N = get<1>(args.problem_shape_mnkl);
    const int64_t first_col = N - static_cast<int64_t>(get<1>(args.residue_tCcD)) + params.col0;
    return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(args.residue_tCcD)>(args.tCcD, args.residue_tCcD,
                                                                                      first_col, params);
  }
};

// ---- the forward's weight norms, formed from the W tiles the mainloop already holds ----------------------------

// The forward's W tile (256 classes x 64 K per stage, the B operand) reaches the 4 CTAs of a cluster by
// multicast, so each CTA sums the squares of its quarter: CTA rank q of the cluster (its M position) takes the
// tile's classes 64 q .. 64 q + 63, all K, from the stages its consumer warpgroup waits on (while that stage's
// wgmma runs; before the stage is released). At the end of its K loop it stores the 64 sums into the same
// slot of all 4 CTAs (st.async into distributed shared memory, each store counted on that CTA's `full`
// barrier); each CTA's epilogue (Sm90NormNode) expects the 1 KiB of the 4 quarters on its `full` barrier and
// waits for them, turns the 256 sums into 1/max(|w_j|, eps) (margin_math.h, the
// overflow rescue reading the row again from global memory when a sum is inf), stores them into the op's
// vector (the cluster at M tile 0) and broadcasts them along M, then arrives on the 4 CTAs' `empty` barriers so
// that the next quarters may land. One slot and barrier pair per consumer warpgroup: the ping-pong's two
// warpgroups take alternate tiles in every CTA of the cluster alike. Static shared memory (counted in the
// mainloop's carveout); the barriers are initialised where the pipelines' are, before the kernel's cluster sync
// (NormMainloop::prefetch_tma_descriptors).
constexpr int kNormCols = 256;   // the forward tile's N (static_assert below)
constexpr int kNormCtas = 4;     // the cluster's M (static_assert below)
constexpr int kNormQuarter = kNormCols / kNormCtas;
__shared__ float norm_sumsq_slot[2][kNormCols];  // per consumer warpgroup: the 4 quarters' sums
__shared__ float norm_inv_slot[2][kNormCols];    // per consumer warpgroup: the tile's inverse norms
__shared__ uint64_t norm_full[2];     // per tile: one arrival (the reader's, expecting 1 KiB), 1 KiB of st.async
__shared__ uint64_t norm_empty[2];    // per tile: 4 CTAs x 4 warps of readers arrive
__shared__ uint32_t norm_parity[2];   // the warpgroup's tile parity, mainloop -> epilogue
constexpr int kNormFullArrivals = 1;
constexpr uint32_t kNormTileBytes = kNormCols * sizeof(float);
constexpr int kNormEmptyArrivals = kNormCtas * 4;
// the slots, barriers and parities as ptxas lays them out (16-byte granules)
constexpr int kNormSlotBytes = (2 * 2 * kNormCols * sizeof(float) + 4 * 8 + 2 * 4 + 15) / 16 * 16;

// which of the two consumer warpgroups (ping-pong: warpgroup 0 is the producer) runs this thread: 0 or 1
CUTLASS_DEVICE int consumer_slot() { return cutlass::canonical_warp_group_idx() - 1; }

// The builder's mainloop with its consumer loop re-stated so the norm work can sit inside it (CUTLASS's
// CollectiveMma<MainloopSm90TmaGmmaWarpSpecialized>::mma: one wgmma batch in flight, each stage released one
// iteration later; its mma_tail releases the last). Thread t of the warpgroup takes the CTA's quarter's class
// t / 2 and the K half t % 2 (32 entries of each 64-wide stage: four 16-byte loads of the swizzled tile, whose
// 16-byte groups stay contiguous); the two halves meet in one shuffle: sumsq_j = half_0 + half_1, each half
// summed in K order. Params.norms 0: the same loop without the norm work (calling the builder's loop from here
// instead made ptxas serialize the wgmmas: warning C7515).
template <class Base>
struct NormMainloop : Base {
  using BuiltArguments = typename Base::Arguments;
  struct Arguments : Base::Arguments {
    int norms = 0;
  };
  struct Params : Base::Params {
    int norms = 0;
  };

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const& shape, Arguments const& args, void* workspace) {
    return Params{Base::to_underlying_arguments(shape, args, workspace), args.norms};
  }

  // one thread, before the kernel's cluster sync (as the pipelines' barriers): the exchange's barriers too
  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    if (params.norms) {
      for (int slot = 0; slot < 2; ++slot) {
        cutlass::arch::ClusterBarrier::init(&norm_full[slot], kNormFullArrivals);
        cutlass::arch::ClusterBarrier::init(&norm_empty[slot], kNormEmptyArrivals);
      }
      cutlass::arch::fence_barrier_init();
    }
  }

  static_assert(cutlass::gemm::detail::is_major<0, typename Base::StrideB>() == false, "B = W must be K-major");
  static_assert(cute::size<1>(typename Base::TileShape{}) == kNormCols, "one slot entry per tile column");
  static_assert(cute::size<2>(typename Base::TileShape{}) == 64, "two 32-entry halves per stage");
  static_assert(cute::size(typename Base::DispatchPolicy::ClusterShape{}) == kNormCtas &&
                    cute::size<0>(typename Base::DispatchPolicy::ClusterShape{}) == kNormCtas,
                "the quarters: one per CTA of the cluster's M");

  uint32_t tiles = 0;   // this warpgroup's tiles so far (the barriers' parity)
  bool formed = false;  // this thread's mainloop sent norm sums

  // A CTA leaves only once every CTA of the cluster has arrived on its `empty` barrier for its last tile: a
  // remote arrival on the shared memory of a CTA that has exited is undefined (the pipelines' producer_tail
  // for the same reason). Runs at the kernel's end in every thread; only consumers that sent sums wait.
  CUTLASS_DEVICE ~NormMainloop() {
    if (formed && tiles > 0) wait_parity(&norm_empty[consumer_slot()], (tiles - 1) & 1);
  }

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(typename Base::MainloopPipeline pipeline, typename Base::PipelineState smem_pipe_read,
                          FrgTensorC& accum, int k_tile_count, int thread_idx,
                          typename Base::TensorStorage& shared_tensors, Params const& params) {
    using TiledMma = typename Base::TiledMma;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), typename Base::SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), typename Base::SmemLayoutB{});
    constexpr int MmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA,MMA_N,MMA_K,PIPE)

    const uint32_t rank = cute::block_rank_in_cluster();
    const int t = thread_idx % cutlass::NumThreadsPerWarpGroup;
    const int col = int(rank) * kNormQuarter + t / 2, k0 = (t % 2) * 32;
    // the thread's four 16-byte groups as shared-window addresses in stage 0, found once through the layout
    // (its swizzle): every stage repeats them (a stage is a whole number of 1 KiB swizzle periods)
    using ElementB = typename Base::ElementB;
    static_assert(kNormCols * 64 * sizeof(ElementB) % 1024 == 0, "stages of whole swizzle periods");
    constexpr uint32_t kStageBytes = kNormCols * 64 * sizeof(ElementB);
    uint32_t group[4];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 4; ++j) group[j] = cute::cast_smem_ptr_to_uint(&sB(col, k0 + 8 * j, 0));
    float sumsq = 0.0f;

    auto smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int k_tile = 0; k_tile < k_tile_count; ++k_tile) {
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      const int read_stage = smem_pipe_read.index();
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, read_stage), tCrB(_, _, k_block, read_stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      // the stage's share of the norms while its wgmma runs (both only read the stage)
      if (params.norms) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 4; ++j) {
          const uint4 v = load_shared16(group[j] + read_stage * kStageBytes);
          sumsq = square_sum8<cute::is_same_v<ElementB, cutlass::bfloat16_t>>(v, sumsq);
        }
      }
      warpgroup_wait<1>();  // the previous stage's wgmma is done: release that stage
      warpgroup_fence_operand(accum);
      if (k_tile > 0) {
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
      }
      ++smem_pipe_read;
    }
    warpgroup_fence_operand(accum);
    if (params.norms) {
      const float other = __shfl_xor_sync(0xFFFFFFFF, sumsq, 1);
      const int slot = consumer_slot();
      const uint32_t parity = tiles & 1;
      ++tiles;
      formed = true;
      if (t == 0) norm_parity[slot] = parity;  // read by this warpgroup's epilogue after its first barrier
      // every CTA's epilogue has read the previous tile's sums out of its slot (a fresh barrier passes)
      wait_parity(&norm_empty[slot], parity ^ 1);
      if (t % 2 == 0) {
        CUTLASS_PRAGMA_UNROLL
        for (uint32_t cta = 0; cta < kNormCtas; ++cta)
          store_async_cluster(&norm_sumsq_slot[slot][col], &norm_full[slot], cta, sumsq + other);
      }
    }
  }
};

// The epilogue's per-class (N) inverse norm: the cluster's sums turned into 1/max(|w_j|, eps) (NormArgs.w set),
// stored into out (by the M tile 0 CTAs: every M tile of a class tile forms the same values) and broadcast
// along M from the slot, one subtile's columns at a time; or (w NULL) the given vector (NULL: 1, raw weights).
struct NormArgs {
  const void* w = nullptr;      // W (cols x dim, the operand dtype): the norms are formed here
  int64_t ld_w = 0, dim = 0;    // for the overflow rescue's second read of a row
  float* out = nullptr;         // cols entries: the formed norms (NULL: not stored)
  const float* given = nullptr; // w NULL: the norms as given (NULL: 1)
};

template <class Element>
struct Sm90NormNode : Sm90ParamsNode<NormArgs> {
  using Base = Sm90ParamsNode<NormArgs>;
  using Base::Base;

  template <class GTensor, class RTensor, class CTensor, class ThrResidue>
  struct ConsumerStoreCallbacks : fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(GTensor tCgRow_, RTensor tCrRow_, CTensor tCcRow_, ThrResidue residue_,
                                          Params const& params_, int64_t n0_, int64_t cols_, bool store_)
        : tCgRow(tCgRow_), tCrRow(tCrRow_), tCcRow(tCcRow_), residue(residue_), params(params_), n0(n0_),
          cols(cols_), store(store_) {}

    GTensor tCgRow;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) each element's class's value (slot or given; M stride 0)
    RTensor tCrRow;  // the values, one register per distinct class, loaded per subtile
    CTensor tCcRow;
    ThrResidue residue;
    Params const& params;
    int64_t n0, cols;  // the tile's first class; its classes in range (<= 256)
    bool store;

    // 1/max(|w_j|, eps) from the sum; an inf sum (|w_j| > ~1.8e19, or an inf entry) takes the rescue's two
    // passes over the row (margin_math.h, as margin_cpu.cpp's inv_norms)
    CUTLASS_DEVICE float inverse_norm(int64_t j, float sumsq) const {
      if (!mk::sumsq_overflowed(sumsq)) return mk::inv_norm_from_sumsq(sumsq);
      const Element* w = static_cast<const Element*>(params.w) + j * params.ld_w;
      auto get = [w](int64_t k) { return static_cast<float>(w[k]); };
      const float top = mk::max_abs_strided<float>(get, 0, params.dim, 1);
      return mk::inv_norm_rescaled(top, mk::unit_sumsq_strided<float>(get, 0, params.dim, 1, top));
    }

    CUTLASS_DEVICE void begin() {
      if (params.w == nullptr) return;
      const int slot = consumer_slot();
      const int t = threadIdx.x % cutlass::NumThreadsPerWarpGroup;
      // the warpgroup's mainloop wrote the parity; the last tile's epilogue has read the previous inverses
      cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, 1 + slot);
      if (t == 0) arrive_expect_tx(&norm_full[slot], kNormTileBytes);
      wait_parity(&norm_full[slot], norm_parity[slot]);  // the 4 quarters of this tile's sums are in
      CUTLASS_PRAGMA_UNROLL
      for (int c = t; c < kNormCols; c += cutlass::NumThreadsPerWarpGroup) {
        if (c < cols) {
          const float inv = inverse_norm(n0 + c, norm_sumsq_slot[slot][c]);
          norm_inv_slot[slot][c] = inv;
          if (store && params.out != nullptr) params.out[n0 + c] = inv;
        }
      }
      cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, 1 + slot);
      // the sums are read: each warp frees the slot of every CTA of the cluster for the next quarters
      if (t % cutlass::NumThreadsPerWarp == 0) {
        CUTLASS_PRAGMA_UNROLL
        for (uint32_t cta = 0; cta < kNormCtas; ++cta) arrive_cluster(&norm_empty[slot], cta);
      }
    }

    CUTLASS_DEVICE void begin_loop(int epi_m, int epi_n) {
      Tensor g = filter_zeros(tCgRow(_, _, _, epi_m, epi_n));
      Tensor r = filter_zeros(tCrRow(_, _, _, epi_m, epi_n));
      Tensor c = filter_zeros(tCcRow(_, _, _, epi_m, epi_n), tCgRow(_, _, _, epi_m, epi_n).stride());
      const bool unit = params.w == nullptr && params.given == nullptr;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(r); ++i) r(i) = unit ? 1.0f : (elem_less(c(i), residue) ? g(i) : 0.0f);
    }

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(cutlass::Array<ElementAccumulator, FragmentSize> const&,
                                                             int epi_v, int epi_m, int epi_n) {
      return register_fragment<FragmentSize>(tCrRow(_, _, _, epi_m, epi_n), epi_v);
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    const int64_t tile_n = size<1>(args.tile_shape_mnk);
    const int64_t n0 = int64_t(get<1>(args.tile_coord_mnkl)) * tile_n;
    const int64_t cols = cute::min(tile_n, int64_t(N) - n0);
    const bool store = get<0>(args.tile_coord_mnkl) == 0;
    // the slot holds the tile's classes from n0: a view indexed by the global class (never read outside the tile)
    float const* base = params.w != nullptr ? &norm_inv_slot[consumer_slot()][0] - n0 : params.given;
    Tensor mRow = make_tensor(make_gmem_ptr(base), make_layout(make_shape(M, N, L), make_stride(_0{}, _1{}, _0{})));
    Tensor tCgRow = fusion::detail::sm90_partition_for_epilogue<ReferenceSrc>(
        mRow, args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile, args.tiled_copy, args.thread_idx);
    Tensor tCrRow = make_tensor_like<float>(tCgRow);
    return ConsumerStoreCallbacks<decltype(tCgRow), decltype(tCrRow), decltype(args.tCcD),
                                  decltype(args.residue_tCcD)>(tCgRow, tCrRow, args.tCcD, args.residue_tCcD, params,
                                                               n0, cute::max(cols, int64_t(0)), store);
  }
};

// ---- the GEMMs -------------------------------------------------------------------------------------------------

// Ping-pong: two consumer warpgroups on alternate 64 x 256 tiles, so one's epilogue (the margin math, ~1 exp
// per element) runs under the other's mainloop; persistent over the tiles; 64 x 256 x 64 tiles with the
// HGMMA 64x256x16 instruction. Clusters of 4 x 1 CTAs on 4 adjacent row tiles of the same columns: TMA
// multicasts each W tile to the 4, so W crosses L2 -> SM once per 256 rows instead of once per 64 (a 128-row
// ping-pong tile would need 256 accumulator registers per thread)
using TileShape = Shape<_64, _256, _64>;
using ClusterShape = Shape<_4, _1, _1>;
// the backward's tile is 64 x 128: its column reduction keeps one (dot, dz) pair per column of the thread's
// share of the tile in registers beside the accumulators (at 256 columns: 128 + 128 registers, which spills).
// Clusters of 4 x 2: W's tile multicast to 4 row tiles, x's to 2 column tiles (at 64 x 128 each CTA would
// otherwise read (1/64 + 1/128) of the product's K-panels per output element from L2)
using BackwardTileShape = Shape<_64, _128, _64>;
using BackwardClusterShape = Shape<_4, _2, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;

// The persistent ping-pong GEMM around a collective epilogue: the mainloop's stages are what shared memory the
// epilogue (and ExtraSmem bytes of static shared memory) leaves (StageCountAutoCarveout), A and B in 16-byte
// aligned rows of the same element type; Wrap: the builder's mainloop as it is, or NormMainloop around it.
template <class M>
using AsBuilt = M;

template <class CollectiveEpilogue, class Element, class LayoutA, class LayoutB, class Tile, class Cluster,
          template <class> class Wrap = AsBuilt, int ExtraSmem = 0>
struct PersistentGemm {
  static constexpr int kAlign = 16 / sizeof(Element);
  using CollectiveMainloop = Wrap<typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign,
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage)) + ExtraSmem>,
      MainloopSchedule>::CollectiveOp>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// 64 x 64 epilogue subtiles: the backward's column reduction merges its 4 warps' partials in the D staging
// buffer of one subtile (4 x 256 ColParts, 8 KiB = 64 x 64 16-bit values)
using EpilogueTile = Shape<_64, _64>;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

using RowVector = Stride<_1, _0, int64_t>;   // one value per row (M), broadcast along N
using ColVector = Stride<_0, _1, int64_t>;   // one value per column (N), broadcast along M

template <class Tile>
using InvNorm = fusion::Sm90RowBroadcast<0, Tile, float, float, ColVector>;
template <class Tile>
using RowFloat = fusion::Sm90ColBroadcast<0, Tile, float, float, RowVector>;
template <class Tile>
using RowLabel = fusion::Sm90ColBroadcast<0, Tile, int64_t, int64_t, RowVector>;

// forward: (max, sum) per row over each tile's columns, not reduced across tiles here (FinalReduction false:
// the (round(M, 64), ceil(N / 256)) buffer of pairs, merged after in tile order). The tree has no D output; the
// builder still sizes its (unused) D staging by an element type, which a void D takes from the root's
// ElementAux: declared here as the operand dtype
using RowLseReduction = fusion::Sm90ColReduction<LsePush, LseMerge, LseMerge, 0, TileShape, LsePart, LsePart,
                                                 kRound, RowVector, 128 / 64, true, /*FinalReduction=*/false>;
template <class Element>
struct ForwardRoot : fusion::Sm90Compute<Discard, float, LsePart, kRound> {
  using fusion::Sm90Compute<Discard, float, LsePart, kRound>::Sm90Compute;
  using ElementAux = Element;
};

template <class Element>
using ForwardTree = fusion::Sm90EVT<
    ForwardRoot<Element>,
    fusion::Sm90EVT<RowLseReduction,
                    fusion::Sm90EVT<Sm90MarginNode<false>, fusion::Sm90AccFetch, Sm90NormNode<Element>,
                                    RowFloat<TileShape>, RowFloat<TileShape>, RowLabel<TileShape>>>>;

// backward: D = dL/dcos in the operand dtype; per column and 64-row tile the ColPart sums (the
// (ceil(M / 64), round(N, 128)) buffer, summed after in row-tile order)
template <class Element>
using BackwardTree = fusion::Sm90EVT<
    fusion::Sm90Compute<TakeGrad, float, GradElem, kRound>,  // fp32 out: the collective rounds it into D
    fusion::Sm90EVT<fusion::Sm90RowReduction<ColSum, ColSum, ColSum, 0, BackwardTileShape, ColPart, ColPart, kRound,
                                             ColVector, 128 / 64, true, /*FinalReduction=*/false>,
                    fusion::Sm90EVT<Sm90MarginNode<true>, fusion::Sm90AccFetch, InvNorm<BackwardTileShape>,
                                    RowFloat<BackwardTileShape>, RowFloat<BackwardTileShape>,
                                    RowLabel<BackwardTileShape>, RowFloat<BackwardTileShape>,
                                    RowFloat<BackwardTileShape>, RowFloat<BackwardTileShape>>>>;

template <class Element, bool BACKWARD>
struct Gemm {
  using LayoutX = cutlass::layout::RowMajor;     // A: rows x dim, K contiguous
  using LayoutW = cutlass::layout::ColumnMajor;  // B: dim x cols with K contiguous = w (cols x dim) row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(Element);
  // a tree with no D output still declares an element type for the builder's shared-memory and copy choices
  using ElementD = cute::conditional_t<BACKWARD, Element, void>;
  using Tree = cute::conditional_t<BACKWARD, BackwardTree<Element>, ForwardTree<Element>>;
  using Tile = cute::conditional_t<BACKWARD, BackwardTileShape, TileShape>;
  using Cluster = cute::conditional_t<BACKWARD, BackwardClusterShape, ClusterShape>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, EpilogueTile, float, float, void, LayoutD, kAlign, ElementD, LayoutD,
      kAlign, EpilogueSchedule, Tree>::CollectiveOp;

  template <class M>
  using Wrap = cute::conditional_t<BACKWARD, M, NormMainloop<M>>;
  using Persistent = PersistentGemm<CollectiveEpilogue, Element, LayoutX, LayoutW, Tile, Cluster, Wrap,
                                    BACKWARD ? 0 : kNormSlotBytes>;
  using CollectiveMainloop = typename Persistent::CollectiveMainloop;
  using Kernel = typename Persistent::Kernel;
  using Device = typename Persistent::Device;
};

// ---- the dW GEMM: G = grad^T x with finish_dw's work in its epilogue --------------------------------------------

// The root of the dW tree: per element of the chunk's dW rows (row j, column n) from the accumulator G_jn, the
// chunk's stored weight w_jn (the C operand), the row's 1/|w_j| and sum_i dc_ij c_ij, and the fp16 unscale:
// margin_math.h's dw_normalize(G_jn * unscale, w_jn, dw_norm_coef(col_dot_j, inv_j), inv_j), as finish_dw_kernel
// of margin_cuda.cu computes it (one 1/|w_j| on each side, never 1/|w_j|^2); raw weights (normalize 0): the
// unscaled G. The grad operand carries 1/|w_j| already (the recompute GEMM folded it in for the dx GEMM).
struct FinishDwParams {
  int normalize = 1;
};

struct Sm90FinishDwNode : Sm90ParamsNode<FinishDwParams> {
  using Base = Sm90ParamsNode<FinishDwParams>;
  using Base::Base;

  struct ConsumerStoreCallbacks : fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE explicit ConsumerStoreCallbacks(int normalize_) : normalize(normalize_) {}
    int normalize;

    template <typename ElementAccumulator, int FragmentSize, class ElementC>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int, int, int,
        cutlass::Array<float, FragmentSize> const& frg_acc, cutlass::Array<ElementC, FragmentSize> const& w,
        cutlass::Array<float, FragmentSize> const& inv, cutlass::Array<float, FragmentSize> const& col_dot,
        cutlass::Array<float, FragmentSize> const& unscale) {
      cutlass::Array<float, FragmentSize> out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        const float g = frg_acc[i] * unscale[i];
        out[i] = normalize ? mk::dw_normalize(g, static_cast<float>(w[i]), mk::dw_norm_coef(col_dot[i], inv[i]),
                                              inv[i])
                           : g;
      }
      return out;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::detail::ConsumerStoreArgs<Args...> const&) {
    return ConsumerStoreCallbacks(params.normalize);
  }
};

// A per-row (M) value of the dW GEMM summed from partials: row j's value is sum_t ptr[t * tile_stride + j * step]
// for t = 0 .. tiles - 1 in that order (sum_col_parts_kernel's order: the same bits). The recompute GEMM's
// per-64-row-tile (dot, dz) partials are read in place (step 2, tile_stride 2 x the padded columns, tiles the
// row tiles), so no kernel sums them in between; a finished col_dot is tiles 1, step 1. Loaded once per tile
// and thread like Sm90ColBroadcast (its partition: one register per distinct row of the thread's elements).
struct RowPartsArgs {
  float const* ptr = nullptr;  // NULL: every row's value is 0
  int64_t step = 1, tile_stride = 0, tiles = 1;
};

template <class CtaTileShapeMNK>
struct Sm90RowPartsSum : Sm90ParamsNode<RowPartsArgs> {
  using Base = Sm90ParamsNode<RowPartsArgs>;
  using Base::Base;

  CUTLASS_DEVICE bool is_zero() const { return params.ptr == nullptr; }

  template <class GTensor, class RTensor, class CTensor, class ThrResidue>
  struct ConsumerStoreCallbacks : fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(GTensor tCgRow_, RTensor tCrRow_, CTensor tCcRow_, ThrResidue residue_,
                                          Params const& params_)
        : tCgRow(tCgRow_), tCrRow(tCrRow_), tCcRow(tCcRow_), residue(residue_), params(params_) {}

    GTensor tCgRow;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) each element's row's first partial (N stride 0)
    RTensor tCrRow;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) the sums, one register per distinct row
    CTensor tCcRow;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) coordinates relative to the thread's first element
    ThrResidue residue;
    Params const& params;

    CUTLASS_DEVICE void begin() {
      Tensor g = filter_zeros(tCgRow);
      Tensor r = filter_zeros(tCrRow);
      Tensor c = filter_zeros(tCcRow, tCgRow.stride());
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(r); ++i) {
        float sum = 0.0f;
        if (params.ptr != nullptr && elem_less(c(i), residue)) {
          float const* first = &g(i);
          for (int64_t t = 0; t < params.tiles; ++t) sum += first[t * params.tile_stride];
        }
        r(i) = sum;
      }
    }

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(cutlass::Array<ElementAccumulator, FragmentSize> const&,
                                                             int epi_v, int epi_m, int epi_n) {
      return register_fragment<FragmentSize>(tCrRow(_, _, _, epi_m, epi_n), epi_v);
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    // a null pointer still needs a layout to partition: every access is guarded by params.ptr
    Tensor mRow = make_tensor(make_gmem_ptr(params.ptr), make_layout(make_shape(M, N, L),
                                                                     make_stride(params.step, _0{}, int64_t(0))));
    Tensor tCgRow = fusion::detail::sm90_partition_for_epilogue<ReferenceSrc>(
        mRow, args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile, args.tiled_copy, args.thread_idx);
    Tensor mRow_static = make_tensor(make_gmem_ptr(params.ptr), make_layout(make_shape(M, N, L),
                                                                            make_stride(_1{}, _0{}, _0{})));
    Tensor tCgRow_static = fusion::detail::sm90_partition_for_epilogue<ReferenceSrc>(
        mRow_static, args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile, args.tiled_copy, args.thread_idx);
    Tensor tCrRow = make_tensor_like<float>(tCgRow_static);
    return ConsumerStoreCallbacks<decltype(tCgRow), decltype(tCrRow), decltype(args.tCcD),
                                  decltype(args.residue_tCcD)>(tCgRow, tCrRow, args.tCcD, args.residue_tCcD, params);
  }
};

// Ping-pong (two consumer warpgroups on alternate 64 x 256 tiles), as the forward: one warpgroup's epilogue
// (the load of w, the column sums, the store) runs under the other's mainloop. M = the chunk's classes, N = d,
// K = the batch: grad (rows x cols, row-major) is A^T with M contiguous (MN-major, fine for 16-bit wgmma), x
// (rows x dim, row-major) is B with N contiguous. Clusters of 4 x 1: each x tile multicast to the 4 CTAs of
// adjacent class tiles (x's L2 reads once per 256 classes).
using DwTileShape = Shape<_64, _256, _64>;
using DwClusterShape = Shape<_4, _1, _1>;

template <class Element, class ElementOut>
struct DwGemm {
  using LayoutGrad = cutlass::layout::ColumnMajor;  // A = grad^T: (cols x rows), cols contiguous
  using LayoutX = cutlass::layout::RowMajor;        // B = x as (rows x dim) K x N, dim contiguous
  using LayoutW = cutlass::layout::RowMajor;        // C = the chunk's weight rows, D = their dW rows
  static constexpr int kAlign = 16 / sizeof(Element);
  static constexpr int kAlignOut = 16 / sizeof(ElementOut);
  using Tree = fusion::Sm90EVT<Sm90FinishDwNode, fusion::Sm90AccFetch, fusion::Sm90SrcFetch<Element>,
                               RowFloat<DwTileShape>, Sm90RowPartsSum<DwTileShape>,
                               fusion::Sm90ScalarBroadcast<float>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, DwTileShape, DwClusterShape,
      EpilogueTile, float, float, Element, LayoutW, kAlign, ElementOut, LayoutW, kAlignOut, EpilogueSchedule,
      Tree>::CollectiveOp;

  using Persistent = PersistentGemm<CollectiveEpilogue, Element, LayoutGrad, LayoutX, DwTileShape, DwClusterShape>;
  using CollectiveMainloop = typename Persistent::CollectiveMainloop;
  using Kernel = typename Persistent::Kernel;
  using Device = typename Persistent::Device;
};

// ---- the merges after the GEMM (fixed order: deterministic) -----------------------------------------------------

// one warp per row: lane t merges tiles t, t + 32, ... in order, then a fixed shuffle tree, then into the run
__global__ void merge_row_parts_kernel(const LsePart* __restrict__ parts, int64_t rows, int64_t padded_rows,
                                       int64_t tiles, float* run_max, float* run_sum) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps
  LsePart acc;
  for (int64_t t = lane; t < tiles; t += 32) {
    const LsePart p = parts[t * padded_rows + row];
    mk::lse_merge(acc.m, acc.s, p.m, p.s);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m = __shfl_xor_sync(0xffffffffu, acc.m, offset);
    const float s = __shfl_xor_sync(0xffffffffu, acc.s, offset);
    // both lanes of a pair merge the same two values in the same order (lower lane first): all lanes agree
    if ((lane & offset) == 0) {
      mk::lse_merge(acc.m, acc.s, m, s);
    } else {
      LsePart low(m, s);
      mk::lse_merge(low.m, low.s, acc.m, acc.s);
      acc = low;
    }
  }
  if (lane == 0) mk::lse_merge(run_max[row], run_sum[row], acc.m, acc.s);
}

// one thread per column, summing its row tiles in order
__global__ void sum_col_parts_kernel(const ColPart* __restrict__ parts, int64_t cols, int64_t padded_cols,
                                     int64_t row_tiles, float* col_dot, float* col_shift) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  float dot = 0.0f, dz = 0.0f;
  for (int64_t t = 0; t < row_tiles; ++t) {
    const ColPart p = parts[t * padded_cols + j];
    dot += p.dot;
    dz += p.dz;
  }
  if (col_dot != nullptr) col_dot[j] = dot;
  if (col_shift != nullptr) col_shift[j] = dz;
}

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// stream-ordered scratch, freed on the same stream after its last use
struct Scratch {
  void* ptr = nullptr;
  cudaStream_t stream;
  explicit Scratch(cudaStream_t s) : stream(s) {}
  cudaError_t get(size_t bytes) { return bytes == 0 ? cudaSuccess : cudaMallocAsync(&ptr, bytes, stream); }
  ~Scratch() {
    if (ptr != nullptr) cudaFreeAsync(ptr, stream);
  }
};

template <class G>
int run(typename G::Device::Arguments const& arguments, cudaStream_t stream) {
  typename G::Device gemm;
  if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return MK_SM90_ERR_CANNOT_IMPLEMENT;
  Scratch workspace(stream);
  cudaError_t status = workspace.get(G::Device::get_workspace_size(arguments));
  if (status != cudaSuccess) return static_cast<int>(status);
  if (gemm.initialize(arguments, workspace.ptr, stream) != cutlass::Status::kSuccess) return MK_SM90_ERR_INTERNAL;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return MK_SM90_ERR_INTERNAL;
  return static_cast<int>(cudaGetLastError());
}

template <class G, bool norms = false>
typename G::Device::Arguments gemm_arguments(mk_sm90_gemm const& g) {
  using Element = typename G::CollectiveMainloop::ElementA;
  typename G::Device::Arguments arguments{};
  arguments.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  const int M = static_cast<int>(g.rows), N = static_cast<int>(g.cols), K = static_cast<int>(g.dim);
  arguments.problem_shape = {M, N, K, 1};
  auto stride_x = cutlass::make_cute_packed_stride(typename G::Kernel::StrideA{}, make_shape(M, K, 1));
  auto stride_w = cutlass::make_cute_packed_stride(typename G::Kernel::StrideB{}, make_shape(N, K, 1));
  get<0>(stride_x) = g.ld_x;  // row strides as given (TMA: a multiple of 16 bytes)
  get<0>(stride_w) = g.ld_w;
  if constexpr (norms) {  // NormMainloop's arguments: the builder's, then the norm switch
    static_cast<typename G::CollectiveMainloop::BuiltArguments&>(arguments.mainloop) = {
        static_cast<Element const*>(g.x), stride_x, static_cast<Element const*>(g.w), stride_w};
  } else {
    arguments.mainloop = {static_cast<Element const*>(g.x), stride_x, static_cast<Element const*>(g.w), stride_w};
  }
  return arguments;
}

NegativeParams negative_params(mk_sm90_epilogue const& ep, const float* factor) {
  NegativeParams p;
  p.kind = ep.kind;
  p.scale = ep.scale;
  p.a = ep.a;
  p.b = ep.b;
  p.binary = ep.reduction == mk::kSoftplusSum;
  p.clamp = ep.clamp;
  p.shift = ep.shift;
  p.col0 = ep.col0;
  p.factor = factor;
  return p;
}

template <class Element>
int forward_for(mk_sm90_gemm const& g, mk_sm90_epilogue const& ep, float* inv_norm_out, float* run_max,
                float* run_sum, cudaStream_t stream) {
  using G = Gemm<Element, false>;
  const int64_t tile_m = size<0>(TileShape{}), tile_n = size<1>(TileShape{});
  const int64_t padded_rows = round_up(g.rows, tile_m), tiles = (g.cols + tile_n - 1) / tile_n;
  Scratch parts(stream);
  cudaError_t status = parts.get(sizeof(LsePart) * padded_rows * tiles);
  if (status != cudaSuccess) return static_cast<int>(status);
  auto arguments = gemm_arguments<G, /*norms=*/true>(g);
  const bool form = inv_norm_out != nullptr;
  arguments.mainloop.norms = form ? 1 : 0;
  NormArgs norms;
  if (form) {
    norms.w = g.w;
    norms.ld_w = g.ld_w;
    norms.dim = g.dim;
    norms.out = inv_norm_out;
  } else {
    norms.given = ep.inv_norm;
  }
  // {children..., node}: {{{acc, inv_norm, thr, aux, label, margin}, row reduction}, root}
  arguments.epilogue.thread = {{{{},
                                 norms,
                                 {ep.thr, 0.0f, {}},
                                 {ep.aux, 0.0f, {}},
                                 {ep.labels, int64_t(-1), {}},
                                 negative_params(ep, nullptr)},
                                {parts.ptr, LsePart(), {}}},
                               {}};
  int result = run<G>(arguments, stream);
  if (result != 0) return result;
  constexpr int kWarps = 8;
  merge_row_parts_kernel<<<static_cast<unsigned int>((g.rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(
      static_cast<const LsePart*>(parts.ptr), g.rows, padded_rows, tiles, run_max, run_sum);
  return static_cast<int>(cudaGetLastError());
}

template <class Element>
int backward_for(mk_sm90_gemm const& g, mk_sm90_epilogue const& ep, const float* lse, const float* g_lse,
                 const float* g_cos_target, const float* factor, void* grad, int64_t ld_grad, float* col_dot,
                 float* col_shift, float* col_parts, cudaStream_t stream) {
  using G = Gemm<Element, true>;
  const int64_t tile_m = size<0>(BackwardTileShape{}), tile_n = size<1>(BackwardTileShape{});
  const int64_t padded_cols = round_up(g.cols, tile_n), row_tiles = (g.rows + tile_m - 1) / tile_m;
  Scratch parts(stream);
  cudaError_t status = col_parts != nullptr ? cudaSuccess : parts.get(sizeof(ColPart) * padded_cols * row_tiles);
  if (status != cudaSuccess) return static_cast<int>(status);
  if (col_parts != nullptr) parts.ptr = nullptr;  // the caller's buffer: not freed here
  void* parts_ptr = col_parts != nullptr ? static_cast<void*>(col_parts) : parts.ptr;
  auto arguments = gemm_arguments<G>(g);
  const int M = static_cast<int>(g.rows), N = static_cast<int>(g.cols);
  auto stride_d = cutlass::make_cute_packed_stride(typename G::Kernel::StrideD{}, make_shape(M, N, 1));
  get<0>(stride_d) = ld_grad;
  arguments.epilogue.ptr_C = nullptr;
  arguments.epilogue.ptr_D = static_cast<Element*>(grad);
  arguments.epilogue.dD = stride_d;
  arguments.epilogue.thread = {
      {{{},
        {ep.inv_norm, 1.0f, {}},
        {ep.thr, 0.0f, {}},
        {ep.aux, 0.0f, {}},
        {ep.labels, int64_t(-1), {}},
        {lse, 0.0f, {}},
        {g_lse, 0.0f, {}},
        {g_cos_target, 0.0f, {}},
        negative_params(ep, factor)},
       {parts_ptr, ColPart(), {}}},
      {}};
  int result = run<G>(arguments, stream);
  if (result != 0 || col_parts != nullptr) return result;
  constexpr int kThreads = 256;
  sum_col_parts_kernel<<<static_cast<unsigned int>((g.cols + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      static_cast<const ColPart*>(parts_ptr), g.cols, padded_cols, row_tiles, col_dot, col_shift);
  return static_cast<int>(cudaGetLastError());
}

template <class Element, class ElementOut>
int dw_for(mk_sm90_dw_args const& a, cudaStream_t stream) {
  using G = DwGemm<Element, ElementOut>;
  const int M = static_cast<int>(a.cols), N = static_cast<int>(a.dim), K = static_cast<int>(a.rows);
  typename G::Device::Arguments arguments{};
  arguments.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  arguments.problem_shape = {M, N, K, 1};
  auto stride_grad = cutlass::make_cute_packed_stride(typename G::Kernel::StrideA{}, make_shape(M, K, 1));
  auto stride_x = cutlass::make_cute_packed_stride(typename G::Kernel::StrideB{}, make_shape(N, K, 1));
  get<1>(stride_grad) = a.ld_grad;  // the K (batch row) strides as given (TMA: a multiple of 16 bytes)
  get<1>(stride_x) = a.ld_x;
  arguments.mainloop = {static_cast<Element const*>(a.grad), stride_grad, static_cast<Element const*>(a.x),
                        stride_x};
  auto stride_w = cutlass::make_cute_packed_stride(typename G::Kernel::StrideC{}, make_shape(M, N, 1));
  auto stride_out = cutlass::make_cute_packed_stride(typename G::Kernel::StrideD{}, make_shape(M, N, 1));
  get<0>(stride_w) = a.ld_w;
  get<0>(stride_out) = a.ld_out;
  arguments.epilogue.ptr_C = static_cast<Element const*>(a.w);
  arguments.epilogue.dC = stride_w;
  arguments.epilogue.ptr_D = static_cast<ElementOut*>(a.out);
  arguments.epilogue.dD = stride_out;
  // {children..., node}: {acc, w, inv_norm, col_dot, unscale, finish}
  typename fusion::Sm90ScalarBroadcast<float>::Arguments unscale{};
  unscale.scalars[0] = 1.0f;
  unscale.scalar_ptrs[0] = a.inv_factor;
  FinishDwParams finish;
  finish.normalize = a.inv_norm != nullptr;
  typename Sm90RowPartsSum<DwTileShape>::Arguments col_dot{a.col_dot, a.col_dot_step, a.col_dot_tile_stride,
                                                          a.col_dot_tiles};
  arguments.epilogue.thread = {{}, {}, {a.inv_norm, 0.0f, {}}, col_dot, unscale, finish};
  return run<G>(arguments, stream);
}

int check(mk_sm90_gemm const& g, mk_sm90_epilogue const& ep) {
  if (ep.kind < 0 || ep.kind >= mk::kNumNegativeKinds) return MK_CUDA_ERR_UNKNOWN_KIND;
  if (g.rows > 0x7fffffff || g.cols > 0x7fffffff || g.dim > 0x7fffffff) return MK_CUDA_ERR_TOO_MANY_ROWS;
  if (ep.labels == nullptr || ep.thr == nullptr || ep.aux == nullptr) return MK_CUDA_ERR_BAD_ARGUMENT;
  return 0;
}

}  // namespace mk_sm90

extern "C" {

int mk_sm90_forward(const mk_sm90_gemm* gemm, const mk_sm90_epilogue* ep, float* inv_norm_out, float* run_max,
                    float* run_sum, void* stream) {
  if (gemm->rows <= 0 || gemm->cols <= 0) return 0;
  if (const int bad = mk_sm90::check(*gemm, *ep)) return bad;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if constexpr ((MK_SM90_KERNELS & 1) != 0) {
    if (gemm->dtype == MK_DTYPE_BF16)
      return mk_sm90::forward_for<cutlass::bfloat16_t>(*gemm, *ep, inv_norm_out, run_max, run_sum, s);
  }
  if constexpr ((MK_SM90_KERNELS & 2) != 0) {
    if (gemm->dtype == MK_DTYPE_F16)
      return mk_sm90::forward_for<cutlass::half_t>(*gemm, *ep, inv_norm_out, run_max, run_sum, s);
  }
  return MK_SM90_ERR_BAD_DTYPE;
}

static int backward_any(const mk_sm90_gemm* gemm, const mk_sm90_epilogue* ep, const float* lse, const float* g_lse,
                 const float* g_cos_target, const float* factor, void* grad, int64_t ld_grad, float* col_dot,
                 float* col_shift, float* col_parts, void* stream) {
  if (gemm->rows <= 0 || gemm->cols <= 0) return 0;
  if (const int bad = mk_sm90::check(*gemm, *ep)) return bad;
  if (col_parts == nullptr && ep->reduction == mk::kSoftplusSum && col_shift == nullptr)
    return MK_CUDA_ERR_MISSING_OUTPUT;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if constexpr ((MK_SM90_KERNELS & 4) != 0) {
    if (gemm->dtype == MK_DTYPE_BF16)
      return mk_sm90::backward_for<cutlass::bfloat16_t>(*gemm, *ep, lse, g_lse, g_cos_target, factor, grad,
                                                        ld_grad, col_dot, col_shift, col_parts, s);
  }
  if constexpr ((MK_SM90_KERNELS & 8) != 0) {
    if (gemm->dtype == MK_DTYPE_F16)
      return mk_sm90::backward_for<cutlass::half_t>(*gemm, *ep, lse, g_lse, g_cos_target, factor, grad, ld_grad,
                                                    col_dot, col_shift, col_parts, s);
  }
  return MK_SM90_ERR_BAD_DTYPE;
}

int mk_sm90_backward(const mk_sm90_gemm* gemm, const mk_sm90_epilogue* ep, const float* lse, const float* g_lse,
                     const float* g_cos_target, const float* factor, void* grad, int64_t ld_grad, float* col_dot,
                     float* col_shift, void* stream) {
  return backward_any(gemm, ep, lse, g_lse, g_cos_target, factor, grad, ld_grad, col_dot, col_shift, nullptr,
                      stream);
}

int mk_sm90_backward_parts(const mk_sm90_gemm* gemm, const mk_sm90_epilogue* ep, const float* lse,
                           const float* g_lse, const float* g_cos_target, const float* factor, void* grad,
                           int64_t ld_grad, float* col_parts, void* stream) {
  if (col_parts == nullptr) return MK_CUDA_ERR_MISSING_OUTPUT;
  return backward_any(gemm, ep, lse, g_lse, g_cos_target, factor, grad, ld_grad, nullptr, nullptr, col_parts,
                      stream);
}

void mk_sm90_col_parts_shape(int64_t rows, int64_t cols, int64_t* tiles, int64_t* padded_cols) {
  const int64_t tile_m = cute::size<0>(mk_sm90::BackwardTileShape{});
  *tiles = (rows + tile_m - 1) / tile_m;
  *padded_cols = mk_sm90::round_up(cols, cute::size<1>(mk_sm90::BackwardTileShape{}));
}

int mk_sm90_dw(const mk_sm90_dw_args* args, void* stream) {
  const mk_sm90_dw_args& a = *args;
  if (a.cols <= 0 || a.dim <= 0) return 0;
  if (a.rows > 0x7fffffff || a.cols > 0x7fffffff || a.dim > 0x7fffffff) return MK_CUDA_ERR_TOO_MANY_ROWS;
  if (a.grad == nullptr || a.x == nullptr || a.w == nullptr || a.out == nullptr) return MK_CUDA_ERR_BAD_ARGUMENT;
  if ((a.inv_norm == nullptr) != (a.col_dot == nullptr)) return MK_CUDA_ERR_BAD_ARGUMENT;
  if (a.col_dot != nullptr && (a.col_dot_tiles < 1 || a.col_dot_step < 1)) return MK_CUDA_ERR_BAD_ARGUMENT;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool f32_out = a.out_dtype == MK_DTYPE_F32;
  if (!f32_out && a.out_dtype != a.dtype) return MK_SM90_ERR_BAD_DTYPE;
  if constexpr ((MK_SM90_KERNELS & 16) != 0) {
    if (a.dtype == MK_DTYPE_BF16 && !f32_out) return mk_sm90::dw_for<cutlass::bfloat16_t, cutlass::bfloat16_t>(a, s);
  }
  if constexpr ((MK_SM90_KERNELS & 32) != 0) {
    if (a.dtype == MK_DTYPE_BF16 && f32_out) return mk_sm90::dw_for<cutlass::bfloat16_t, float>(a, s);
  }
  if constexpr ((MK_SM90_KERNELS & 64) != 0) {
    if (a.dtype == MK_DTYPE_F16 && !f32_out) return mk_sm90::dw_for<cutlass::half_t, cutlass::half_t>(a, s);
  }
  if constexpr ((MK_SM90_KERNELS & 128) != 0) {
    if (a.dtype == MK_DTYPE_F16 && f32_out) return mk_sm90::dw_for<cutlass::half_t, float>(a, s);
  }
  return MK_SM90_ERR_BAD_DTYPE;
}

void mk_sm90_tile_shape(int backward, int* m, int* n, int* k) {
  *m = backward ? cute::size<0>(mk_sm90::BackwardTileShape{}) : cute::size<0>(mk_sm90::TileShape{});
  *n = backward ? cute::size<1>(mk_sm90::BackwardTileShape{}) : cute::size<1>(mk_sm90::TileShape{});
  *k = backward ? cute::size<2>(mk_sm90::BackwardTileShape{}) : cute::size<2>(mk_sm90::TileShape{});
}

}  // extern "C"

#ifdef MK_SM90_REPORT_MAIN
#include <cstdio>
// the shared memory of each GEMM (what a launch requests; the forward's static norm slots added), for
// bench/cutlass_check.py
int main() {
  constexpr int kStatic = mk_sm90::kNormSlotBytes;
  std::printf("forward_bf16 %d\n", static_cast<int>(mk_sm90::Gemm<cutlass::bfloat16_t, false>::Kernel::SharedStorageSize) + kStatic);
  std::printf("forward_f16 %d\n", static_cast<int>(mk_sm90::Gemm<cutlass::half_t, false>::Kernel::SharedStorageSize) + kStatic);
  std::printf("backward_bf16 %d\n", static_cast<int>(mk_sm90::Gemm<cutlass::bfloat16_t, true>::Kernel::SharedStorageSize));
  std::printf("backward_f16 %d\n", static_cast<int>(mk_sm90::Gemm<cutlass::half_t, true>::Kernel::SharedStorageSize));
  std::printf("dw_bf16 %d\n", static_cast<int>(mk_sm90::DwGemm<cutlass::bfloat16_t, cutlass::bfloat16_t>::Kernel::SharedStorageSize));
  std::printf("dw_bf16_f32 %d\n", static_cast<int>(mk_sm90::DwGemm<cutlass::bfloat16_t, float>::Kernel::SharedStorageSize));
  std::printf("dw_f16 %d\n", static_cast<int>(mk_sm90::DwGemm<cutlass::half_t, cutlass::half_t>::Kernel::SharedStorageSize));
  std::printf("dw_f16_f32 %d\n", static_cast<int>(mk_sm90::DwGemm<cutlass::half_t, float>::Kernel::SharedStorageSize));
  return 0;
}
#endif
