"""Bad input gets a clear exception naming the argument; edge cases get a defined, documented result."""
import pytest
import torch

import margin_kernels as mk
from tests.helpers import loss_and_grads, random_problem, rel_err
from tests.tolerances import FP32_LOSS, FP64_END_TO_END

X, W, Y = random_problem(6, 20, 12, dtype=torch.float32)


def call(features=X, weight=W, labels=Y, margin=None, **kw):
    return mk.margin_cross_entropy(features, weight, labels, margin or mk.ArcFace(), **kw)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("kwargs, exc, needle", [
    (dict(features=X[0]), ValueError, "features must be 2-D"),
    (dict(weight=W[0]), ValueError, "weight must be 2-D"),
    (dict(weight=W[:, :5]), ValueError, "embedding_dim"),
    (dict(weight=W.double()), TypeError, "weight dtype"),
    (dict(features=X.long(), weight=W.long()), TypeError, "features must be a floating"),
    (dict(labels=Y.float()), TypeError, "labels must be an integer"),
    (dict(labels=Y.bool()), TypeError, "labels must be an integer"),
    (dict(labels=Y[:3]), ValueError, "labels must have shape"),
    (dict(labels=Y.view(2, 3)), ValueError, "labels must have shape"),
    (dict(labels=torch.tensor([0, 1, 2, 20, 4, 5])), ValueError, "labels must be in [0, 20)"),
    (dict(labels=torch.tensor([0, 1, -2, 3, 4, 5])), ValueError, "found -2"),
    (dict(features=X.clone().index_fill_(0, torch.tensor([2]), float("nan"))), ValueError, "features contain NaN"),
    (dict(features=X.clone().index_fill_(0, torch.tensor([1]), float("inf"))), ValueError, "features contain NaN"),
    (dict(margin="arcface"), TypeError, "margin must be"),
    (dict(features=X.numpy()), TypeError, "features must be a torch.Tensor"),
    (dict(reduction="avg"), ValueError, "reduction must be"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(ignore_index=None), TypeError, "ignore_index"),
    (dict(weight=W[:0]), ValueError, "at least one class"),
    (dict(class_index=torch.tensor([1, 1, 2])), ValueError, "duplicates"),
    (dict(class_index=torch.tensor([0, 25])), ValueError, "class_index values"),
    (dict(class_index=torch.tensor([0.5])), TypeError, "class_index must be int"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, 5]), class_index=torch.tensor([0, 1, 2])), ValueError,
     "len(class_index)"),
    (dict(grad_filter=1.5), ValueError, "grad_filter"),
])
def test_bad_input_names_the_argument(backend, kwargs, exc, needle):
    with pytest.raises(exc) as info:
        call(backend=backend, **kwargs)
    assert needle in str(info.value)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="fast")


def test_device_mismatch_is_rejected():
    meta = torch.empty(20, 12, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        call(weight=meta)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_batch_gives_zero_loss_and_zero_gradients(backend):
    x, w = X[:0].clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(x, w, Y[:0], mk.ArcFace(), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert w.grad is not None and (w.grad == 0).all()
    assert mk.margin_cross_entropy(X[:0], W, Y[:0], mk.ArcFace(), reduction="none").shape == (0,)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(backend):
    labels = torch.full((6,), -1)
    loss, dx, dw = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.CurricularFace(),
                                                                       backend=backend), X, W)
    assert loss.item() == 0.0 and (dx == 0).all() and (dw == 0).all()


def test_custom_ignore_index():
    labels = Y.clone()
    labels[1] = -100
    a = mk.margin_cross_entropy(X, W, labels, mk.CosFace(), ignore_index=-100, backend="torch")
    keep = torch.arange(6) != 1
    b = mk.margin_cross_entropy(X[keep], W, Y[keep], mk.CosFace(), backend="torch")
    assert abs(a.item() - b.item()) < FP32_LOSS


@pytest.mark.parametrize("name", ["arcface", "sphereface", "lsoftmax", "magface"])
def test_zero_feature_and_weight_rows_are_defined(name):
    """A zero row normalises to a zero row (as F.normalize); the loss stays finite and matches the reference."""
    from tests.helpers import make_loss
    x, w, labels = random_problem(6, 20, 12, seed=9)
    x[2] = 0.0
    w[labels[4]] = 0.0
    w[7] = 0.0
    fused = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, make_loss(name), backend="torch",
                                                                chunk_size=6), x, w)
    ref = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, make_loss(name), backend="reference"),
                         x, w)
    assert all(torch.isfinite(t).all() for t in fused)
    assert abs(fused[0].item() - ref[0].item()) < FP64_END_TO_END
    assert rel_err(fused[1], ref[1]) < FP64_END_TO_END and rel_err(fused[2], ref[2]) < FP64_END_TO_END


def test_bad_loss_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="s must be"):
        mk.ArcFace(s=-1)
    with pytest.raises(ValueError, match="m must be"):
        mk.CosFace(m=float("nan"))
    with pytest.raises(ValueError, match="m must be an integer"):
        mk.SphereFace(m=2.5)
    with pytest.raises(ValueError, match="variant"):
        mk.MVSoftmax(variant="x")
    with pytest.raises(ValueError, match="u_a must be greater"):
        mk.MagFace(l_a=10, u_a=5)
