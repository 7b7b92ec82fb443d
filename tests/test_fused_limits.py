"""What the fused optimizers do with what main's heads grew beyond a plain weight, and what they refuse.

* a head's other parameters (a binary loss's learnable bias), sub-center weights (K rows per class) and the
  16-bit product path (finish_dw through ``out=``) train as the unfused head does under torch.optim (same
  backend: only summation orders differ);
* clipping the fused weight (clip_grad_norm_ / clip_grad_value_) and GradScaler over its optimizer raise with
  the reason, while the ordinary loop (zero_grad, ``p.grad is not None`` checks, state_dict, save/load) works.
"""
import io

import pytest
import torch

import margin_kernels as mk
from margin_kernels.optim import FusedAdamW, FusedSGD
from margin_kernels.optim.fused_weight import FusedWeight
from tests.tolerances import FUSED_KERNEL_EPS, FUSED_TRAJECTORY

C, D, B, CHUNK = 120, 8, 16, 32
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-3)
ADAMW = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-2)


def batches(steps, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D, generator=g).to(dtype), torch.randint(0, C, (B,), generator=g))
            for _ in range(steps)]


def head_pair(make_margin, kind, backend="torch", sample_rate=1.0):
    """(fused head, unfused head + its torch.optim optimizer), same initial parameters."""
    fused_cls, torch_cls, options = (FusedSGD, torch.optim.SGD, SGD) if kind == "sgd" else \
        (FusedAdamW, torch.optim.AdamW, ADAMW)
    heads = [mk.MarginHead(C, D, make_margin(), backend=backend, dtype=torch.float64, chunk_size=CHUNK,
                           sample_rate=sample_rate, seed=5) for _ in range(2)]
    heads[0].fuse(fused_cls(heads[0].parameters(), **options))
    return heads[0], heads[1], torch_cls(heads[1].parameters(), **options)


def relative(a, b):
    return ((a.detach() - b.detach()).norm() / b.detach().norm()).item()


def run_pair(make_margin, kind, steps, **options):
    fused, plain, plain_opt = head_pair(make_margin, kind, **options)
    for x, y in batches(steps):
        fused(x, y).backward()
        assert fused.weight.grad is None
        fused.fused_optimizer.step()
        fused.fused_optimizer.zero_grad()
        plain(x, y).backward()
        plain_opt.step()
        plain_opt.zero_grad()
    return fused, plain


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_learnable_bias_trains_beside_the_fused_weight(kind):
    """SphereFace2's bias b is a parameter of the head: FusedSGD(head.parameters()) steps it in step(), unfused,
    with the same rule; the weight is updated in backward. Both equal the unfused head under torch.optim."""
    fused, plain = run_pair(lambda: mk.SphereFace2(num_class=C), kind, steps=6)
    assert relative(fused.weight, plain.weight) <= FUSED_TRAJECTORY[torch.float64][0]
    # b is an fp32 parameter (the authors' Parameter(Tensor(1))) in a float64 head: its bound is fp32's
    assert relative(fused.margin.b, plain.margin.b) <= FUSED_TRAJECTORY[fused.margin.b.dtype][0]
    assert not torch.equal(fused.margin.b.detach(), torch.tensor([mk.SphereFace2(num_class=C).b.item()],
                                                               dtype=fused.margin.b.dtype)), "b never moved"


@pytest.mark.parametrize("sample_rate", [1.0, 0.5, 0.8])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sub_centers_fuse(backend, sample_rate):
    """K = 3 rows per class: the sink receives each chunk's K rows per class (and the target norm's share on the
    winning row); dense mode steps every row, with and without Partial FC (0.5: the unvisited rows stepped as
    whole blocks around the visited ones, 0.8: gathered)."""
    fused, plain = run_pair(lambda: mk.SubCenterArcFace(sub_centers=3), "sgd", steps=5, backend=backend,
                            sample_rate=sample_rate)
    assert relative(fused.weight, plain.weight) <= FUSED_TRAJECTORY[torch.float64][0]


def test_sub_centers_fuse_triton_interpreter():
    fused, plain = run_pair(lambda: mk.SubCenterArcFace(sub_centers=2), "adamw", steps=2, backend="triton")
    assert relative(fused.weight, plain.weight) <= FUSED_TRAJECTORY[torch.float64][0]


def fused_head():
    head = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", chunk_size=CHUNK,
                         optimizer=lambda p: FusedSGD(p, lr=0.1, momentum=0.9))
    backbone = torch.nn.Linear(D, D)
    return head, backbone


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_clipping_the_fused_weight_raises_with_the_reason(clip):
    head, backbone = fused_head()
    x, y = batches(1, torch.float32)[0]
    head(backbone(x), y).backward()
    params = list(backbone.parameters()) + list(head.parameters())
    with pytest.raises(RuntimeError, match="gradient clipping cannot include the weight of a head with a fused"):
        if clip == "norm":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        else:
            torch.nn.utils.clip_grad_value_(params, 0.1)
    with pytest.raises(RuntimeError, match="dW never exists as a whole"):
        torch.nn.utils.clip_grad_norm_(head.weight, 1.0)
    # the backbone alone clips as usual
    norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1e-3)
    assert norm > 1e-3 and torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in backbone.parameters()])) <= 1e-3 * (1 + 1e-5)


def test_the_ordinary_training_loop_is_untouched():
    """zero_grad (both modes), DDP-style ``p.grad is not None`` filters, state_dict, torch.save/load and a
    plain head loading the fused head's state: the weight is still an nn.Parameter, its state-dict entry a
    plain tensor."""
    head, backbone = fused_head()
    assert isinstance(head.weight, FusedWeight) and isinstance(head.weight, torch.nn.Parameter)
    backbone_opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    before = head.weight.detach().clone()
    for set_to_none in (True, False):
        x, y = batches(1, torch.float32, seed=int(set_to_none))[0]
        head(backbone(x), y).backward()
        with_grad = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.grad is not None]
        assert all(p is not head.weight for p in with_grad) and len(with_grad) == 2
        backbone_opt.step()
        head.fused_optimizer.step()
        backbone_opt.zero_grad(set_to_none=set_to_none)
        head.fused_optimizer.zero_grad(set_to_none=set_to_none)
        head.zero_grad(set_to_none=set_to_none)
        assert head.weight.grad is None
    assert not torch.equal(head.weight.detach(), before)
    state = head.state_dict()
    assert type(state["weight"]) is torch.Tensor
    buffer = io.BytesIO()
    torch.save({"head": state, "optimizer": head.fused_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    plain = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", chunk_size=CHUNK, seed=9)
    plain.load_state_dict(loaded["head"])
    assert torch.equal(plain.weight.detach(), head.weight.detach())
    assert type(plain.weight) is torch.nn.Parameter
    again = mk.MarginHead(C, D, mk.ArcFace(), backend="torch", chunk_size=CHUNK,
                          optimizer=lambda p: FusedSGD(p, lr=0.1, momentum=0.9))
    again.load_state_dict(loaded["head"])
    again.fused_optimizer.load_state_dict(loaded["optimizer"])
    assert isinstance(again.weight, FusedWeight)
    assert torch.equal(again.fused_optimizer.state[again.weight]["momentum_buffer"],
                       head.fused_optimizer.state[head.weight]["momentum_buffer"])


@pytest.mark.parametrize("call", ["unscale_", "step"])
def test_grad_scaler_raises_naming_it(call):
    """GradScaler is refused at its first unscale_/step on the fused optimizer. By then the first backward has
    already applied its update with the scaled gradient (nothing in forward or backward can see a scaler): the
    error stops the loop at its first step, it cannot undo that update."""
    head, backbone = fused_head()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = batches(1, torch.float32)[0]
    scaler.scale(head(backbone(x), y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        getattr(scaler, call)(head.fused_optimizer)


def test_reference_backend_cannot_fuse():
    with pytest.raises(ValueError, match="backend='reference'"):
        mk.MarginHead(C, D, mk.ArcFace(), backend="reference", optimizer=lambda p: FusedSGD(p, lr=0.1))


def test_unreshardable_optimizer_state_of_other_parameters_is_refused():
    """The fused optimizer's state of a head parameter other than the weight is saved as is: loading it into a
    parameter of another shape (a class-sharded one on another world size) raises naming it."""
    from margin_kernels.distributed.checkpoint import fused_optimizer_rows, load_fused_optimizer_rows
    weight, other = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(6, 2))
    opt = FusedSGD([weight, other], lr=0.1, momentum=0.9)
    other.grad = torch.ones(6, 2)
    opt.step()
    saved = fused_optimizer_rows(opt, weight)
    assert torch.equal(saved["others"]["1"]["momentum_buffer"], torch.ones(6, 2))
    smaller = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="does not reshard"):
        load_fused_optimizer_rows(FusedSGD([weight, smaller], lr=0.1, momentum=0.9), weight, saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_fused_kernels_and_the_op_by_op_rules_agree(dtype, monkeypatch):
    """optim.rules runs torch's fused SGD/AdamW kernel per chunk where it exists, the op-by-op transcription
    elsewhere (a kernel that fails at dispatch falls back): both give torch.optim's update."""
    from margin_kernels.optim import rules
    g = torch.Generator().manual_seed(0)
    p, grad, buf = (torch.randn(64, 8, generator=g, dtype=dtype) for _ in range(3))
    v = torch.rand(64, 8, generator=g, dtype=dtype)
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=5e-3, nesterov=True, first_step=False)
    adamw = dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=1e-2, step=3)
    fused = [t.clone() for t in (p, grad, buf, v)]
    rules.sgd_rows(fused[0], fused[1].clone(), fused[2], **sgd)
    rules.adamw_rows(fused[0], fused[1], fused[2], fused[3], **adamw)
    assert rules._FUSED_KERNEL_OK[("sgd", "cpu", dtype)] and rules._FUSED_KERNEL_OK[("adamw", "cpu", dtype)]
    monkeypatch.setattr(rules, "_FUSED_KERNEL_OK", {})

    def missing(*args, **kwargs):
        raise NotImplementedError("no kernel")
    monkeypatch.setattr(torch, "_fused_sgd_", missing)
    monkeypatch.setattr(torch, "_fused_adamw_", missing)
    by_op = [t.clone() for t in (p, grad, buf, v)]
    rules.sgd_rows(by_op[0], by_op[1].clone(), by_op[2], **sgd)
    rules.adamw_rows(by_op[0], by_op[1], by_op[2], by_op[3], **adamw)
    assert rules._FUSED_KERNEL_OK == {("sgd", "cpu", dtype): False, ("adamw", "cpu", dtype): False}
    eps = torch.finfo(dtype).eps
    for a, b in zip(fused, by_op):
        assert ((a - b).abs() <= FUSED_KERNEL_EPS * eps * b.abs().clamp_min(1e-3)).all()


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_16_bit_product_path_feeds_the_sink(monkeypatch, grad_dtype, sample_rate):
    """The chunk loop's 16-bit dL/dcos path (CUDA's tensor-core products, autocast or matmul precision "medium":
    both gradient GEMMs on 16-bit operands, finish_dw writing through ``out=``) forced on the CPU, where it
    runs the same code on widened operands: the sink gets finish_dw's fp32 rows and the fused head follows the
    unfused head on that same path (fp16 includes the gradient_scale factor and its inverse)."""
    from margin_kernels.backends import chunk_loop
    monkeypatch.setattr(chunk_loop, "gradient_operand_dtype", lambda w: grad_dtype)
    fused, plain, plain_opt = head_pair(mk.ArcFace, "sgd", sample_rate=sample_rate)
    for head in (fused, plain):
        head.float()
    plain_opt = torch.optim.SGD(plain.parameters(), **SGD)
    for x, y in batches(4, torch.float32):
        fused(x, y).backward()
        fused.fused_optimizer.step()
        plain(x, y).backward()
        plain_opt.step()
        plain_opt.zero_grad()
    assert relative(fused.weight, plain.weight) <= FUSED_TRAJECTORY[torch.float32][0]
