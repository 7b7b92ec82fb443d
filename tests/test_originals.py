"""The fused losses against transcriptions of their authors' code (tests/originals.py): value and gradients."""
import pytest
import torch

import margin_kernels as mk
from tests import originals
from tests.helpers import loss_and_grads, random_problem, rel_err
from tests.tolerances import ORIGINALS_GRAD, ORIGINALS_LOSS


def fused(margin, labels, chunk=7):
    return lambda x, w: mk.margin_cross_entropy(x, w, labels, margin, backend="torch", chunk_size=chunk)


CASES = {
    "insightface_arcface_st": (lambda: mk.CombinedMargin(), lambda y: lambda x, w: originals.insightface_combined(
        x, w, y)),
    "insightface_cosface": (lambda: mk.CombinedMargin(m1=1.0, m2=0.0, m3=0.35),
                            lambda y: lambda x, w: originals.insightface_combined(x, w, y, m2=0.0, m3=0.35)),
    "insightface_filter": (lambda: mk.CombinedMargin(interclass_filtering_threshold=0.05),
                           lambda y: lambda x, w: originals.insightface_combined(
                               x, w, y, interclass_filtering_threshold=0.05)),
    "insightface_arcface_exact": (lambda: mk.ArcFace(), lambda y: lambda x, w: originals.insightface_arcface(x, w, y)),
    "insightface_arcface_easy": (lambda: mk.ArcFace(easy_margin=True),
                                 lambda y: lambda x, w: originals.insightface_arcface(x, w, y, easy_margin=True)),
    "mv_am": (lambda: mk.MVSoftmax(variant="am"), lambda y: lambda x, w: originals.mv_softmax(x, w, y)),
    "mv_arc": (lambda: mk.MVSoftmax(variant="arc"),
               lambda y: lambda x, w: originals.mv_softmax(x, w, y, is_am=False)),
    "magface": (lambda: mk.MagFace(), lambda y: lambda x, w: originals.magface(x, w, y)),
    "magface_th_mm": (lambda: mk.MagFace(easy_margin=False),
                      lambda y: lambda x, w: originals.magface(x, w, y, easy_margin=False)),
    "lsoftmax": (lambda: mk.LSoftmax(m=2, lambda_base=100.0, lambda_gamma=0.0, lambda_min=0.0),
                 lambda y: lambda x, w: originals.lsoftmax(x, w, y, m=2, beta=100.0)),
    "lsoftmax_m4": (lambda: mk.LSoftmax(m=4, lambda_base=3.0, lambda_gamma=0.0, lambda_min=0.0),
                    lambda y: lambda x, w: originals.lsoftmax(x, w, y, m=4, beta=3.0)),
    "circle": (lambda: mk.CircleLoss(), lambda y: lambda x, w: originals.circle_classification(x, w, y)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_original_code(case):
    make_margin, make_original = CASES[case]
    ignore = (2,) if case.startswith("insightface") else ()
    x, w, labels = random_problem(10, 30, 24, seed=11, ignore_rows=ignore)
    ours = loss_and_grads(fused(make_margin(), labels), x, w)
    theirs = loss_and_grads(make_original(labels), x, w)
    assert abs(ours[0].item() - theirs[0].item()) < ORIGINALS_LOSS * max(1.0, abs(theirs[0].item()))
    assert rel_err(ours[1], theirs[1]) < ORIGINALS_GRAD
    assert rel_err(ours[2], theirs[2]) < ORIGINALS_GRAD


def test_curricularface_matches_original_over_steps():
    margin, t = mk.CurricularFace(), torch.zeros((), dtype=torch.float64)
    for step in range(3):
        x, w, labels = random_problem(10, 30, 24, seed=20 + step)
        ours = loss_and_grads(fused(margin, labels), x, w)
        t_before = t.clone()
        theirs = loss_and_grads(lambda a, b: originals.curricularface(a, b, labels, t_before)[0], x, w)
        t = originals.curricularface(x, w, labels, t_before)[1]
        assert abs(ours[0].item() - theirs[0].item()) < ORIGINALS_LOSS
        assert rel_err(ours[1], theirs[1]) < ORIGINALS_GRAD and rel_err(ours[2], theirs[2]) < ORIGINALS_GRAD
        assert abs(margin.t.item() - t.item()) < ORIGINALS_GRAD


def test_adaface_matches_original_over_steps():
    margin = mk.AdaFace(t_alpha=0.5).double()
    state = [torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)]
    for step in range(3):
        x, w, labels = random_problem(10, 30, 24, seed=30 + step)
        ours = loss_and_grads(fused(margin, labels), x, w)
        snapshot = [v.clone() for v in state]
        theirs = loss_and_grads(lambda a, b: originals.adaface(a, b, labels, [v.clone() for v in snapshot],
                                                                t_alpha=0.5), x, w)
        originals.adaface(x, w, labels, state, t_alpha=0.5)
        assert abs(ours[0].item() - theirs[0].item()) < ORIGINALS_LOSS
        assert rel_err(ours[1], theirs[1]) < ORIGINALS_GRAD and rel_err(ours[2], theirs[2]) < ORIGINALS_GRAD
        assert abs(margin.batch_mean.item() - state[0].item()) < ORIGINALS_LOSS
        assert abs(margin.batch_std.item() - state[1].item()) < ORIGINALS_LOSS


def test_sphereface_matches_original_over_steps():
    margin, it = mk.SphereFace(m=4, lambda_base=1500.0, lambda_gamma=0.1, lambda_power=1.0, lambda_min=5.0), 0
    for step in range(3):
        x, w, labels = random_problem(10, 30, 24, seed=40 + step)
        ours = loss_and_grads(fused(margin, labels), x, w)
        theirs = loss_and_grads(lambda a, b: originals.sphereface(a, b, labels, it)[0], x, w)
        it += 1
        assert abs(ours[0].item() - theirs[0].item()) < ORIGINALS_LOSS
        assert rel_err(ours[1], theirs[1]) < ORIGINALS_GRAD and rel_err(ours[2], theirs[2]) < ORIGINALS_GRAD
        assert margin.iteration.item() == it
