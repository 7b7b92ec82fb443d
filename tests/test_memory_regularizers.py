"""The Center loss keeps the "never more than B rows" promise: at large C a head step with it allocates nothing
C x d beyond the centers themselves (and, with the gradient rule, their gradient, which the optimizer needs as
it needs dW). Two methods, as tests/test_memory.py: every tensor an op returns (TorchDispatchMode), and the
peak RSS of a fresh process."""
import pytest
import torch

import margin_kernels as mk
from tests.helpers import random_problem
from tests.peak_memory import peak_extra
from tests.test_memory import AllocationLog

B, C, D, CHUNK = 64, 3000, 16, 256


@pytest.mark.parametrize("update, invariant", [("alpha", 0.0), ("gradient", 0.1)])
def test_center_loss_step_allocates_no_class_by_dim_tensor_but_gradients(update, invariant):
    x, w, y = random_problem(B, C, D, dtype=torch.float32, ignore_rows=(3,), duplicate=True)
    head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", chunk_size=CHUNK,
                         regularizers=[mk.CenterLoss(0.1, update=update, invariant_weight=invariant, init_std=1.0),
                                       mk.RingLoss(0.01)])
    with torch.no_grad():
        head.weight.copy_(w)
    centers = head.regularizers[0].centers
    before = centers.detach().clone()
    x.requires_grad_(True)
    log = AllocationLog(big=C * D)
    with log:
        head(x, y).backward()
    # in-place updates return the centers themselves: their storage is not a new buffer
    new = log.big_storages - {centers.untyped_storage().data_ptr(), head.weight.untyped_storage().data_ptr()}
    gradients = 1 if update == "alpha" else 2  # dW, and d centers for the optimizer
    assert len(new) == gradients, f"{len(new)} new C x d buffers, expected {gradients}"
    assert max(log.sizes) <= (C + 1) * D  # the centers' gradient has one spare row (rows of other shards)
    moved = centers.detach() if update == "alpha" else centers.grad
    assert not torch.equal(moved, before if update == "alpha" else torch.zeros_like(before)), "nothing moved"


PEAK_SCRIPT = r"""
import sys
import margin_kernels as mk
with_center, B, C, D = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
def head(c):
    regs = [mk.CenterLoss(0.1, init_std=1.0)] if with_center else []
    return mk.MarginHead(c, D, mk.ArcFace(), backend="torch", regularizers=regs)
def step(h, c):
    x = torch.randn(B, D, requires_grad=True)
    h(x, torch.randint(0, c, (B,))).backward()
step(head(64), 64)                                   # load code paths
h = head(C)
report(measure(lambda: step(h, C)), C * D)
"""


def _peak_extra(with_center, batch, classes, dim):
    return peak_extra(PEAK_SCRIPT, "1" if with_center else "0", batch, classes, dim)


def test_center_loss_adds_no_class_by_dim_peak_memory():
    """Fresh processes, C = 2e5, d = 64 (one C x d fp32 copy = 51 MB): a step of the head with the Center loss
    (alpha rule) needs no more extra memory than the step without it, up to a quarter of one C x d copy; the
    step without it does allocate dW (a C x d copy), so the measurement sees a step's allocations at all."""
    batch, classes, dim = 256, 200_000, 64
    plain = _peak_extra(False, batch, classes, dim)
    center = _peak_extra(True, batch, classes, dim)
    one_copy = classes * dim * 4
    assert plain >= 0.9 * one_copy, ("the plain step's dW was not seen", plain, one_copy)
    assert center < plain + one_copy / 4, (center, plain, one_copy)
