"""MarginHead: initialisation, equivalence with the functional call, dtype handling under AMP."""
import torch

import margin_kernels as mk
from tests.helpers import loss_and_grads, random_problem, rel_err


def test_weight_initialisation_matches_insightface():
    torch.manual_seed(0)
    head = mk.MarginHead(20_000, 64, mk.ArcFace())
    assert head.weight.shape == (20_000, 64) and head.weight.dtype == torch.float32
    assert abs(head.weight.std().item() - 0.01) < 2e-4 and abs(head.weight.mean().item()) < 2e-4


def test_forward_equals_functional_call():
    x, w, labels = random_problem(8, 30, 16, dtype=torch.float32, ignore_rows=(2,))
    head = mk.MarginHead(30, 16, mk.CosFace(), backend="torch", dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(w)
    out = head(x, labels)
    ref = mk.margin_cross_entropy(x, w, labels, mk.CosFace(), backend="reference")
    assert abs(out.item() - ref.item()) < 1e-5


def test_low_precision_features_are_cast_to_the_weight_dtype():
    """Under AMP the backbone hands bf16 features to an fp32 head: they are upcast (B x d) and the feature
    gradient comes back in bf16."""
    x, w, labels = random_problem(8, 30, 16, dtype=torch.float32)
    head = mk.MarginHead(30, 16, mk.ArcFace(), backend="torch")
    with torch.no_grad():
        head.weight.copy_(w)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    loss = head(xb, labels)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16
    ref = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="reference"),
                         xb.detach().double(), w.double())
    assert abs(loss.item() - ref[0].item()) < 1e-4
    assert rel_err(head.weight.grad, ref[2]) < 1e-4
    assert rel_err(xb.grad, ref[1]) < 2e-2  # the gradient is rounded to bf16 on the way back
