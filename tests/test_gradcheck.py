"""torch.autograd.gradcheck on the hand-written backward (small float64 cases).

Straight-through margins (ArcFace st, insightface's combined arc branch, opensphere's SphereFace2), CircleLoss and AdaFace define their
gradient with detached factors on purpose, so their gradient is not the numerical derivative of the loss;
they are covered by the reference comparisons instead. Losses run in eval mode so state stays fixed across
gradcheck's many evaluations."""
import pytest
import torch

import margin_kernels as mk
from tests.helpers import LOSS_NAMES, make_loss, random_problem
from tests.tolerances import GRADCHECK

NOT_A_TRUE_GRADIENT = {"arcface_st", "arcface_insightface", "combined", "combined_filter", "circle", "adaface",
                       "npcface",  # NPCFace's margin follows a no-grad statistic of the row's negatives
                       "sphereface2", "sphereface2_a", "sphereface2_m"}  # opensphere's no_grad adjustment


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n not in NOT_A_TRUE_GRADIENT])
def test_gradcheck_torch_backend(name):
    margin = make_loss(name).eval()
    x, w, labels = random_problem(4, 11, 6, seed=7, ignore_rows=(1,), sub_centers=margin.sub_centers)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def fn(a, b):
        return mk.margin_cross_entropy(a, b, labels, margin, backend="torch", chunk_size=4)

    assert torch.autograd.gradcheck(fn, (x, w), **GRADCHECK)


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
@pytest.mark.parametrize("loss", [mk.ElasticArcFace, mk.ElasticCosFace], ids=["arc", "cos"])
def test_gradcheck_elastic_with_explicit_margins(loss, plus):
    """Per-row margins (explicit, so fixed across gradcheck's evaluations), in training mode."""
    x, w, labels = random_problem(4, 11, 6, seed=7, ignore_rows=(1,))
    margin = loss(plus=plus, margins=torch.tensor([0.2, 0.9, 0.5, 0.35], dtype=torch.float64))
    x.requires_grad_(True)
    w.requires_grad_(True)

    def fn(a, b):
        return mk.margin_cross_entropy(a, b, labels, margin, backend="torch", chunk_size=4)

    assert torch.autograd.gradcheck(fn, (x, w), **GRADCHECK)
