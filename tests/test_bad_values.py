"""No silent wrong answer: each probe of issue 13 that once returned a plausible value, with its fix.

* a NaN/Inf in a weight row (the last row once gave the `cpu` backend a loss of 0): an error with
  check_values on, NaN with it off, the same on every backend;
* the `cpu` epilogue at extreme scales (s = 1e4: 1e-4 gradient error; s = 1e30: NaN gradients): the backward
  exponentiated a fused-multiply-add logit, not the rounded one the forward summed;
* labels out of range under torch.compile or with check_values=False: an error, or a NaN row; never a
  plausible loss nor an out-of-bounds read;
* loss parameters assigned after construction (`margin.s = -64`): rejected where they are set.
"""
from __future__ import annotations

import pytest
import torch

import margin_kernels as mk
from margin_kernels.backends import available_backends

from .helpers import LOSS_NAMES, loss_and_grads, make_loss, random_problem, rel_err
from .tolerances import EXTREME_SCALE_BETWEEN_BACKENDS, EXTREME_SCALE_F32, FP64_END_TO_END

#: every backend that runs in this process, "auto" included (on CPU: the fused C++ path)
RUNNABLE = ["auto"] + [name for name, reason in available_backends().items() if reason is None]
#: one loss per negative kind, plus raw weights (Softmax) and raw features (SphereFace)
KIND_LOSSES = ["arcface", "softmax", "adaface", "curricularface", "mv_am", "circle", "combined_filter",
               "sphereface"]


def _loss_named(name: str) -> mk.MarginLoss:
    return make_loss(name) if name in LOSS_NAMES else make_loss(next(n for n in LOSS_NAMES if n.startswith(name)))


def test_kind_losses_exist():
    for name in KIND_LOSSES:
        assert any(n == name or n.startswith(name) for n in LOSS_NAMES), name


def _poisoned_weight(classes: int, row: int, value: float, dim: int = 16, seed: int = 0):
    x, w, y = random_problem(9, classes, dim, dtype=torch.float32, seed=seed)
    y = torch.where(y == row % classes, (y + 1) % classes, y)  # the bad class is a negative of every row
    w = w.clone()
    w[row, dim // 3] = value
    return x, w, y


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("classes", [10, 37, 64, 100])
def test_nan_in_the_last_weight_row_is_flagged(backend, classes):
    x, w, y = _poisoned_weight(classes, classes - 1, float("nan"))
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend)
    loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend, reduction="none", check_values=False)
    assert torch.isnan(loss).all(), f"{backend}: {loss}"


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("loss_name", KIND_LOSSES)
@pytest.mark.parametrize("where,value", [("first", float("nan")), ("middle", float("inf")), ("last", float("-inf")),
                                         ("target", float("nan"))])
def test_non_finite_weight_never_gives_a_finite_loss(backend, loss_name, where, value):
    classes = 41
    row = {"first": 0, "middle": classes // 2, "last": classes - 1, "target": 0}[where]
    x, w, y = _poisoned_weight(classes, row, value)
    if where == "target":
        y[4] = row  # one row's own class is the bad one
    margin = _loss_named(loss_name)
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        mk.margin_cross_entropy(x, w, y, margin, backend=backend, chunk_size=16)
    loss = mk.margin_cross_entropy(x, w, y, _loss_named(loss_name), backend=backend, reduction="none",
                                   chunk_size=16, check_values=False)
    assert not torch.isfinite(loss).any(), f"{backend} {loss_name}: {loss}"


def test_non_finite_weight_outside_class_index_is_not_read():
    x, w, y = _poisoned_weight(30, 29, float("nan"))
    index = torch.arange(0, 20)
    y = y % 20
    for backend in RUNNABLE:
        loss = mk.margin_cross_entropy(x, w, y, mk.CosFace(), backend=backend, class_index=index)
        assert torch.isfinite(loss), backend


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("loss_cls", [mk.CosFace, mk.ArcFace, mk.NormFace])
def test_extreme_scales_match_the_float64_reference(scale, loss_cls):
    """The cpu epilogue once gave a 1.1e-4 gradient error at s = 1e4 and NaN gradients at s = 1e30: its
    backward formed exp(fma(s, g, -lse)), not exp(z - lse) with the z the forward had summed."""
    x, w, y = random_problem(12, 50, 16, dtype=torch.float64, seed=3)
    x, w = x.float(), w.float()

    def run(backend, a, b):
        return mk.margin_cross_entropy(a, b, y, loss_cls(s=scale), backend=backend, reduction="none",
                                       chunk_size=16)

    ref = loss_and_grads(lambda a, b: run("reference", a, b), x.double(), w.double())
    outs = {backend: loss_and_grads(lambda a, b: run(backend, a, b), x, w)
            for backend in RUNNABLE if backend not in ("auto", "reference")}
    tol = EXTREME_SCALE_F32
    for backend, out in outs.items():
        assert all(torch.isfinite(t).all() for t in out), backend
        loss_err = (out[0].double() - ref[0]).abs().max().item() / max(1.0, ref[0].abs().max().item())
        assert loss_err <= tol.loss, backend
        assert rel_err(out[1], ref[1]) <= tol.dx, backend
        assert rel_err(out[2], ref[2]) <= tol.dw, backend
        for i in (1, 2):
            assert rel_err(out[i], outs["torch"][i]) <= EXTREME_SCALE_BETWEEN_BACKENDS, backend


# ---- labels ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("label", [-5, 20, 10**9])
def test_out_of_range_label_unchecked_gives_a_nan_row_not_a_read(backend, label):
    x, w, y = random_problem(6, 20, 8, dtype=torch.float32)
    y[2] = label
    if backend == "reference":  # the ground truth indexes with the labels: it needs checked ones
        with pytest.raises((IndexError, RuntimeError)):
            mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend, check_values=False)
        return
    per_row = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend, reduction="none",
                                      check_values=False)
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[torch.arange(6) != 2]).all()
    assert torch.isnan(mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend, check_values=False))


def test_out_of_range_class_index_unchecked_gives_nan():
    x, w, y = random_problem(6, 20, 8, dtype=torch.float32)
    index = torch.tensor([0, 4, 7, 25])
    for backend in [b for b in RUNNABLE if b != "reference"]:
        loss = mk.margin_cross_entropy(x, w, y % 4, mk.ArcFace(), backend=backend, class_index=index,
                                       check_values=False)
        assert torch.isnan(loss), backend


@pytest.mark.parametrize("label", [-5, 20])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_out_of_range_label_raises_under_torch_compile(backend, label):
    """A device-side check (torch._assert_async): traced by dynamo, no host sync; on CPU it raises at once."""
    if backend not in RUNNABLE:
        pytest.skip(f"{backend} is unavailable here")
    x, w, y = random_problem(6, 20, 8, dtype=torch.float32)
    compiled = torch.compile(mk.margin_cross_entropy, fullgraph=True, backend="aot_eager")
    assert torch.isfinite(compiled(x, w, y, mk.ArcFace(), backend=backend))
    y[1] = label
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 20\)"):
        compiled(x, w, y, mk.ArcFace(), backend=backend)


def test_device_checks_without_host_sync_name_the_argument(monkeypatch):
    """The GPU path of the value checks, run on CPU: ``value_check_mode`` says DEVICE there."""
    from margin_kernels import validation
    monkeypatch.setattr(validation, "value_check_mode", lambda check_values, device: validation.DEVICE
                        if check_values else None)
    from margin_kernels import functional
    monkeypatch.setattr(functional, "value_check_mode", validation.value_check_mode)
    x, w, y = random_problem(6, 20, 8, dtype=torch.float32)
    cases = [
        (lambda: (x, w, torch.where(torch.arange(6) == 0, 99, y), None), "labels must be in"),
        (lambda: (x.index_fill(0, torch.tensor([1]), float("nan")), w, y, None), "features contain NaN"),
        (lambda: (x, w.index_fill(0, torch.tensor([19]), float("inf")), y % 19, None), "weight contains NaN"),
        (lambda: (x, w, y % 3, torch.tensor([1, 2, 30])), "class_index values must be in"),
        (lambda: (x, w, y % 3, torch.tensor([1, 2, 1])), "class_index must not contain duplicates"),
    ]
    for make, message in cases:
        a, b, labels, index = make()
        with pytest.raises(RuntimeError, match=message):
            mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="torch", class_index=index)


def test_head_with_sampling_unchecked_bad_label_is_a_nan_row():
    head = mk.MarginHead(40, 8, mk.CosFace(), sample_rate=0.5, check_values=False, backend="torch")
    x = torch.randn(5, 8)
    y = torch.tensor([1, 2, 400, 3, -7])
    loss = head(x, y)
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="labels must be in"):
        mk.MarginHead(40, 8, mk.CosFace(), sample_rate=0.5, backend="torch")(x, y)


# ---- parameters ----------------------------------------------------------------------------------------------
BAD_ASSIGNMENTS = [
    ("s", -64.0), ("s", float("nan")), ("s", float("inf")), ("s", 0), ("s", "64"), ("s", True),
    ("m", -0.1), ("m", float("nan")), ("m", 100.0),
]


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_invalid_parameter_assignment_raises_and_keeps_the_value(loss_name):
    margin = make_loss(loss_name)
    for name, value in BAD_ASSIGNMENTS:
        if name not in type(margin)._rules or (name == "s" and type(margin).__name__ in ("Softmax",)):
            continue
        before = getattr(margin, name)
        with pytest.raises((ValueError, TypeError), match=name):
            setattr(margin, name, value)
        assert getattr(margin, name) == before
    assert "s" in type(margin)._rules


def test_cross_parameter_constraint_and_derived_kind_follow_assignment():
    magface = mk.MagFace()
    with pytest.raises(ValueError, match="u_a must be greater than l_a"):
        magface.u_a = 5.0
    assert magface.u_a == 110.0
    combined = mk.CombinedMargin()
    combined.interclass_filtering_threshold = 0.3
    assert combined.negative_spec().kind == mk.losses.negatives.NegativeKind.FILTER
    circle = mk.CircleLoss()
    with pytest.raises(ValueError, match="gamma"):
        circle.gamma = -1
    circle.gamma = 128
    assert circle.s == 128.0


def test_valid_assignment_changes_the_loss():
    x, w, y = random_problem(6, 20, 8, dtype=torch.float64)
    margin = mk.CosFace(s=30.0)
    before = mk.margin_cross_entropy(x, w, y, margin, backend="torch")
    margin.s = 64
    assert isinstance(margin.s, float)
    after = mk.margin_cross_entropy(x, w, y, margin, backend="torch")
    assert torch.allclose(after, mk.margin_cross_entropy(x, w, y, mk.CosFace(s=64.0), backend="reference"),
                          rtol=FP64_END_TO_END, atol=0.0)
    assert not torch.allclose(before, after)
