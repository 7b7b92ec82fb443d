"""The native backends: "cpu" (the chunk loop with MKL GEMMs and the fused C++ epilogues of csrc/margin_cpu.cpp,
the CPU default of "auto") and "cuda" (cuBLAS GEMMs + the CUDA epilogues of csrc/margin_cuda.cu). Both share
the per-element math of csrc/margin_math.h.

Here: the fused epilogues tile by tile against ``torch_backend.TorchEpilogue`` (the reference implementation
of the epilogue contract) on each device, the header's helpers, determinism, the bindings' and the backends'
own input checks, and loading (ABI, JIT fallback). Whole losses against the float64 reference are in
test_conformance.py (with every other backend); the header's negative functions at their branch points, too.
CUDA cases skip with the reason on machines without a CUDA device; test_cuda_compile.py compiles the CUDA
sources for sm_80/sm_90 on any machine with nvcc.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import margin_kernels as mk
from margin_kernels import _native, backends, native_build
from margin_kernels.backends import chunk_loop, cpu_backend, resolve_backend, unavailable_reason
from margin_kernels.backends.contract import CallState, OpConfig, OpInputs
from margin_kernels.backends.native_epilogue import NativeEpilogue
from margin_kernels.backends.torch_backend import TorchEpilogue
from margin_kernels.losses.negatives import NegativeKind, NegativeSpec

from .helpers import SPECS, loss_and_grads, random_problem, rel_err
from .tolerances import (FP32_LOSS, FP32_SMOKE, NATIVE_EXP_F32, NATIVE_EXP_F64, NATIVE_INV_NORM_F32, NATIVE_LSE_MERGE,
                         NATIVE_POWER_DERIVATIVE, NATIVE_POWER_VALUE, NATIVE_VS_TORCH, NATIVE_VS_TORCH_LARGE_LOGITS_F32)

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = (f"needs a CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}, reports "
           f"torch.cuda.is_available() == False)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])]


def _load(device):
    return _native.load(with_cuda=device == "cuda")


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def ext(device):
    module, reason = _load(device)
    if module is None:
        pytest.skip(f"the native {device} extension is unavailable ({reason}); test_backend_is_available fails")
    return module


@pytest.fixture(scope="module")
def cpu_ext():
    module, reason = _native.load()
    if module is None:
        pytest.skip(f"the native CPU extension is unavailable ({reason}); test_backend_is_available fails")
    return module


@pytest.fixture(scope="module")
def cuda_ext():
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    module, reason = _native.load(with_cuda=True)
    if module is None:
        pytest.skip(f"the CUDA extension is unavailable ({reason}); test_backend_is_available fails")
    return module


def test_backend_is_available(device):
    # CI builds the extensions (setup.py) or compiles them at first use; this says why not if neither worked
    assert unavailable_reason(device) is None


def test_auto_picks_the_native_or_a_gpu_backend(ext, device):
    expected = ("cpu",) if device == "cpu" else ("triton", "cuda")
    assert resolve_backend("auto", torch.device(device)) in expected


# ---- the epilogue contract, tile by tile ---------------------------------------------------------------------
def random_tile_inputs(kind, dtype, device, *, rows=37, cols=301, ld_pad=5, normalized=True, seed=0):
    """A tile of raw dot products (cos * |w|, cos in [-1.1, 1.1]) stored with row stride cols + ld_pad, labels
    with some targets inside and outside the tile and one ignored row, and per-row inputs."""
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 2.2 - 1.1
    norms = torch.rand(cols, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    raw = cos * norms if normalized else cos * 3.0
    storage = torch.zeros(rows, cols + ld_pad, dtype=dtype)
    storage[:, :cols] = raw.to(dtype)
    labels = torch.randint(-cols // 2, cols + cols // 2, (rows,), generator=gen)  # col0 = 0: some outside
    labels[0] = -1
    labels[1] = cols - 1  # last column (tails of vector loops)
    thr = torch.rand(rows, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    aux = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.5
    row_params = torch.stack([thr, aux], dim=1).to(dtype)
    inv_norm = (1.0 / norms).to(dtype) if normalized else None
    g_lse = torch.rand(rows, generator=gen, dtype=torch.float64).to(dtype)
    g_cos_target = torch.randn(rows, generator=gen, dtype=torch.float64).to(dtype)
    to = (lambda t: None if t is None else t.to(device))
    return dict(tile=to(storage)[:, :cols], inv_norm=to(inv_norm), labels=to(labels), row_params=to(row_params),
                g_lse=to(g_lse), g_cos_target=to(g_cos_target), spec=SPECS[kind])


def compare_epilogues(ext, kind, dtype, device, *, normalized=True, col0=0, seed=0):
    """Errors of the native epilogue against TorchEpilogue for one tile: forward (lse), backward (gradient
    tile, col_dot, max_abs), finish_dw; both epilogues start from identical copies."""
    inputs = random_tile_inputs(kind, dtype, device, normalized=normalized, seed=seed)
    spec, rows = inputs["spec"], inputs["tile"].shape[0]
    labels = inputs["labels"] + col0
    native, torch_epi = NativeEpilogue(ext), TorchEpilogue()
    lses = []
    for epi in (native, torch_epi):
        run_max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        run_sum = torch.zeros(rows, dtype=dtype, device=device)
        # two tiles merged into the same running pair: the second one shifted by col0 + a tile's width
        for offset in (0, inputs["tile"].shape[1]):
            epi.forward_tile(inputs["tile"].clone(), inputs["inv_norm"], labels, col0 + offset, inputs["row_params"],
                             spec, run_max, run_sum)
        lses.append(run_max + torch.log(run_sum))
    errors = {"lse": rel_err(lses[0], lses[1])}
    lse = lses[1]
    grads = []
    for epi in (native, torch_epi):
        tile = inputs["tile"].clone()
        grads.append(epi.backward_tile(tile, inputs["inv_norm"], labels, col0, inputs["row_params"], spec, lse,
                                       inputs["g_lse"], inputs["g_cos_target"], True))
    errors["grad"] = rel_err(grads[0].grad, grads[1].grad)
    errors["max_abs"] = rel_err(grads[0].max_abs.reshape(()), grads[1].max_abs.reshape(()))
    if normalized:
        errors["col_dot"] = rel_err(grads[0].col_dot, grads[1].col_dot)
        w = torch.randn(inputs["tile"].shape[1], 9, dtype=dtype, device=device)
        dw = torch.randn_like(w)
        outs = []
        for epi in (native, torch_epi):
            out = dw.clone()
            epi.finish_dw(out, w, grads[1].col_dot, inputs["inv_norm"])
            outs.append(out)
        errors["finish_dw"] = rel_err(outs[0], outs[1])
        errors["inv_norms"] = rel_err(native.inv_norms(w, dtype), torch_epi.inv_norms(w, dtype))
    if device != "cpu" and dtype == torch.float32:
        errors.update(compare_16bit_operands(native, torch_epi, inputs, labels, col0, lse, normalized))
    return errors


def compare_16bit_operands(native, torch_epi, inputs, labels, col0, lse, normalized):
    """CUDA only: the 16-bit dL/dcos copy (bf16; fp16 with its factor) and the finish_dw that unscales and
    stores into 16-bit rows, against TorchEpilogue's version of the same contract (which the chunk loop's CPU
    emulation, tests/test_chunk_loop_operands.py, runs). Errors relative to one rounding (2^-8 / 2^-11)."""
    errors = {}
    for grad_dtype, ulp in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        grads = [epi.backward_tile(inputs["tile"].clone(), inputs["inv_norm"], labels, col0, inputs["row_params"],
                                   inputs["spec"], lse, inputs["g_lse"], inputs["g_cos_target"], False, grad_dtype)
                 for epi in (native, torch_epi)]
        assert grads[0].grad.dtype == grad_dtype
        unscaled = [g.grad.float() * (1.0 if g.inv_factor is None else g.inv_factor) for g in grads]
        errors[f"grad_{grad_dtype}"] = rel_err(unscaled[0], unscaled[1]) / ulp * 1e-5
        w = torch.randn(inputs["tile"].shape[1], 9, device=inputs["tile"].device).to(grad_dtype)
        dw = torch.randn(w.shape, device=w.device)
        outs = []
        for epi, g in zip((native, torch_epi), grads):
            out = torch.empty_like(w)
            epi.finish_dw(dw.clone(), w, g.col_dot if normalized else None, inputs["inv_norm"] if normalized else None,
                          g.inv_factor, out=out)
            outs.append(out.float())
        errors[f"finish_dw_{grad_dtype}"] = rel_err(outs[0], outs[1]) / ulp * 1e-5
    return errors


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(NegativeKind), ids=[k.name for k in NegativeKind])
def test_epilogue_matches_torch_epilogue(ext, device, kind, dtype, normalized):
    # strided tile (row stride > width), targets inside/outside the tile, an ignored row, two merged tiles
    errors = compare_epilogues(ext, kind, dtype, device, normalized=normalized, col0=7)
    # fp32: both epilogues compute in fp32 with different exp/log implementations (SLEEF/libdevice vs
    # PyTorch's) and summation orders; fp64: libm vs SLEEF, 1 ulp per element
    tol = NATIVE_VS_TORCH[dtype]
    if dtype == torch.float32 and kind in (NegativeKind.POWER, NegativeKind.POWER_ST) and not normalized:
        # raw tiles reach |c| = 3.3, where s * 2((c+1)/2)^3 ~ 800: exp(z - lse) carries |z| * 2^-24 ~ 5e-5
        # relative error in fp32 in either epilogue (fp64 meets 1e-12)
        tol = NATIVE_VS_TORCH_LARGE_LOGITS_F32
    assert all(err < tol for err in errors.values()), errors


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_norms_read_low_precision_storage(cuda_ext, dtype):
    w = torch.randn(300, 37, device="cuda").to(dtype)
    ref = 1.0 / w.float().norm(dim=1).clamp_min(1e-12)
    out = cuda_ext.inv_norms(w, torch.cuda.current_stream().cuda_stream)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=NATIVE_INV_NORM_F32)


# ---- the header's helpers (the CPU module exposes them; the CUDA kernels include the same header) -----------
def test_header_rejects_unknown_kind(cpu_ext):
    c, rp = torch.zeros(1, 1), torch.zeros(1, 2)
    with pytest.raises(RuntimeError, match="negative_eval.*kind"):
        cpu_ext.negative_eval(c, rp, len(NegativeKind), 0.0, 0.0)  # the first number past the last kind


def test_header_exp(cpu_ext):
    x = torch.cat([torch.linspace(-87.0, 88.0, 200001), torch.tensor([0.0, -1e-30, 1e-30, 1.0, -1.0])])
    out = cpu_ext.exp_eval(x)
    ref = torch.exp(x.double())
    assert ((out.double() - ref).abs() / ref).max().item() < NATIVE_EXP_F32  # ~2 ulp
    below = torch.tensor([float("-inf"), -88.0, -200.0, -1e30])
    assert torch.equal(cpu_ext.exp_eval(below), torch.zeros(4))  # masked logits contribute exactly 0
    assert torch.isnan(cpu_ext.exp_eval(torch.tensor([float("nan")]))).all()
    x64 = torch.linspace(-700.0, 700.0, 1001, dtype=torch.float64)
    assert torch.allclose(cpu_ext.exp_eval(x64), torch.exp(x64), rtol=NATIVE_EXP_F64, atol=0.0)  # libm vs SLEEF: 1 ulp


def test_header_power_and_softplus_math(cpu_ext):
    """The header's float log / pow (exp(t log x): polynomials a CPU loop vectorises, where libm's powf and
    log1pf kept it scalar) against float64: SphereFace2's 2 ((c+1)/2)^t - 1 + m and its derivative over
    c in [-1, 1] with a zero base (c = -1) and several t, within a few ulp; 0^t as powf gives it; a NaN cosine
    stays NaN (the base's floor at 0 must not turn it into a finite logit)."""
    c = torch.cat([torch.linspace(-1.0, 1.0, 20001), torch.tensor([-1.0, -1.0 + 1e-7, 1.0 - 1e-7])])[None]
    rp = torch.zeros(1, 2)
    base = ((c.double() + 1) / 2).clamp_min(0)
    for t in (3.0, 1.5, 1.0, 0.5):
        value, deriv = cpu_ext.negative_eval(c, rp, int(NegativeKind.POWER), t, 0.2)
        value_error = (value.double() - (2 * base ** t - 1 + 0.2)).abs().max().item()
        assert value_error < NATIVE_POWER_VALUE, t  # |g| <= 1.2: ~4 ulp
        ref = t * base ** (t - 1)
        finite = torch.isfinite(ref)
        relative = (deriv.double() - ref)[finite].abs() / ref[finite].abs().clamp_min(1e-30)
        assert relative.max().item() < NATIVE_POWER_DERIVATIVE, t
        assert torch.equal(deriv[~finite], ref[~finite].float())  # 0^(t-1) = inf for t < 1, as powf
    nan = torch.tensor([[float("nan")]])
    assert all(torch.isnan(out).all() for out in cpu_ext.negative_eval(nan, rp, int(NegativeKind.POWER), 3.0, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_header_lse_merge(cpu_ext, dtype):
    gen = torch.Generator().manual_seed(0)
    m1 = torch.randn(64, generator=gen, dtype=torch.float64) * 30
    m2 = torch.randn(64, generator=gen, dtype=torch.float64) * 30
    s1 = torch.rand(64, generator=gen, dtype=torch.float64) * 10 + 1
    s2 = torch.rand(64, generator=gen, dtype=torch.float64) * 10 + 1
    m1[:4], s1[:4] = float("-inf"), 0.0  # empty left side
    m2[2:6], s2[2:6] = float("-inf"), 0.0  # empty right side (both empty at 2, 3)
    run_max, run_sum = m1.to(dtype).clone(), s1.to(dtype).clone()  # merged in place
    cpu_ext.lse_merge_eval(run_max, run_sum, m2.to(dtype), s2.to(dtype))
    out = run_max.double() + torch.log(run_sum.double())
    ref = torch.logaddexp(m1 + torch.log(s1), m2 + torch.log(s2))
    finite = torch.isfinite(ref)
    tol = NATIVE_LSE_MERGE[dtype]
    assert torch.allclose(out[finite], ref[finite], rtol=tol, atol=tol)
    assert torch.equal(run_max[2:4], torch.full((2,), float("-inf"), dtype=dtype))
    assert torch.equal(run_sum[2:4], torch.zeros(2, dtype=dtype))


# ---- backend behaviour -------------------------------------------------------------------------------------
def test_default_chunk_keeps_the_tile_near_two_mib():
    policy = lambda batch: chunk_loop.default_chunk_size(batch, "cpu")  # noqa: E731
    assert policy(256) * 256 == chunk_loop.CPU_TILE_ELEMENTS
    assert policy(4096) == chunk_loop.CPU_MIN_CHUNK
    assert policy(1) == chunk_loop.CPU_MAX_CHUNK
    assert all(c & (c - 1) == 0 for c in map(policy, range(1, 3000, 7)))


def test_grad_filter_skips_the_same_tiles_as_torch(ext, device):
    # the same tiles fall below the threshold in both backends, and the kept ones give the same gradients
    x, w, labels = random_problem(4, 2000, 24, dtype=torch.float32, seed=3, device=device)
    results = {}
    for backend in ("torch", device):
        mk.reset_grad_filter_stats()
        fn = lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace().to(device),  # noqa: E731
                                                  backend=backend, chunk_size=50, grad_filter=1e-2)
        results[backend] = (loss_and_grads(fn, x, w), mk.grad_filter_stats())
    (torch_out, torch_stats), (native_out, native_stats) = results["torch"], results[device]
    assert native_stats == torch_stats and 0 < native_stats["skipped_tiles"] < native_stats["total_tiles"]
    assert max(rel_err(o, r) for o, r in zip(native_out, torch_out)) < NATIVE_VS_TORCH[torch.float32]


def test_marginhead_defaults_to_the_cpu_backend(cpu_ext):
    torch.manual_seed(0)
    head = mk.MarginHead(50, 16, mk.CosFace())
    x, labels = torch.randn(6, 16), torch.randint(0, 50, (6,))
    loss = head(x, labels)
    ref = mk.margin_cross_entropy(x.double(), head.weight.detach().double(), labels, mk.CosFace(),
                                  backend="reference")
    assert abs(loss.item() - ref.item()) < FP32_LOSS * max(1.0, abs(ref.item()))


# ---- determinism -------------------------------------------------------------------------------------------
def test_epilogues_do_not_depend_on_thread_count(cpu_ext):
    # per-class sums run over rows in a fixed order inside one strip, whatever the number of threads
    inputs = random_tile_inputs(NegativeKind.CURRICULAR, torch.float32, "cpu", rows=64, cols=1100)
    lse = torch.rand(64) * 5 + 20
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            tile = inputs["tile"].clone()
            run_max, run_sum = torch.full((64,), float("-inf")), torch.zeros(64)
            epi = NativeEpilogue(cpu_ext)
            epi.forward_tile(tile.clone(), inputs["inv_norm"], inputs["labels"], 0, inputs["row_params"],
                             inputs["spec"], run_max, run_sum)
            grad = epi.backward_tile(tile, inputs["inv_norm"], inputs["labels"], 0, inputs["row_params"],
                                     inputs["spec"], lse, inputs["g_lse"], inputs["g_cos_target"], True)
            results.append((run_max, run_sum, grad.grad, grad.col_dot, grad.max_abs))
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(results[0][0]).all() and results[0][2].abs().sum() > 0
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_backward_is_bitwise_reproducible(ext, device):
    shape = (20, 500, 24) if device == "cpu" else (40, 3000, 64)
    x, w, labels = random_problem(*shape, dtype=torch.float32, seed=5, device=device)
    chunk = 128 if device == "cpu" else 512
    fn = lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace().to(device),  # noqa: E731
                                              backend=device, chunk_size=chunk)
    first, second = loss_and_grads(fn, x, w), loss_and_grads(fn, x, w)
    assert first[1].abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_runs_on_the_callers_stream(cuda_ext):
    x, w, labels = random_problem(16, 700, 32, dtype=torch.float32, seed=2, device="cuda")
    fn = lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.CosFace(), backend="cuda", chunk_size=128)  # noqa
    expected = loss_and_grads(fn, x, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = loss_and_grads(fn, x, w)
    torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


# ---- bad input: clear errors, never a crash -----------------------------------------------------------------
def test_binding_checks_name_function_and_argument(cpu_ext):
    ext = cpu_ext
    tile, labels, rp = torch.zeros(4, 6), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2)
    run = (torch.zeros(4), torch.zeros(4))
    cases = [
        (lambda: ext.forward_tile(tile.int(), None, labels, 0, rp, 0, 1.0, 0.0, 0.0, *run), "forward_tile.*tile"),
        (lambda: ext.forward_tile(tile, None, labels.int(), 0, rp, 0, 1.0, 0.0, 0.0, *run), "labels must be int64"),
        (lambda: ext.forward_tile(tile, None, labels, 0, rp[:3], 0, 1.0, 0.0, 0.0, *run), "row_params"),
        (lambda: ext.forward_tile(tile, None, labels, 0, rp, 99, 1.0, 0.0, 0.0, *run), "kind"),
        (lambda: ext.forward_tile(tile.t(), None, labels, 0, rp, 0, 1.0, 0.0, 0.0, *run), "unit stride"),
        (lambda: ext.forward_tile(tile, torch.zeros(5), labels, 0, rp, 0, 1.0, 0.0, 0.0, *run), "inv_norm"),
        (lambda: ext.forward_tile(tile, None, labels, 0, rp.double(), 0, 1.0, 0.0, 0.0, *run), "row_params must"),
        (lambda: ext.backward_tile(tile, torch.ones(6), labels, 0, rp, 0, 1.0, 0.0, 0.0, *run, torch.zeros(4),
                                   None, None), "col_dot is required"),
        (lambda: ext.finish_dw(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3), torch.zeros(3)), "same shape"),
        (lambda: ext.backward_tile(tile, None, labels, 0, rp, 0, 1.0, 0.0, 0.0, *run, torch.zeros(4), None, None,
                                   grad_out=tile.bfloat16()), "CUDA-only"),
        (lambda: ext.finish_dw(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), torch.zeros(3),
                               out=torch.zeros(3, 2)), "CUDA-only"),
        (lambda: ext.finish_dw(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), None), "together"),
        (lambda: ext.inv_norms(torch.zeros(3, 2, dtype=torch.bfloat16)), "convert first"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_cpu_backend_rejects_wrong_device_and_shapes(cpu_ext):
    x, w, labels = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)
    rp, config = torch.zeros(3, 2), OpConfig(backend="cpu")
    with pytest.raises(ValueError, match="weight is on meta"):
        cpu_backend.lse_forward(OpInputs(x, w.to("meta"), labels, rp, None), config, CallState())
    with pytest.raises(ValueError, match="row_params"):
        cpu_backend.lse_forward(OpInputs(x, w, labels, rp[:, :1], None), config, CallState())
    with pytest.raises(TypeError, match="same dtype"):
        cpu_backend.lse_forward(OpInputs(x, w.double(), labels, rp, None), config, CallState())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_rejects_mixed_devices_with_names(cuda_ext):
    tile = torch.zeros(4, 6, device="cuda")
    labels, rp = torch.zeros(4, dtype=torch.long), torch.zeros(4, 2, device="cuda")
    run = (torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda"))
    with pytest.raises(RuntimeError, match="forward_tile: labels are on cpu"):
        cuda_ext.forward_tile(tile, None, labels, 0, rp, 0, 1.0, 0.0, 0.0, *run,
                              torch.cuda.current_stream().cuda_stream)
    x, w = torch.zeros(4, 6, device="cuda"), torch.zeros(9, 6)
    with pytest.raises(ValueError, match="weight is on cpu"):
        mk.backends.get_backend("cuda").lse_forward(OpInputs(x, w, labels.cuda(), rp, None),
                                                     OpConfig(backend="cuda"), CallState())


# ---- loading ------------------------------------------------------------------------------------------------
def test_no_jit_reports_why(monkeypatch):
    monkeypatch.setenv("MARGIN_KERNELS_JIT", "0")
    monkeypatch.setattr(native_build, "CPU_MODULE", "_C_not_built")
    module, reason = _native._load(with_cuda=False)
    assert module is None and "_C_not_built" in reason and "MARGIN_KERNELS_JIT=1" in reason


def test_stale_prebuilt_is_not_used(monkeypatch, cpu_ext):
    monkeypatch.setenv("MARGIN_KERNELS_JIT", "0")
    monkeypatch.setattr(_native, "ABI_VERSION", cpu_ext.abi_version() + 1)
    module, reason = _native._load(with_cuda=False)
    assert module is None and "other sources" in reason


def test_auto_falls_back_to_torch_when_native_is_missing(monkeypatch, request):
    monkeypatch.setattr(cpu_backend, "unavailable_reason", lambda: "no compiler here")
    backends.forget_availability()  # availability is probed once per process: probe the patched one
    request.addfinalizer(backends.forget_availability)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="no compiler here"):
        resolve_backend("cpu", torch.device("cpu"))
    x, w, labels = random_problem(4, 10, 8, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = mk.margin_cross_entropy(x, w, labels, mk.ArcFace())
    assert math.isfinite(loss.item())


@pytest.mark.slow
def test_jit_build_from_sources(tmp_path):
    # the fallback when setup.py built nothing: compile csrc/ at first use (cached in TORCH_EXTENSIONS_DIR)
    script = ("import torch, margin_kernels as mk\n"
              "from margin_kernels import _native\n"
              "module, reason = _native.load()\n"
              "assert module is not None, reason\n"
              "assert 'torch_extensions' in module.__file__ or 'TORCH_EXTENSIONS_DIR' in str(reason), module.__file__\n"
              "x = torch.randn(5, 8); w = torch.randn(30, 8); y = torch.randint(0, 30, (5,))\n"
              "a = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend='cpu')\n"
              "b = mk.margin_cross_entropy(x.double(), w.double(), y, mk.ArcFace(), backend='reference')\n"
              f"assert abs(a.item() - b.item()) < {FP32_SMOKE!r}, (a, b)\n")
    env = dict(os.environ, MARGIN_KERNELS_JIT="force", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
