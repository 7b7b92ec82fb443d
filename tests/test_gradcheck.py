"""torch.autograd.gradcheck on the hand-written backward (small float64 cases).

Straight-through margins (ArcFace st, insightface's combined arc branch, opensphere's SphereFace2), CircleLoss and AdaFace define their
gradient with detached factors on purpose, so their gradient is not the numerical derivative of the loss;
they are covered by the reference comparisons instead. Losses run in eval mode so state stays fixed across
gradcheck's many evaluations."""
import pytest
import torch

import margin_kernels as mk
from tests.helpers import LOSS_NAMES, make_loss, random_problem

NOT_A_TRUE_GRADIENT = {"arcface_st", "combined", "combined_filter", "circle", "adaface",
                       "sphereface2", "sphereface2_a", "sphereface2_m"}  # opensphere's no_grad adjustment


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n not in NOT_A_TRUE_GRADIENT])
def test_gradcheck_torch_backend(name):
    x, w, labels = random_problem(4, 11, 6, seed=7, ignore_rows=(1,))
    margin = make_loss(name).eval()
    x.requires_grad_(True)
    w.requires_grad_(True)

    def fn(a, b):
        return mk.margin_cross_entropy(a, b, labels, margin, backend="torch", chunk_size=4)

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-6, rtol=1e-5)
