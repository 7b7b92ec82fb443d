"""AMP the way insightface's train_v2.py trains: the backbone under fp16 (or bf16) autocast, fp32 master
weights in the head, a GradScaler starting at 2^16 (growth_interval=100) and s = 64. What insightface's
issues report (#2200, #1715, #1664, #1486: NaN / inf with fp16) comes from its head computing the B x C logits
and their gradient in fp16: at scale 2^16 the scaled gradient of s * cos overflows fp16, every step is skipped
and the scale collapses. Here the head accumulates in fp32 and returns fp32 weight gradients, so the scaled
head gradient stays finite; the fp16 products that remain (Triton, fp32 weights cast in registers) are checked
against the float64 reference within tests/tolerances.py.

Runs on CPU: bf16 and fp16 autocast both exist on CPU in the supported torch versions, and so does
``torch.amp.GradScaler("cpu")``; the chunk-loop backends multiply fp32 exactly on CPU (autocast only changes
the backbone), the Triton backend runs its fp16/bf16 products in the interpreter."""
from __future__ import annotations

import pytest
import torch

import margin_kernels as mk
from margin_kernels.backends import unavailable_reason
from margin_kernels.distributed import DistributedMarginHead
from margin_kernels.integrations import insightface
from tests import originals_insightface
from tests.helpers import rel_err
from tests.tolerances import PRODUCT_TOLERANCES, TOLERANCES

CLASSES, DIM, ROWS, INPUTS = 40, 16, 8, 6
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def backend_or_skip(name):
    reason = unavailable_reason(name)
    if reason:
        pytest.skip(reason)
    return name


def make_head(kind, backend, autocast):
    torch.manual_seed(0)
    if kind == "PartialFC_V2":  # its fp16 flag is insightface's: autocast fp16 around the products
        return insightface.PartialFC_V2(insightface.CombinedMarginLoss(64, 1.0, 0.5, 0.0), DIM, CLASSES,
                                        fp16=autocast == "fp16", backend=backend)
    cls = mk.MarginHead if kind == "MarginHead" else DistributedMarginHead
    return cls(CLASSES, DIM, mk.CombinedMargin(), backend=backend)


def batch(step):
    gen = torch.Generator().manual_seed(step % 4)  # four batches in turn, so the loss goes down
    return torch.randn(ROWS, INPUTS, generator=gen), torch.randint(0, CLASSES, (ROWS,), generator=gen)


def train_amp(head, autocast, steps):
    """train_v2.py's fp16 branch; per step: (loss, head gradient finite before unscale, scale)."""
    torch.manual_seed(1)
    net = torch.nn.Linear(INPUTS, DIM)
    with torch.no_grad():
        net.weight.mul_(10.0)  # feature norms ~ 20, as a face backbone's
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=100)
    records = []
    for step in range(steps):
        inputs, labels = batch(step)
        with torch.autocast("cpu", dtype=AUTOCAST[autocast]):
            loss = head(net(inputs), labels)
        scaler.scale(loss).backward()
        head_grad_finite = bool(torch.isfinite(head.weight.grad).all())
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        records.append((loss.detach(), head_grad_finite, scaler.get_scale()))
    return records, net


def assert_trained_without_nan(head, records, net):
    losses = torch.stack([r[0] for r in records])
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert all(r[1] for r in records), "the scaled head gradient overflowed"
    assert head.weight.dtype == torch.float32 and torch.isfinite(head.weight).all()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert losses[-4:].mean() < losses[:4].mean()  # it trained
    # the scale never fell below 2^15: at most one skip, from the backbone's own fp16 gradients
    assert min(r[2] for r in records) >= 2.0 ** 15


@pytest.mark.parametrize("autocast", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["MarginHead", "DistributedMarginHead", "PartialFC_V2"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_amp_training_at_s64_has_no_nan(backend, kind, autocast):
    head = make_head(kind, backend_or_skip(backend), autocast)
    records, net = train_amp(head, autocast, steps=20)
    assert_trained_without_nan(head, records, net)


@pytest.mark.parametrize("autocast", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["MarginHead", "PartialFC_V2"])
def test_amp_training_at_s64_has_no_nan_triton(kind, autocast):
    head = make_head(kind, backend_or_skip("triton"), autocast)
    records, net = train_amp(head, autocast, steps=8)
    losses = torch.stack([r[0] for r in records])
    assert torch.isfinite(losses).all() and all(r[1] for r in records)
    assert head.weight.dtype == torch.float32 and torch.isfinite(head.weight).all()
    assert min(r[2] for r in records) >= 2.0 ** 15


def test_insightface_own_fp16_head_overflows_where_the_fused_one_does_not():
    """The contrast: the transcription of insightface's PartialFC_V2(fp16=True) computes the logits' gradient in
    fp16; at scale 2^16 and s = 64 its head gradient is inf and the GradScaler skips step after step."""
    torch.manual_seed(0)
    theirs = originals_insightface.PartialFC_V2(originals_insightface.CombinedMarginLoss(64, 1.0, 0.5, 0.0), DIM,
                                                CLASSES, fp16=True)
    records, _ = train_amp(theirs, "fp16", steps=4)
    assert not any(r[1] for r in records) and records[-1][2] <= 2.0 ** 12
    records, net = train_amp(make_head("PartialFC_V2", "torch", "fp16"), "fp16", steps=4)
    assert all(r[1] for r in records)


@pytest.mark.parametrize("kind", ["MarginHead", "DistributedMarginHead"])
@pytest.mark.parametrize("autocast", ["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_amp_step_matches_the_float64_reference(backend, autocast, kind):
    """One scaled step under autocast: the unscaled gradients against the float64 reference on the same
    (autocast-rounded) features. The chunk-loop backends multiply fp32 exactly on CPU (fp32 bounds); Triton
    casts the fp32 weights to the autocast dtype in registers (its product bounds), also inside the distributed
    head, which turns autocast off around its collectives but keeps the caller's product mode."""
    head = make_head(kind, backend_or_skip(backend), autocast)
    net = torch.nn.Linear(INPUTS, DIM)
    with torch.no_grad():
        net.weight.mul_(10.0)
    inputs, labels = batch(0)
    with torch.autocast("cpu", dtype=AUTOCAST[autocast]):
        features = net(inputs).detach().requires_grad_(True)
        assert features.dtype == AUTOCAST[autocast]
        loss = head(features, labels)
    # 2^12, not 2^16: the features' gradient is the backbone's fp16 tensor, which at 2^16 may overflow (finding
    # that is the GradScaler's job, tested above); the head's own fp32 gradient is scale-independent
    scale = 2.0 ** 12
    (loss * scale).backward()
    xr = features.detach().double().requires_grad_(True)
    wr = head.weight.detach().double().requires_grad_(True)
    ref = mk.margin_cross_entropy(xr, wr, labels, mk.CombinedMargin(), backend="reference")
    ref.backward()
    bounds = PRODUCT_TOLERANCES[autocast] if backend == "triton" else TOLERANCES[(backend, torch.float32)].float64
    # the features' gradient comes back in their 16-bit dtype, rounded: the bound of that dtype's storage
    # against float64
    dx_bound = max(bounds.dx, TOLERANCES[("torch", AUTOCAST[autocast])].float64.dx)
    assert abs(loss.item() - ref.item()) <= bounds.loss * max(1.0, ref.item())
    assert features.grad.dtype == AUTOCAST[autocast] and head.weight.grad.dtype == torch.float32
    assert rel_err(features.grad.double() / scale, xr.grad) <= dx_bound
    assert rel_err(head.weight.grad.double() / scale, wr.grad) <= bounds.dw
    if backend == "triton":  # the 16-bit products really ran: far above the IEEE mode's error
        assert rel_err(head.weight.grad.double() / scale, wr.grad) > 50 * PRODUCT_TOLERANCES["ieee"].observed[2]
