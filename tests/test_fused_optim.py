"""The fused optimizers (margin_kernels.optim): the head's weight after N steps equals torch.optim's applied to
the float64 reference's dense gradient, on every backend, dense and sparse; the training-loop protocol
(weight.grad stays None, step/zero_grad, LR schedulers, state_dict) and what cannot fuse."""
import copy

import pytest
import torch

import margin_kernels as mk
from margin_kernels.optim import FusedAdamW, FusedSGD
from tests.tolerances import FUSED_TRAJECTORY

C, D, B, CHUNK = 300, 16, 24, 64
SGD_CASES = {
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov_decay": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3),
    "dampening_decay": dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=5e-3),
}
ADAMW = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-2)


def batches(steps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D, generator=g).to(dtype), torch.randint(0, C, (B,), generator=g))
            for _ in range(steps)]


def reference_gradient(w, x, y, class_index):
    """The float64 reference's dense dW at ``w`` (rows outside ``class_index`` are zero)."""
    w = w.detach().double().requires_grad_(True)
    labels = y if class_index is None else torch.searchsorted(class_index, y)
    mk.margin_cross_entropy(x.double(), w, labels, mk.ArcFace(), backend="reference",
                            class_index=class_index).backward()
    return w.grad


def storage_gradient(backend, dtype=torch.bfloat16):
    """For bf16 and fp32 weights: the unfused backend's own dW on the same weight and features in that dtype.
    The float64 reference differs from any bf16 run by the API's rounding of x/||x||, ~1e-2 of dW, and from an
    fp32 run by fp32 rounding amplified by s = 64 (~1e-6 of dW), which AdamW's normalised steps compound past
    1e-5 in 20 steps (observed 5.7e-5); the backend's gradient accuracy is tested against the reference
    elsewhere, these trajectories test the fused update against torch.optim's on the same gradient."""
    def gradient(w, x, y, class_index):
        w = w.detach().to(dtype, copy=True).requires_grad_(True)
        labels = y if class_index is None else torch.searchsorted(class_index, y)
        mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), backend=backend, chunk_size=CHUNK,
                                class_index=class_index).backward()
        return w.grad.float()
    return gradient


class TorchReference:
    """torch.optim stepping a copy of the weight on the reference's gradient (``sparse``: only the class set's
    rows, SGD with their momentum rows, AdamW as SparseAdam). The copy is float64 for float64 weights and fp32
    otherwise (the fused update's math dtype); for bf16 weights it is rounded to bf16 after every step, as the
    fused update stores it."""

    def __init__(self, w0, kind, options, sparse, dtype, gradient=reference_gradient):
        self.gradient = gradient
        self.round_to = torch.bfloat16 if dtype == torch.bfloat16 else None
        # a copy: ``.to`` of a tensor already in the dtype returns it, and the reference would step the head's
        # own weight (every comparison trivially 0)
        self.w = torch.nn.Parameter(w0.detach().to(torch.float64 if dtype == torch.float64 else torch.float32,
                                                   copy=True))
        self.kind, self.options, self.sparse = kind, options, sparse
        if kind == "sgd":
            self.opt = torch.optim.SGD([self.w], **options)
        elif sparse:
            assert options["weight_decay"] == 0, "SparseAdam has no weight decay"
            self.opt = torch.optim.SparseAdam([self.w], lr=options["lr"], betas=options["betas"],
                                              eps=options["eps"])
        else:
            self.opt = torch.optim.AdamW([self.w], **options)
        self.momentum = torch.zeros_like(self.w)
        self.steps = 0

    def step(self, x, y, class_index):
        grad = self.gradient(self.w, x, y, class_index).to(self.w.dtype)
        self.steps += 1
        if self.sparse and class_index is not None and self.kind == "sgd":
            self._sparse_sgd(grad, class_index)
        elif self.sparse and self.kind == "adamw":
            rows = torch.arange(self.w.shape[0]) if class_index is None else class_index
            self.w.grad = torch.sparse_coo_tensor(rows[None], grad[rows], self.w.shape)
            self.opt.step()
        else:
            self.w.grad = grad
            self.opt.step()
        if self.round_to is not None:
            with torch.no_grad():
                self.w.copy_(self.w.to(self.round_to))

    def _sparse_sgd(self, grad, rows):
        """Partial FC v1: torch.optim.SGD on the class set's rows and their momentum rows only."""
        sub = torch.nn.Parameter(self.w.detach()[rows].clone())
        opt = torch.optim.SGD([sub], **self.options)
        if self.steps > 1 and self.options.get("momentum", 0):
            opt.state[sub]["momentum_buffer"] = self.momentum[rows].clone()
        sub.grad = grad[rows]
        opt.step()
        with torch.no_grad():
            self.w[rows] = sub
            if self.options.get("momentum", 0):
                self.momentum[rows] = opt.state[sub]["momentum_buffer"]


def make_fused(kind, params, options, sparse, **extra):
    cls = FusedSGD if kind == "sgd" else FusedAdamW
    return cls(params, sparse=sparse, **options, **extra)


def trajectory_error(kind, options, *, backend="torch", dtype=torch.float64, sample_rate=1.0, sparse=False,
                     steps=20, scheduler=None):
    head = mk.MarginHead(C, D, mk.ArcFace(), backend=backend, dtype=dtype, chunk_size=CHUNK,
                         sample_rate=sample_rate, seed=3)
    gradient = reference_gradient if dtype == torch.float64 else storage_gradient(backend, dtype)
    ref = TorchReference(head.weight, kind, options, sparse, dtype, gradient)
    opt = make_fused(kind, head.parameters(), options, sparse)
    head.fuse(opt)
    schedules = (scheduler(opt), scheduler(ref.opt)) if scheduler else ()
    for x, y in batches(steps, dtype):
        head(x, y).backward()
        assert head.weight.grad is None
        opt.step()
        opt.zero_grad()
        ref.step(x, y, head.sampled_classes)
        for schedule in schedules:
            schedule.step()
    if schedules:
        assert opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"]
    return ((head.weight.double() - ref.w.double()).norm() / ref.w.double().norm()).item()


@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
@pytest.mark.parametrize("case", list(SGD_CASES) + ["adamw"])
def test_dense_trajectory_float64(case, sample_rate):
    kind, options = ("adamw", ADAMW) if case == "adamw" else ("sgd", SGD_CASES[case])
    bound, _ = FUSED_TRAJECTORY[torch.float64]
    assert trajectory_error(kind, options, sample_rate=sample_rate) <= bound


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_sparse_trajectory_float64(kind):
    """sparse=True with Partial FC: only the sampled rows (and their state) move."""
    options = SGD_CASES["dampening_decay"] if kind == "sgd" else dict(ADAMW, weight_decay=0.0)
    bound, _ = FUSED_TRAJECTORY[torch.float64]
    assert trajectory_error(kind, options, sample_rate=0.4, sparse=True) <= bound


def test_sparse_and_dense_differ_only_with_sampling():
    """The documented difference: with every class in the step's set the modes agree; with sampling, dense
    decays and carries momentum on the unsampled rows, sparse leaves them untouched."""
    weights = {}
    for sparse in (False, True):
        for rate in (1.0, 0.4):
            head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", dtype=torch.float64, chunk_size=CHUNK,
                                 sample_rate=rate, seed=3)
            head.fuse(FusedSGD(head.parameters(), sparse=sparse, **SGD_CASES["nesterov_decay"]))
            w0 = head.weight.detach().clone()
            for x, y in batches(2, torch.float64):
                head(x, y).backward()
                head.fused_optimizer.step()
            weights[sparse, rate] = head.weight.detach().clone()
            if sparse and rate < 1:
                untouched = torch.ones(C, dtype=torch.bool)
                untouched[head.sampled_classes] = False  # the last draw; both draws' union moved
                assert (weights[sparse, rate] != w0).any(dim=1).sum() < C
    assert torch.equal(weights[False, 1.0], weights[True, 1.0])
    assert not torch.equal(weights[False, 0.4], weights[True, 0.4])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fp32_trajectory(backend, kind):
    options = ADAMW if kind == "adamw" else SGD_CASES["nesterov_decay"]
    bound, _ = FUSED_TRAJECTORY[torch.float32]
    assert trajectory_error(kind, options, backend=backend, dtype=torch.float32, sample_rate=0.4) <= bound


def test_cpu_backend_float64_trajectory():
    bound, _ = FUSED_TRAJECTORY[torch.float64]
    assert trajectory_error("sgd", SGD_CASES["momentum"], backend="cpu", sample_rate=0.4) <= bound


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_bf16_weights_fp32_state(backend, kind):
    options = ADAMW if kind == "adamw" else SGD_CASES["momentum"]
    bound, _ = FUSED_TRAJECTORY[torch.bfloat16]
    assert trajectory_error(kind, options, backend=backend, dtype=torch.bfloat16, steps=5) <= bound


def test_triton_interpreter_trajectory():
    """The Triton backend's dW kernel writing into the chunk buffer of the sink (interpreter: 3 steps)."""
    bound, _ = FUSED_TRAJECTORY[torch.float32]
    assert trajectory_error("sgd", SGD_CASES["nesterov_decay"], backend="triton", dtype=torch.float32,
                            sample_rate=0.4, steps=3) <= bound


@pytest.mark.parametrize("schedule", ["polynomial", "onecycle"])
def test_lr_schedulers_drive_param_groups(schedule):
    def scheduler(opt):
        if schedule == "polynomial":
            return torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=12, power=2.0)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=12)
    bound, _ = FUSED_TRAJECTORY[torch.float64]
    assert trajectory_error("sgd", SGD_CASES["momentum"], steps=12, scheduler=scheduler) <= bound
    assert trajectory_error("adamw", ADAMW, steps=12, scheduler=scheduler) <= bound


def test_no_dense_gradient_is_allocated(monkeypatch):
    """After the first step allocated the state, a step allocates nothing of C x d: the chunk buffers, and
    the blocks of unsampled rows updated after the loop (made CHUNK rows here, 8192 by default)."""
    from margin_kernels.optim import sink
    from tests.test_memory import AllocationLog
    monkeypatch.setattr(sink, "UNVISITED_BLOCK_ROWS", CHUNK)
    head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", dtype=torch.float32, chunk_size=CHUNK,
                         sample_rate=0.4)
    head.fuse(FusedAdamW(head.parameters(), lr=1e-3))
    (x, y), (x2, y2) = batches(2, torch.float32)
    head(x, y).backward()
    head.fused_optimizer.step()
    log = AllocationLog(big=C * D)
    with log:
        head(x2, y2).backward()
    # C x d results of ops are views of (or in-place writes to) the weight and the state, nothing new
    owned = {t.untyped_storage().data_ptr() for t in (head.weight, *head.fused_optimizer.state[head.weight].values())
             if isinstance(t, torch.Tensor)}
    assert log.big_storages <= owned, "no new C x d tensor in a fused step"
    assert max(n for n in log.sizes if n < C * D) <= max(CHUNK * D, B * CHUNK, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    """Stop after 3 steps, restore head and optimizer into fresh objects, continue: same as never stopping;
    the fp32 state of bf16 weights stays fp32 through load_state_dict."""
    data = batches(6, dtype)

    def build():
        head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", dtype=dtype, chunk_size=CHUNK)
        head.fuse(FusedSGD(head.parameters(), **SGD_CASES["nesterov_decay"]))
        return head

    def train(head, part):
        for x, y in part:
            head(x, y).backward()
            head.fused_optimizer.step()

    straight = build()
    train(straight, data)
    first = build()
    train(first, data[:3])
    saved = copy.deepcopy((first.state_dict(), first.fused_optimizer.state_dict()))
    resumed = build()
    resumed.load_state_dict(saved[0])
    resumed.fused_optimizer.load_state_dict(saved[1])
    state = resumed.fused_optimizer.state[resumed.weight]
    assert state["momentum_buffer"].dtype == torch.float32 and state["step"] == 3
    train(resumed, data[3:])
    assert torch.equal(resumed.weight, straight.weight)


def test_state_dtype_option():
    head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", dtype=torch.bfloat16, chunk_size=CHUNK)
    head.fuse(FusedAdamW(head.parameters(), lr=1e-3, state_dtype=torch.bfloat16))
    x, y = batches(1, torch.bfloat16)[0]
    head(x, y).backward()
    assert head.fused_optimizer.state[head.weight]["exp_avg"].dtype == torch.bfloat16


def test_constructor_takes_an_optimizer_factory():
    head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", optimizer=lambda p: FusedSGD(p, lr=0.1))
    assert isinstance(head.fused_optimizer, FusedSGD)
    with pytest.raises(TypeError, match="optimizer must be"):
        mk.MarginHead(C, D, mk.ArcFace(), backend="torch", optimizer=torch.optim.SGD)
    other = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="this head's weight"):
        head.fuse(FusedSGD([other], lr=0.1))


def test_two_backwards_before_step_raise_naming_accumulation():
    head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", optimizer=lambda p: FusedSGD(p, lr=0.1))
    (x, y), (x2, y2) = batches(2, torch.float32)
    head(x, y).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        head(x2, y2).backward()


def test_bad_options_raise_naming_them():
    w = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="momentum"):
        FusedSGD(w, lr=0.1, momentum=-1)
    with pytest.raises(ValueError, match="nesterov"):
        FusedSGD(w, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW(w, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="state_dtype"):
        FusedAdamW(w, lr=0.1, state_dtype=torch.int32)


def test_compile_is_refused_in_fused_mode():
    head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", optimizer=lambda p: FusedSGD(p, lr=0.1))
    x, y = batches(1, torch.float32)[0]
    compiled = torch.compile(head, fullgraph=True)
    with pytest.raises(Exception, match="fused optimizer cannot run under torch.compile"):
        compiled(x, y)


@pytest.mark.slow
def test_bench_optimizer_step_runs_both_modes(tmp_path):
    """python -m bench optimizer-step (small): both modes report; unfused holds a dW (about W) that fused does not
    (fused: a few MiB of chunk buffers and allocator slack, not proportional to W)."""
    import json

    from bench import optimizer_step
    out = tmp_path / "rows.json"
    assert optimizer_step.main(["-C", "4e5", "-d", "32", "-B", "32", "--steps", "2", "--backend", "torch",
                                "--json", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fused", "unfused"}
    for row in rows.values():
        assert row["state_bytes"] == row["weight_bytes"] and row["seconds_per_step"] > 0
    if rows["fused"]["workspace_bytes"] is not None:  # Linux /proc: the resident-set numbers
        assert rows["unfused"]["workspace_bytes"] > 0.8 * rows["unfused"]["weight_bytes"]
        assert rows["fused"]["workspace_bytes"] < 0.5 * rows["unfused"]["weight_bytes"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("sampled", [False, True])
def test_unfused_backward_accumulates_into_existing_grad_in_place(backend, sampled):
    """Without a fused optimizer, a second backward adds into weight.grad in place (same buffer), equal to the
    sum of the two reference gradients; torch.autograd.grad(loss, w) with a .grad present still returns dW
    and leaves .grad alone."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, D, generator=g, dtype=torch.float64)
    w = torch.randn(40, D, generator=g, dtype=torch.float64).requires_grad_(True)
    index = torch.tensor([0, 3, 5, 7, 9, 11, 20, 30]) if sampled else None
    y = torch.randint(0, 8 if sampled else 40, (8,), generator=g)
    loss = lambda feats, weight, name: mk.margin_cross_entropy(  # noqa: E731
        feats, weight, y, mk.ArcFace(), backend=name, class_index=index)
    loss(x, w, backend).backward()
    buffer = w.grad.data_ptr()
    loss(2 * x, w, backend).backward()
    ref = w.detach().clone().requires_grad_(True)
    loss(x, ref, "reference").backward()
    loss(2 * x, ref, "reference").backward()
    assert w.grad.data_ptr() == buffer
    assert ((w.grad - ref.grad).norm() / ref.grad.norm()).item() <= FUSED_TRAJECTORY[torch.float64][0]
    before = w.grad.clone()
    (dw,) = torch.autograd.grad(loss(x, w, backend), w)
    assert torch.equal(w.grad, before)
    single = w.detach().clone().requires_grad_(True)
    loss(x, single, "reference").backward()
    assert ((dw - single.grad).norm() / single.grad.norm()).item() <= FUSED_TRAJECTORY[torch.float64][0]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_fused_step_with_a_memory_budget_is_the_same(backend):
    """memory_budget= and a fused optimizer together: the backward reads the kept tiles and hands each chunk to
    the update sink; the weights after 3 steps equal those of the recomputing fused head bitwise."""
    from margin_kernels.backends import unavailable_reason
    if unavailable_reason(backend) is not None:
        pytest.skip(f"the {backend!r} backend cannot run here: {unavailable_reason(backend)}")
    if backend == "triton":
        from margin_kernels.backends import triton_backend
        if not triton_backend.interpret_mode():
            pytest.skip("Triton runs compiled on this GPU machine (CUDA tensors only); this CPU-tensor case runs "
                        "in its interpreter on machines without a GPU")
    weights = []
    for budget in (None, 10 ** 9):
        head = mk.MarginHead(C, D, mk.ArcFace(), backend=backend, dtype=torch.float32, chunk_size=CHUNK,
                             memory_budget=budget, seed=3)
        torch.manual_seed(0)
        torch.nn.init.normal_(head.weight, std=0.05)
        opt = FusedSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        head.fuse(opt)
        for x, y in batches(2 if backend == "triton" else 3, torch.float32):  # the interpreter is slow
            head(x, y).backward()
            opt.step()
        weights.append(head.weight.detach().clone())
    assert torch.equal(*weights)
