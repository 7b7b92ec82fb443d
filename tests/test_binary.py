"""The binary (one-vs-all) reduction beyond the conformance suite's loss/dx/dW: the learnable bias's gradient
on every backend against the float64 reference, gradcheck through the bias, the arguments' checks, Partial FC
(UniFace samples as its authors do; SphereFace2 refuses), state_dict, and torch.compile of a head with it."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels.backends import unavailable_reason
from tests.helpers import class_subset, make_loss, random_problem, rel_err, twin
from tests.tolerances import FP32_LOSS, GRADCHECK, SHIFT_GRAD

BINARY = ["sphereface2", "sphereface2_exact", "sphereface2_a", "sphereface2_m", "uniface", "uniface_clamp"]
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _skip_unless_available(backend):
    reason = unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"the {backend!r} backend cannot run here: {reason}")


def bias_grad(margin, backend, x, w, labels, index=None, **kwargs):
    param = margin.logit_shift_parameter()
    param.grad = None
    loss = mk.margin_cross_entropy(x, w, labels, margin, backend=backend, class_index=index, **kwargs)
    loss.backward()
    return loss.detach(), param.grad.clone()


def shift_grad_error(backend, name, dtype, *, classes=83, class_index=False, chunk_size=32, seed=0):
    """Relative error of the bias gradient (and of the mean loss) against the float64 reference on the same
    rounded inputs."""
    x, w, labels = random_problem(12, classes, 24, dtype=dtype, seed=seed, ignore_rows=(3,))
    index = None
    if class_index:
        index, labels = class_subset(classes, labels, seed)
    margin = make_loss(name)
    ref_margin = twin(margin)
    loss, grad = bias_grad(margin, backend, x, w, labels, index, chunk_size=chunk_size)
    ref_loss, ref_grad = bias_grad(ref_margin, "reference", x.double(), w.double(), labels, index)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    return abs(loss.double().item() - ref_loss.item()) / max(1.0, abs(ref_loss.item())), rel_err(grad, ref_grad)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_bias_gradient_matches_reference(backend, dtype_name, name):
    _skip_unless_available(backend)
    loss_err, grad_err = shift_grad_error(backend, name, DTYPES[dtype_name])
    bound = SHIFT_GRAD[DTYPES[dtype_name]]
    assert grad_err <= bound, f"{backend} {name} {dtype_name}: bias gradient {grad_err:.2e} > {bound:.0e}"
    assert loss_err <= bound, f"{backend} {name} {dtype_name}: loss {loss_err:.2e} > {bound:.0e}"


@pytest.mark.parametrize("shape", [dict(class_index=True), dict(classes=257, chunk_size=50),
                                   dict(classes=1, chunk_size=None)], ids=["class_index", "ragged", "one_class"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_bias_gradient_on_shape_variants(backend, shape):
    _skip_unless_available(backend)
    for name in ("sphereface2_exact", "uniface_clamp"):
        loss_err, grad_err = shift_grad_error(backend, name, torch.float64, **shape)
        assert grad_err <= SHIFT_GRAD[torch.float64] and loss_err <= SHIFT_GRAD[torch.float64], (name, shape)


@pytest.mark.parametrize("name", ["sphereface2_exact", "uniface", "uniface_clamp"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_with_the_learnable_bias(backend, name):
    """gradcheck over (features, weight, bias): the bias Parameter is swapped for gradcheck's input tensor."""
    _skip_unless_available(backend)
    x, w, labels = random_problem(4, 11, 6, seed=7, ignore_rows=(1,))
    margin = make_loss(name).double().eval()
    param_name = "b" if isinstance(margin, mk.SphereFace2) else "bias"
    start = margin._parameters.pop(param_name).detach().double()

    def fn(a, b, bias):
        setattr(margin, param_name, bias)  # a plain tensor attribute now, read by the loss's formulas
        return mk.margin_cross_entropy(a, b, labels, margin, backend=backend, chunk_size=4)

    inputs = (x.requires_grad_(True), w.requires_grad_(True), start.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="magn_type"):
        mk.SphereFace2(magn_type="X")
    with pytest.raises(ValueError, match="^t must"):
        mk.SphereFace2(t=0.5)
    with pytest.raises(ValueError, match="alpha"):
        mk.SphereFace2(alpha=1.0)
    with pytest.raises(ValueError, match="num_class"):
        mk.SphereFace2(num_class=1)
    with pytest.raises(ValueError, match="bias"):
        mk.UniFace(bias=math.inf)
    with pytest.raises(ValueError, match="^l must"):
        mk.UniFace(l=0.0)
    with pytest.raises(ValueError, match="out_features"):
        mk.UniFace(out_features=2.5)


def test_sphereface2_refuses_partial_fc_and_uniface_samples():
    with pytest.raises(ValueError, match="sample_rate.*SphereFace2.*unbiased"):
        mk.MarginHead(40, 8, mk.SphereFace2(num_class=40), sample_rate=0.5, backend="torch")
    head = mk.MarginHead(40, 8, mk.UniFace(out_features=40, r=0.5), sample_rate=0.5, backend="torch", seed=3)
    x, _, labels = random_problem(6, 40, 8, dtype=torch.float32, seed=2)
    loss = head(x, labels)
    loss.backward()
    index = head.sampled_classes
    assert index is not None and index.numel() == 20
    # the loss is the reference's on the drawn classes, the sampled negatives unweighted (as the authors)
    ref_margin = mk.UniFace(out_features=40, r=0.5)
    ref = mk.margin_cross_entropy(x, head.weight.detach(), torch.searchsorted(index, labels), ref_margin,
                                  backend="reference", class_index=index)
    assert abs(loss.item() - ref.item()) < FP32_LOSS * max(1.0, abs(ref.item()))
    assert head.margin.bias.grad is not None and head.margin.bias.grad.abs() > 0


def test_bias_lives_in_the_head_parameters_and_state_dict():
    head = mk.MarginHead(30, 8, mk.UniFace(out_features=30), backend="torch")
    assert any(p is head.margin.bias for p in head.parameters())
    state = head.state_dict()
    assert torch.equal(state["margin.bias"], head.margin.bias.detach())
    other = mk.MarginHead(30, 8, mk.UniFace(bias=0.0), backend="torch")
    other.load_state_dict(state)
    assert torch.equal(other.margin.bias, head.margin.bias)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiled_binary_head_matches_eager(backend):
    _skip_unless_available(backend)
    from tests.tolerances import COMPILE_VS_EAGER
    x, w, labels = random_problem(8, 40, 16, dtype=torch.float32, ignore_rows=(2,))
    head = mk.MarginHead(40, 16, mk.UniFace(s=16.0, bias=12.0), backend=backend)
    with torch.no_grad():
        head.weight.copy_(w)

    def run(module):
        features = x.clone().requires_grad_(True)
        head.zero_grad()
        loss = module(features, labels)
        loss.backward()
        return loss.detach(), features.grad, head.weight.grad.clone(), head.margin.bias.grad.clone()

    eager = run(head)
    compiled = run(torch.compile(head, fullgraph=True, backend="inductor"))
    for got, want in zip(compiled, eager):
        assert rel_err(got, want) <= COMPILE_VS_EAGER
