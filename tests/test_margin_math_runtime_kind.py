"""csrc/margin_math.h's run-time-kind functions (negative_logit_rt, negative_derivative_rt, negative_grad_rt,
binary_negative_grad_rt: what the CUTLASS epilogue of csrc/cutlass/margin_sm90.cu calls with the kind as a kernel
argument) on the CPU, against the float64 reference of losses/negatives.py and losses/reductions.py at every
kind's branch points (tests/test_conformance.branch_point_inputs: thresholds T_i, the constants a, b, -a, one ulp
either side; POWER's floor of the base at c = -1 and its 0^t are in the random range [-1.2, 1.2]).

The CPU extension reaches only the compile-time-kind functions, so a small C++ harness (below) is compiled with
the host compiler and the project's host flags (-ffp-contract=off: margin_kernels/native_build.py) and fed the
inputs as raw float64. It also checks that each _rt function returns the very bits of the compile-time-kind
function it dispatches to (one description: the switch adds no arithmetic), and that an unknown kind gives NaN."""
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from margin_kernels.losses.negatives import NegativeKind, negative_derivative, negative_logits
from margin_kernels.losses.reductions import softplus_grad

from .helpers import SPECS
from .test_conformance import SMOOTH_DERIVATIVE_KINDS, branch_point_inputs
from .tolerances import NEGATIVE_FUNCTION, RUNTIME_KIND_GRAD

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# one record in: kind, c, thr, aux, scale, a, b, lse, g_lse, shift, clamp, g (float64; the float run rounds them)
# one record out per type T (float, then double): logit, deriv, grad, binary grad, binary dz, and a flag that is
# 1 when every _rt value has the bits of its compile-time-kind twin
HARNESS = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "margin_math.h"

template <typename T>
static bool same(T x, T y) { return std::memcmp(&x, &y, sizeof(T)) == 0; }

template <typename T>
static void eval(const double* r, double* out) {
  const int kind = static_cast<int>(r[0]);
  const T c = T(r[1]), thr = T(r[2]), aux = T(r[3]);
  const mk::NegativeConsts<T> k{T(r[4]), T(r[5]), T(r[6])};
  const T lse = T(r[7]), g_lse = T(r[8]), shift = T(r[9]), clamp = T(r[10]), g = T(r[11]);
  T dz = T(0);
  const T logit = mk::negative_logit_rt(kind, c, thr, aux, k);
  const T deriv = mk::negative_derivative_rt(kind, c, thr, aux, k.a, k.b);
  const T grad = mk::negative_grad_rt(kind, c, thr, aux, k, lse, g_lse);
  const T bgrad = mk::binary_negative_grad_rt(kind, c, thr, aux, k, shift, clamp, g, dz);
  bool twin = true;
  const bool known = mk::dispatch_kind(kind, [&](auto K) {
    constexpr int KIND = decltype(K)::value;
    T dz2 = T(0);
    const T bgrad2 = mk::binary_negative_grad<KIND>(c, thr, aux, k, shift, clamp, g, dz2);
    twin = same(logit, mk::negative_logit<KIND>(c, thr, aux, k)) &&
           same(deriv, mk::negative_derivative<KIND>(c, thr, aux, k.a, k.b)) &&
           same(grad, mk::negative_grad<KIND>(c, thr, aux, k, lse, g_lse)) && same(bgrad, bgrad2) && same(dz, dz2);
  });
  if (!known) twin = logit != logit && deriv != deriv;  // an unknown kind: NaN
  const double values[6] = {double(logit), double(deriv), double(grad), double(bgrad), double(dz), twin ? 1.0 : 0.0};
  std::memcpy(out, values, sizeof(values));
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 3;
  std::vector<double> rec;
  double v;
  while (std::fread(&v, sizeof v, 1, in) == 1) rec.push_back(v);
  std::fclose(in);
  const size_t n = rec.size() / 12;
  std::vector<double> out(n * 12);
  for (size_t i = 0; i < n; ++i) {
    eval<float>(&rec[12 * i], &out[12 * i]);
    eval<double>(&rec[12 * i], &out[12 * i + 6]);
  }
  FILE* o = std::fopen(argv[2], "wb");
  if (!o) return 4;
  std::fwrite(out.data(), sizeof(double), out.size(), o);
  std::fclose(o);
  return 0;
}
"""

#: the binary reduction's shift and clamp of the harness records: a clamp inside the logits' range, so both sides
#: of |z + shift| <= L are visited (UniFace's clamp; SphereFace2's shift)
SHIFT, CLAMP = -3.0, 20.0


def _cxx():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/$CXX) found: margin_math.h's run-time-kind functions are not tested")
    work = tmp_path_factory.mktemp("rt_kind")
    source, exe = work / "harness.cpp", work / "harness"
    source.write_text(HARNESS)
    done = subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
                           f"-I{CSRC}", str(source), "-o", str(exe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

    def run(records: np.ndarray) -> np.ndarray:
        (work / "in.bin").write_bytes(np.ascontiguousarray(records, dtype=np.float64).tobytes())
        subprocess.run([str(exe), str(work / "in.bin"), str(work / "out.bin")], check=True)
        return np.frombuffer((work / "out.bin").read_bytes(), dtype=np.float64).reshape(len(records), 2, 6)

    return run


def _spec(kind, dtype):
    """SPECS[kind] with its constants rounded to ``dtype``, as the kernel receives them: the float64 reference
    then takes every branch (c > a, c <= a) on the same two values as the float run."""
    spec = SPECS[kind]
    r = lambda v: torch.tensor(v, dtype=dtype).item()  # noqa: E731
    return dataclasses.replace(spec, scale=r(spec.scale), a=r(spec.a), b=r(spec.b))


def _records(spec, c, row_params, lse, g_lse, g):
    rows, cols = c.shape
    full = lambda v: np.full(rows * cols, float(v))  # noqa: E731
    per_row = lambda t: np.repeat(t.numpy(), cols)  # noqa: E731
    return np.stack([full(int(spec.kind)), c.reshape(-1).numpy(), per_row(row_params[:, 0]), per_row(row_params[:, 1]),
                     full(spec.scale), full(spec.a), full(spec.b), per_row(lse), per_row(g_lse), full(SHIFT),
                     full(CLAMP), per_row(g)], axis=1)


def _reference(spec, c, row_params, lse, g_lse, g):
    """float64: z, g'(c), the LSE backward's dL/dc = s g'(c) exp(z - lse) g_lse, the binary one's, and its dz."""
    z = negative_logits(c, spec, row_params)
    deriv = negative_derivative(c, spec, row_params)
    grad = torch.exp(z - lse[:, None]) * g_lse[:, None] * deriv * spec.scale
    dz = softplus_grad(z + SHIFT, CLAMP) * g[:, None]
    return z, deriv, grad, dz * deriv * spec.scale, dz


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(NegativeKind), ids=[k.name for k in NegativeKind])
def test_runtime_kind_functions_match_the_reference(harness, kind, dtype):
    c, row_params = branch_point_inputs(kind, dtype)
    # and POWER's floor: c = -1 (base 0, 0^t and 0^(t-1)), one ulp either side, and c = 0, 1 for every kind
    ends = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype)
    ends = torch.cat([ends, torch.nextafter(ends, torch.full_like(ends, -2.0)),
                      torch.nextafter(ends, torch.full_like(ends, 2.0))])
    c = torch.cat([c, ends.expand(c.shape[0], -1)], dim=1)
    c, row_params = c.double(), row_params.double()  # exact: the inputs are representable in dtype
    spec = _spec(kind, dtype)
    gen = torch.Generator().manual_seed(100 + int(kind))
    z = negative_logits(c, spec, row_params)
    lse = torch.logsumexp(z, dim=1)  # a real row's log-sum-exp: p = exp(z - lse) in (0, 1]
    g_lse = torch.rand(c.shape[0], generator=gen, dtype=torch.float64) + 0.5
    g = torch.rand(c.shape[0], generator=gen, dtype=torch.float64) + 0.5
    records = _records(spec, c, row_params, lse.to(dtype).double(), g_lse.to(dtype).double(), g.to(dtype).double())
    out = harness(records)[:, 0 if dtype == torch.float32 else 1, :]
    assert (out[:, 5] == 1.0).all(), "a _rt function differs from its compile-time-kind twin"
    names = ("logit", "derivative", "lse grad", "binary grad", "binary dz")
    refs = _reference(spec, c, row_params, lse.to(dtype).double(), g_lse.to(dtype).double(), g.to(dtype).double())
    tol = NEGATIVE_FUNCTION[dtype]
    for i, (name, ref) in enumerate(zip(names, refs)):
        got = torch.from_numpy(out[:, i].copy()).reshape(c.shape)
        if i == 0:  # z = s g(c): the negative function's bound (test_conformance's, on g) times s
            bound = tol * (spec.scale + ref.abs())
        elif i == 1 and kind not in SMOOTH_DERIVATIVE_KINDS:
            # 0/1/a or U + 2c: exact (U + 2c rounded once in dtype, as torch rounds it), and on the right side of
            # every branch point
            in_dtype = negative_derivative(c.to(dtype), spec, row_params.to(dtype)).double()
            assert torch.equal(got, in_dtype), name
            continue
        elif i == 1:
            bound = tol * (1.0 + ref.abs())
        else:  # through exp(z - lse): z's absolute error as a relative one (RUNTIME_KIND_GRAD)
            bound = RUNTIME_KIND_GRAD[dtype] * (spec.scale + z.abs().max()) * (ref.abs() + 1e-30)
        err = (got - ref).abs()
        assert (err <= bound).all(), f"{name}: worst error {err.max().item():.3e}"


def test_unknown_kind_gives_nan(harness):
    rec = np.array([[99, 0.3, 0.1, 0.2, 30.0, 0.0, 0.0, 1.0, 1.0, SHIFT, CLAMP, 1.0]], dtype=np.float64)
    out = harness(rec)
    assert np.isnan(out[0, :, 0]).all() and np.isnan(out[0, :, 1]).all() and np.isnan(out[0, :, 2]).all()
    assert (out[0, :, 5] == 1.0).all()
