"""Settings that can be assigned take effect (issue 25 point 6): pml's ``loss.scale = 32`` once changed nothing,
and ``ArcFace.mode`` / ``CombinedMargin.m3`` changed the loss but not the gradient rule derived at
construction. For every constructor argument of every loss of the registry and of every adapter
(integrations.pml, integrations.insightface), each candidate value is assigned to a fresh object: either the
assignment raises an error naming the attribute, or the object's loss AND gradients equal those of an object
constructed with the new value (float64 reference backend, bitwise up to 1e-12)."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

import margin_kernels as mk
from margin_kernels.integrations import insightface, pml
from margin_kernels.losses.registry import VARIANTS

from .helpers import loss_and_grads, random_problem

#: values to try for arguments whose candidates cannot be derived from their current value
EXTRA = {"num_class": [50], "out_features": [50], "num_classes": [50, 7], "seed": [1], "b": [0.5], "bias": [0.5],
         "magn_type": ["A", "M", "C"], "plus_order": ["paper", "code"], "update": ["lagged", "faithful"],
         "variant": ["arc", "am"], "straight_through": [True, False], "generator": [torch.Generator()],
         "margins": [torch.full((8,), 0.3, dtype=torch.float64)], "mode": ["insightface", "insightface_legacy",
                                                                          "facexzoo", "paddle", "pml", "magface"]}
#: constructor arguments that are not settings of the object (nothing to assign)
NOT_SETTINGS = {"weight_init_func", "reducer", "kwargs"}


def _candidates(name, value):
    out = list(EXTRA.get(name, []))
    if isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, int):
        out += [value + 1, value - 1]
    elif isinstance(value, float):
        out += [value * 0.9, value * 1.1, value + 0.1]
    return [c for c in out if not (type(c) is type(value) and c == value)]


def _ctor_params(cls):
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in NOT_SETTINGS]


def _plain(value):
    if isinstance(value, torch.nn.Parameter):
        return value.detach().item()
    return copy.deepcopy(value)


def _assign(obj, name, value):
    """True: assigned; False: rejected with an error naming ``name``."""
    try:
        setattr(obj, name, value)
    except (ValueError, TypeError, AttributeError) as error:
        assert name in str(error), f"the error for {name}={value!r} does not name it: {error}"
        return False
    return True


def _loss_cases():
    cases = []
    for variant, factory in VARIANTS.items():
        for name in _ctor_params(type(factory())):
            cases.append((variant, name))
    return cases


def _reference_run(loss):
    k = loss.sub_centers
    x, w, y = random_problem(8, 11, 12, seed=4, sub_centers=k)
    return loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, y, loss, backend="reference",
                                                               reduction="none"), x, w)


def _same(a, b):
    for what, u, v in zip(("loss", "dx", "dw"), a, b):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12, equal_nan=True), what


@pytest.mark.parametrize("variant,name", _loss_cases(), ids=[f"{v}.{n}" for v, n in _loss_cases()])
def test_an_assigned_loss_setting_equals_a_fresh_loss(variant, name):
    factory = VARIANTS[variant]
    cls = type(factory())
    tried = 0
    for value in _candidates(name, getattr(factory(), name)):
        loss = factory()
        if not _assign(loss, name, value):
            continue
        kwargs = {p: _plain(getattr(loss, p)) for p in _ctor_params(cls)}
        if kwargs.get("seed") is not None:
            kwargs["generator"] = None
        fresh = cls(**kwargs)
        _same(_reference_run(loss), _reference_run(fresh))
        tried += 1
    if tried == 0:
        pytest.skip(f"every candidate for {name} was rejected with an error naming it")


PML = [pml.ArcFaceLoss, pml.CosFaceLoss, pml.LargeMarginSoftmaxLoss, pml.SphereFaceLoss, pml.NormalizedSoftmaxLoss,
       pml.SubCenterArcFaceLoss]
PML_CASES = [(cls, name) for cls in PML for name in _ctor_params(cls)]


def _run(module, weight, classes: int, seed: int):
    """(loss, d features, d ``weight``) of ``module`` on a fixed problem with ``classes`` classes."""
    x, _, y = random_problem(8, classes, 12, seed=seed)
    x = x.float().detach().requires_grad_(True)
    loss = module(x, y)
    dx, dw = torch.autograd.grad(loss, [x, weight])
    return loss.detach(), dx, dw


def _pml_run(module):
    return _run(module, module.W, 6, 5)


@pytest.mark.parametrize("cls,name", PML_CASES, ids=[f"{c.__name__}.{n}" for c, n in PML_CASES])
def test_an_assigned_pml_setting_equals_a_fresh_loss(cls, name):
    for value in _candidates(name, getattr(cls(6, 12), name)):
        torch.manual_seed(0)
        module = cls(6, 12)
        if not _assign(module, name, value):
            continue
        torch.manual_seed(0)
        fresh = cls(**{p: _plain(getattr(module, p)) for p in _ctor_params(cls)})
        fresh.W.data.copy_(module.W.data)
        _same(_pml_run(module), _pml_run(fresh))


MARGINS = [(insightface.CombinedMarginLoss, (64.0, 1.0, 0.5, 0.0)), (insightface.ArcFace, ()),
           (insightface.CosFace, ())]
IF_CASES = [(cls, args, name) for cls, args in MARGINS for name in _ctor_params(cls)]


def _head_run(head):
    return _run(head, head.weight, 10, 6)


@pytest.mark.parametrize("cls,args,name", IF_CASES, ids=[f"{c.__name__}.{n}" for c, _, n in IF_CASES])
def test_an_assigned_insightface_margin_setting_reaches_the_head(cls, args, name):
    """Assigned on the margin module after a PartialFC_V2 was built on it: the head follows."""
    for value in _candidates(name, float(getattr(cls(*args), name))):
        module = cls(*args)
        head = insightface.PartialFC_V2(module, 12, 10)
        if not _assign(module, name, value):
            continue
        fresh = insightface.PartialFC_V2(cls(**{p: getattr(module, p) for p in _ctor_params(cls)}), 12, 10)
        fresh.weight.data.copy_(head.weight.data)
        _same(_head_run(head), _head_run(fresh))


@pytest.mark.parametrize("name", ["embedding_size", "num_classes", "sample_rate", "margin_softmax", "fp16"])
def test_partial_fc_v2_settings_are_assignable_or_fixed(name):
    head = insightface.PartialFC_V2(insightface.ArcFace(), 12, 10)
    value = {"embedding_size": 16, "num_classes": 20, "sample_rate": 0.5, "margin_softmax": insightface.CosFace(),
             "fp16": False}[name]
    if name == "fp16":  # read on every call
        head.fp16 = value
        assert head.fp16 is False
        return
    with pytest.raises(AttributeError, match=name):
        setattr(head, name, value)
