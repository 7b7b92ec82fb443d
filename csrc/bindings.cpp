// Python bindings of the fused epilogues: take torch tensors, check what the kernels assume (a clear
// RuntimeError naming the function and the argument, never a crash), and call the CPU kernels (margin_cpu.h)
// or, in the CUDA build (MK_WITH_CUDA), the CUDA launchers (margin_cuda.h) on the stream the caller passes.
// The Python side (margin_kernels/backends/native_epilogue.py) validates first; these checks are the backstop.
#include <torch/extension.h>

#include <optional>
#include <string>

#include "margin_cpu.h"
#include "margin_math.h"
#ifdef MK_WITH_CUDA
#include "margin_cuda.h"
#endif
#ifdef MK_WITH_CUTLASS
#include "cutlass/margin_sm90.h"
#endif

namespace {

using at::Tensor;
template <typename T>
using optional = std::optional<T>;

bool is_acc_dtype(const Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble; }

void check_matrix(const char* fn, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "margin_kernels.", fn, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "margin_kernels.", fn, ": ", name,
              " must have unit stride along its last dimension, got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "margin_kernels.", fn, ": ", name,
              " rows must not overlap, got strides ", t.strides(), " for shape ", t.sizes());
}

void check_like(const char* fn, const char* name, const Tensor& t, const Tensor& ref, int64_t numel) {
  TORCH_CHECK(t.device() == ref.device(), "margin_kernels.", fn, ": ", name, " is on ", t.device(),
              " but the tile is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "margin_kernels.", fn, ": ", name, " must be ",
              ref.scalar_type(), " like the tile, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "margin_kernels.", fn, ": ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, "margin_kernels.", fn, ": ", name, " must have ", numel, " elements, got ",
              t.numel(), " (shape ", t.sizes(), ")");
}

// the arguments every tile call shares, checked once
struct Tile {
  Tensor tile;
  optional<Tensor> inv_norm;
  Tensor labels;
  int64_t col0;
  Tensor row_params;
  int64_t kind;
  double scale, a, b;
  int64_t reduction;         // mk::ReductionKind
  double clamp;              // the binary reduction's logit clamp
  optional<Tensor> shift;    // the binary reduction's logit shift (one element, the tile's dtype and device)

  bool binary() const { return reduction == mk::kSoftplusSum; }
  int64_t rows() const { return tile.size(0); }
  int64_t cols() const { return tile.size(1); }
  int64_t ld() const { return tile.size(0) <= 1 ? tile.size(1) : tile.stride(0); }

  void check(const char* fn) const {
    check_matrix(fn, "tile", tile);
    TORCH_CHECK(is_acc_dtype(tile), "margin_kernels.", fn, ": tile must be float32 or float64, got ",
                tile.scalar_type());
    TORCH_CHECK(kind >= 0 && kind < mk::kNumNegativeKinds, "margin_kernels.", fn, ": unknown negative kind ",
                kind);
    if (inv_norm) check_like(fn, "inv_norm", *inv_norm, tile, cols());
    check_like(fn, "row_params", row_params, tile, 2 * rows());
    TORCH_CHECK(reduction >= 0 && reduction < mk::kNumReductionKinds, "margin_kernels.", fn,
                ": unknown reduction kind ", reduction);
    TORCH_CHECK(!binary() || shift, "margin_kernels.", fn, ": shift is required by the binary reduction");
    if (shift) check_like(fn, "shift", *shift, tile, 1);
    TORCH_CHECK(labels.scalar_type() == at::kLong, "margin_kernels.", fn, ": labels must be int64, got ",
                labels.scalar_type());
    TORCH_CHECK(labels.device() == tile.device(), "margin_kernels.", fn, ": labels are on ", labels.device(),
                " but the tile is on ", tile.device());
    TORCH_CHECK(labels.is_contiguous() && labels.numel() == rows(), "margin_kernels.", fn,
                ": labels must be contiguous with one entry per tile row (", rows(), "), got shape ",
                labels.sizes());
  }

  template <typename T>
  mk_cpu::TileArgs<T> cpu_args() const {
    return mk_cpu::TileArgs<T>{tile.data_ptr<T>(), rows(), cols(), ld(),
                               inv_norm ? inv_norm->data_ptr<T>() : nullptr, labels.data_ptr<int64_t>(), col0,
                               row_params.data_ptr<T>(), static_cast<int>(kind), static_cast<T>(scale),
                               static_cast<T>(a), static_cast<T>(b), static_cast<int>(reduction),
                               static_cast<T>(clamp), shift ? shift->data_ptr<T>() : nullptr};
  }
};

void check_status(int status, const char* fn) {
  TORCH_CHECK(status == mk_cpu::kOk, "margin_kernels.", fn, " failed: ",
              status == mk_cpu::kUnknownKind     ? "unknown negative kind"
              : status == mk_cpu::kMissingOutput ? "the binary reduction needs col_shift"
                                                 : "error code " + std::to_string(status));
}

#ifdef MK_WITH_CUDA
int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return MK_DTYPE_F32;
    case at::kDouble: return MK_DTYPE_F64;
    case at::kHalf: return MK_DTYPE_F16;
    case at::kBFloat16: return MK_DTYPE_BF16;
    default: return -1;
  }
}

void check_cuda(int status, const char* kernel) {
  TORCH_CHECK(status == 0, "margin_kernels CUDA kernel ", kernel, " failed: ", mk_cuda_error_string(status));
}

mk_tile_args cuda_args(const Tile& t, int64_t stream) {
  mk_tile_args args;
  args.tile = t.tile.data_ptr();
  args.rows = t.rows();
  args.cols = t.cols();
  args.ld = t.ld();
  args.inv_norm = t.inv_norm ? t.inv_norm->data_ptr() : nullptr;
  args.labels = t.labels.data_ptr<int64_t>();
  args.col0 = t.col0;
  args.row_params = t.row_params.data_ptr();
  args.kind = static_cast<int>(t.kind);
  args.scale = t.scale;
  args.a = t.a;
  args.b = t.b;
  args.reduction = static_cast<int>(t.reduction);
  args.clamp = t.clamp;
  args.shift = t.shift ? t.shift->data_ptr() : nullptr;
  args.dtype = dtype_code(t.tile);
  args.device = t.tile.get_device();
  args.stream = reinterpret_cast<void*>(stream);
  return args;
}
#endif

void no_cuda(const char* fn) {
  TORCH_CHECK(false, "margin_kernels.", fn, ": got CUDA tensors but this extension was built without CUDA");
}

Tensor inv_norms(const Tensor& w, int64_t stream) {
  check_matrix("inv_norms", "w", w);
  const int64_t ld = w.size(0) <= 1 ? w.size(1) : w.stride(0);
  if (w.is_cuda()) {
#ifdef MK_WITH_CUDA
    TORCH_CHECK(dtype_code(w) >= 0, "margin_kernels.inv_norms: w must be a floating tensor, got ", w.scalar_type());
    const auto acc = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor out = at::empty({w.size(0)}, w.options().dtype(acc));
    check_cuda(mk_cuda_inv_norms(w.data_ptr(), dtype_code(w), w.size(0), w.size(1), ld, out.data_ptr(),
                                 dtype_code(out), w.get_device(), reinterpret_cast<void*>(stream)),
               "inv_norms");
    return out;
#else
    no_cuda("inv_norms");
#endif
  }
  TORCH_CHECK(is_acc_dtype(w), "margin_kernels.inv_norms: CPU weights must be float32 or float64 (convert first), got ",
              w.scalar_type());
  Tensor out = at::empty({w.size(0)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "inv_norms", [&] {
    mk_cpu::inv_norms<scalar_t>(w.data_ptr<scalar_t>(), w.size(0), w.size(1), ld, out.data_ptr<scalar_t>(),
                                at::get_num_threads());
  });
  return out;
}

void forward_tile(const Tensor& tile, const optional<Tensor>& inv_norm, const Tensor& labels, int64_t col0,
                  const Tensor& row_params, int64_t kind, double scale, double a, double b, const Tensor& run_max,
                  const Tensor& run_sum, int64_t stream, int64_t reduction, double clamp,
                  const optional<Tensor>& shift) {
  const Tile t{tile, inv_norm, labels, col0, row_params, kind, scale, a, b, reduction, clamp, shift};
  t.check("forward_tile");
  check_like("forward_tile", "run_max", run_max, tile, t.rows());
  check_like("forward_tile", "run_sum", run_sum, tile, t.rows());
  if (tile.is_cuda()) {
#ifdef MK_WITH_CUDA
    const mk_tile_args args = cuda_args(t, stream);
    check_cuda(mk_cuda_forward_epilogue(&args, run_max.data_ptr(), run_sum.data_ptr()), "forward_epilogue");
    return;
#else
    no_cuda("forward_tile");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "forward_tile", [&] {
    check_status(mk_cpu::forward_tile<scalar_t>(t.cpu_args<scalar_t>(), run_max.data_ptr<scalar_t>(),
                                                 run_sum.data_ptr<scalar_t>(), at::get_num_threads()),
                 "forward_tile");
  });
}

void backward_tile(const Tensor& tile, const optional<Tensor>& inv_norm, const Tensor& labels, int64_t col0,
                   const Tensor& row_params, int64_t kind, double scale, double a, double b, const Tensor& lse,
                   const Tensor& g_lse, const Tensor& g_cos_target, const optional<Tensor>& col_dot,
                   const optional<Tensor>& max_abs, const optional<Tensor>& grad_out, const optional<Tensor>& factor,
                   int64_t stream, int64_t reduction, double clamp, const optional<Tensor>& shift,
                   const optional<Tensor>& col_shift) {
  const Tile t{tile, inv_norm, labels, col0, row_params, kind, scale, a, b, reduction, clamp, shift};
  t.check("backward_tile");
  check_like("backward_tile", "lse", lse, tile, t.rows());
  check_like("backward_tile", "g_lse", g_lse, tile, t.rows());
  check_like("backward_tile", "g_cos_target", g_cos_target, tile, t.rows());
  TORCH_CHECK(!inv_norm || col_dot, "margin_kernels.backward_tile: col_dot is required with inv_norm");
  if (col_dot) check_like("backward_tile", "col_dot", *col_dot, tile, t.cols());
  if (max_abs) check_like("backward_tile", "max_abs", *max_abs, tile, 1);
  if (factor) check_like("backward_tile", "factor", *factor, tile, 1);
  if (grad_out) {
    TORCH_CHECK(grad_out->device() == tile.device() && grad_out->sizes() == tile.sizes() &&
                    grad_out->stride(1) == 1,
                "margin_kernels.backward_tile: grad_out must have the tile's shape and device with unit column "
                "stride, got ", grad_out->sizes(), " on ", grad_out->device());
  }
  TORCH_CHECK(!t.binary() || col_shift, "margin_kernels.backward_tile: col_shift is required by the binary reduction");
  if (col_shift) check_like("backward_tile", "col_shift", *col_shift, tile, t.cols());
  if (tile.is_cuda()) {
#ifdef MK_WITH_CUDA
    const mk_tile_args args = cuda_args(t, stream);
    mk_grad_out out{};
    if (grad_out) {
      out.data = grad_out->data_ptr();
      out.ld = grad_out->size(0) <= 1 ? grad_out->size(1) : grad_out->stride(0);
      out.dtype = dtype_code(*grad_out);
      out.factor = factor ? factor->data_ptr() : nullptr;
    }
    check_cuda(mk_cuda_backward_epilogue(&args, lse.data_ptr(), g_lse.data_ptr(), g_cos_target.data_ptr(),
                                         col_dot ? col_dot->data_ptr() : nullptr,
                                         max_abs ? max_abs->data_ptr() : nullptr,
                                         col_shift ? col_shift->data_ptr() : nullptr, grad_out ? &out : nullptr),
               "backward_epilogue");
    return;
#else
    no_cuda("backward_tile");
#endif
  }
  TORCH_CHECK(!grad_out && !factor, "margin_kernels.backward_tile: grad_out/factor (a 16-bit gradient copy) are "
              "CUDA-only; the CPU epilogue overwrites the tile");
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "backward_tile", [&] {
    check_status(mk_cpu::backward_tile<scalar_t>(t.cpu_args<scalar_t>(), lse.data_ptr<scalar_t>(),
                                                  g_lse.data_ptr<scalar_t>(), g_cos_target.data_ptr<scalar_t>(),
                                                  col_dot ? col_dot->data_ptr<scalar_t>() : nullptr,
                                                  max_abs ? max_abs->data_ptr<scalar_t>() : nullptr,
                                                  col_shift ? col_shift->data_ptr<scalar_t>() : nullptr,
                                                  at::get_num_threads()),
                 "backward_tile");
  });
}

int64_t leading_dim(const Tensor& m) { return m.size(0) <= 1 ? m.size(1) : m.stride(0); }

// g: the dW GEMM output (fp32/fp64). CPU: in place, w in g's dtype, col_dot/inv_norm given. CUDA also: w in
// its storage dtype, no col_dot/inv_norm (raw weights), inv_factor (the fp16 factor's inverse), and out (the
// gradient's rows, any float dtype) instead of in place.
void finish_dw(const Tensor& g, const Tensor& w, const optional<Tensor>& col_dot, const optional<Tensor>& inv_norm,
               const optional<Tensor>& out, const optional<Tensor>& inv_factor, int64_t stream) {
  check_matrix("finish_dw", "g", g);
  check_matrix("finish_dw", "w", w);
  TORCH_CHECK(is_acc_dtype(g), "margin_kernels.finish_dw: g must be float32 or float64, got ", g.scalar_type());
  TORCH_CHECK(g.sizes() == w.sizes() && w.device() == g.device(),
              "margin_kernels.finish_dw: g and w must have the same shape and device, got ", g.sizes(), " on ",
              g.device(), " and ", w.sizes(), " on ", w.device());
  TORCH_CHECK(col_dot.has_value() == inv_norm.has_value(),
              "margin_kernels.finish_dw: col_dot and inv_norm must be given together");
  if (col_dot) check_like("finish_dw", "col_dot", *col_dot, g, g.size(0));
  if (inv_norm) check_like("finish_dw", "inv_norm", *inv_norm, g, g.size(0));
  if (inv_factor) check_like("finish_dw", "inv_factor", *inv_factor, g, 1);
  if (out) {
    check_matrix("finish_dw", "out", *out);
    TORCH_CHECK(out->sizes() == g.sizes() && out->device() == g.device(),
                "margin_kernels.finish_dw: out must have g's shape and device, got ", out->sizes(), " on ",
                out->device());
  }
  if (g.is_cuda()) {
#ifdef MK_WITH_CUDA
    const Tensor& dst = out ? *out : g;
    mk_dw_args args{};
    args.g = g.data_ptr();
    args.n = g.size(0);
    args.dim = g.size(1);
    args.ld_g = leading_dim(g);
    args.dtype = dtype_code(g);
    args.w = w.data_ptr();
    args.ld_w = leading_dim(w);
    args.w_dtype = dtype_code(w);
    args.col_dot = col_dot ? col_dot->data_ptr() : nullptr;
    args.inv_norm = inv_norm ? inv_norm->data_ptr() : nullptr;
    args.inv_factor = inv_factor ? inv_factor->data_ptr() : nullptr;
    args.out = dst.data_ptr();
    args.ld_out = leading_dim(dst);
    args.out_dtype = dtype_code(dst);
    args.device = g.get_device();
    args.stream = reinterpret_cast<void*>(stream);
    check_cuda(mk_cuda_finish_dw(&args), "finish_dw");
    return;
#else
    no_cuda("finish_dw");
#endif
  }
  TORCH_CHECK(col_dot && !out && !inv_factor && w.scalar_type() == g.scalar_type(),
              "margin_kernels.finish_dw: the CPU epilogue works in place on g with w in g's dtype and col_dot/"
              "inv_norm given (out, inv_factor and raw weights are CUDA-only)");
  const int64_t ld_g = leading_dim(g);
  const int64_t ld_w = leading_dim(w);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "finish_dw", [&] {
    mk_cpu::finish_dw<scalar_t>(g.data_ptr<scalar_t>(), g.size(0), g.size(1), ld_g, w.data_ptr<scalar_t>(), ld_w,
                                col_dot->data_ptr<scalar_t>(), inv_norm->data_ptr<scalar_t>(), at::get_num_threads());
  });
}

// ---- the cuda backend's epilogue-fused CUTLASS GEMMs (csrc/cutlass/margin_sm90.h, sm_90a) --------------------
// x (B x d) and w (n x d): one 16-bit dtype, CUDA, unit column stride, rows 16-byte aligned (TMA); the per-row
// vectors fp32 and contiguous. The callers (native_epilogue.NativeEpilogue.fused_*) run these only where
// backends/cuda_variant.select chose the fused path; these checks are the backstop.
bool has_cutlass_sm90() {
#ifdef MK_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

#ifdef MK_WITH_CUTLASS
struct FusedCall {
  mk_sm90_gemm gemm{};
  mk_sm90_epilogue ep{};
  Tensor thr, aux;  // row_params' two columns, contiguous (the kernel reads each as a vector)
};

void check_fused_vector(const char* fn, const char* name, const Tensor& t, const Tensor& x, int64_t numel) {
  TORCH_CHECK(t.device() == x.device(), "margin_kernels.", fn, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "margin_kernels.", fn, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, "margin_kernels.", fn, ": ", name, " must be contiguous with ",
              numel, " elements, got shape ", t.sizes());
}

FusedCall fused_call(const char* fn, const Tensor& x, const Tensor& w, const optional<Tensor>& inv_norm,
                     const Tensor& labels, int64_t col0, const Tensor& row_params, int64_t kind, double scale,
                     double a, double b, int64_t reduction, double clamp, const optional<Tensor>& shift) {
  check_matrix(fn, "x", x);
  check_matrix(fn, "w", w);
  TORCH_CHECK(x.is_cuda() && w.device() == x.device(), "margin_kernels.", fn,
              ": x and w must be CUDA tensors on one device, got ", x.device(), " and ", w.device());
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "margin_kernels.", fn, ": x and w must both be bfloat16 or both float16, got ", x.scalar_type(),
              " and ", w.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(1), "margin_kernels.", fn, ": x ", x.sizes(), " and w ", w.sizes(),
              " must have the same d");
  const int64_t ld_x = leading_dim(x), ld_w = leading_dim(w);
  TORCH_CHECK(x.size(1) % 8 == 0 && ld_x % 8 == 0 && ld_w % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "margin_kernels.", fn, ": x and w need 16-byte aligned rows (d and the row strides a multiple of 8), "
              "got d = ", x.size(1), ", strides ", ld_x, " and ", ld_w);
  TORCH_CHECK(kind >= 0 && kind < mk::kNumNegativeKinds, "margin_kernels.", fn, ": unknown negative kind ", kind);
  TORCH_CHECK(reduction >= 0 && reduction < mk::kNumReductionKinds, "margin_kernels.", fn,
              ": unknown reduction kind ", reduction);
  const int64_t rows = x.size(0), cols = w.size(0);
  if (inv_norm) check_fused_vector(fn, "inv_norm", *inv_norm, x, cols);
  TORCH_CHECK(row_params.device() == x.device() && row_params.scalar_type() == at::kFloat && row_params.dim() == 2 &&
                  row_params.size(0) == rows && row_params.size(1) == 2,
              "margin_kernels.", fn, ": row_params must be (", rows, ", 2) float32 on x's device, got ",
              row_params.sizes(), " ", row_params.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.device() == x.device() && labels.is_contiguous() &&
                  labels.numel() == rows,
              "margin_kernels.", fn, ": labels must be contiguous int64 on x's device with ", rows,
              " entries, got ", labels.sizes(), " ", labels.scalar_type());
  TORCH_CHECK(reduction != mk::kSoftplusSum || shift, "margin_kernels.", fn,
              ": shift is required by the binary reduction");
  if (shift) check_fused_vector(fn, "shift", *shift, x, 1);
  FusedCall call;
  call.thr = row_params.select(1, 0).contiguous();
  call.aux = row_params.select(1, 1).contiguous();
  call.gemm = mk_sm90_gemm{x.data_ptr(), w.data_ptr(), rows, cols, x.size(1), ld_x, ld_w, dtype_code(x)};
  call.ep.inv_norm = inv_norm ? inv_norm->data_ptr<float>() : nullptr;
  call.ep.labels = labels.data_ptr<int64_t>();
  call.ep.col0 = col0;
  call.ep.thr = call.thr.data_ptr<float>();
  call.ep.aux = call.aux.data_ptr<float>();
  call.ep.kind = static_cast<int>(kind);
  call.ep.scale = static_cast<float>(scale);
  call.ep.a = static_cast<float>(a);
  call.ep.b = static_cast<float>(b);
  call.ep.reduction = static_cast<int>(reduction);
  call.ep.clamp = static_cast<float>(clamp);
  call.ep.shift = shift ? shift->data_ptr<float>() : nullptr;
  return call;
}

void check_sm90(int status, const char* fn) {
  TORCH_CHECK(status == 0, "margin_kernels.", fn, " failed: ",
              status == MK_SM90_ERR_BAD_DTYPE            ? std::string("operands neither bf16 nor fp16")
              : status == MK_SM90_ERR_CANNOT_IMPLEMENT ? std::string("CUTLASS cannot implement this problem")
              : status == MK_SM90_ERR_INTERNAL         ? std::string("CUTLASS initialize/run failed")
                                                       : std::string(mk_cuda_error_string(status)));
}
#endif

void no_cutlass(const char* fn) {
  TORCH_CHECK(false, "margin_kernels.", fn, ": this extension was built without the CUTLASS sm_90a kernels "
              "(has_cutlass_sm90() is False)");
}

// forward of one chunk: merges the rows' negatives of x.w^T into run_max/run_sum (fp32, in place); the B x n
// block is never written. inv_norm_out (n floats): the kernel forms the inverse norms of w's rows itself, writes
// them there and uses them (inv_norm must then be None)
void fused_forward(const Tensor& x, const Tensor& w, const optional<Tensor>& inv_norm, const Tensor& labels,
                   int64_t col0, const Tensor& row_params, int64_t kind, double scale, double a, double b,
                   const Tensor& run_max, const Tensor& run_sum, int64_t stream, int64_t reduction, double clamp,
                   const optional<Tensor>& shift, const optional<Tensor>& inv_norm_out) {
#ifdef MK_WITH_CUTLASS
  const FusedCall call = fused_call("fused_forward", x, w, inv_norm, labels, col0, row_params, kind, scale, a, b,
                                    reduction, clamp, shift);
  check_fused_vector("fused_forward", "run_max", run_max, x, x.size(0));
  check_fused_vector("fused_forward", "run_sum", run_sum, x, x.size(0));
  TORCH_CHECK(!(inv_norm && inv_norm_out), "margin_kernels.fused_forward: inv_norm and inv_norm_out are exclusive "
              "(the kernel forms the norms it writes to inv_norm_out)");
  if (inv_norm_out) check_fused_vector("fused_forward", "inv_norm_out", *inv_norm_out, x, w.size(0));
  check_sm90(mk_sm90_forward(&call.gemm, &call.ep, inv_norm_out ? inv_norm_out->data_ptr<float>() : nullptr,
                             run_max.data_ptr<float>(), run_sum.data_ptr<float>(), reinterpret_cast<void*>(stream)),
             "fused_forward");
#else
  no_cutlass("fused_forward");
#endif
}

// backward of one chunk (the recompute GEMM): grad_out (B x n, x's dtype, unit column stride, row stride a
// multiple of 8) = dL/d(x.w) times 1/|w_j| times *factor; col_dot (with inv_norm) and col_shift (the binary
// reduction) per class; or, with col_parts, neither: the per-(64-row tile, class) (dot, dz) partials returned as
// a (tiles, padded n, 2) float32 tensor for fused_dw to sum in its epilogue
optional<Tensor> fused_backward(const Tensor& x, const Tensor& w, const optional<Tensor>& inv_norm,
                                const Tensor& labels, int64_t col0, const Tensor& row_params, int64_t kind,
                                double scale, double a, double b, const Tensor& lse, const Tensor& g_lse,
                                const Tensor& g_cos_target, const optional<Tensor>& col_dot, const Tensor& grad_out,
                                const optional<Tensor>& factor, int64_t stream, int64_t reduction, double clamp,
                                const optional<Tensor>& shift, const optional<Tensor>& col_shift,
                                bool col_parts) {
#ifdef MK_WITH_CUTLASS
  const char* fn = "fused_backward";
  const FusedCall call = fused_call(fn, x, w, inv_norm, labels, col0, row_params, kind, scale, a, b, reduction,
                                    clamp, shift);
  const int64_t rows = x.size(0), cols = w.size(0);
  check_fused_vector(fn, "lse", lse, x, rows);
  check_fused_vector(fn, "g_lse", g_lse, x, rows);
  check_fused_vector(fn, "g_cos_target", g_cos_target, x, rows);
  TORCH_CHECK(!col_parts || (!col_dot && !col_shift),
              "margin_kernels.fused_backward: col_parts replaces col_dot and col_shift (pass neither)");
  TORCH_CHECK(col_parts || !inv_norm || col_dot, "margin_kernels.fused_backward: col_dot is required with inv_norm");
  if (col_dot) check_fused_vector(fn, "col_dot", *col_dot, x, cols);
  TORCH_CHECK(col_parts || reduction != mk::kSoftplusSum || col_shift,
              "margin_kernels.fused_backward: col_shift is required by the binary reduction");
  if (col_shift) check_fused_vector(fn, "col_shift", *col_shift, x, cols);
  if (factor) check_fused_vector(fn, "factor", *factor, x, 1);
  check_matrix(fn, "grad_out", grad_out);
  TORCH_CHECK(grad_out.device() == x.device() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.size(0) == rows && grad_out.size(1) == cols && leading_dim(grad_out) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(grad_out.data_ptr()) % 16 == 0,
              "margin_kernels.fused_backward: grad_out must be (", rows, ", ", cols, ") ", x.scalar_type(),
              " on x's device with 16-byte aligned rows, got ", grad_out.sizes(), " ", grad_out.scalar_type(),
              " strides ", grad_out.strides());
  if (col_parts) {
    int64_t tiles = 0, padded = 0;
    mk_sm90_col_parts_shape(rows, cols, &tiles, &padded);
    Tensor parts = at::empty({tiles, padded, 2}, x.options().dtype(at::kFloat));
    check_sm90(mk_sm90_backward_parts(&call.gemm, &call.ep, lse.data_ptr<float>(), g_lse.data_ptr<float>(),
                                      g_cos_target.data_ptr<float>(), factor ? factor->data_ptr<float>() : nullptr,
                                      grad_out.data_ptr(), leading_dim(grad_out), parts.data_ptr<float>(),
                                      reinterpret_cast<void*>(stream)),
               fn);
    return parts;
  }
  check_sm90(mk_sm90_backward(&call.gemm, &call.ep, lse.data_ptr<float>(), g_lse.data_ptr<float>(),
                              g_cos_target.data_ptr<float>(), factor ? factor->data_ptr<float>() : nullptr,
                              grad_out.data_ptr(), leading_dim(grad_out),
                              col_dot ? col_dot->data_ptr<float>() : nullptr,
                              col_shift ? col_shift->data_ptr<float>() : nullptr, reinterpret_cast<void*>(stream)),
             fn);
  return std::nullopt;
#else
  no_cutlass("fused_backward");
  return std::nullopt;
#endif
}

// the dW GEMM of one chunk with finish_dw in its epilogue (csrc/cutlass/margin_sm90.h mk_sm90_dw): out (n x d,
// x's dtype or float32) = finish_dw(grad^T x, w, col_dot, inv_norm, inv_factor); grad (B x n) the recompute
// GEMM's output, w the chunk's stored rows in x's dtype; col_dot and inv_norm together or neither (raw weights)
void fused_dw(const Tensor& grad, const Tensor& x, const Tensor& w, const optional<Tensor>& col_dot,
              const optional<Tensor>& inv_norm, const optional<Tensor>& inv_factor, const Tensor& out,
              int64_t stream) {
#ifdef MK_WITH_CUTLASS
  const char* fn = "fused_dw";
  const auto check_operand = [&](const char* name, const Tensor& t) {
    check_matrix(fn, name, t);
    TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "margin_kernels.fused_dw: ", name, " must be on x's ",
                "CUDA device, got ", t.device());
    TORCH_CHECK(leading_dim(t) * t.element_size() % 16 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                "margin_kernels.fused_dw: ", name, " needs 16-byte aligned rows (TMA), got strides ", t.strides());
  };
  check_operand("grad", grad);
  check_operand("x", x);
  check_operand("w", w);
  check_operand("out", out);
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
                  grad.scalar_type() == x.scalar_type() && w.scalar_type() == x.scalar_type(),
              "margin_kernels.fused_dw: grad, x and w must all be bfloat16 or all float16, got ", grad.scalar_type(),
              ", ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(out.scalar_type() == x.scalar_type() || out.scalar_type() == at::kFloat,
              "margin_kernels.fused_dw: out must be ", x.scalar_type(), " or float32, got ", out.scalar_type());
  const int64_t rows = x.size(0), cols = w.size(0), dim = x.size(1);
  TORCH_CHECK(grad.size(0) == rows && grad.size(1) == cols && w.size(1) == dim && out.size(0) == cols &&
                  out.size(1) == dim,
              "margin_kernels.fused_dw: grad ", grad.sizes(), ", x ", x.sizes(), ", w ", w.sizes(), " and out ",
              out.sizes(), " must be (B, n), (B, d), (n, d) and (n, d)");
  TORCH_CHECK(col_dot.has_value() == inv_norm.has_value(),
              "margin_kernels.fused_dw: col_dot and inv_norm must be given together");
  // col_dot: the finished vector, or fused_backward's (tiles, padded n, 2) partials (summed in the epilogue)
  const bool parts = col_dot && col_dot->dim() == 3;
  if (parts) {
    TORCH_CHECK(col_dot->device() == x.device() && col_dot->scalar_type() == at::kFloat &&
                    col_dot->is_contiguous() && col_dot->size(0) >= 1 && col_dot->size(1) >= cols &&
                    col_dot->size(2) == 2,
                "margin_kernels.fused_dw: col_dot partials must be a contiguous (tiles, >= ", cols,
                ", 2) float32 tensor on x's device, got ", col_dot->sizes(), " ", col_dot->scalar_type());
  } else if (col_dot) {
    check_fused_vector(fn, "col_dot", *col_dot, x, cols);
  }
  if (inv_norm) check_fused_vector(fn, "inv_norm", *inv_norm, x, cols);
  if (inv_factor) check_fused_vector(fn, "inv_factor", *inv_factor, x, 1);
  mk_sm90_dw_args args{};
  args.col_dot_step = parts ? 2 : 1;
  args.col_dot_tile_stride = parts ? 2 * col_dot->size(1) : 0;
  args.col_dot_tiles = parts ? col_dot->size(0) : 1;
  args.grad = grad.data_ptr();
  args.x = x.data_ptr();
  args.w = w.data_ptr();
  args.out = out.data_ptr();
  args.rows = rows;
  args.cols = cols;
  args.dim = dim;
  args.ld_grad = leading_dim(grad);
  args.ld_x = leading_dim(x);
  args.ld_w = leading_dim(w);
  args.ld_out = leading_dim(out);
  args.dtype = dtype_code(x);
  args.out_dtype = dtype_code(out);
  args.col_dot = col_dot ? col_dot->data_ptr<float>() : nullptr;
  args.inv_norm = inv_norm ? inv_norm->data_ptr<float>() : nullptr;
  args.inv_factor = inv_factor ? inv_factor->data_ptr<float>() : nullptr;
  check_sm90(mk_sm90_dw(&args, reinterpret_cast<void*>(stream)), fn);
#else
  no_cutlass("fused_dw");
#endif
}

// ---- sub-centers: the tile of a chunk's n classes x K rows reduced to n, and a gradient spread back ----------
void check_sub_centers(const char* fn, const Tensor& tile, int64_t K) {
  check_matrix(fn, "tile", tile);
  TORCH_CHECK(is_acc_dtype(tile), "margin_kernels.", fn, ": tile must be float32 or float64, got ",
              tile.scalar_type());
  TORCH_CHECK(K >= 1 && tile.size(1) % K == 0, "margin_kernels.", fn, ": the tile's ", tile.size(1),
              " columns must be whole classes of sub_centers=", K, " rows");
}

void check_winner(const char* fn, const Tensor& winner, const Tensor& ref, int64_t numel) {
  TORCH_CHECK(winner.scalar_type() == at::kInt && winner.is_contiguous() && winner.numel() == numel &&
                  winner.device() == ref.device(),
              "margin_kernels.", fn, ": winner must be a contiguous int32 tensor of ", numel, " elements on ",
              ref.device());
}

std::tuple<Tensor, Tensor> sub_center_max(const Tensor& tile, const optional<Tensor>& inv_norm, int64_t K,
                                          int64_t stream) {
  check_sub_centers("sub_center_max", tile, K);
  if (inv_norm) check_like("sub_center_max", "inv_norm", *inv_norm, tile, tile.size(1));
  const int64_t rows = tile.size(0), classes = tile.size(1) / K;
  const int64_t ld = rows <= 1 ? tile.size(1) : tile.stride(0);
  Tensor values = at::empty({rows, classes}, tile.options());
  Tensor winner = at::empty({rows, classes}, tile.options().dtype(at::kInt));
  if (tile.is_cuda()) {
#ifdef MK_WITH_CUDA
    check_cuda(mk_cuda_sub_center_max(tile.data_ptr(), rows, classes, ld, inv_norm ? inv_norm->data_ptr() : nullptr,
                                      static_cast<int>(K), values.data_ptr(), winner.data_ptr<int32_t>(),
                                      dtype_code(tile), tile.get_device(), reinterpret_cast<void*>(stream)),
               "sub_center_max");
    return {values, winner};
#else
    no_cuda("sub_center_max");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "sub_center_max", [&] {
    mk_cpu::sub_center_max<scalar_t>(tile.data_ptr<scalar_t>(), rows, classes, ld,
                                     inv_norm ? inv_norm->data_ptr<scalar_t>() : nullptr, static_cast<int>(K),
                                     values.data_ptr<scalar_t>(), winner.data_ptr<int32_t>(), at::get_num_threads());
  });
  return {values, winner};
}

void sub_center_scatter(const Tensor& grad, const optional<Tensor>& values, const Tensor& winner,
                        const optional<Tensor>& inv_norm, int64_t K, const Tensor& out, const optional<Tensor>& col_dot,
                        int64_t stream) {
  check_sub_centers("sub_center_scatter", out, K);
  const int64_t rows = out.size(0), classes = out.size(1) / K;
  check_like("sub_center_scatter", "grad", grad, out, rows * classes);
  check_winner("sub_center_scatter", winner, out, rows * classes);
  if (inv_norm) check_like("sub_center_scatter", "inv_norm", *inv_norm, out, out.size(1));
  TORCH_CHECK(!col_dot || values, "margin_kernels.sub_center_scatter: values are required with col_dot");
  if (values) check_like("sub_center_scatter", "values", *values, out, rows * classes);
  if (col_dot) check_like("sub_center_scatter", "col_dot", *col_dot, out, out.size(1));
  const int64_t ld = rows <= 1 ? out.size(1) : out.stride(0);
  if (out.is_cuda()) {
#ifdef MK_WITH_CUDA
    check_cuda(mk_cuda_sub_center_scatter(grad.data_ptr(), values ? values->data_ptr() : nullptr,
                                          winner.data_ptr<int32_t>(), inv_norm ? inv_norm->data_ptr() : nullptr,
                                          rows, classes, static_cast<int>(K), out.data_ptr(), ld,
                                          col_dot ? col_dot->data_ptr() : nullptr, dtype_code(out),
                                          out.get_device(), reinterpret_cast<void*>(stream)),
               "sub_center_scatter");
    return;
#else
    no_cuda("sub_center_scatter");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sub_center_scatter", [&] {
    mk_cpu::sub_center_scatter<scalar_t>(grad.data_ptr<scalar_t>(), values ? values->data_ptr<scalar_t>() : nullptr,
                                         winner.data_ptr<int32_t>(),
                                         inv_norm ? inv_norm->data_ptr<scalar_t>() : nullptr, rows, classes,
                                         static_cast<int>(K), out.data_ptr<scalar_t>(), ld,
                                         col_dot ? col_dot->data_ptr<scalar_t>() : nullptr, at::get_num_threads());
  });
}

// ---- direct access to the header's math, for tests (CPU only) -----------------------------------------------
void check_cpu_acc(const char* fn, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && is_acc_dtype(t) && t.is_contiguous(), "margin_kernels.", fn, ": ", name,
              " must be a contiguous float32/float64 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

std::tuple<Tensor, Tensor> negative_eval(const Tensor& c, const Tensor& row_params, int64_t kind, double a,
                                         double b) {
  check_cpu_acc("negative_eval", "c", c);
  TORCH_CHECK(c.dim() == 2, "margin_kernels.negative_eval: c must be 2-D, got shape ", c.sizes());
  check_like("negative_eval", "row_params", row_params, c, 2 * c.size(0));
  Tensor value = at::empty_like(c), deriv = at::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "negative_eval", [&] {
    check_status(mk_cpu::negative_eval<scalar_t>(c.data_ptr<scalar_t>(), c.size(0), c.size(1),
                                                 row_params.data_ptr<scalar_t>(), static_cast<int>(kind),
                                                 static_cast<scalar_t>(a), static_cast<scalar_t>(b),
                                                 value.data_ptr<scalar_t>(), deriv.data_ptr<scalar_t>()),
                 "negative_eval");
  });
  return {value, deriv};
}

Tensor exp_eval(const Tensor& x) {
  check_cpu_acc("exp_eval", "x", x);
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "exp_eval", [&] {
    mk_cpu::exp_eval<scalar_t>(x.data_ptr<scalar_t>(), x.numel(), out.data_ptr<scalar_t>());
  });
  return out;
}

void lse_merge_eval(const Tensor& run_max, const Tensor& run_sum, const Tensor& other_max, const Tensor& other_sum) {
  check_cpu_acc("lse_merge_eval", "run_max", run_max);
  check_like("lse_merge_eval", "run_sum", run_sum, run_max, run_max.numel());
  check_like("lse_merge_eval", "other_max", other_max, run_max, run_max.numel());
  check_like("lse_merge_eval", "other_sum", other_sum, run_max, run_max.numel());
  AT_DISPATCH_FLOATING_TYPES(run_max.scalar_type(), "lse_merge_eval", [&] {
    mk_cpu::lse_merge_eval<scalar_t>(run_max.data_ptr<scalar_t>(), run_sum.data_ptr<scalar_t>(),
                                     other_max.data_ptr<scalar_t>(), other_sum.data_ptr<scalar_t>(),
                                     run_max.numel());
  });
}

// the constants margin_math.h restates from Python (the negative kinds, the norm eps), so a test can compare
// the compiled values with margin_kernels' own
pybind11::dict constants() {
  pybind11::dict kinds;
  kinds["IDENTITY"] = static_cast<int>(mk::kIdentity);
  kinds["CLAMP"] = static_cast<int>(mk::kClamp);
  kinds["CURRICULAR"] = static_cast<int>(mk::kCurricular);
  kinds["MV"] = static_cast<int>(mk::kMV);
  kinds["CIRCLE"] = static_cast<int>(mk::kCircle);
  kinds["FILTER"] = static_cast<int>(mk::kFilter);
  kinds["ROW_SCALE"] = static_cast<int>(mk::kRowScale);
  kinds["AFFINE"] = static_cast<int>(mk::kAffine);
  kinds["POWER"] = static_cast<int>(mk::kPower);
  kinds["POWER_ST"] = static_cast<int>(mk::kPowerSt);
  pybind11::dict reductions;
  reductions["LSE"] = static_cast<int>(mk::kLse);
  reductions["SOFTPLUS_SUM"] = static_cast<int>(mk::kSoftplusSum);
  pybind11::dict out;
  out["negative_kinds"] = kinds;
  out["reduction_kinds"] = reductions;
  out["num_negative_kinds"] = mk::kNumNegativeKinds;
  out["norm_eps"] = mk::kNormEps;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "margin_kernels native epilogues (CPU; CUDA when built with it)";
  // the kernels do not touch Python objects: let other Python threads run meanwhile
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("abi_version", [] { return mk::kAbiVersion; });
  m.def("constants", &constants);
  m.def("inv_norms", &inv_norms, py::arg("w"), py::arg("stream") = 0, nogil);
  m.def("forward_tile", &forward_tile, py::arg("tile"), py::arg("inv_norm"), py::arg("labels"), py::arg("col0"),
        py::arg("row_params"), py::arg("kind"), py::arg("scale"), py::arg("a"), py::arg("b"), py::arg("run_max"),
        py::arg("run_sum"), py::arg("stream") = 0, py::arg("reduction") = 0, py::arg("clamp") = INFINITY,
        py::arg("shift") = py::none(), nogil);
  m.def("backward_tile", &backward_tile, py::arg("tile"), py::arg("inv_norm"), py::arg("labels"), py::arg("col0"),
        py::arg("row_params"), py::arg("kind"), py::arg("scale"), py::arg("a"), py::arg("b"), py::arg("lse"),
        py::arg("g_lse"), py::arg("g_cos_target"), py::arg("col_dot"), py::arg("max_abs"),
        py::arg("grad_out") = py::none(), py::arg("factor") = py::none(), py::arg("stream") = 0,
        py::arg("reduction") = 0, py::arg("clamp") = INFINITY, py::arg("shift") = py::none(),
        py::arg("col_shift") = py::none(), nogil);
  m.def("finish_dw", &finish_dw, py::arg("g"), py::arg("w"), py::arg("col_dot"), py::arg("inv_norm"),
        py::arg("out") = py::none(), py::arg("inv_factor") = py::none(), py::arg("stream") = 0, nogil);
  m.def("has_cutlass_sm90", &has_cutlass_sm90);
  m.def("fused_forward", &fused_forward, py::arg("x"), py::arg("w"), py::arg("inv_norm"), py::arg("labels"),
        py::arg("col0"), py::arg("row_params"), py::arg("kind"), py::arg("scale"), py::arg("a"), py::arg("b"),
        py::arg("run_max"), py::arg("run_sum"), py::arg("stream") = 0, py::arg("reduction") = 0,
        py::arg("clamp") = INFINITY, py::arg("shift") = py::none(), py::arg("inv_norm_out") = py::none(), nogil);
  m.def("fused_backward", &fused_backward, py::arg("x"), py::arg("w"), py::arg("inv_norm"), py::arg("labels"),
        py::arg("col0"), py::arg("row_params"), py::arg("kind"), py::arg("scale"), py::arg("a"), py::arg("b"),
        py::arg("lse"), py::arg("g_lse"), py::arg("g_cos_target"), py::arg("col_dot"), py::arg("grad_out"),
        py::arg("factor") = py::none(), py::arg("stream") = 0, py::arg("reduction") = 0,
        py::arg("clamp") = INFINITY, py::arg("shift") = py::none(), py::arg("col_shift") = py::none(),
        py::arg("col_parts") = false, nogil);
  m.def("fused_dw", &fused_dw, py::arg("grad"), py::arg("x"), py::arg("w"), py::arg("col_dot"), py::arg("inv_norm"),
        py::arg("inv_factor"), py::arg("out"), py::arg("stream") = 0, nogil);
  m.def("sub_center_max", &sub_center_max, py::arg("tile"), py::arg("inv_norm"), py::arg("sub_centers"),
        py::arg("stream") = 0, nogil);
  m.def("sub_center_scatter", &sub_center_scatter, py::arg("grad"), py::arg("values"), py::arg("winner"),
        py::arg("inv_norm"), py::arg("sub_centers"), py::arg("out"), py::arg("col_dot"), py::arg("stream") = 0, nogil);
  m.def("negative_eval", &negative_eval, py::arg("c"), py::arg("row_params"), py::arg("kind"), py::arg("a"),
        py::arg("b"), nogil);
  m.def("exp_eval", &exp_eval, py::arg("x"), nogil);
  m.def("lse_merge_eval", &lse_merge_eval, py::arg("run_max"), py::arg("run_sum"), py::arg("other_max"),
        py::arg("other_sum"), nogil);
}
