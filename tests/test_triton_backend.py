"""The Triton backend: what is specific to it (the conformance suite compares it with the reference).

Without CUDA the kernels run in Triton's interpreter. Triton decides that when it is first imported (its own
library functions are @triton.jit functions, decorated for the interpreter only if TRITON_INTERPRET=1 is set
by then), so this module sets TRITON_INTERPRET=1 before it imports triton, and skips with the reason if the
process imported triton earlier without it (then run this file on its own, or export TRITON_INTERPRET=1).
With CUDA the same tests run the compiled kernels on the GPU. Shapes are tiny (the interpreter runs each
program in numpy) and tiles are forced to 16 so that every case spans several class tiles, K steps and class
splits, with C and d not multiples of the tile.

Every loss x dtype x shape variant against the float64 reference (with the same forced tiles and one to seven
class splits) is in test_conformance.py, bounded by tests/tolerances.py; so are the Triton negative
functions at their branch points. Here: what is specific to this backend (Partial FC's untouched dW rows,
int64 offsets, gradient filtering, determinism, interpreter detection, tile configs, the compile check).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see the docstring)
pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be tested")

import margin_kernels as mk  # noqa: E402
from margin_kernels.backends import available_backends, triton_backend  # noqa: E402
from margin_kernels.backends import triton_configs as configs  # noqa: E402
from margin_kernels.backends.contract import CallState, OpConfig, OpInputs  # noqa: E402
from margin_kernels.losses.negatives import NegativeKind  # noqa: E402
from tests.helpers import Errors, loss_and_grads, make_loss, random_problem, rel_err, twin  # noqa: E402
from tests.tolerances import TOLERANCES  # noqa: E402

if triton_backend.unavailable_reason() is not None:
    pytest.skip(f"the Triton backend cannot run in this process: {triton_backend.unavailable_reason()}",
                allow_module_level=True)

# rows without negatives take log(0) = -inf on purpose; numpy (the interpreter) warns about it
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
DEVICE = "cuda" if CUDA else "cpu"
TILES = dict(forward=configs.ForwardTiles(16, 16, 16), backward=configs.BackwardTiles(16, 16), splits=2)


@pytest.fixture(autouse=True)
def small_tiles():
    with configs.fixed_configs(**TILES):
        yield


def _run(backend, margin, x, w, labels, **kwargs):
    """(per-row losses, dx, dw) of one backend; the reference runs in float64."""
    if backend == "reference":
        x, w = x.double(), w.double()
    return loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, margin, backend=backend,
                                                               reduction="none", **kwargs), x, w)


def _assert_close(out, ref, dtype, what=""):
    """Within tests/tolerances.py's bounds for Triton in ``dtype`` against the float64 reference."""
    loss, dx, dw = (t.cpu() for t in out)
    ref_loss, ref_dx, ref_dw = (t.cpu().double() for t in ref)
    errors = Errors((loss.double() - ref_loss).abs().max().item() / max(1.0, ref_loss.abs().max().item()),
                    rel_err(dx, ref_dx), rel_err(dw, ref_dw))
    bad = TOLERANCES[("triton", dtype)].float64.violations(errors)
    assert not bad, f"{what}: " + ", ".join(bad)


def test_negative_kinds_match_the_enum():
    from margin_kernels.backends import triton_negatives as tn
    for kind in NegativeKind:
        assert getattr(tn, kind.name).value == int(kind)


def test_registry_reports_triton_available():
    assert available_backends()["triton"] is None
    assert triton_backend.unavailable_reason() is None


@pytest.mark.parametrize("name", ["arcface", "softmax"])
def test_class_index_partial_fc(name):
    """Labels index into a sampled class subset; only the sampled dW rows are written, the rest is zero."""
    gen = torch.Generator().manual_seed(3)
    x, w, _ = random_problem(12, 80, 24, dtype=torch.float32, device=DEVICE)
    class_index = torch.randperm(80, generator=gen)[:35].to(DEVICE)
    labels = torch.randint(0, 35, (12,), generator=gen).to(DEVICE)
    labels[4] = -1
    margin = make_loss(name)
    ref_margin = twin(margin)
    out = _run("triton", margin, x, w, labels, class_index=class_index)
    ref = _run("reference", ref_margin, x, w, labels, class_index=class_index)
    _assert_close(out, ref, torch.float32, name)
    untouched = torch.ones(80, dtype=torch.bool)
    untouched[class_index.cpu()] = False
    assert out[2].cpu()[untouched].abs().max().item() == 0.0
    assert out[2].cpu()[~untouched].abs().amax(dim=1).min().item() > 0.0


@pytest.mark.parametrize("use_index", [False, True], ids=["all", "class_index"])
def test_offsets_beyond_int32(use_index):
    """Weight rows at element offsets 0, S and 2S > 2^31 of an 8 GiB fp32 storage that is allocated but never
    touched (torch.empty maps it lazily; only the three rows are written), so the kernels must form their
    row offsets in int64. An int32 product wraps and reads the wrong memory (or faults)."""
    stride = 2 ** 30 + 3
    dim = 24
    _, small_w, _ = random_problem(4, 3, dim, dtype=torch.float32)
    storage = torch.empty(2 * stride + dim, dtype=torch.float32, device=DEVICE)
    weight = storage.as_strided((3, dim), (stride, 1))
    weight.copy_(small_w)
    assert (weight.shape[0] - 1) * weight.stride(0) >= 2 ** 31
    x, _, labels = random_problem(4, 3, dim, dtype=torch.float32, device=DEVICE, seed=1)
    kwargs = {}
    if use_index:
        kwargs["class_index"] = torch.tensor([2, 0], device=DEVICE)
        labels = torch.tensor([0, 1, 0, -1], device=DEVICE)
    margin = make_loss("arcface")
    ref_margin = twin(margin)
    wl = weight.detach().requires_grad_(True)  # a leaf view: autograd must not clone the 8 GiB storage
    xl = x.detach().clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xl, wl, labels, margin, backend="triton", reduction="none", **kwargs)
    dx, dw = torch.autograd.grad(loss.sum(), [xl, wl])
    ref = _run("reference", ref_margin, x, weight.contiguous(), labels, **kwargs)
    _assert_close((loss.detach(), dx, dw), ref, torch.float32)


#: the gradient GEMMs' own tiling: output tiles twice as wide over d as the dcos kernel's K step, and dW tiles
#: two dcos class tiles tall (a dW K step is skipped only when both of its tiles were)
GROUPED = configs.BackwardTiles(16, 16, 16, grad_block_d=32, dw_group=2)


@pytest.mark.parametrize("name", ["arcface", "curricularface", "sphereface2"])
def test_grouped_gradient_tiles_match_the_reference(name):
    """dW tiles of grouped class tiles and wider d tiles (the sm_90 layout: 128-row dW output tiles over 64-class
    dcos tiles) give the reference's loss and gradients, masked tails included (C = 70: a partial last group)."""
    x, w, labels = random_problem(20, 70, 40, dtype=torch.float32, device=DEVICE)
    ref = _run("reference", make_loss(name), x, w, labels)
    with configs.fixed_configs(forward=TILES["forward"], backward=GROUPED, splits=2):
        out = _run("triton", make_loss(name), x, w, labels)
    _assert_close(out, ref, torch.float32, name)


def test_grouped_gradient_tiles_skip_what_the_dcos_tiles_skipped():
    """With gradient filtering the grouped tiling skips the same dcos tiles (the flags are the dcos kernel's)
    and a group's dW step only when all its tiles were skipped, whose dL/dcos are zeros anyway: in float64
    the gradients equal the ungrouped tiling's up to summation order (1e-12 relative, ~2^-52 per add)."""
    x, w, labels = _far_classes_problem(20, 70, range(16, 48), seed=3)  # tiles 1, 2 far: both groups mixed
    runs = []
    for backward in (TILES["backward"], GROUPED):
        mk.reset_grad_filter_stats()
        with configs.fixed_configs(forward=TILES["forward"], backward=backward, splits=2):
            runs.append((_run("triton", make_loss("arcface"), x, w, labels, grad_filter=2e-3),
                         mk.grad_filter_stats()))
    (plain, plain_stats), (grouped, grouped_stats) = runs
    assert plain_stats == grouped_stats and 0 < plain_stats["skipped_tiles"] < plain_stats["total_tiles"]
    assert torch.equal(plain[0], grouped[0])
    for a, b in zip(plain[1:], grouped[1:]):
        assert rel_err(b, a) <= 1e-12


@pytest.mark.parametrize("backward", [TILES["backward"], GROUPED], ids=["tiles", "grouped"])
def test_grad_filter_skips_far_classes(backward):
    """Every feature leans along one direction u and classes 32..63 point along -u (cos ~ -0.9, p ~ e^-50):
    their two class tiles have |dL/dcos| far below tau and are skipped; the tiles holding the targets are not.
    The loss is unchanged and the gradients are within the bound of triton_backend's docstring: per row
    ||ddx_eff_i|| <= tau * (skipped columns) <= tau * C for unit weight rows, and d features / d x_eff has norm
    <= 1/||x_i||; per class ||ddW_j|| <= 2 tau sum_i ||x_eff_i|| / ||w_j|| = 2 tau B / ||w_j||."""
    tau = 1e-4
    x, w, labels = _far_classes_problem(16, 64, range(32, 64), seed=5)
    x, w = x.float(), w.float()
    margin = make_loss("normface")
    with configs.fixed_configs(forward=TILES["forward"], backward=backward, splits=2):
        _check_filter(margin, x, w, labels, tau)


def _far_classes_problem(batch, classes, far, seed):
    """float64 features leaning along one direction u, the ``far`` classes pointing along -u (cos ~ -0.9,
    p ~ e^-50: their dL/dcos is far below any threshold used here), labels among the other classes."""
    far = torch.tensor(list(far))
    x, w, labels = random_problem(batch, classes, 24, dtype=torch.float64, seed=seed)
    u = torch.randn(24, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    u = u / u.norm()
    x = x + 3.0 * x.norm(dim=1, keepdim=True) * u
    near = torch.tensor([c for c in range(classes) if c not in set(far.tolist())])
    w[far] = -u * w[near].norm(dim=1).mean() + 1e-3 * w[far]
    return x.to(DEVICE), w.to(DEVICE), near[labels % len(near)].to(DEVICE)


def _check_filter(margin, x, w, labels, tau):
    exact = _run("triton", twin(margin), x, w, labels)
    mk.reset_grad_filter_stats()
    filtered = _run("triton", twin(margin), x, w, labels, grad_filter=tau)
    assert isinstance(triton_backend.filter_stats._skipped, torch.Tensor)  # recorded without a device sync
    stats = mk.grad_filter_stats()
    assert stats["total_tiles"] == 4  # one row block x four class tiles of 16
    assert stats["skipped_tiles"] == 2
    assert torch.equal(filtered[0], exact[0])
    feature_norms = x.double().norm(dim=1).cpu()
    dx_err = (filtered[1] - exact[1]).double().norm(dim=1).cpu()
    assert (dx_err <= tau * 64 / feature_norms).all()
    dw_err = (filtered[2] - exact[2]).double().norm(dim=1).cpu()
    assert (dw_err <= 2 * tau * 16 / w.double().norm(dim=1).cpu()).all()
    assert dw_err[:32].max() == 0 and dw_err[32:].max() > 0  # only the far classes were skipped


def test_backward_is_deterministic():
    x, w, labels = random_problem(20, 50, 24, dtype=torch.float32, device=DEVICE, duplicate=True)
    first = _run("triton", make_loss("arcface"), x, w, labels)
    second = _run("triton", make_loss("arcface"), x, w, labels)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_changing_interpret_mode_after_import_is_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0" if triton_backend.interpret_mode() else "1")
    assert "before the first `import triton`" in triton_backend.unavailable_reason()
    x, w, labels = random_problem(4, 8, 16, dtype=torch.float32, device=DEVICE)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_backend.lse_forward(OpInputs(x, w, labels, torch.zeros(4, 2, device=DEVICE), None),
                                   OpConfig(make_loss("arcface").negative_spec(), backend="triton"), CallState())
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mk.margin_cross_entropy(x, w, labels, make_loss("arcface"), backend="triton")


def _run_script(args, timeout=300):
    """A fresh Python without TRITON_INTERPRET (compiled mode), from the repository root."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=root)


def test_cpu_only_process_without_interpreter_explains():
    if CUDA:
        pytest.skip("a CUDA machine runs the compiled kernels; this checks the CPU-only error path")
    code = ("import torch, margin_kernels as mk\n"
            "from margin_kernels.backends import available_backends\n"
            "print(available_backends()['triton'])\n"
            "x = torch.randn(4, 16); w = torch.randn(8, 16); y = torch.tensor([1, 2, 3, 4])\n"
            "mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend='triton')\n")
    result = _run_script(["-c", code], timeout=120)
    assert result.returncode != 0
    assert "needs a CUDA device" in result.stdout  # the registry's reason
    assert "needs a CUDA device" in result.stderr  # the RuntimeError of an explicit backend='triton'


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_100"])
@pytest.mark.parametrize("elem_bytes", [2, 4, 8])
def test_gpu_tilings_fit(arch, elem_bytes):
    """The fixed GPU tilings fit shared memory and the register budget for every element size and loss shape
    (the narrow tiling of the heavier epilogues too): the backward holds GEMM tiles, never whole embedding rows,
    so no d is too wide (fp64 d = 1024 included)."""
    assert configs.forward_fits(configs.default_forward(elem_bytes, arch=arch), elem_bytes)
    for kind in (NegativeKind.IDENTITY, NegativeKind.POWER):
        assert configs.backward_fits(configs.default_backward(elem_bytes, arch, int(kind)), elem_bytes)


def test_backward_chunks_respect_the_buffer_budget():
    tiles = configs.default_backward(2)
    chunk = configs.backward_chunk(tiles, 512, 10 ** 6, 2, interpret=False)
    assert chunk % tiles.block_c == 0 and 512 * chunk * 2 <= configs.BACKWARD_BUFFER_BYTES
    needed = -(-300 // tiles.block_c) * tiles.block_c  # never more than C needs, in whole tiles
    assert configs.backward_chunk(tiles, 512, 300, 2, interpret=False) == needed
    assert configs.backward_chunk(tiles, 10 ** 7, 10 ** 6, 2, interpret=False) == tiles.block_c


def test_autotune_key_buckets_the_batch_and_ignores_classes():
    assert [configs.batch_bucket(b) for b in (1, 500, 512, 513)] == [1, 512, 512, 1024]
    kernel = triton_backend._autotuned_kernel(triton_backend._kernels()[0].lse_forward_kernel)
    # sub-centers, the epilogue (kind, reduction) and keeping tiles restrict the tilings (prune_forward): a
    # config tuned for one must not be reused for another
    assert list(kernel.keys) == ["B_BUCKET", "D", "PRODUCT", "SUB_CENTERS", "KIND", "REDUCTION", "KEEP"]


def test_fp16_factor_keeps_the_buffer_finite_and_scaled():
    """dL/dcos is scaled by a power of two before its fp16 rounding: finite for tiny and huge bounds."""
    spec = mk.losses.NegativeSpec(NegativeKind.CIRCLE, 256.0, 0.25)
    rows = torch.zeros(4, 2)
    x = torch.zeros(4, 3, dtype=torch.float16)
    for g in (1e-40, 1e-3, 1.0, 1e30):
        factor = triton_backend._dc_factor(x.dtype, spec, rows, torch.full((4,), g), torch.full((4,), g))
        assert torch.isfinite(factor).all() and factor.item() > 0
        bound = 256 * 1.25 * g
        if 2.0 ** -100 < bound < 2.0 ** 100:
            assert 2 ** 13 < bound * factor.item() <= 2 ** 14
    assert triton_backend._dc_factor(torch.float32, spec, rows, torch.ones(4), torch.ones(4)).item() == 1.0


# ---- fp32 weights: the product dtype follows PyTorch's rules ------------------------------------------------
@pytest.mark.parametrize("name", ["arcface", "softmax", "curricularface"])
@pytest.mark.parametrize("mode", ["highest", "high", "medium", "autocast-bf16", "autocast-fp16"])
def test_fp32_products_follow_matmul_precision_and_autocast(mode, name):
    """torch.get_float32_matmul_precision() and autocast decide how fp32 weights are multiplied: each mode
    stays within its bound of tests/tolerances.py, and the 16-bit modes really round (their error is far
    above the IEEE mode's)."""
    from margin_kernels.precision import product_mode
    from tests.tolerances import PRODUCT_TOLERANCES
    x, w, labels = random_problem(12, 50, 24, dtype=torch.float32, device=DEVICE, ignore_rows=(3,))
    ref = _run("reference", make_loss(name), x, w, labels)
    saved = torch.get_float32_matmul_precision()
    try:
        if mode.startswith("autocast"):
            dtype = torch.bfloat16 if mode.endswith("bf16") else torch.float16
            with torch.autocast(DEVICE, dtype=dtype):
                product = product_mode(torch.float32, DEVICE)
                out = _run("triton", make_loss(name), x, w, labels)
        else:
            torch.set_float32_matmul_precision(mode)
            product = product_mode(torch.float32, DEVICE)
            out = _run("triton", make_loss(name), x, w, labels)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert product == {"highest": "ieee", "high": "tf32", "medium": "bf16", "autocast-bf16": "bf16",
                       "autocast-fp16": "fp16"}[mode]
    loss, dx, dw = (t.cpu() for t in out)
    errors = ((loss.double() - ref[0].cpu()).abs().max().item() / max(1.0, ref[0].abs().max().item()),
              rel_err(dx, ref[1].cpu()), rel_err(dw, ref[2].cpu()))
    bounds = PRODUCT_TOLERANCES[product]
    assert errors[0] <= bounds.loss and errors[1] <= bounds.dx and errors[2] <= bounds.dw, (product, errors)
    if product in ("bf16", "fp16"):
        assert errors[2] > 50 * PRODUCT_TOLERANCES["ieee"].observed[2]  # the cast happened


def test_fp32_with_cast_products_drops_the_spilling_forward_tilings():
    """From the compiled evidence (python -m bench kernels): 4-warp 64x128 / 128x64 forward tiles spill when
    fp32 loads are cast to bf16 in registers; the autotuner must not pick them there, but may for 16-bit
    storage and for IEEE/TF32 fp32 products."""
    spilling = [t for t in configs.H100_FORWARD if t.num_warps == 4 and t.block_b * t.block_c >= 8192]
    assert spilling
    for tiles in spilling:
        assert not configs.forward_candidate(tiles, 4, casts_operands=True)
        assert configs.forward_candidate(tiles, 4, casts_operands=False)
        assert configs.forward_candidate(tiles, 2, casts_operands=False)
    assert any(configs.forward_candidate(t, 4, casts_operands=True) for t in configs.H100_FORWARD)


def test_fixed_forward_tiling_avoids_the_spilling_ones():
    """With autotuning off the fixed forward tiling is itself an allowed candidate in every case."""
    for elem_bytes in (2, 4, 8):
        for casts in (False, True):
            tiles = configs.default_forward(elem_bytes, casts)
            assert configs.forward_candidate(tiles, elem_bytes, casts)
    assert configs.default_forward(2) == configs.ForwardTiles(64, 128, 64, 4, 4)  # unchanged for 16-bit
    # sm_8x (mma.sync): the tile that spills on none of sm_80/86/89 (python -m bench archs), every dtype valid
    assert configs.default_forward(2, arch="sm_80") == configs.ForwardTiles(128, 128, 32, 8, 4)
    for elem_bytes in (2, 4, 8):
        tiles = configs.default_forward(elem_bytes, arch="sm_80")
        assert configs.forward_candidate(tiles, elem_bytes, False)


def test_fixed_forward_tiling_follows_the_epilogue():
    """With autotuning off, the fixed tiling obeys the same per-kind limits as the autotuner's candidates
    (SphereFace2's power kinds spill above 64 x 64 under the binary sum)."""
    from margin_kernels.losses.reductions import ReductionKind
    tiles = configs.default_forward(2, False, 1, int(NegativeKind.POWER), int(ReductionKind.SOFTPLUS_SUM))
    assert tiles.block_b * tiles.block_c <= configs.POWER_KINDS_MAX_TILE
    assert configs.forward_candidate(tiles, 2, False, 1, int(NegativeKind.POWER), int(ReductionKind.SOFTPLUS_SUM))
