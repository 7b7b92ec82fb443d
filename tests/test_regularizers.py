"""Center loss, its Center-invariant term and Ring loss as head regularisers (margin_kernels.regularizers), one
process: against the float64 reference head plus transcriptions of the authors' code (tests/originals_center.py):
loss, gradients to features / weight / centers / radius, and the centers over several training steps."""
import pytest
import torch

import margin_kernels as mk
from margin_kernels import reference
from margin_kernels.regularizers import CenterLoss, RingLoss
from tests import originals_center as orig
from tests.helpers import random_problem, rel_err
from tests.tolerances import FP64_SAME_SUMS, FP64_SHORT_SUM, REGULARIZER_TOLERANCES

B, C, D = 10, 23, 12
BACKENDS = ["reference", "torch"] + (["cpu"] if mk.available_backends()["cpu"] is None else [])


def make_head(w, regularizers, backend="torch", margin=None):
    head = mk.MarginHead(w.shape[0], w.shape[1], margin or mk.ArcFace(), dtype=w.dtype, backend=backend,
                         regularizers=regularizers)
    with torch.no_grad():
        head.weight.copy_(w)
    return head


def head_step(head, x, y, **kwargs):
    """(loss, dx, dW) of one call; the regularisers' parameter gradients stay on them."""
    x = x.detach().clone().requires_grad_(True)
    head.weight.grad = None
    loss = head(x, y, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad.clone()


def reference_step(x, w, y, extra, margin=None, leaves=()):
    """float64 reference head loss + ``extra(x_leaf)`` (a transcription), and gradients to x, w, ``leaves``."""
    xr, wr = x.detach().double().clone().requires_grad_(True), w.detach().double().clone().requires_grad_(True)
    loss = reference.margin_cross_entropy(xr, wr, y, margin or mk.ArcFace()) + extra(xr)
    grads = torch.autograd.grad(loss, [xr, wr, *leaves])
    return loss.detach(), grads


def assert_close(out, ref, tol, what):
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def assert_loss(loss, ref, tol):
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item())), (loss.item(), ref.item())


TOL = REGULARIZER_TOLERANCES[torch.float64]


# ---- Center loss --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_center_loss_matches_pytorch_center_loss_and_reference(backend):
    """weight = 2 x pytorch-center-loss's weight_cent (its loss has no 1/2); gradients to x, W and centers."""
    x, w, y = random_problem(B, C, D, duplicate=True)
    weight_cent = 0.01
    head = make_head(w, [CenterLoss(2 * weight_cent, update="gradient", init_std=1.0)], backend)
    centers = head.regularizers[0].centers
    c0 = centers.detach().clone().requires_grad_(True)
    loss, dx, dw = head_step(head, x, y)
    ref_loss, (ref_dx, ref_dw, ref_dc) = reference_step(
        x, w, y, lambda xr: weight_cent * orig.kaiyang_center_loss(xr, c0, y), leaves=[c0])
    # the original's clamp adds 1e-12 for each of the B (C - 1) masked-out entries, / B
    assert_loss(loss, ref_loss - weight_cent * (C - 1) * 1e-12, TOL.loss)
    assert_close(dx, ref_dx, TOL.dx, "dx")
    assert_close(dw, ref_dw, TOL.dw, "dW")
    assert_close(centers.grad, ref_dc, TOL.dw, "d centers")
    assert centers.grad[torch.isin(torch.arange(C), y, invert=True)].abs().max() == 0


def test_alpha_rule_over_steps_matches_caffe_face():
    """Three training steps: loss and dx from caffe-face's layer (loss_weight lambda), centers after each step
    from its alpha update; an eval call leaves the centers alone."""
    lam, alpha = 0.05, 0.5
    _, w, _ = random_problem(B, C, D)
    head = make_head(w, [CenterLoss(lam, alpha=alpha, init_std=1.0)])
    centers = head.regularizers[0].centers
    assert not centers.requires_grad
    expected = centers.detach().clone()
    for step in range(3):
        x, _, y = random_problem(B, C, D, seed=10 + step, duplicate=step == 1)
        caffe_loss, caffe_dx, caffe_center_diff = orig.caffe_face_forward_backward(x, expected, y)
        loss, dx, dw = head_step(head, x, y)
        ref_loss, (ref_dx, ref_dw) = reference_step(x, w, y, lambda xr: 0 * xr.sum())
        assert_loss(loss, ref_loss + lam * caffe_loss, TOL.loss)
        assert_close(dx, ref_dx + lam * caffe_dx, TOL.dx, "dx")
        assert_close(dw, ref_dw, TOL.dw, "dW")
        expected = orig.caffe_face_alpha_steps([x], expected, [y], alpha)[0]
        assert_close(centers, expected, TOL.dw, f"centers after step {step + 1}")
    head.eval()
    before = centers.detach().clone()
    head_step(head, x, y)
    assert torch.equal(centers, before)


def test_gradient_rule_with_sgd_matches_pytorch_center_loss_training():
    """The optimizer route: SGD(lr_cent / weight_cent) on the centers' exact gradient is the original's
    separate SGD(lr_cent) on gradients divided by weight_cent, over several steps."""
    weight_cent, lr_cent = 0.02, 0.5
    _, w, _ = random_problem(B, C, D)
    head = make_head(w, [CenterLoss(2 * weight_cent, update="gradient", init_std=1.0)])
    centers = head.regularizers[0].centers
    optimizer = torch.optim.SGD([centers], lr=lr_cent / weight_cent)
    expected = centers.detach().clone()
    for step in range(3):
        x, _, y = random_problem(B, C, D, seed=20 + step, duplicate=True)
        optimizer.zero_grad()
        head_step(head, x, y)
        optimizer.step()
        _, expected = orig.kaiyang_train_step(x, expected, y, weight_cent, lr_cent)
        assert_close(centers, expected, TOL.dw, f"centers after step {step + 1}")


def test_center_invariant_term_matches_wu_et_al():
    """Center term off (weight 0): the loss is the reference's plus lambda_I x the layer's, the centers'
    gradient lambda_I x its gradient (only the batch's classes get one)."""
    lam_i = 0.3
    x, w, y = random_problem(B, C, D, duplicate=True)
    head = make_head(w, [CenterLoss(0.0, update="gradient", invariant_weight=lam_i, init_std=1.0)])
    centers = head.regularizers[0].centers
    wu_loss, wu_grad = orig.wu_center_invariant(centers.detach(), y)
    loss, dx, _ = head_step(head, x, y)
    ref_loss, (ref_dx, _) = reference_step(x, w, y, lambda xr: 0 * xr.sum())
    assert_loss(loss, ref_loss + lam_i * wu_loss, TOL.loss)
    assert_close(dx, ref_dx, TOL.dx, "dx (the invariant term has no feature gradient)")
    assert_close(centers.grad, lam_i * wu_grad, TOL.dw, "d centers")


def test_center_loss_ignores_rows_and_follows_the_callers_class_index():
    """Ignored rows contribute nothing and 'mean' divides by the valid rows; with a caller's class_index the
    labels index into it and the center is that of the indexed class."""
    lam = 0.1
    x, w, y = random_problem(B, C, D, ignore_rows=(2, 5))
    head = make_head(w, [CenterLoss(lam, alpha=0.0, init_std=1.0)])
    centers = head.regularizers[0].centers.detach().clone()
    valid = y >= 0
    loss, dx, _ = head_step(head, x, y)
    caffe_loss, caffe_dx, _ = orig.caffe_face_forward_backward(x[valid], centers, y[valid])
    ref_loss, (ref_dx, _) = reference_step(x, w, y, lambda xr: 0 * xr.sum())
    assert_loss(loss, ref_loss + lam * caffe_loss, TOL.loss)
    expected_dx = ref_dx.clone()
    expected_dx[valid] += lam * caffe_dx
    assert_close(dx, expected_dx, TOL.dx, "dx")

    class_index = torch.randperm(C, generator=torch.Generator().manual_seed(3))[:15]
    positions = torch.randint(0, 15, (B,), generator=torch.Generator().manual_seed(4))
    loss = head(x, positions, class_index=class_index)
    expected = reference.margin_cross_entropy(x, w, positions, mk.ArcFace(), class_index=class_index) + \
        lam * orig.caffe_face_forward_backward(x, centers, class_index[positions])[0]
    assert_loss(loss.detach(), expected, TOL.loss)


def test_low_precision_centers_are_updated_from_fp32_sums():
    """bf16 centers, every row of the batch in one class: the alpha update sums the B differences in fp32 and
    rounds once, so the result is the float64 update of the same bf16 values rounded to bf16."""
    lam, alpha = 0.05, 0.5
    x, w, y = random_problem(64, C, D, dtype=torch.bfloat16)
    y[:] = 7
    head = make_head(w, [CenterLoss(lam, alpha=alpha, init_std=1.0)])
    centers = head.regularizers[0].centers
    assert centers.dtype == torch.bfloat16
    expected = orig.caffe_face_alpha_steps([x.double()], centers.detach().double(), [y], alpha)[0]
    head(x, y)
    ulp = 2.0 ** -7  # one bf16 step relative to the value, at most one rounding apart
    assert torch.equal(centers[torch.arange(C) != 7], expected[torch.arange(C) != 7].to(torch.bfloat16))
    assert ((centers[7].double() - expected[7]).abs() <= ulp * expected[7].abs()).all()


# ---- Ring loss ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["l2", "auto", "l1"])
def test_ring_loss_matches_the_authors_code(variant):
    """The first call sets R to the batch's mean norm (as the original's radius of -1); the second, with the
    radius trained away from it, checks the gradients to x and R. loss_weight of the code = weight / 2."""
    lam = 0.02 if variant != "auto" else 1.0
    x, w, y = random_problem(B, C, D, seed=1)
    head = make_head(w, [RingLoss(lam, variant=variant)])
    ring = head.regularizers[0]
    head_step(head, x, y)
    assert ring.radius.item() == pytest.approx(x.norm(dim=1).mean().item(), rel=FP64_SHORT_SUM)
    with torch.no_grad():
        ring.radius.mul_(0.9)
    ring.radius.grad = None
    r0 = ring.radius.detach().clone().requires_grad_(True)
    x2 = x * torch.linspace(0.5, 1.5, B, dtype=x.dtype).unsqueeze(1)
    loss, dx, dw = head_step(head, x2, y)
    ref_loss, (ref_dx, ref_dw, ref_dr) = reference_step(
        x2, w, y, lambda xr: orig.paralysis_ring_loss(xr, r0, variant, lam / 2), leaves=[r0])
    assert_loss(loss, ref_loss, TOL.loss)
    assert_close(dx, ref_dx, TOL.dx, "dx")
    assert_close(dw, ref_dw, TOL.dw, "dW")
    assert_close(ring.radius.grad, ref_dr, TOL.dx, "dR")


def test_given_radius_is_kept_and_state_round_trips():
    x, w, y = random_problem(B, C, D)
    head = make_head(w, [RingLoss(0.01, radius=20.0), CenterLoss(0.1, init_std=1.0)])
    head(x, y)
    assert head.regularizers[0].radius.item() == 20.0
    state = head.state_dict()
    assert {"regularizers.0.radius", "regularizers.0.initialized", "regularizers.1.centers"} <= set(state)
    other = make_head(w, [RingLoss(0.01), CenterLoss(0.1)])
    other.load_state_dict(state)
    assert torch.equal(other.regularizers[1].centers, head.regularizers[1].centers)
    assert other(x, y).item() == pytest.approx(head(x, y).item(), rel=FP64_SAME_SUMS)


def test_regularizers_sum_with_sampling_and_reductions():
    """Partial FC sampling changes the cross-entropy's classes, not the regularisers' (they use the labels);
    'sum' and 'none' add the per-row terms the same way."""
    x, w, y = random_problem(B, C, D)
    for reduction in ("sum", "none"):
        plain = mk.MarginHead(C, D, mk.CosFace(), dtype=torch.float64, reduction=reduction, backend="torch")
        ring = mk.MarginHead(C, D, mk.CosFace(), dtype=torch.float64, reduction=reduction, backend="torch",
                             regularizers=[RingLoss(0.02, radius=30.0)])
        ring.load_state_dict(plain.state_dict(), strict=False)
        term = 0.01 * (x.norm(dim=1) - 30.0) ** 2
        expected = plain(x, y) + (term.sum() if reduction == "sum" else term)
        assert rel_err(ring(x, y).detach(), expected.detach()) <= TOL.loss
    head = mk.MarginHead(C, D, mk.ArcFace(), dtype=torch.float64, sample_rate=0.5, backend="torch",
                         regularizers=[CenterLoss(0.1, alpha=0.0, init_std=1.0)])
    with torch.no_grad():
        head.weight.copy_(w)
    twin = mk.MarginHead(C, D, mk.ArcFace(), dtype=torch.float64, sample_rate=0.5, backend="torch")
    with torch.no_grad():
        twin.weight.copy_(w)
    centers = head.regularizers[0].centers.detach()
    expected = twin(x, y) + 0.1 * orig.caffe_face_forward_backward(x, centers, y)[0]
    assert_loss(head(x, y).detach(), expected.detach(), TOL.loss)


# ---- arguments ----------------------------------------------------------------------------------------------
def test_bad_regularizer_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="weight"):
        CenterLoss(-1.0)
    with pytest.raises(ValueError, match="update"):
        CenterLoss(update="sgd")
    with pytest.raises(ValueError, match="invariant_weight"):
        CenterLoss(invariant_weight=0.1)  # needs update="gradient"
    with pytest.raises(ValueError, match="alpha"):
        CenterLoss(alpha=float("nan"))
    with pytest.raises(ValueError, match="variant"):
        RingLoss(variant="l3")
    with pytest.raises(ValueError, match="radius"):
        RingLoss(radius=-2.0)
    with pytest.raises(TypeError, match="regularizers"):
        mk.MarginHead(C, D, mk.ArcFace(), regularizers=["center"])
    used = CenterLoss()
    mk.MarginHead(C, D, mk.ArcFace(), regularizers=[used])
    with pytest.raises(ValueError, match="regularizers.*already used"):
        mk.MarginHead(C, D, mk.ArcFace(), regularizers=[used])
    ring = RingLoss()
    with pytest.raises(ValueError, match="twice"):
        mk.MarginHead(C, D, mk.ArcFace(), regularizers=[ring, ring])


# ---- torch.compile ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("update", ["alpha", "gradient"])
def test_compiled_regularized_head_matches_eager(update):
    """fullgraph (aot_eager): static shapes throughout (the class sums are a B x B product, no unique), so the
    head with both regularisers traces; two steps, the centers and radius in step with eager."""
    from tests.tolerances import COMPILE_VS_EAGER

    x, w, y = random_problem(B, C, D, dtype=torch.float32, duplicate=True)

    def make():
        return make_head(w, [CenterLoss(0.1, update=update, invariant_weight=0.1 if update == "gradient" else 0.0,
                                        init_std=1.0), RingLoss(0.01)])

    eager, compiled_head = make(), make()
    compiled = torch.compile(compiled_head, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        a, b = head_step(eager, x, y), head_step(compiled, x, y)
        assert abs(a[0].item() - b[0].item()) <= COMPILE_VS_EAGER * max(1.0, abs(a[0].item()))
        assert rel_err(b[1], a[1]) <= COMPILE_VS_EAGER and rel_err(b[2], a[2]) <= COMPILE_VS_EAGER
    for (name, p), (_, q) in zip(eager.regularizers.named_parameters(), compiled_head.regularizers.named_parameters()):
        assert rel_err(q, p) <= COMPILE_VS_EAGER, name
        if p.grad is not None:
            assert rel_err(q.grad, p.grad) <= COMPILE_VS_EAGER, name + ".grad"
