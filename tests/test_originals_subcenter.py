"""SubCenterArcFace against transcriptions of pytorch-metric-learning's and insightface's code
(tests/originals_subcenter.py): value, dx and dW on random problems, the weights after several SGD steps
(the loss has no buffers: its state is the weight), and PML's outlier utility."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels.subcenters import dominant_sub_centers
from tests import originals_subcenter as orig
from tests.helpers import loss_and_grads, random_problem, rel_err
from tests.tolerances import ORIGINALS_GRAD, ORIGINALS_LOSS

B, C, D, K = 10, 13, 24, 3
PML_MARGIN_DEGREES = 28.6  # PML's default; ours is the same margin in radians


def pml_module(weight: torch.Tensor, sub_centers: int = K) -> orig.PMLSubCenterArcFaceLoss:
    """PML's loss holding ``weight`` (C K, d) in its own layout, W = weight^T (d, C K)."""
    module = orig.PMLSubCenterArcFaceLoss(weight.shape[0] // sub_centers, weight.shape[1],
                                          margin=PML_MARGIN_DEGREES, sub_centers=sub_centers).double()
    with torch.no_grad():
        module.W.copy_(weight.t())
    return module


def ours(mode="pml", sub_centers=K):
    return mk.SubCenterArcFace(s=64.0, m=math.radians(PML_MARGIN_DEGREES) if mode == "pml" else 0.5,
                               sub_centers=sub_centers, mode=mode)


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
@pytest.mark.parametrize("sub_centers", [K, 1, 4])
def test_matches_pml_loss_and_gradients(backend, sub_centers):
    x, w, labels = random_problem(B, C, D, seed=11, sub_centers=sub_centers)
    margin = ours(sub_centers=sub_centers)
    got = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, margin, backend=backend,
                                                              chunk_size=4), x, w)

    xa = x.clone().requires_grad_(True)
    module = pml_module(w, sub_centers)
    loss = module(xa, labels)
    loss.backward()
    assert abs(got[0].item() - loss.item()) < ORIGINALS_LOSS * max(1.0, abs(loss.item()))
    assert rel_err(got[1], xa.grad) < ORIGINALS_GRAD
    assert rel_err(got[2], module.W.grad.t()) < ORIGINALS_GRAD


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_insightface_loss_and_gradients(backend):
    x, w, labels = random_problem(B, C, D, seed=12, sub_centers=K)
    margin = ours("insightface")
    got = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, margin, backend=backend,
                                                              chunk_size=5), x, w)
    theirs = loss_and_grads(lambda a, b: orig.insightface_subcenter(a, b, labels, C, loss_K=K), x, w)
    assert abs(got[0].item() - theirs[0].item()) < ORIGINALS_LOSS * max(1.0, abs(theirs[0].item()))
    assert rel_err(got[1], theirs[1]) < ORIGINALS_GRAD and rel_err(got[2], theirs[2]) < ORIGINALS_GRAD


def test_weights_after_sgd_steps_match_pml():
    """A MarginHead with SGD + momentum and PML's module with the same optimizer, five steps on fresh batches:
    the losses and the whole weight (every sub-center, winners and losers) stay together."""
    _, w0, _ = random_problem(B, C, D, seed=13, sub_centers=K)
    head = mk.MarginHead(C, D, ours(), backend="torch", dtype=torch.float64, chunk_size=4)
    assert head.weight.shape == (C * K, D)
    with torch.no_grad():
        head.weight.copy_(w0)
    module = pml_module(w0)
    opt_ours = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    opt_theirs = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9)
    for step in range(5):
        x, _, labels = random_problem(B, C, D, seed=100 + step, sub_centers=K)
        for opt, fn in ((opt_ours, lambda: head(x, labels)), (opt_theirs, lambda: module(x, labels))):
            opt.zero_grad()
            loss = fn()
            loss.backward()
            opt.step()
            if opt is opt_ours:
                loss_ours = loss.item()
        assert abs(loss_ours - loss.item()) < ORIGINALS_LOSS * max(1.0, abs(loss.item())), f"step {step}"
    moved = (head.weight.detach() - w0).norm(dim=1) > 0
    assert moved.all(), "every sub-center row is a negative of some row, so every row moves"
    assert rel_err(head.weight.detach(), module.W.detach().t()) < ORIGINALS_LOSS


def test_dominant_sub_centers_match_pml_get_outliers():
    x, w, labels = random_problem(40, 6, D, seed=14, sub_centers=K)
    labels[labels == 5] = 4  # class 5 absent: its dominant row stays zero in both
    outliers, dominant = dominant_sub_centers(x, w, labels, K, threshold=75.0)
    pml_outliers, pml_dominant = pml_module(w).get_outliers(x, labels, threshold=75)
    assert torch.equal(outliers, pml_outliers)
    assert torch.equal(dominant, pml_dominant.t())
    assert 0 < outliers.numel() < 40, "the problem must have some outliers and some inliers"
