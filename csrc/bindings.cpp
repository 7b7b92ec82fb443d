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
                   const optional<Tensor>& max_abs, int64_t stream, int64_t reduction, double clamp,
                   const optional<Tensor>& shift, const optional<Tensor>& col_shift) {
  const Tile t{tile, inv_norm, labels, col0, row_params, kind, scale, a, b, reduction, clamp, shift};
  t.check("backward_tile");
  check_like("backward_tile", "lse", lse, tile, t.rows());
  check_like("backward_tile", "g_lse", g_lse, tile, t.rows());
  check_like("backward_tile", "g_cos_target", g_cos_target, tile, t.rows());
  TORCH_CHECK(!inv_norm || col_dot, "margin_kernels.backward_tile: col_dot is required with inv_norm");
  if (col_dot) check_like("backward_tile", "col_dot", *col_dot, tile, t.cols());
  if (max_abs) check_like("backward_tile", "max_abs", *max_abs, tile, 1);
  TORCH_CHECK(!t.binary() || col_shift, "margin_kernels.backward_tile: col_shift is required by the binary reduction");
  if (col_shift) check_like("backward_tile", "col_shift", *col_shift, tile, t.cols());
  if (tile.is_cuda()) {
#ifdef MK_WITH_CUDA
    const mk_tile_args args = cuda_args(t, stream);
    check_cuda(mk_cuda_backward_epilogue(&args, lse.data_ptr(), g_lse.data_ptr(), g_cos_target.data_ptr(),
                                         col_dot ? col_dot->data_ptr() : nullptr,
                                         max_abs ? max_abs->data_ptr() : nullptr,
                                         col_shift ? col_shift->data_ptr() : nullptr),
               "backward_epilogue");
    return;
#else
    no_cuda("backward_tile");
#endif
  }
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

void finish_dw(const Tensor& g, const Tensor& w, const Tensor& col_dot, const Tensor& inv_norm, int64_t stream) {
  check_matrix("finish_dw", "g", g);
  check_matrix("finish_dw", "w", w);
  TORCH_CHECK(is_acc_dtype(g), "margin_kernels.finish_dw: g must be float32 or float64, got ", g.scalar_type());
  TORCH_CHECK(g.sizes() == w.sizes(), "margin_kernels.finish_dw: g and w must have the same shape, got ",
              g.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.scalar_type() == g.scalar_type() && w.device() == g.device(),
              "margin_kernels.finish_dw: w must have g's dtype and device (", g.scalar_type(), " on ", g.device(),
              "), got ", w.scalar_type(), " on ", w.device());
  check_like("finish_dw", "col_dot", col_dot, g, g.size(0));
  check_like("finish_dw", "inv_norm", inv_norm, g, g.size(0));
  const int64_t ld_g = g.size(0) <= 1 ? g.size(1) : g.stride(0);
  const int64_t ld_w = w.size(0) <= 1 ? w.size(1) : w.stride(0);
  if (g.is_cuda()) {
#ifdef MK_WITH_CUDA
    check_cuda(mk_cuda_finish_dw(g.data_ptr(), g.size(0), g.size(1), ld_g, w.data_ptr(), ld_w, col_dot.data_ptr(),
                                 inv_norm.data_ptr(), dtype_code(g), g.get_device(),
                                 reinterpret_cast<void*>(stream)),
               "finish_dw");
    return;
#else
    no_cuda("finish_dw");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "finish_dw", [&] {
    mk_cpu::finish_dw<scalar_t>(g.data_ptr<scalar_t>(), g.size(0), g.size(1), ld_g, w.data_ptr<scalar_t>(), ld_w,
                                col_dot.data_ptr<scalar_t>(), inv_norm.data_ptr<scalar_t>(), at::get_num_threads());
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
        py::arg("g_lse"), py::arg("g_cos_target"), py::arg("col_dot"), py::arg("max_abs"), py::arg("stream") = 0,
        py::arg("reduction") = 0, py::arg("clamp") = INFINITY, py::arg("shift") = py::none(),
        py::arg("col_shift") = py::none(), nogil);
  m.def("finish_dw", &finish_dw, py::arg("g"), py::arg("w"), py::arg("col_dot"), py::arg("inv_norm"),
        py::arg("stream") = 0, nogil);
  m.def("negative_eval", &negative_eval, py::arg("c"), py::arg("row_params"), py::arg("kind"), py::arg("a"),
        py::arg("b"), nogil);
  m.def("exp_eval", &exp_eval, py::arg("x"), nogil);
  m.def("lse_merge_eval", &lse_merge_eval, py::arg("run_max"), py::arg("run_sum"), py::arg("other_max"),
        py::arg("other_sum"), nogil);
}
