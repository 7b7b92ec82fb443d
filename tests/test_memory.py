"""The memory claim: the chunked backend never allocates B x C, nor any C x d buffer besides dW."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import margin_kernels as mk
from margin_kernels.backends import chunk_loop, torch_backend
from margin_kernels.backends.contract import CallState, OpConfig, OpInputs, RowGrads
from tests.helpers import random_problem
from tests.peak_memory import peak_extra


class AllocationLog(TorchDispatchMode):
    """Records the element count of every tensor an op returns, and which storage holds each big one."""

    def __init__(self, big=None):
        super().__init__()
        self.sizes = []
        self.big, self.big_storages = big, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
                if self.big is not None and t.numel() >= self.big:
                    self.big_storages.add(t.untyped_storage().data_ptr())
        return out


# B > d so that a B x C tensor is bigger than W
B, C, D, CHUNK = 64, 3000, 16, 256


@pytest.mark.parametrize("name", ["arcface", "curricularface", "lsoftmax"])
def test_whole_call_allocates_no_batch_by_class_tensor(name):
    from tests.helpers import make_loss
    x, w, labels = random_problem(B, C, D, dtype=torch.float32, ignore_rows=(3,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    log = AllocationLog(big=C * D)
    with log:
        loss = mk.margin_cross_entropy(x, w, labels, make_loss(name), backend="torch", chunk_size=CHUNK)
        loss.backward()
    assert max(log.sizes) == C * D, "the largest tensor must be dW"
    # views of dW (autograd's detach into .grad) share its storage; a dense zero gradient would be a second one
    assert len(log.big_storages) == 1, "exactly one C x d buffer (dW)"


def test_backend_internals_stay_within_a_chunk():
    x, w, labels = random_problem(B, C, D, dtype=torch.float32)
    margin = mk.CurricularFace()
    row_params = torch.rand(B, 2)
    config = OpConfig(margin.negative_spec(), chunk_size=CHUNK)
    log = AllocationLog()
    with log:
        lse = torch_backend.lse_forward(OpInputs(x, w, labels, row_params, None), config, CallState())
    assert max(log.sizes) <= B * CHUNK
    log = AllocationLog()
    with log:
        torch_backend.lse_backward(OpInputs(x, w, labels, row_params, None), config,
                                   RowGrads(lse, torch.rand(B), torch.rand(B)), CallState())
    big = [n for n in log.sizes if n > B * CHUNK]
    assert big == [C * D], f"only dW may exceed a chunk, got {big}"


PEAK_SCRIPT = r"""
import sys
import margin_kernels as mk
backend, B, C, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
def run(c):
    x = torch.randn(B, D, requires_grad=True)
    w = torch.randn(c, D).mul_(0.01).requires_grad_(True)  # in place: no freed temporary to hide dW in
    y = torch.randint(0, c, (B,))
    return x, w, y
x, w, y = run(64)
mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend).backward()   # load code paths
x, w, y = run(C)
report(measure(lambda: mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend).backward()), C * D)
"""


def _peak_extra(backend, batch, classes, dim):
    return peak_extra(PEAK_SCRIPT, backend, batch, classes, dim)


@pytest.mark.slow  # three fresh processes at C up to 1e6: ~12 s
def test_peak_extra_memory_is_flat_in_classes():
    """Measured peak RSS in a fresh process: the reference's extra memory grows with B x C (several B x C fp32
    copies), the chunked backend's stays near dW + O(B x chunk)."""
    batch, classes, dim = 256, 200_000, 64
    fused = _peak_extra("torch", batch, classes, dim)
    ref = _peak_extra("reference", batch, classes, dim)
    logits_bytes = batch * classes * 4
    dweight_bytes = classes * dim * 4
    chunk_bytes = batch * chunk_loop.default_chunk_size(batch) * 4
    assert ref > 3 * logits_bytes, (ref, logits_bytes)
    assert 0.9 * dweight_bytes <= fused < dweight_bytes + 16 * chunk_bytes, (fused, dweight_bytes, chunk_bytes)
    assert ref > 8 * fused, (ref, fused)
