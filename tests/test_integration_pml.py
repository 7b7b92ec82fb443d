"""margin_kernels.integrations.pml against transcriptions of pytorch-metric-learning's losses
(tests/originals_pml.py): loss and gradients in float64, 20-step SGD trajectories in float64 and float32, the
state dict and parameter layout pml uses, get_logits, and the arguments that are refused."""
from __future__ import annotations

import pytest
import torch

from margin_kernels.integrations import pml
from tests import originals_pml
from tests.helpers import rel_err
from tests.tolerances import FP32_LOSS, FP64_SAME_SUMS, INTEGRATION_GRAD, INTEGRATION_LOSS, TRAJECTORY_TOLERANCES

CLASSES, DIM, ROWS = 23, 12, 10
CASES = {
    "arcface": (lambda: pml.ArcFaceLoss(CLASSES, DIM, backend="torch", chunk_size=8), originals_pml.arcface),
    "arcface_m40_s30": (lambda: pml.ArcFaceLoss(CLASSES, DIM, margin=40.0, scale=30, backend="torch"),
                        lambda x, y, W: originals_pml.arcface(x, y, W, margin=40.0, scale=30)),
    "cosface": (lambda: pml.CosFaceLoss(CLASSES, DIM, backend="torch", chunk_size=8), originals_pml.cosface),
    "lsoftmax": (lambda: pml.LargeMarginSoftmaxLoss(CLASSES, DIM, backend="torch", chunk_size=8),
                 originals_pml.large_margin_softmax),
    "lsoftmax_m3_scale2": (lambda: pml.LargeMarginSoftmaxLoss(CLASSES, DIM, margin=3, scale=2.0, backend="torch"),
                           lambda x, y, W: originals_pml.large_margin_softmax(x, y, W, margin=3, scale=2.0)),
    "sphereface": (lambda: pml.SphereFaceLoss(CLASSES, DIM, backend="torch", chunk_size=8), originals_pml.sphereface),
    "sphereface_m2_scale3": (lambda: pml.SphereFaceLoss(CLASSES, DIM, margin=2, scale=3.0, backend="torch"),
                             lambda x, y, W: originals_pml.sphereface(x, y, W, margin=2, scale=3.0)),
    "normalized_softmax": (lambda: pml.NormalizedSoftmaxLoss(CLASSES, DIM, backend="torch", chunk_size=8),
                           originals_pml.normalized_softmax),
}


def data(step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    x = torch.randn(ROWS, DIM, generator=gen, dtype=dtype)
    return x, labels


def make(case, dtype):
    torch.manual_seed(7)
    loss_func = CASES[case][0]().to(dtype)
    return loss_func


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_pml(case):
    loss_func = make(case, torch.float64)
    x, labels = data(0, torch.float64)
    # some targets past theta + m = pi (the ArcFace fallback) and some close: pull rows toward +-W_y
    with torch.no_grad():
        direction = loss_func.W.t()[labels] / loss_func.W.t()[labels].norm(dim=1, keepdim=True)
        x += torch.linspace(-4, 3, ROWS, dtype=torch.float64).unsqueeze(1) * direction * x.norm(dim=1, keepdim=True)
    target_cos = torch.nn.functional.cosine_similarity(x, loss_func.W.t()[labels])
    assert (target_cos < -0.88).sum() >= 2 and (target_cos > 0.9).sum() >= 2  # ArcFace's fallback is reached
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    W = loss_func.W.detach().clone().requires_grad_(True)
    ours = loss_func(xa, labels)
    theirs = CASES[case][1](xb, labels, W)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= INTEGRATION_LOSS * max(1.0, abs(theirs.item()))
    assert rel_err(xa.grad, xb.grad) <= INTEGRATION_GRAD
    assert rel_err(loss_func.W.grad, W.grad) <= INTEGRATION_GRAD


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", ["arcface", "cosface", "lsoftmax", "sphereface", "normalized_softmax"])
def test_sgd_trajectory_matches_pml(case, dtype):
    """20 SGD steps on the embeddings' producer and W, ours and the transcription from the same start."""
    assert_same_trajectory(make(case, dtype), CASES[case][1], dtype)


def assert_same_trajectory(loss_func, theirs, dtype):
    """20 SGD steps (momentum 0.9) of a linear embedding net and W, ours against the transcription ``theirs``
    (called as ``theirs(embeddings, labels, W)``), from the same start: losses, net and W stay together."""
    W_theirs = torch.nn.Parameter(loss_func.W.detach().clone())
    torch.manual_seed(8)
    net_ours = torch.nn.Linear(DIM, DIM).to(dtype)
    net_theirs = torch.nn.Linear(DIM, DIM).to(dtype)
    net_theirs.load_state_dict(net_ours.state_dict())
    opt_ours = torch.optim.SGD(list(net_ours.parameters()) + list(loss_func.parameters()), lr=0.05, momentum=0.9)
    opt_theirs = torch.optim.SGD(list(net_theirs.parameters()) + [W_theirs], lr=0.05, momentum=0.9)
    losses = []
    for step in range(20):
        x, labels = data(step % 3, dtype)  # three batches in turn, so the loss can go down
        a = loss_func(net_ours(x), labels)
        b = theirs(net_theirs(x), labels, W_theirs)
        for opt, loss in ((opt_ours, a), (opt_theirs, b)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append((a.item(), b.item()))
    bound = TRAJECTORY_TOLERANCES[dtype]
    assert max(abs(p - q) / max(1.0, abs(q)) for p, q in losses) <= bound.loss
    assert rel_err(net_ours.weight.detach(), net_theirs.weight.detach()) <= bound.dx
    assert rel_err(loss_func.W.detach(), W_theirs.detach()) <= bound.dw
    assert losses[-1][1] < losses[0][1]  # it trained


def test_parameter_layout_and_state_dict_are_pmls():
    torch.manual_seed(0)
    loss_func = pml.LargeMarginSoftmaxLoss(CLASSES, DIM)
    torch.manual_seed(0)
    expected = torch.nn.init.normal_(torch.empty(DIM, CLASSES))  # pml's default weight_init_func
    assert list(loss_func.state_dict()) == ["W"] and torch.equal(loss_func.W, expected)
    uniform = pml.ArcFaceLoss(CLASSES, DIM, weight_init_func=torch.nn.init.zeros_)
    assert not uniform.W.any()
    restored = pml.SphereFaceLoss(CLASSES, DIM)
    restored.load_state_dict(loss_func.state_dict())
    assert torch.equal(restored.W, loss_func.W)


@pytest.mark.parametrize("case", ["arcface", "lsoftmax", "sphereface", "normalized_softmax"])
def test_get_logits_is_the_margin_free_logits(case):
    loss_func = make(case, torch.float64)
    x, _ = data(1, torch.float64)
    logits = loss_func.get_logits(x)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(loss_func.W.t()).t()
    expected = {"arcface": 64 * cos, "normalized_softmax": cos / 0.05, "sphereface": x.norm(dim=1, keepdim=True) * cos,
                "lsoftmax": x @ loss_func.W}[case]
    assert torch.allclose(logits, expected, rtol=FP64_SAME_SUMS, atol=FP64_SAME_SUMS)


def test_embeddings_under_autocast_are_cast_to_the_fp32_weight():
    loss_func = pml.CosFaceLoss(CLASSES, DIM, backend="torch")
    x, labels = data(2, torch.float32)
    bf16 = x.to(torch.bfloat16).requires_grad_(True)
    loss = loss_func(bf16, labels)
    loss.backward()
    assert loss_func.W.dtype == torch.float32 and loss_func.W.grad.dtype == torch.float32
    assert bf16.grad.dtype == torch.bfloat16 and torch.isfinite(bf16.grad.float()).all()
    reference = originals_pml.cosface(bf16.detach().float(), labels, loss_func.W.detach())
    assert abs(loss.item() - reference.item()) <= FP32_LOSS * reference.item()


@pytest.mark.parametrize("kwargs, word", [({"weight_regularizer": object()}, "weight_regularizer"),
                                          ({"embedding_regularizer": object()}, "embedding_regularizer"),
                                          ({"reducer": object()}, "reducer"), ({"distance": object()}, "distance")])
def test_unsupported_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        pml.ArcFaceLoss(CLASSES, DIM, **kwargs)


def test_unsupported_call_arguments_are_named():
    loss_func = pml.CosFaceLoss(CLASSES, DIM)
    x, labels = data(3, torch.float32)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_func(x, labels, indices_tuple=(labels, labels, labels))
    with pytest.raises(ValueError, match="labels"):
        loss_func(x)


# ---- SubCenterArcFaceLoss (the sub-center family landed after the adapters) ----------------------------------
def _pml_subcenter(sub_centers):
    from tests.originals_subcenter import PMLSubCenterArcFaceLoss

    def theirs(x, labels, W):
        module = PMLSubCenterArcFaceLoss(CLASSES, DIM, sub_centers=sub_centers)
        module.W = W  # the caller's parameter: its gradient is what the test compares
        return module(x, labels)
    return theirs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("sub_centers", [1, 3])
def test_sub_center_arcface_trajectory_matches_pml(sub_centers, dtype):
    """Loss and gradients at every step of 20 SGD steps, W of pml's shape (d, C K), against the transcription."""
    torch.manual_seed(7)
    loss_func = pml.SubCenterArcFaceLoss(CLASSES, DIM, sub_centers=sub_centers, backend="torch", chunk_size=8).to(dtype)
    assert tuple(loss_func.W.shape) == (DIM, CLASSES * sub_centers) and list(loss_func.state_dict()) == ["W"]
    assert_same_trajectory(loss_func, _pml_subcenter(sub_centers), dtype)


def test_sub_center_arcface_outliers_and_logits_are_pmls():
    from tests.originals_subcenter import PMLSubCenterArcFaceLoss
    torch.manual_seed(3)
    ours = pml.SubCenterArcFaceLoss(CLASSES, DIM, sub_centers=3).double()
    theirs = PMLSubCenterArcFaceLoss(CLASSES, DIM, sub_centers=3).double()
    theirs.W = torch.nn.Parameter(ours.W.detach().clone())
    x, labels = data(1, torch.float64)
    found, centers = ours.get_outliers(x, labels, threshold=60)
    expected, expected_centers = theirs.get_outliers(x, labels, threshold=60)
    assert torch.equal(torch.sort(found).values, torch.sort(expected).values)
    assert torch.equal(centers, expected_centers)
    assert torch.allclose(ours.get_logits(x), theirs.get_cosine(x) * 64, rtol=FP64_SAME_SUMS, atol=FP64_SAME_SUMS)
