"""The CUDA backend (backend="cuda": cuBLAS GEMMs + the CUDA epilogues of csrc/margin_cuda.cu) on a CUDA device.

Skipped without one. The kernels' per-element math is csrc/margin_math.h, which test_native_cpu.py checks on
the CPU through the same functions (and the same shared checks in native_checks.py); test_cuda_compile.py
compiles the CUDA sources for sm_80/sm_90 on any machine with nvcc."""
from __future__ import annotations

import pytest
import torch

import margin_kernels as mk
from margin_kernels import _native
from margin_kernels.backends import resolve_backend, unavailable_reason
from margin_kernels.losses.negatives import NegativeKind

from .helpers import LOSS_NAMES, loss_and_grads, random_problem
from .native_checks import VARIANTS, assert_matches_reference, compare_epilogues

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason=f"needs a CUDA device (torch {torch.__version__}, built with CUDA "
                              f"{torch.version.cuda}, reports torch.cuda.is_available() == False)"),
]


def test_cuda_backend_is_available():
    # a CUDA machine that runs these tests must have built (or be able to JIT-build) margin_kernels._C_cuda
    assert unavailable_reason("cuda") is None


@pytest.fixture(scope="module")
def ext():
    module, reason = _native.load(with_cuda=True)
    if module is None:
        pytest.skip(f"the CUDA extension is unavailable ({reason}); test_cuda_backend_is_available fails")
    return module


def test_auto_prefers_a_gpu_backend(ext):
    assert resolve_backend("auto", torch.device("cuda")) in ("triton", "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_matches_reference(ext, name, dtype):
    assert_matches_reference("cuda", name, dtype, device="cuda")


@pytest.mark.parametrize("name", ["arcface", "curricularface", "softmax", "combined_filter"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_and_label_cases(ext, variant, name):
    assert_matches_reference("cuda", name, torch.float32, device="cuda", **VARIANTS[variant])


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(NegativeKind), ids=[k.name for k in NegativeKind])
def test_epilogue_matches_torch_epilogue(ext, kind, dtype, normalized):
    errors = compare_epilogues(ext, kind, dtype, "cuda", normalized=normalized, col0=7)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert all(err < tol for err in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_norms_read_low_precision_storage(ext, dtype):
    w = torch.randn(300, 37, device="cuda").to(dtype)
    ref = 1.0 / w.float().norm(dim=1).clamp_min(1e-12)
    out = ext.inv_norms(w, torch.cuda.current_stream().cuda_stream)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-6)


def test_backward_is_bitwise_reproducible(ext):
    x, w, labels = random_problem(40, 3000, 64, dtype=torch.float32, seed=5, device="cuda")
    fn = lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="cuda", chunk_size=512)  # noqa
    first, second = loss_and_grads(fn, x, w), loss_and_grads(fn, x, w)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_runs_on_the_callers_stream(ext):
    x, w, labels = random_problem(16, 700, 32, dtype=torch.float32, seed=2, device="cuda")
    fn = lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.CosFace(), backend="cuda", chunk_size=128)  # noqa
    expected = loss_and_grads(fn, x, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = loss_and_grads(fn, x, w)
    torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_mixed_devices_are_rejected_with_names(ext):
    tile = torch.zeros(4, 6, device="cuda")
    labels, rp = torch.zeros(4, dtype=torch.long), torch.zeros(4, 2, device="cuda")
    run = (torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda"))
    with pytest.raises(RuntimeError, match="forward_tile: labels are on cpu"):
        ext.forward_tile(tile, None, labels, 0, rp, 0, 1.0, 0.0, 0.0, *run, torch.cuda.current_stream().cuda_stream)
    x, w = torch.zeros(4, 6, device="cuda"), torch.zeros(9, 6)
    with pytest.raises(ValueError, match="weight is on cpu"):
        mk.backends.get_backend("cuda").lse_forward(x, w, labels.cuda(), rp, None, mk.losses.NegativeSpec(), True, None)
