"""The fused optimizers (margin_kernels.optim): the head's weight after N steps equals torch.optim's applied to
the float64 reference's dense gradient, on every backend, dense and sparse; the training-loop protocol
(weight.grad stays None, step/zero_grad, LR schedulers, state_dict) and what cannot fuse."""
import copy

import pytest
import torch

import margin_kernels as mk
from margin_kernels.optim import FusedAdamW, FusedSGD
from tests.tolerances import LOW_PRECISION, fused_gradient_bound, update_bound

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


def reference_gradient(w, x, y, class_index, dtype=torch.float64):
    """The reference's dense dW at ``w`` (rows outside ``class_index`` are zero), computed in ``dtype``: float64
    (the ground truth) by default; in bf16 the reference on the very same bf16 tensors (fp32 math, dW rounded to
    bf16), the conformance suite's tight ``storage`` comparison."""
    w = w.detach().to(dtype, copy=True).requires_grad_(True)
    labels = y if class_index is None else torch.searchsorted(class_index, y)
    mk.margin_cross_entropy(x.to(dtype), w, labels, mk.ArcFace(), backend="reference",
                            class_index=class_index).backward()
    return w.grad


class TorchReference:
    """torch.optim stepping a copy of the weight (``sparse``: only the class set's rows, SGD with their momentum
    rows, AdamW as SparseAdam). The copy is float64 for float64 weights and fp32 otherwise (the fused update's
    math dtype); for bf16 weights it is rounded to bf16 after every step, as the fused update stores it.
    ``step(x, y, class_index)`` steps on ``gradient`` at the copy's own weight (a free-running trajectory);
    ``step_on(grad, class_index)`` on a given gradient."""

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
        self.step_on(self.gradient(self.w, x, y, class_index), class_index)

    def step_on(self, grad, class_index):
        grad = grad.to(self.w.dtype, copy=True)
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


class GradientRecorder:
    """The gradient each fused step applied, read where the head hands it to the optimizer
    (``FusedOptimizer.apply_rows``: a chunk's finished dW rows, then, in dense mode with a class subset, the
    rows no chunk visited with a zero gradient). ``grad``: the last backward's dense gradient (zero on rows never
    handed over). A row's first hand-over in a step is its gradient: the unvisited-row pass may step a whole
    block with zeros and put the visited rows back."""

    def __init__(self, optimizer, param):
        self.param, self.grad, self.seen = param, None, None
        apply_rows = optimizer.apply_rows

        def recording_apply_rows(p, group, state, step, rows, grad):
            if p is param:
                self._record(rows, grad)
            apply_rows(p, group, state, step, rows, grad)
        optimizer.apply_rows = recording_apply_rows

    def start(self):
        shape, dtype = self.param.shape, torch.float64 if self.param.dtype == torch.float64 else torch.float32
        self.grad = torch.zeros(shape, dtype=dtype)
        self.seen = torch.zeros(shape[0], dtype=torch.bool)

    def _record(self, rows, grad):
        rows = torch.arange(rows[0], rows[1]) if isinstance(rows, tuple) else rows
        new = ~self.seen[rows]
        self.grad[rows[new]] = grad[new].to(self.grad.dtype)  # before the update, which may overwrite grad
        self.seen[rows] = True


def relative(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def trajectory_errors(kind, options, *, backend="torch", dtype=torch.float64, sample_rate=1.0, sparse=False,
                      steps=20, scheduler=None, fused_options=None):
    """(gradient error, weight error) of N fused steps, the two things a fused step can get wrong, each against
    its own reference so that neither compounds through the other:

    * gradient: at every step, the gradient the fused update applied against the reference's dW at the same
      weight (the fused head's, before the step): max over steps of the relative L2 error;
    * weight: the fused head's weight after N steps against torch.optim stepping a copy on those same
      gradients (the recorded ones): the update's rounding only.

    Comparing instead with torch.optim stepping on the reference's gradient at its own weight (a free-running
    trajectory) feeds each step's rounding difference into the next step's gradient; with AdamW's normalised
    steps (lr = 1e-2 on weights of N(0, 0.01^2)) the difference grows ~1.3-2x per step, by a factor that
    depends on the trajectory and not on the fused code (tests/tolerances.py, above fused_gradient_bound)."""
    head = mk.MarginHead(C, D, mk.ArcFace(), backend=backend, dtype=dtype, chunk_size=CHUNK,
                         sample_rate=sample_rate, seed=3)
    ref = TorchReference(head.weight, kind, options, sparse, dtype)
    opt = make_fused(kind, head.parameters(), fused_options or options, sparse)
    head.fuse(opt)
    recorder = GradientRecorder(opt, head.weight)
    reference_dtype = dtype if dtype in LOW_PRECISION else torch.float64
    schedules = (scheduler(opt), scheduler(ref.opt)) if scheduler else ()
    gradient_error, weight_norms, step_norms = 0.0, [], []
    for x, y in batches(steps, dtype):
        before = head.weight.detach().clone()
        recorder.start()
        head(x, y).backward()
        assert head.weight.grad is None
        opt.step()
        opt.zero_grad()
        expected = reference_gradient(before, x, y, head.sampled_classes, reference_dtype)
        gradient_error = max(gradient_error, relative(recorder.grad, expected))
        previous = ref.w.detach().clone()
        ref.step_on(recorder.grad, head.sampled_classes)
        weight_norms.append(ref.w.detach().double().norm().item())
        step_norms.append((ref.w.detach() - previous).double().norm().item())
        for schedule in schedules:
            schedule.step()
    if schedules:
        assert opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"]
    final = weight_norms[-1]
    return gradient_error, relative(head.weight, ref.w), sum(weight_norms) / final, sum(step_norms) / final


def make_fused(kind, params, options, sparse, **extra):
    cls = FusedSGD if kind == "sgd" else FusedAdamW
    return cls(params, sparse=sparse, **options, **extra)


def trajectory_bounds(kind, options, dtype, steps, weight_path, step_path):
    """(gradient bound, weight bound) of a run of ``trajectory_errors`` (tests/tolerances.py)."""
    scale = mk.ArcFace().s
    return (fused_gradient_bound(dtype, scale, D, C, B),
            update_bound(kind, options, dtype, steps, weight_path, step_path))


def assert_trajectory(kind, options, *, dtype=torch.float64, steps=20, **run):
    """Both errors of ``trajectory_errors`` within their bounds."""
    gradient_error, weight_error, *path = trajectory_errors(kind, options, dtype=dtype, steps=steps, **run)
    gradient_bound, weight_bound = trajectory_bounds(kind, options, dtype, steps, *path)
    assert gradient_error <= gradient_bound, f"dW {gradient_error:.2e} > {gradient_bound:.1e}"
    assert weight_error <= weight_bound, f"weight {weight_error:.2e} > {weight_bound:.1e}"


@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
@pytest.mark.parametrize("case", list(SGD_CASES) + ["adamw"])
def test_dense_trajectory_float64(case, sample_rate):
    kind, options = ("adamw", ADAMW) if case == "adamw" else ("sgd", SGD_CASES[case])
    assert_trajectory(kind, options, sample_rate=sample_rate)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_sparse_trajectory_float64(kind):
    """sparse=True with Partial FC: only the sampled rows (and their state) move."""
    options = SGD_CASES["dampening_decay"] if kind == "sgd" else dict(ADAMW, weight_decay=0.0)
    assert_trajectory(kind, options, sample_rate=0.4, sparse=True)


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


@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fp32_trajectory(backend, kind, sample_rate):
    options = ADAMW if kind == "adamw" else SGD_CASES["nesterov_decay"]
    assert_trajectory(kind, options, backend=backend, dtype=torch.float32, sample_rate=sample_rate)


def test_cpu_backend_float64_trajectory():
    assert_trajectory("sgd", SGD_CASES["momentum"], backend="cpu", sample_rate=0.4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_bf16_weights_fp32_state(backend, kind):
    options = ADAMW if kind == "adamw" else SGD_CASES["momentum"]
    assert_trajectory(kind, options, backend=backend, dtype=torch.bfloat16, steps=5)


def test_triton_interpreter_trajectory():
    """The Triton backend's dW kernel writing into the chunk buffer of the sink (interpreter: 3 steps)."""
    assert_trajectory("sgd", SGD_CASES["nesterov_decay"], backend="triton", dtype=torch.float32, sample_rate=0.4,
                      steps=3)


@pytest.mark.parametrize("fault", ["lr", "bias_correction", "skipped_row"])
def test_a_wrong_update_fails_the_bound(monkeypatch, fault):
    """The bounds are tight enough to see an update that is almost right: lr 1% off, AdamW without its bias
    correction (from the first step), one weight row (and its state) left as it was in each step."""
    options = dict(ADAMW)
    fused_options = dict(ADAMW, lr=ADAMW["lr"] * 1.01) if fault == "lr" else None
    if fault == "bias_correction":
        from margin_kernels.optim import rules
        exact = rules.adamw_rows
        monkeypatch.setattr(rules, "adamw_rows", lambda *a, step, **k: exact(*a, step=10 ** 6, **k))
    if fault == "skipped_row":
        from margin_kernels.optim.fused import FusedOptimizer
        exact_rows = FusedOptimizer.apply_rows

        def skipping(self, param, group, state, step, rows, grad):
            if isinstance(rows, tuple) and rows[0] == 0:  # the first chunk: row 0 left as it was
                rows, grad = (1, rows[1]), grad[1:]
            exact_rows(self, param, group, state, step, rows, grad)
        monkeypatch.setattr(FusedOptimizer, "apply_rows", skipping)
    _, weight_error, *path = trajectory_errors("adamw", options, dtype=torch.float32, fused_options=fused_options)
    _, weight_bound = trajectory_bounds("adamw", options, torch.float32, 20, *path)
    assert weight_error > 100 * weight_bound


@pytest.mark.parametrize("schedule", ["polynomial", "onecycle"])
def test_lr_schedulers_drive_param_groups(schedule):
    def scheduler(opt):
        if schedule == "polynomial":
            return torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=12, power=2.0)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=12)
    assert_trajectory("sgd", SGD_CASES["momentum"], steps=12, scheduler=scheduler)
    assert_trajectory("adamw", ADAMW, steps=12, scheduler=scheduler)


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
    bound = fused_gradient_bound(torch.float64, mk.ArcFace().s, D, w.shape[0], x.shape[0])
    assert relative(w.grad, ref.grad) <= bound
    before = w.grad.clone()
    (dw,) = torch.autograd.grad(loss(x, w, backend), w)
    assert torch.equal(w.grad, before)
    single = w.detach().clone().requires_grad_(True)
    loss(x, single, "reference").backward()
    assert relative(dw, single.grad) <= bound


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
