"""Each loss mode against a transcription of the code it is named after (tests/originals.py,
tests/originals_modes.py): value, dx and dW in float64, on problems with targets past theta + m = pi, where
the modes differ. (Every mode is also a registry variant, so the conformance suite runs it on every backend.)"""
import math

import pytest
import torch

import margin_kernels as mk
from tests import originals, originals_modes
from tests.helpers import loss_and_grads, random_problem, rel_err
from tests.tolerances import ORIGINALS_GRAD, ORIGINALS_LOSS


def fused(margin, labels):
    return lambda x, w: mk.margin_cross_entropy(x, w, labels, margin, backend="torch", chunk_size=7)


CASES = {
    "arcface_insightface": (lambda: mk.ArcFace(mode="insightface"),
                            lambda y: lambda x, w: originals.insightface_combined(x, w, y, m2=0.5)),
    "arcface_insightface_legacy": (lambda: mk.ArcFace(mode="insightface_legacy"),
                                   lambda y: lambda x, w: originals.insightface_arcface(x, w, y)),
    "arcface_facexzoo": (lambda: mk.ArcFace(s=32.0, m=0.35, mode="facexzoo", margin_am=0.2),
                         lambda y: lambda x, w: originals_modes.facexzoo_arcface(x, w, y, 0.35, 0.2, 32.0)),
    "magface_facexzoo": (lambda: mk.MagFace(s=32.0, lambda_g=20.0, mode="facexzoo", margin_am=0.1),
                         lambda y: lambda x, w: originals_modes.facexzoo_magface(x, w, y, margin_am=0.1)),
    # insightface's CosFace branch ignores m1 and m2
    "combined_insightface_m3_branch": (lambda: mk.CombinedMargin(m1=1.2, m2=0.3, m3=0.2),
                                       lambda y: lambda x, w: originals.insightface_combined(
                                           x, w, y, m1=1.2, m2=0.3, m3=0.2)),
    "combined_paddle_general": (lambda: mk.CombinedMargin(m1=0.9, m2=0.4, m3=0.15, mode="paddle"),
                                lambda y: lambda x, w: originals_modes.paddle_margin_cross_entropy(
                                    x, w, y, 0.9, 0.4, 0.15)),
    "combined_paddle_arcface": (lambda: mk.CombinedMargin(mode="paddle"),
                                lambda y: lambda x, w: originals_modes.paddle_margin_cross_entropy(x, w, y)),
    "combined_paddle_sphereface": (lambda: mk.CombinedMargin(m1=1.35, m2=0.0, mode="paddle"),
                                   lambda y: lambda x, w: originals_modes.paddle_margin_cross_entropy(
                                       x, w, y, 1.35, 0.0, 0.0)),
    "combined_paddle_cosface": (lambda: mk.CombinedMargin(m2=0.0, m3=0.4, mode="paddle"),
                                lambda y: lambda x, w: originals_modes.paddle_margin_cross_entropy(
                                    x, w, y, 1.0, 0.0, 0.4)),
}


def problem():
    x, w, labels = random_problem(12, 30, 24, seed=11)
    cos = torch.nn.functional.cosine_similarity(x, w[labels])
    # the modes only differ past theta + m = pi: make sure the problem has such targets (and ordinary ones)
    assert (cos < math.cos(math.pi - 0.5)).sum() >= 2 and (cos > 0).sum() >= 2
    return x, w, labels


@pytest.mark.parametrize("case", list(CASES))
def test_mode_matches_its_code(case):
    make_margin, make_original = CASES[case]
    x, w, labels = problem()
    ours = loss_and_grads(fused(make_margin(), labels), x, w)
    theirs = loss_and_grads(make_original(labels), x, w)
    assert abs(ours[0].item() - theirs[0].item()) < ORIGINALS_LOSS * max(1.0, abs(theirs[0].item()))
    assert rel_err(ours[1], theirs[1]) < ORIGINALS_GRAD
    assert rel_err(ours[2], theirs[2]) < ORIGINALS_GRAD


def test_arcface_insightface_mode_is_combined_margin_default():
    x, w, labels = problem()
    a = loss_and_grads(fused(mk.ArcFace(mode="insightface"), labels), x, w)
    b = loss_and_grads(fused(mk.CombinedMargin(), labels), x, w)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_legacy_straight_through_is_neither_code():
    """ArcFace(straight_through=True) keeps th/mm's value with the no-grad gradient: on targets past pi - m its
    loss differs from arcface_torch's today and its gradient from arcface_torch's before 2022-12."""
    x, w, labels = problem()
    hybrid = loss_and_grads(fused(mk.ArcFace(straight_through=True), labels), x, w)
    today = loss_and_grads(lambda a, b: originals.insightface_combined(a, b, labels), x, w)
    legacy = loss_and_grads(lambda a, b: originals.insightface_arcface(a, b, labels), x, w)
    assert abs(hybrid[0].item() - legacy[0].item()) < ORIGINALS_LOSS < abs(hybrid[0].item() - today[0].item())
    assert rel_err(hybrid[1], legacy[1]) > 1e-3


@pytest.mark.parametrize("make, word", [
    (lambda: mk.ArcFace(mode="insightfcae"), "mode"),
    (lambda: mk.ArcFace(easy_margin=True, mode="insightface"), "easy_margin"),
    (lambda: mk.ArcFace(margin_am=0.1), "margin_am"),
    (lambda: mk.MagFace(margin_am=0.1), "margin_am"),
    (lambda: mk.CombinedMargin(m1=0.9, m2=0.4), "mode='paddle'"),
    (lambda: mk.CombinedMargin(interclass_filtering_threshold=0.2, mode="paddle"), "interclass_filtering"),
    (lambda: mk.CombinedMargin(mode="plsc"), "mode"),
])
def test_mode_arguments_are_checked(make, word):
    with pytest.raises(ValueError, match=word):
        make()
