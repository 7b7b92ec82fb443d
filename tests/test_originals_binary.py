"""SphereFace2 and UniFace against transcriptions of their authors' code (tests/originals_binary.py): loss,
gradients (features, class weights, the learnable bias) and the parameters after several SGD steps."""
import pytest
import torch

import margin_kernels as mk
from tests import originals_binary as originals
from tests.helpers import random_problem, rel_err
from tests.tolerances import ORIGINALS_FP32_PARAMETER, ORIGINALS_FP32_PARAMETER_GRAD, ORIGINALS_GRAD, ORIGINALS_LOSS

STEPS, LR = 4, 0.05


def _unit_rows(w):
    return w / w.norm(dim=1, keepdim=True)


def _tangent(dw, w):
    """dW without its component along each (unit) w_j: what survives opensphere's in-place re-normalisation."""
    return dw - (dw * w).sum(dim=1, keepdim=True) * w


SPHEREFACE2 = {
    "C": dict(magn_type="C"),
    "A": dict(magn_type="A"),
    "M": dict(magn_type="M", m=1.5),
    "C_exact": dict(magn_type="C", exact=True),
}


def _sphereface2_pair(case, num_class):
    kwargs = dict(SPHEREFACE2[case])
    exact = kwargs.pop("exact", False)
    ours = mk.SphereFace2(num_class=num_class, straight_through=not exact, **kwargs).double()
    theirs = lambda x, w, y, b: originals.opensphere_sphereface2(x, w, y, b, exact=exact, **kwargs)  # noqa: E731
    return ours, theirs


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", list(SPHEREFACE2))
def test_sphereface2_matches_opensphere_over_sgd_steps(case, backend):
    """Features and the bias trained by SGD for several steps on both sides (the class weights fixed at unit
    rows: opensphere re-normalises them every step, and its weight gradient has no normalisation Jacobian,
    so only its tangent part is comparable, checked at the first step)."""
    x0, w, labels = random_problem(10, 30, 24, seed=51)
    w = _unit_rows(w)
    margin, original = _sphereface2_pair(case, 30)
    b_theirs = margin.b.detach().clone().requires_grad_(True)
    x_ours, x_theirs = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    w_ours, w_theirs = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    opt_ours = torch.optim.SGD([x_ours, margin.b], lr=LR)
    opt_theirs = torch.optim.SGD([x_theirs, b_theirs], lr=LR)
    for step in range(STEPS):
        loss_ours = mk.margin_cross_entropy(x_ours, w_ours, labels, margin, backend=backend, chunk_size=7)
        loss_theirs = original(x_theirs, w_theirs, labels, b_theirs)
        loss_ours.backward()
        loss_theirs.backward()
        assert abs(loss_ours.item() - loss_theirs.item()) < ORIGINALS_LOSS * max(1.0, abs(loss_theirs.item()))
        assert rel_err(x_ours.grad, x_theirs.grad) < ORIGINALS_GRAD
        assert rel_err(margin.b.grad, b_theirs.grad) < ORIGINALS_FP32_PARAMETER_GRAD  # fp32 parameter
        if step == 0:
            assert rel_err(w_ours.grad, _tangent(w_theirs.grad, w)) < ORIGINALS_GRAD
        for opt in (opt_ours, opt_theirs):
            opt.step()
            opt.zero_grad()
        w_ours.grad = w_theirs.grad = None
    assert rel_err(x_ours, x_theirs) < ORIGINALS_GRAD
    assert abs(margin.b.item() - b_theirs.item()) < ORIGINALS_FP32_PARAMETER


@pytest.mark.parametrize("magn_type", ["C", "A", "M"])
def test_sphereface2_initial_bias_is_opensphere_formula(magn_type):
    import math
    alpha, r, m, t, num_class = 0.7, 40.0, (1.5 if magn_type == "M" else 0.4), 3.0, 1000
    z = alpha / ((1.0 - alpha) * (num_class - 1.0))
    if magn_type == "C":
        ay, ai = r * (2.0 * 0.5 ** t - 1.0 - m), r * (2.0 * 0.5 ** t - 1.0 + m)
    else:
        theta_y = min(math.pi, math.pi / 2.0 + m) if magn_type == "A" else min(math.pi, m * math.pi / 2.0)
        ay, ai = r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0), r * (2.0 * 0.5 ** t - 1.0)
    b = math.log(2.0 * z) - ai - math.log(1.0 - z + math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(ay - ai)))
    margin = mk.SphereFace2(magn_type=magn_type, m=m, num_class=num_class)
    assert margin.b.shape == (1,) and abs(margin.b.item() - b) < ORIGINALS_FP32_PARAMETER * abs(b)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("sampled", [False, True], ids=["all_classes", "partial_index"])
@pytest.mark.parametrize("s, bias", [(64.0, None), (16.0, 12.0)], ids=["default", "clamped"])
def test_uniface_matches_authors_code_over_sgd_steps(s, bias, sampled, backend):
    """Features, class weights and the unified threshold trained by SGD on both sides (the authors normalise
    the weights with autograd, so the weight gradient is the same); ``partial_index`` as the authors' loop
    draws it (the batch's classes kept, the rest sampled, sorted), the sampled negatives unweighted."""
    x0, w0, labels = random_problem(10, 30, 24, seed=61)
    margin = mk.UniFace(s=s, out_features=30, bias=bias).double()
    bias_theirs = margin.bias.detach().clone().requires_grad_(True)
    index, ours_labels = None, labels
    if sampled:
        perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
        perm[labels.unique()] = 0
        index = torch.topk(perm, k=18, largest=False)[1].sort()[0]
        ours_labels = torch.searchsorted(index, labels)
        assert torch.equal(index[ours_labels], labels)
    ours_p = [x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)]
    theirs_p = [x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)]
    opt_ours = torch.optim.SGD(ours_p + [margin.bias], lr=LR)
    opt_theirs = torch.optim.SGD(theirs_p + [bias_theirs], lr=LR)
    for _ in range(STEPS):
        loss_ours = mk.margin_cross_entropy(*ours_p, ours_labels, margin, backend=backend, chunk_size=7,
                                            class_index=index)
        loss_theirs = originals.uniface(*theirs_p, labels, bias_theirs, s=s, partial_index=index)
        loss_ours.backward()
        loss_theirs.backward()
        assert abs(loss_ours.item() - loss_theirs.item()) < ORIGINALS_LOSS * max(1.0, abs(loss_theirs.item()))
        for a, b in zip(ours_p, theirs_p):
            assert rel_err(a.grad, b.grad) < ORIGINALS_GRAD
        assert rel_err(margin.bias.grad, bias_theirs.grad) < ORIGINALS_FP32_PARAMETER_GRAD
        for opt in (opt_ours, opt_theirs):
            opt.step()
            opt.zero_grad()
    for a, b in zip(ours_p, theirs_p):
        assert rel_err(a, b) < ORIGINALS_GRAD
    assert abs(margin.bias.item() - bias_theirs.item()) < ORIGINALS_FP32_PARAMETER


def test_uniface_initial_bias_is_the_authors():
    import math
    bias = mk.UniFace(out_features=10572, r=0.5).bias.item()
    assert abs(bias - math.log(10572 * 0.5 * 10)) < ORIGINALS_FP32_PARAMETER
