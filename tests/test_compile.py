"""torch.compile sees the fused loss as a custom op: no graph break, same loss, same gradients, same state."""
import pytest
import torch

import margin_kernels as mk
from tests.helpers import loss_and_grads, random_problem, rel_err

torch._dynamo.config.cache_size_limit = 64


@pytest.mark.parametrize("factory", [lambda: mk.ArcFace(), lambda: mk.CurricularFace(), lambda: mk.MagFace()],
                         ids=["arcface", "curricularface", "magface"])
def test_compiled_loss_matches_eager(factory):
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32, ignore_rows=(1,))
    eager_margin, compiled_margin = factory(), factory()

    def step(margin):
        def fn(a, b):
            return mk.margin_cross_entropy(a, b, labels, margin, backend="torch", chunk_size=16)
        return fn

    compiled = torch.compile(step(compiled_margin), fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second call runs with updated state
        eager = loss_and_grads(step(eager_margin), x, w)
        comp = loss_and_grads(compiled, x, w)
        assert abs(eager[0].item() - comp[0].item()) < 1e-5
        assert rel_err(comp[1], eager[1]) < 1e-5 and rel_err(comp[2], eager[2]) < 1e-5
    for name, buf in eager_margin.named_buffers():
        assert torch.allclose(buf, dict(compiled_margin.named_buffers())[name])


def test_inductor_compiles_the_head():
    """The default backend (inductor) over the whole head, fullgraph: the custom op is opaque to it."""
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32)
    head = mk.MarginHead(40, 16, mk.CosFace(), backend="torch")
    with torch.no_grad():
        head.weight.copy_(w)
    eager = head(x, labels)
    eager.backward()
    eager_grad, head.weight.grad = head.weight.grad, None
    compiled = torch.compile(head, fullgraph=True)
    out = compiled(x, labels)
    assert abs(out.item() - eager.item()) < 1e-5
    out.backward()
    assert rel_err(head.weight.grad, eager_grad) < 1e-5
