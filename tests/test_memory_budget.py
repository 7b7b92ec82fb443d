"""memory_budget=: the forward keeps its tiles so the backward skips the recompute GEMM.

* the loss and both gradients are bitwise the same with no budget, a partial one and one that keeps every
  tile, on every loss and every CPU-capable backend (torch, cpu, Triton in its interpreter: the kept tile is
  the very GEMM output the backward would recompute, the chunk boundaries do not move), and within the
  float64 reference's conformance bounds;
* the kept tiles are really read (corrupting them changes the gradient) and the recompute GEMMs really go
  (counted per chunk);
* torch.compile(fullgraph=True) traces the op with its extra output;
* the budget is respected: peak extra memory in a fresh process grows by at most the budget plus O(B·d);
* bad values raise a ValueError naming the argument; "auto" follows the per-device rule.
"""
import os
import subprocess
import sys

import pytest
import torch

import margin_kernels as mk
from margin_kernels import memory_budget as mb
from margin_kernels.backends import chunk_loop, unavailable_reason
from margin_kernels.backends.contract import OpConfig, OpInputs
from margin_kernels.backends.kept_tiles import KeptTiles, keep_columns, kept_whole_chunks
from margin_kernels.ops import TargetPairs, margin_lse
from tests.helpers import LOSS_NAMES, compare_with_reference, loss_and_grads, make_loss, random_problem
from tests.peak_memory import peak_extra
from tests.tolerances import COMPILE_VS_EAGER, bounds

BACKENDS = ["torch", "cpu", "triton"]
B, C, D, CHUNK = 12, 83, 24, 32   # 3 chunks of the chunk loop; 3 chunks of 32 in the Triton interpreter too
PARTIAL = B * 4 * 40              # room for 40 columns: one whole chunk kept, two recomputed
EVERYTHING = B * 4 * C


def _skip_unless_available(backend, on_cpu=True):
    reason = unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"the {backend!r} backend cannot run here: {reason}")
    if on_cpu and backend == "triton":
        from margin_kernels.backends import triton_backend
        if not triton_backend.interpret_mode():
            pytest.skip("Triton runs compiled on this GPU machine, on CUDA tensors only: the CPU-tensor cases "
                        "run in its interpreter elsewhere; test_budgeted_matches_recomputed_on_gpu covers it here")


def _run(backend, name, budget, x, w, labels, **kwargs):
    margin = make_loss(name)  # a fresh state per run: stateful losses see the same first call
    return loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, margin, backend=backend,
                                                               reduction="none", chunk_size=CHUNK,
                                                               memory_budget=budget, **kwargs), x, w)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_budgeted_equals_recomputed(backend, name):
    _skip_unless_available(backend)
    x, w, labels = random_problem(B, C, D, dtype=torch.float32, ignore_rows=(3,),
                                  sub_centers=make_loss(name).sub_centers)
    recomputed = _run(backend, name, None, x, w, labels)
    for budget in (PARTIAL, EVERYTHING):
        kept = _run(backend, name, budget, x, w, labels)
        for what, a, b in zip(("loss", "dx", "dW"), kept, recomputed):
            assert torch.equal(a, b), f"{what} differs with memory_budget={budget}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["arcface", "curricularface", "softmax"])
def test_budgeted_meets_the_reference_bounds(backend, name):
    """Against the float64 ground truth, with Partial FC (a class_index) too, every tile kept."""
    _skip_unless_available(backend)
    for class_index in (False, True):
        errors = compare_with_reference(backend, name, torch.float32, memory_budget=EVERYTHING,
                                        class_index=class_index)
        bound = bounds(backend, torch.float32, make_loss(name).negative_spec().kind)[torch.float64]
        assert not bound.violations(errors), (class_index, errors, bound)


def _op_inputs(backend, keep):
    x, w, labels = random_problem(B, C, D, dtype=torch.float32)
    x = torch.nn.functional.normalize(x, dim=1)
    config = OpConfig(mk.ArcFace().negative_spec(), True, backend, CHUNK, product="ieee", keep_cols=keep)
    inputs = OpInputs(x, w, labels, torch.zeros(B, 2), None)
    targets = TargetPairs(torch.zeros(B), torch.ones(B), labels.clamp_min(0))
    return inputs, targets, torch.zeros(1), config


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_reads_the_kept_tiles(backend):
    """Corrupting the kept tiles changes dx only when the backward reads them (every column kept)."""
    _skip_unless_available(backend)
    inputs, targets, shift, config = _op_inputs(backend, C)
    lse, _, _, saved = margin_lse(inputs, targets, shift, config)
    g = torch.ones(B)

    def backward(buffer):
        return torch.ops.margin_kernels.margin_lse_backward(*inputs, targets.norm, targets.rows, shift, lse, g,
                                                            torch.zeros(B), torch.zeros(B), buffer, *config.pack())

    store = KeptTiles(saved.clone(), B, C, C, True)
    clean = backward(store.flat)
    store.tiles.mul_(0.5)
    corrupted = backward(store.flat)
    assert not torch.equal(clean[0], corrupted[0]), "the backward did not read the kept tiles"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [0, C])
def test_the_buffer_holds_norms_only_for_a_backend_that_reads_them(backend, keep):
    """The chunk loop's backward reads the C inverse norms its forward wrote; the Triton backward forms them
    itself unless it reads kept tiles, so without a budget the op allocates nothing for it. The fake (what
    torch.compile traces) allocates the same size."""
    _skip_unless_available(backend)
    inputs, targets, shift, config = _op_inputs(backend, keep)
    fwd = (*inputs, *targets, shift, *config.pack())
    saved = torch.ops.margin_kernels.margin_lse(*fwd)[3]
    norms = 0 if backend == "triton" and keep == 0 else C
    assert saved.numel() == norms + B * keep
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = torch.ops.margin_kernels.margin_lse(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                     for a in fwd))[3]
    assert fake.numel() == saved.numel()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_chunk_loop_skips_one_gemm_per_kept_chunk(backend, monkeypatch):
    _skip_unless_available(backend)
    calls = []
    original = chunk_loop._matmul_acc
    monkeypatch.setattr(chunk_loop, "_matmul_acc", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, w, labels = random_problem(B, C, D, dtype=torch.float32)
    chunks = -(-C // CHUNK)
    for budget, recomputed in ((None, chunks), (PARTIAL, chunks - 1), (EVERYTHING, 0)):
        calls.clear()
        _run(backend, "arcface", budget, x, w, labels)
        assert len(calls) == chunks + recomputed, (budget, len(calls))


@pytest.mark.parametrize("backend,budget", [("cpu", 8 * 4 * 40), ("cpu", "auto"), ("torch", 8 * 4 * 20),
                                            ("triton", 8 * 4 * 40)])
def test_compiled_with_budget_matches_eager(backend, budget):
    """fullgraph: the kept-tile buffer is an op output; "auto" (free memory) is a constant of the trace."""
    _skip_unless_available(backend)
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32, ignore_rows=(1,))

    def fn(a, b):
        return mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend=backend, chunk_size=16,
                                       memory_budget=budget)

    eager = loss_and_grads(fn, x, w)
    compiled = loss_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, w)
    for a, b in zip(compiled, eager):
        assert (a.double() - b.double()).abs().max().item() <= COMPILE_VS_EAGER * max(1.0, b.abs().max().item())


def test_heads_take_the_budget():
    x, w, labels = random_problem(B, C, D, dtype=torch.float32)
    results = []
    for budget in (None, EVERYTHING, "auto"):
        head = mk.MarginHead(C, D, mk.CosFace(), backend="cpu", chunk_size=CHUNK, memory_budget=budget)
        with torch.no_grad():
            head.weight.copy_(w)
        feats = x.clone().requires_grad_(True)
        loss = head(feats, labels)
        loss.backward()
        results.append((loss.detach(), feats.grad, head.weight.grad))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results[0]))


@pytest.mark.parametrize("bad", [-1, 1.5, "lots", True])
def test_bad_budget_names_the_argument(bad):
    x, w, labels = random_problem(4, 10, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="memory_budget"):
        mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), memory_budget=bad)
    with pytest.raises(ValueError, match="memory_budget"):
        mk.MarginHead(10, 8, mk.ArcFace(), memory_budget=bad)


def test_auto_follows_the_device_rule():
    cpu = torch.device("cpu")
    assert mb.budget_bytes(None, cpu, 512) == 0 and mb.budget_bytes(0, cpu, 512) == 0
    assert mb.budget_bytes(1234, cpu, 512) == 1234
    assert mb.budget_bytes("auto", cpu, 512) > 0  # keeping always pays on CPU
    assert not mb.keeping_pays("cuda", 512) and mb.keeping_pays("cuda", 1024)


def test_keep_arithmetic():
    assert keep_columns(0, 8, 100, torch.float32) == 0
    assert keep_columns(8 * 4 * 10 + 3, 8, 100, torch.float32) == 10
    assert keep_columns(10 ** 9, 8, 100, torch.float64) == 100
    assert kept_whole_chunks(70, 100, 32) == 64 and kept_whole_chunks(100, 100, 32) == 100


PEAK_SCRIPT = r"""
import sys
import margin_kernels as mk
backend, budget, B, C, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
def run(c):
    x = torch.randn(B, D, requires_grad=True)
    w = torch.randn(c, D).mul_(0.01).requires_grad_(True)
    y = torch.randint(0, c, (B,))
    return x, w, y
x, w, y = run(64)
mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend, memory_budget=budget).backward()
x, w, y = run(C)
report(measure(lambda: mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend,
                                               memory_budget=budget).backward()), C * D)
"""


def _peak_extra(backend, budget, batch, classes, dim):
    return peak_extra(PEAK_SCRIPT, backend, budget, batch, classes, dim)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("torch", marks=pytest.mark.slow)])
def test_peak_extra_memory_stays_within_the_budget(backend):
    """Fresh processes: the budgeted step's extra peak over the recomputing one is at most the budget plus
    O(B·d) (slack: 16 B x d fp32 buffers and 1 MiB of allocator rounding), and it did use the budget. The
    portable torch backend gets 8 B x chunk fp32 tiles more: its epilogue's per-chunk temporaries land in a
    heap that the kept buffer fragments (glibc keeps freed 2 MiB blocks once a larger mmap was freed)."""
    _skip_unless_available(backend)
    batch, classes, dim = 256, 50_000, 64
    budget = 24 * 2 ** 20  # about half of the 49 MiB every tile would take
    base = _peak_extra(backend, 0, batch, classes, dim)
    kept = _peak_extra(backend, budget, batch, classes, dim)
    slack = 16 * batch * dim * 4 + 2 ** 20
    if backend == "torch":
        slack += 8 * batch * chunk_loop.default_chunk_size(batch) * 4
    assert kept - base <= budget + slack, (kept, base, budget)
    assert kept - base >= budget // 2, ("the budget was not used", kept, base)


DISTRIBUTED_SCRIPT = r"""
import os, sys, tempfile, torch, torch.distributed as dist
import margin_kernels as mk
from margin_kernels.distributed import DistributedMarginHead
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
torch.manual_seed(0)
x, y = torch.randn(12, 24), torch.randint(0, 83, (12,))
out = []
for budget in (None, 12 * 4 * 83):
    head = DistributedMarginHead(83, 24, mk.ArcFace(), backend="cpu", chunk_size=32, memory_budget=budget)
    feats = x.clone().requires_grad_(True)
    head(feats, y).backward()
    out.append((feats.grad, head.weight.grad))
assert all(torch.equal(a, b) for a, b in zip(*out)), "budgeted != recomputed"
print("ok")
"""


@pytest.mark.slow  # a fresh process with a gloo group: ~10 s
def test_distributed_head_takes_the_budget():
    """DistributedMarginHead passes memory_budget to the same op (a world of one gloo rank, in a subprocess
    so this process keeps no process group)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    _skip_unless_available("cpu")
    out = subprocess.run([sys.executable, "-c", DISTRIBUTED_SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_budgeted_equals_recomputed_in_other_dtypes(backend, dtype):
    """fp64 keeps fp64 tiles (8 bytes a column entry); bf16 storage keeps the fp32 GEMM output."""
    _skip_unless_available(backend)
    x, w, labels = random_problem(B, C, D, dtype=dtype, ignore_rows=(3,))
    recomputed = _run(backend, "arcface", None, x, w, labels)
    kept = _run(backend, "arcface", 10 ** 9, x, w, labels)
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_with_gradient_filtering_and_partial_fc(backend):
    _skip_unless_available(backend)
    x, w, labels = random_problem(B, C, D, dtype=torch.float32)
    index = torch.randperm(C, generator=torch.Generator().manual_seed(1))[:60]
    labels = labels % 60
    options = dict(grad_filter=1e-3, class_index=index)
    recomputed = _run(backend, "cosface", None, x, w, labels, **options)
    kept = _run(backend, "cosface", EVERYTHING, x, w, labels, **options)
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed))


def test_a_second_backward_reads_intact_tiles():
    """retain_graph: the backward works on a copy of each kept tile, so a second backward gives the same."""
    x, w, labels = random_problem(B, C, D, dtype=torch.float32)
    w = w.clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), backend="cpu", chunk_size=CHUNK,
                                   memory_budget=EVERYTHING)
    first, = torch.autograd.grad(loss, w, retain_graph=True)
    second, = torch.autograd.grad(loss, w)
    assert torch.equal(first, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; on CPU the cuda backend's "
                    "path (NativeBackend over the chunk loop, shared with 'cpu') and the Triton kernels (in "
                    "the interpreter) are the cases above")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_budgeted_matches_recomputed_on_gpu(backend):
    """On a GPU the Triton forward and dcos kernels tile differently, so the kept cosines may differ from
    the recomputed ones in the last bits: compared within COMPILE_VS_EAGER (fp32, same math); the cuda
    backend's chunk loop is bitwise."""
    _skip_unless_available(backend, on_cpu=False)
    x, w, labels = random_problem(64, 5000, 128, dtype=torch.float32)
    x, w, labels = x.cuda(), w.cuda(), labels.cuda()
    recomputed = _run(backend, "arcface", None, x, w, labels)
    for budget in (64 * 4 * 2000, 10 ** 10):
        kept = _run(backend, "arcface", budget, x, w, labels)
        for a, b in zip(kept, recomputed):
            if backend == "cuda":
                assert torch.equal(a, b)
            else:
                assert (a.double() - b.double()).norm() <= COMPILE_VS_EAGER * b.double().norm()


def test_triton_keeps_no_sub_center_tiles():
    """The Triton kernels keep K = 1 tiles only: a sub-center loss gets no kept-tile buffer there (the budget
    is not spent for nothing), while the chunk-loop backends keep them."""
    from margin_kernels.backends import keeps_tiles
    assert keeps_tiles("cpu", 3) and keeps_tiles("torch", 3) and keeps_tiles("triton", 1)
    if unavailable_reason("triton") is None:
        assert not keeps_tiles("triton", 3)


def test_keeping_forward_tilings_are_the_spill_free_ones():
    """The autotuner's candidates when the forward keeps its tiles: what compiled without spills for sm_90
    (``python -m bench kernels`` checks every one in CI): 64 x 64, and the 8-warp 128 x 128 tilings under the
    log-sum-exp; never 128 x 256 or a 4-warp tiling above 64 x 64, nothing above 64 x 64 under the binary sum."""
    from margin_kernels.backends import triton_configs as configs
    from margin_kernels.losses.reductions import ReductionKind
    lse = {(t.block_b, t.block_c, t.num_warps) for t in configs.H100_FORWARD
           if configs.forward_candidate(t, 2, False, 1, 0, int(ReductionKind.LSE), keeps=True)}
    binary = {(t.block_b, t.block_c, t.num_warps) for t in configs.H100_FORWARD
              if configs.forward_candidate(t, 2, False, 1, 0, int(ReductionKind.SOFTPLUS_SUM), keeps=True)}
    assert lse == {(128, 128, 8), (64, 64, 4)} and binary == {(64, 64, 4)}
    assert configs.default_forward(2, keeps=True, reduction=int(ReductionKind.SOFTPLUS_SUM)).block_c == 64
