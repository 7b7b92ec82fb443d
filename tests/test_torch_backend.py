"""What is specific to the portable chunked backend ("torch"): reductions, the straight-through margin, the
class_index subset, gradient filtering, and random shapes (hypothesis) against the float64 reference. Every
loss x dtype x shape variant against the reference, for every backend, is in test_conformance.py."""
import pytest
import torch

import margin_kernels as mk
from tests.helpers import LOSS_NAMES, compare_with_reference, loss_and_grads, random_problem, rel_err
from tests.tolerances import FP64_END_TO_END, FP64_RANDOM_EXTREMES, FP64_SAME_SUMS

def test_reduction_none_and_sum_match_reference():
    x, w, labels = random_problem(8, 30, 16, ignore_rows=(3,))
    for reduction in ("none", "sum"):
        fused = mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), backend="torch", reduction=reduction,
                                        chunk_size=7)
        ref = mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), backend="reference", reduction=reduction)
        assert fused.shape == ref.shape
        assert (fused - ref).abs().max().item() < FP64_SAME_SUMS
    per_row = mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), backend="torch", reduction="none")
    assert per_row[3].item() == 0.0 and (per_row[torch.arange(8) != 3] > 0).all()


def test_straight_through_arcface_changes_gradient_not_loss():
    x, w, labels = random_problem(10, 40, 32, seed=3)
    exact = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="torch"), x, w)
    st = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(straight_through=True),
                                                             backend="torch"), x, w)
    assert abs(exact[0].item() - st[0].item()) < FP64_SAME_SUMS
    assert rel_err(st[1], exact[1]) > 1e-3
    # straight-through: d z_iy / d c_iy = s exactly, as insightface's no_grad margin gives
    c = torch.linspace(-0.99, 0.99, 11, dtype=torch.float64, requires_grad=True)
    ones = torch.ones(11, dtype=torch.float64)
    z = mk.ArcFace(straight_through=True).target_logit(mk.losses.RowInputs(c, ones, ones, ones.bool()))
    (gz,) = torch.autograd.grad(z.sum(), [c])
    assert torch.equal(gz, torch.full_like(gz, 64.0))


def test_class_index_selects_a_subset():
    x, w, labels_full = random_problem(8, 60, 24, seed=4)
    class_index = torch.unique(torch.cat([labels_full, torch.tensor([1, 5, 17, 33, 59])]))
    labels = torch.searchsorted(class_index, labels_full)
    out = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.CosFace(), backend="torch",
                                                              chunk_size=4, class_index=class_index), x, w)
    ref = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.CosFace(), backend="reference",
                                                              class_index=class_index), x, w)
    assert abs(out[0].item() - ref[0].item()) < FP64_SAME_SUMS
    assert rel_err(out[1], ref[1]) < FP64_END_TO_END and rel_err(out[2], ref[2]) < FP64_END_TO_END
    untouched = torch.ones(60, dtype=torch.bool)
    untouched[class_index] = False
    assert (out[2][untouched] == 0).all() and (out[2][class_index].abs().sum(dim=1) > 0).all()


def test_grad_filter_keeps_loss_and_bounds_gradient_error():
    # features near their class (labels in the first tile), 4 of them noisy: far tiles carry ~0 gradient, the
    # first tile and the noisy rows' closest classes do not
    x, w, _ = random_problem(16, 400, 32, seed=5)
    labels = torch.arange(16) % 12
    noise = torch.cat([torch.full((12, 1), 0.3), torch.full((4, 1), 20.0)]).double()
    # a seeded draw: the global RNG's state depends on which tests ran before (with some, no tile was skipped)
    x = w[labels] / w[labels].norm(dim=1, keepdim=True) * 30.0 + noise * torch.randn(
        16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    exact = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="torch",
                                                                chunk_size=16), x, w)
    mk.reset_grad_filter_stats()
    threshold = 1e-4
    filtered = loss_and_grads(lambda a, b: mk.margin_cross_entropy(
        a, b, labels, mk.ArcFace(), backend="torch", chunk_size=16, grad_filter=threshold), x, w)
    stats = mk.grad_filter_stats()
    assert stats["total_tiles"] == 25 and 0 < stats["skipped_tiles"] < 25
    assert filtered[0].item() == exact[0].item()
    # each skipped dc_ij is below the threshold: |dx_i error| <= threshold * (#skipped columns) * ||w_hat|| = 1
    bound = threshold * 400
    assert (filtered[1] - exact[1]).norm(dim=1).max().item() <= bound
    assert rel_err(filtered[1], exact[1]) < 1e-2 and rel_err(filtered[2], exact[2]) < 1e-2


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_grad_filter_without_a_host_decision_matches_the_skips(monkeypatch, backend, dtype):
    """On a GPU the chunk loop zeroes a filtered chunk's dL/dcos on the device instead of branching on it (no
    device-to-host sync per chunk); forced here on the CPU (``filter_skips_on_host``), it gives exactly what
    skipping gives: the same loss, dx, dW and filter statistics, bit for bit (adding a product of zeros and
    writing zero rows are what a skip leaves)."""
    from margin_kernels.backends import chunk_loop
    if backend == "cpu" and mk.backends.unavailable_reason("cpu") is not None:
        pytest.skip(mk.backends.unavailable_reason("cpu"))
    x, w, _ = random_problem(16, 400, 32, seed=5)
    labels = torch.arange(16) % 12
    noise = torch.cat([torch.full((12, 1), 0.3), torch.full((4, 1), 20.0)]).double()  # 4 rows far from theirs
    x = w[labels] / w[labels].norm(dim=1, keepdim=True) * 30.0 + noise * torch.randn(
        16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x, w = x.to(dtype), w.to(dtype)
    runs = []
    for on_host in (True, False):
        monkeypatch.setattr(chunk_loop, "filter_skips_on_host", lambda device, on_host=on_host: on_host)
        mk.reset_grad_filter_stats()
        out = loss_and_grads(lambda a, b: mk.margin_cross_entropy(
            a, b, labels, mk.ArcFace(), backend=backend, chunk_size=16, grad_filter=1e-4), x, w)
        runs.append((out, mk.grad_filter_stats()))
    (skipping, skip_stats), (zeroing, zero_stats) = runs
    assert skip_stats == zero_stats and 0 < skip_stats["skipped_tiles"] < skip_stats["total_tiles"]
    for a, b in zip(skipping, zeroing):
        assert torch.equal(a, b)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True)
@given(batch=st.integers(1, 12), classes=st.integers(1, 70), dim=st.integers(2, 40), chunk=st.integers(1, 80),
       name=st.sampled_from(LOSS_NAMES), seed=st.integers(0, 2 ** 16), ignore_first=st.booleans())
def test_random_shapes_match_reference(batch, classes, dim, chunk, name, seed, ignore_first):
    # d >= 2: at d = 1 every cosine is +-1 and the exact gradient of normalised losses is 0 (rel. error undefined)
    # tiny problems can have an (almost) exactly zero gradient, e.g. x aligned with w at d = 2: errors are
    # then measured against 1e-2 instead of ||ref|| (1e-11 absolute). Random extremes (unnormalised Softmax with
    # |x| ~ 100, loss ~ 0) make the reference's softmax - onehot cancel (1 - p_target), hence 1e-9 on the
    # gradients, not tests/tolerances.py's 1.5e-14 for the suite's fixed problems; losses to 1e-12.
    errors = compare_with_reference("torch", name, torch.float64, batch=batch, classes=classes, dim=dim,
                                    chunk_size=chunk, ignore_rows=(0,) if ignore_first else (), seed=seed,
                                    grad_floor=1e-2)
    assert not FP64_RANDOM_EXTREMES.violations(errors), errors
