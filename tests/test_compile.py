"""torch.compile(fullgraph=True) sees the fused loss as a custom op: no graph break, and the same loss, the same
gradients and the same loss state as eager, for every CPU-capable backend (backend="auto" resolves at trace
time to a constant) under both the inductor and the aot_eager compilers, for the functional
``margin_cross_entropy`` and for ``MarginHead``.

Each case compiles once (a few seconds each); the functional case runs two steps of CurricularFace, whose
buffer (the running t) must match eager after both, and the second step runs with the updated state.
Tolerance: tests/tolerances.COMPILE_VS_EAGER (1e-5, fp32: the same kernels run in both)."""
import pytest
import torch

import margin_kernels as mk
from margin_kernels.backends import unavailable_reason
from tests.helpers import head_eager_and_compiled, loss_and_grads, random_problem, rel_err
from tests.tolerances import COMPILE_VS_EAGER

torch._dynamo.config.cache_size_limit = 64

BACKENDS = ["auto", "cpu", "torch", "triton"]
COMPILERS = ["inductor", "aot_eager"]


def _skip_unless_available(backend):
    reason = None if backend == "auto" else unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"the {backend!r} backend cannot run here: {reason}")


def _assert_same(comp, eager):
    loss_err = (comp[0].double() - eager[0].double()).abs().max().item() / max(1.0, eager[0].abs().max().item())
    assert loss_err <= COMPILE_VS_EAGER, f"loss {loss_err:.2e}"
    assert rel_err(comp[1], eager[1]) <= COMPILE_VS_EAGER, "dx"
    assert rel_err(comp[2], eager[2]) <= COMPILE_VS_EAGER, "dW"


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_functional_matches_eager_with_state(backend, compiler):
    _skip_unless_available(backend)
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32, ignore_rows=(1,))
    eager_margin, compiled_margin = mk.CurricularFace(), mk.CurricularFace()
    t0 = eager_margin.t.clone()

    def step(margin):
        def fn(a, b):
            return mk.margin_cross_entropy(a, b, labels, margin, backend=backend, chunk_size=16)
        return fn

    compiled = torch.compile(step(compiled_margin), fullgraph=True, backend=compiler)
    for _ in range(2):  # the second call runs with updated state
        eager = loss_and_grads(step(eager_margin), x, w)
        comp = loss_and_grads(compiled, x, w)
        _assert_same(comp, eager)
    assert not torch.equal(eager_margin.t, t0)  # the state did move, so matching it means something
    eager_buffers = dict(eager_margin.named_buffers())
    for name, buf in compiled_margin.named_buffers():
        assert torch.allclose(buf, eager_buffers[name], rtol=COMPILE_VS_EAGER, atol=0.0), name


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_head_matches_eager(backend, compiler):
    """The whole head (MagFace: feature norms and a regulariser around the op), fullgraph."""
    _skip_unless_available(backend)
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32, ignore_rows=(2,))
    head = mk.MarginHead(40, 16, mk.MagFace(), backend=backend)
    with torch.no_grad():
        head.weight.copy_(w)

    eager, compiled = head_eager_and_compiled(head, x, labels, compiler)
    assert eager[1].abs().sum() > 0 and eager[2].abs().sum() > 0
    _assert_same(compiled, eager)


@pytest.mark.parametrize("name", ["adacos", "adacos_lagged", "npcface"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_compiled_statistics_losses_match_eager(backend, name):
    """Losses with a statistics pass or a post-forward state update (AdaCos' tensor scale, NPCFace's hard
    negatives) trace fullgraph: the scale never becomes a Python float. Two steps, the state compared."""
    from tests.helpers import make_loss
    _skip_unless_available(backend)
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32, ignore_rows=(1,))
    eager_margin, compiled_margin = make_loss(name), make_loss(name)

    def step(margin):
        def fn(a, b):
            return mk.margin_cross_entropy(a, b, labels, margin, backend=backend, chunk_size=16)
        return fn

    compiled = torch.compile(step(compiled_margin), fullgraph=True, backend="aot_eager")
    for _ in range(2):
        _assert_same(loss_and_grads(compiled, x, w), loss_and_grads(step(eager_margin), x, w))
    eager_buffers = dict(eager_margin.named_buffers())
    for buf_name, buf in compiled_margin.named_buffers():
        assert torch.allclose(buf, eager_buffers[buf_name], rtol=COMPILE_VS_EAGER, atol=0.0), buf_name


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_compiled_elastic_with_explicit_margins_matches_eager(plus):
    """ElasticFace's margins passed in (``margins=``) trace fullgraph, the "+" ranking included. (Its own draws
    do not: a torch.Generator cannot be created inside a graph; docs/losses.md.)"""
    _skip_unless_available("cpu")
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32, ignore_rows=(1,))
    margin = mk.ElasticArcFace(plus=plus, margins=torch.linspace(0.2, 0.8, 8))

    def fn(a, b):
        return mk.margin_cross_entropy(a, b, labels, margin, backend="cpu", chunk_size=16)

    _assert_same(loss_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, w), loss_and_grads(fn, x, w))


def _partial_fc_head():
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32)
    head = mk.MarginHead(40, 16, mk.ArcFace(), sample_rate=0.5, backend="torch", seed=3)
    with torch.no_grad():
        head.weight.copy_(w)
    return head, x, labels


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiled_partial_fc_head_refuses_with_what_to_do(compiler):
    """Issue 25 point 8: fullgraph on a sampling head (training mode) once failed deep in dynamo on the
    sampler's data-dependent branch; now it raises the sampler's reason and the ways around it."""
    head, x, labels = _partial_fc_head()
    compiled = torch.compile(head, fullgraph=True, backend=compiler)
    with pytest.raises(Exception, match="Partial FC .* cannot run inside torch.compile") as info:
        compiled(x, labels)
    assert "sample_rate=1.0" in str(info.value) and "torch.compile(backbone)" in str(info.value)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_partial_fc_head_without_fullgraph_matches_eager(compiler):
    """The ways the refusal names work: without fullgraph the sampler runs eagerly between graphs, with the
    same draws (the same generator state) as an eager twin; in eval mode (no sampling) fullgraph traces."""
    head, x, labels = _partial_fc_head()
    twin = mk.MarginHead(40, 16, mk.ArcFace(), sample_rate=0.5, backend="torch", seed=3)
    twin.load_state_dict(head.state_dict())
    compiled = torch.compile(head, backend=compiler)

    def run(module, weight):
        a = x.clone().requires_grad_(True)
        loss = module(a, labels)
        return (loss.detach(), *torch.autograd.grad(loss, [a, weight]))

    for _ in range(2):  # two steps: the generators advance alike
        eager, comp = run(twin, twin.weight), run(compiled, head.weight)
        assert torch.equal(head.sampled_classes, twin.sampled_classes)
        _assert_same(comp, eager)
    head.eval()
    twin.eval()
    evaluated = torch.compile(head, fullgraph=True, backend=compiler)(x, labels)
    assert torch.allclose(evaluated, twin(x, labels), rtol=COMPILE_VS_EAGER, atol=0.0)
