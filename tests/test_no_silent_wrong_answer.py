"""Issue 25's classes of silent wrong answers (points 1, 3, 4, 5), each over every backend that runs here and
the heads: labels of any integer dtype, empty and all-ignored batches that touch nothing, a refused fused step
that refuses before it writes, unchecked labels that never reach an index.

Losses are compared with the float64 reference on int64 labels; the bound is the conformance table's
(``tolerances.py``) for fp32 storage.
"""
from __future__ import annotations

import pytest
import torch

import margin_kernels as mk
from margin_kernels.backends import unavailable_reason
from margin_kernels.optim import FusedAdamW, FusedSGD

from .helpers import random_problem
from .tolerances import TOLERANCES

BACKENDS = ("torch", "cpu", "triton")
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _skip_unless(backend: str) -> None:
    reason = unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)


def _labels_in(dtype: torch.dtype, batch: int) -> tuple[torch.Tensor, int]:
    """(labels of ``dtype`` that use its high values, a class count above what the dtype holds where it can):
    uint8 labels up to 255 with C = 300 (255 must not read as ignore_index -1); int8 up to 127 with C = 300
    (300 must not wrap to 44)."""
    high = {torch.uint8: 255, torch.int8: 127}.get(dtype, 299)
    labels = torch.linspace(0, high, batch).round().to(torch.int64)
    return labels.to(dtype), 300


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_labels_of_any_integer_dtype_give_the_int64_loss(backend, dtype):
    if backend != "reference":
        _skip_unless(backend)
    labels, classes = _labels_in(dtype, 12)
    x, w, _ = random_problem(12, classes, 16, dtype=torch.float32)
    margin = mk.ArcFace()
    expected = mk.margin_cross_entropy(x.double(), w.double(), labels.long(), margin, backend="reference")
    got = mk.margin_cross_entropy(x, w, labels, margin, backend=backend)
    # the conformance table's fp32 loss bound (relative to max(1, |loss|)); the reference runs the torch row's
    bound = TOLERANCES[(backend if backend != "reference" else "torch", torch.float32)].float64.loss
    assert torch.isfinite(got) and abs(float(got) - float(expected)) <= bound * max(1.0, abs(float(expected)))


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_heads_take_labels_of_any_integer_dtype(dtype, sample_rate):
    labels, classes = _labels_in(dtype, 10)
    x = torch.randn(10, 8)
    heads = [mk.MarginHead(classes, 8, mk.CosFace(), backend="torch", sample_rate=sample_rate, seed=3)
             for _ in range(2)]
    got = heads[0](x, labels)
    expected = heads[1](x, labels.long())
    assert torch.isfinite(got) and torch.equal(got, expected)
    assert torch.equal(heads[0].sampled_classes if sample_rate < 1 else torch.zeros(0),
                       heads[1].sampled_classes if sample_rate < 1 else torch.zeros(0))


def test_a_uint8_label_255_is_not_ignored_and_an_int8_batch_is_not_refused():
    """The issue's two examples: loss 0 where the reference gives ~80; valid int8 labels refused."""
    x, w, _ = random_problem(4, 300, 16, dtype=torch.float64)
    labels = torch.full((4,), 255, dtype=torch.uint8)
    loss = mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), backend="torch")
    assert float(loss) > 1.0
    mk.margin_cross_entropy(x, w, torch.full((4,), 100, dtype=torch.int8), mk.ArcFace(), backend="torch")


def _fused_head(backend: str, optimizer=FusedSGD, **options):
    head = mk.MarginHead(50, 8, mk.ArcFace(), backend=backend, seed=1, **options)
    head.fuse(optimizer(head.parameters(), lr=0.1, **({"momentum": 0.9} if optimizer is FusedSGD else {})))
    return head


@pytest.mark.parametrize("optimizer", [FusedSGD, FusedAdamW], ids=lambda o: o.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", ["empty", "all-ignored"])
def test_a_batch_without_rows_touches_nothing(backend, batch, optimizer):
    _skip_unless(backend)
    head = _fused_head(backend, optimizer, sample_rate=0.5)
    before = head.weight.detach().clone()
    state_before = {k: v.clone() if torch.is_tensor(v) else v for k, v in head.fused_optimizer.state_dict().items()}
    rows = 0 if batch == "empty" else 5
    x = torch.randn(rows, 8, requires_grad=True)
    loss = head(x, torch.full((rows,), -1, dtype=torch.long))
    loss.backward()
    head.fused_optimizer.step()
    assert float(loss.detach()) == 0.0
    assert head.weight.grad is None, "no dW may be allocated"
    assert torch.equal(head.weight.detach(), before), "no update may run"
    assert head.fused_optimizer.state_dict()["state"] == state_before["state"]
    head(torch.randn(3, 8), torch.tensor([1, 2, 3])).backward()  # the next step is not refused
    head.fused_optimizer.step()
    assert not torch.equal(head.weight.detach(), before)


def test_ring_loss_keeps_its_radius_on_a_batch_without_valid_rows():
    ring = mk.RingLoss()
    head = mk.MarginHead(20, 8, mk.ArcFace(), backend="torch", regularizers=[ring])
    head(torch.randn(4, 8), torch.full((4,), -1))
    assert not bool(ring.initialized) and float(ring.radius) == 1.0
    x = torch.randn(4, 8) * 3
    head(x, torch.tensor([0, 1, 2, 3]))
    assert bool(ring.initialized)
    assert abs(float(ring.radius) - float(x.norm(dim=1).mean())) < 1e-5 * float(x.norm(dim=1).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_calls_into_one_backward_are_refused_before_any_write(backend):
    _skip_unless(backend)
    head = _fused_head(backend)
    before = head.weight.detach().clone()
    first = head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(RuntimeError, match="previous call has not been backpropagated"):
        head(torch.randn(4, 8), torch.tensor([5, 6, 7, 8]))
    assert torch.equal(head.weight.detach(), before)
    first.backward()  # the first call alone still trains
    head.fused_optimizer.step()
    assert not torch.equal(head.weight.detach(), before)
    head(torch.randn(4, 8), torch.tensor([5, 6, 7, 8])).backward()  # and the next call is free again


def test_a_dropped_call_does_not_block_the_next():
    head = _fused_head("torch")
    head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))  # loss dropped: its graph, and its update, are gone
    head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4])).backward()
    with torch.no_grad():
        head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))  # the no_grad call left nothing pending


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [50, 10**6, -5])
def test_unchecked_labels_with_center_loss_under_partial_fc_give_nan_rows(backend, bad):
    """check_values=False, a Center-loss regulariser, Partial FC: an out-of-range label's row is NaN (the
    documented result), never an IndexError from inside torch; the other rows are finite."""
    _skip_unless(backend)
    head = mk.MarginHead(50, 8, mk.ArcFace(), backend=backend, sample_rate=0.5, check_values=False,
                         regularizers=[mk.CenterLoss()], reduction="none")
    labels = torch.tensor([1, bad, 3, -1])
    loss = head(torch.randn(4, 8), labels)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
