"""The fused CPU backend (backend="cpu", the CPU default of "auto") and the C++ math it shares with the CUDA
kernels (csrc/margin_math.h): every loss against the float64 reference, the epilogues tile by tile against the
pure-torch epilogue, the header's functions against losses/negatives.py, determinism, errors, loading."""
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
from margin_kernels.losses.negatives import NegativeKind, NegativeSpec, negative_derivative, negative_value

from .helpers import LOSS_NAMES, loss_and_grads, make_loss, random_problem, rel_err, twin
from .native_checks import SPECS, VARIANTS, assert_matches_reference, compare_epilogues, compare_with_reference

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_backend_is_available():
    # CI builds the extension (setup.py) or compiles it at first use; this says why not if neither worked
    assert unavailable_reason("cpu") is None


@pytest.fixture(scope="module")
def ext():
    module, reason = _native.load()
    if module is None:
        pytest.skip(f"the native CPU extension is unavailable ({reason}); test_cpu_backend_is_available fails")
    return module


def test_auto_is_cpu_on_cpu(ext):
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


# ---- whole losses against the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_matches_reference(ext, name, dtype):
    # fp64 at 1e-10 also shows the epilogue runs in double for fp64 inputs (an fp32 one would be ~1e-7 off)
    assert_matches_reference("cpu", name, dtype)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_bf16_matches_reference(ext, name):
    # against the reference on the same bf16 tensors (it, too, computes in fp32): fp32 losses at 1e-5
    assert_matches_reference("cpu", name, torch.bfloat16)
    # and against the float64 reference of the upcast inputs: x/||x|| is stored back in bf16 before the
    # products (the API keeps the storage dtype), so cosines carry bf16 rounding (2^-9 relative) and every
    # result is ~1e-3 off; a filtered loss moves further where rounding flips c_ij > tau for a negative
    errors = compare_with_reference("cpu", name, torch.bfloat16, reference_dtype=torch.float64)
    bound = 0.15 if name == "combined_filter" else 2e-2
    assert max(errors) < bound, errors


@pytest.mark.parametrize("name", ["softmax", "arcface", "circle"])
def test_fp16_matches_reference(ext, name):
    assert_matches_reference("cpu", name, torch.float16)




@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", ["arcface", "curricularface", "softmax", "combined_filter"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_and_label_cases(ext, variant, name, dtype):
    assert_matches_reference("cpu", name, dtype, **VARIANTS[variant])


def test_duplicate_labels(ext):
    x, w, labels = random_problem(12, 40, 16, dtype=torch.float32, duplicate=True)
    margin = make_loss("mv_arc")
    ref = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, twin(margin), backend="reference"),
                         x.double(), w.double())
    out = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, margin, backend="cpu", chunk_size=16),
                         x, w)
    assert max(rel_err(o, r) for o, r in zip(out, ref)) < 1e-5


def test_non_contiguous_weight(ext):
    # a transposed-storage weight: chunks are copied to unit stride, dW keeps the weight's layout
    x, w, labels = random_problem(9, 120, 20, dtype=torch.float32, seed=4)
    w_t = w.t().contiguous().t()
    assert not w_t.is_contiguous()
    margin = make_loss("curricularface")
    ref = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, twin(margin), backend="reference"),
                         x.double(), w.double())
    out = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, margin, backend="cpu", chunk_size=32),
                         x, w_t)
    assert max(rel_err(o, r) for o, r in zip(out, ref)) < 1e-5


def test_default_chunk_keeps_the_tile_near_two_mib():
    policy = lambda batch: chunk_loop.default_chunk_size(batch, "cpu")  # noqa: E731
    assert policy(256) * 256 == chunk_loop.CPU_TILE_ELEMENTS
    assert policy(4096) == chunk_loop.CPU_MIN_CHUNK
    assert policy(1) == chunk_loop.CPU_MAX_CHUNK
    assert all(c & (c - 1) == 0 for c in map(policy, range(1, 3000, 7)))


def test_grad_filter_skips_the_same_tiles_as_torch(ext):
    # the same tiles fall below the threshold in both backends, and the kept ones give the same gradients
    x, w, labels = random_problem(4, 2000, 24, dtype=torch.float32, seed=3)
    results = {}
    for backend in ("torch", "cpu"):
        mk.reset_grad_filter_stats()
        fn = lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend=backend,  # noqa: E731
                                                  chunk_size=50, grad_filter=1e-2)
        results[backend] = (loss_and_grads(fn, x, w), mk.grad_filter_stats())
    (torch_out, torch_stats), (cpu_out, cpu_stats) = results["torch"], results["cpu"]
    assert cpu_stats == torch_stats and 0 < cpu_stats["skipped_tiles"] < cpu_stats["total_tiles"]
    assert max(rel_err(o, r) for o, r in zip(cpu_out, torch_out)) < 1e-5


def test_marginhead_defaults_to_the_cpu_backend(ext):
    torch.manual_seed(0)
    head = mk.MarginHead(50, 16, mk.CosFace())
    x, labels = torch.randn(6, 16), torch.randint(0, 50, (6,))
    loss = head(x, labels)
    ref = mk.margin_cross_entropy(x.double(), head.weight.detach().double(), labels, mk.CosFace(),
                                  backend="reference")
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


# ---- the epilogues tile by tile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(NegativeKind), ids=[k.name for k in NegativeKind])
def test_epilogue_matches_torch_epilogue(ext, kind, dtype, normalized):
    # strided tile (row stride > width), targets inside/outside the tile, an ignored row, two merged tiles
    errors = compare_epilogues(ext, kind, dtype, "cpu", normalized=normalized, col0=7)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert all(err < tol for err in errors.values()), errors


# ---- the header's math directly -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(NegativeKind), ids=[k.name for k in NegativeKind])
def test_header_negatives_match_negatives_py(ext, kind, dtype):
    spec = SPECS[kind]
    gen = torch.Generator().manual_seed(int(kind))
    row_params = torch.stack([torch.rand(8, generator=gen, dtype=torch.float64) * 1.6 - 0.8,
                              torch.rand(8, generator=gen, dtype=torch.float64) * 0.5], dim=1).to(dtype)
    c = (torch.rand(8, 64, generator=gen, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    # exactly on every branch point: the thresholds T_i and the constants a, b (where > and >= differ)
    c[:, 0] = row_params[:, 0]
    c[:, 1] = spec.a
    c[:, 2] = spec.b
    c[:, 3] = -spec.a
    value, deriv = ext.negative_eval(c, row_params, int(kind), spec.a, spec.b)
    ref_value = negative_value(c, spec, row_params)
    ref_deriv = negative_derivative(c, spec, row_params)
    tol = 1e-6 if dtype == torch.float32 else 1e-15
    assert torch.allclose(value, ref_value, rtol=tol, atol=tol)
    assert torch.equal(deriv, ref_deriv)  # 0/1/a or U + 2c: exact


def test_header_rejects_unknown_kind(ext):
    c, rp = torch.zeros(1, 1), torch.zeros(1, 2)
    with pytest.raises(RuntimeError, match="negative_eval.*kind"):
        ext.negative_eval(c, rp, 6, 0.0, 0.0)


def test_header_exp(ext):
    x = torch.cat([torch.linspace(-87.0, 88.0, 200001), torch.tensor([0.0, -1e-30, 1e-30, 1.0, -1.0])])
    out = ext.exp_eval(x)
    ref = torch.exp(x.double())
    assert ((out.double() - ref).abs() / ref).max().item() < 3e-7  # ~2 ulp
    below = torch.tensor([float("-inf"), -88.0, -200.0, -1e30])
    assert torch.equal(ext.exp_eval(below), torch.zeros(4))  # masked logits contribute exactly 0
    assert torch.isnan(ext.exp_eval(torch.tensor([float("nan")]))).all()
    x64 = torch.linspace(-700.0, 700.0, 1001, dtype=torch.float64)
    assert torch.allclose(ext.exp_eval(x64), torch.exp(x64), rtol=1e-15, atol=0.0)  # libm vs SLEEF: 1 ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_header_lse_merge(ext, dtype):
    gen = torch.Generator().manual_seed(0)
    m1 = torch.randn(64, generator=gen, dtype=torch.float64) * 30
    m2 = torch.randn(64, generator=gen, dtype=torch.float64) * 30
    s1 = torch.rand(64, generator=gen, dtype=torch.float64) * 10 + 1
    s2 = torch.rand(64, generator=gen, dtype=torch.float64) * 10 + 1
    m1[:4], s1[:4] = float("-inf"), 0.0  # empty left side
    m2[2:6], s2[2:6] = float("-inf"), 0.0  # empty right side (both empty at 2, 3)
    run_max, run_sum = m1.to(dtype).clone(), s1.to(dtype).clone()  # merged in place
    ext.lse_merge_eval(run_max, run_sum, m2.to(dtype), s2.to(dtype))
    out = run_max.double() + torch.log(run_sum.double())
    ref = torch.logaddexp(m1 + torch.log(s1), m2 + torch.log(s2))
    finite = torch.isfinite(ref)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert torch.allclose(out[finite], ref[finite], rtol=tol, atol=tol)
    assert torch.equal(run_max[2:4], torch.full((2,), float("-inf"), dtype=dtype))
    assert torch.equal(run_sum[2:4], torch.zeros(2, dtype=dtype))


# ---- determinism -------------------------------------------------------------------------------------------
def test_epilogues_do_not_depend_on_thread_count(ext):
    # per-class sums run over rows in a fixed order inside one strip, whatever the number of threads
    from .native_checks import random_tile_inputs
    from margin_kernels.backends.native_epilogue import NativeEpilogue
    inputs = random_tile_inputs(NegativeKind.CURRICULAR, torch.float32, "cpu", rows=64, cols=1100)
    lse = torch.rand(64) * 5 + 20
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            tile = inputs["tile"].clone()
            run_max, run_sum = torch.full((64,), float("-inf")), torch.zeros(64)
            epi = NativeEpilogue(ext)
            epi.forward_tile(tile.clone(), inputs["inv_norm"], inputs["labels"], 0, inputs["row_params"],
                             inputs["spec"], run_max, run_sum)
            grad = epi.backward_tile(tile, inputs["inv_norm"], inputs["labels"], 0, inputs["row_params"],
                                     inputs["spec"], lse, inputs["g_lse"], inputs["g_cos_target"], True)
            results.append((run_max, run_sum, grad.grad, grad.col_dot, grad.max_abs))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_backward_is_bitwise_reproducible(ext):
    x, w, labels = random_problem(20, 500, 24, dtype=torch.float32, seed=5)
    fn = lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="cpu", chunk_size=128)  # noqa
    first, second = loss_and_grads(fn, x, w), loss_and_grads(fn, x, w)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- bad input: clear errors, never a crash -----------------------------------------------------------------
def test_binding_checks_name_function_and_argument(ext):
    tile, labels, rp = torch.zeros(4, 6), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2)
    run = (torch.zeros(4), torch.zeros(4))
    cases = [
        (lambda: ext.forward_tile(tile.int(), None, labels, 0, rp, 0, 1.0, 0.0, 0.0, *run), "forward_tile.*tile"),
        (lambda: ext.forward_tile(tile, None, labels.int(), 0, rp, 0, 1.0, 0.0, 0.0, *run), "labels must be int64"),
        (lambda: ext.forward_tile(tile, None, labels, 0, rp[:3], 0, 1.0, 0.0, 0.0, *run), "row_params"),
        (lambda: ext.forward_tile(tile, None, labels, 0, rp, 9, 1.0, 0.0, 0.0, *run), "kind"),
        (lambda: ext.forward_tile(tile.t(), None, labels, 0, rp, 0, 1.0, 0.0, 0.0, *run), "unit stride"),
        (lambda: ext.forward_tile(tile, torch.zeros(5), labels, 0, rp, 0, 1.0, 0.0, 0.0, *run), "inv_norm"),
        (lambda: ext.forward_tile(tile, None, labels, 0, rp.double(), 0, 1.0, 0.0, 0.0, *run), "row_params must"),
        (lambda: ext.backward_tile(tile, torch.ones(6), labels, 0, rp, 0, 1.0, 0.0, 0.0, *run, torch.zeros(4),
                                   None, None), "col_dot is required"),
        (lambda: ext.finish_dw(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3), torch.zeros(3)), "same shape"),
        (lambda: ext.inv_norms(torch.zeros(3, 2, dtype=torch.bfloat16)), "convert first"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_backend_rejects_wrong_device_and_shapes(ext):
    x, w, labels = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)
    rp, spec = torch.zeros(3, 2), NegativeSpec()
    with pytest.raises(ValueError, match="weight is on meta"):
        cpu_backend.lse_forward(x, w.to("meta"), labels, rp, None, spec, True, None)
    with pytest.raises(ValueError, match="row_params"):
        cpu_backend.lse_forward(x, w, labels, rp[:, :1], None, spec, True, None)
    with pytest.raises(TypeError, match="same dtype"):
        cpu_backend.lse_forward(x, w.double(), labels, rp, None, spec, True, None)


# ---- loading ------------------------------------------------------------------------------------------------
def test_no_jit_reports_why(monkeypatch):
    monkeypatch.setenv("MARGIN_KERNELS_JIT", "0")
    monkeypatch.setattr(native_build, "CPU_MODULE", "_C_not_built")
    module, reason = _native._load(with_cuda=False)
    assert module is None and "_C_not_built" in reason and "MARGIN_KERNELS_JIT=1" in reason


def test_stale_prebuilt_is_not_used(monkeypatch, ext):
    monkeypatch.setenv("MARGIN_KERNELS_JIT", "0")
    monkeypatch.setattr(_native, "ABI_VERSION", ext.abi_version() + 1)
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
              "assert abs(a.item() - b.item()) < 1e-4, (a, b)\n")
    env = dict(os.environ, MARGIN_KERNELS_JIT="force", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bench_script_runs(ext, tmp_path):
    # smoke test of bench/bench_cpu_native.py at a tiny size (the real sweep is a recorded run, not a test)
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_cpu_native", ROOT / "bench" / "bench_cpu_native.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cpu_native.md"
    rows = bench.main(["--batch", "8", "--classes", "300", "--dim", "16", "--repeats", "1", "--warmup", "0",
                       "--chunk", "64", "--out", str(out)])
    assert len(rows) == 1 and {"cpu", "torch", "naive", "cpu@64", "floor_full"} <= set(rows[0]["vs_floor"])
    assert all(t > 0 for t in rows[0]["median_s"].values())
    assert "| 8 | 3e+02 | 16 |" in out.read_text() and out.with_suffix(".json").is_file()
