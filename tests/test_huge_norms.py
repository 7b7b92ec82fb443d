"""Norms that once overflowed (issue 25 point 2): an fp32 row of norm > ~1.8e19 summed its squares to inf, so
its cosines were 0 and the loss finite and wrong (205.6 where the float64 reference gives 384.7), on torch, cpu
and Triton. Each backend, in each dtype it takes, on a problem where some feature rows or weight rows are
scaled to a huge or a tiny norm, against the float64 reference on the same (rounded) inputs; the reference
itself against the unscaled problem (the losses here normalise both sides: scaling a row changes no cosine).

Gradients are compared in the rows' own units: dL/dx_i * ||x_i|| and dL/dw_j * ||w_j|| (a row of norm 1e30 has
a gradient ~1e-30 that a plain relative error over the whole tensor would not see).
"""
from __future__ import annotations

import pytest
import torch

import margin_kernels as mk
from margin_kernels import norms
from margin_kernels.backends import available_backends

from .helpers import loss_and_grads, make_loss, random_problem, rel_err
from .tolerances import bounds, subnormal_bounds

BACKENDS = [name for name in ("torch", "cpu", "triton") if available_backends().get(name, "absent") is None]
#: normalised on both sides (ArcFace), on both sides with the weight rows' max over K (sub-centers), and a loss
#: that reads the feature norm itself (MagFace)
LOSSES = ["arcface", "subcenter_arcface", "magface"]
HUGE = [1e20, 1e30, 3e38]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
B, C, D = 8, 21, 24


def _norm_cases(dtype):
    """(name, target norm) of the scaled rows in ``dtype``: huge ones, one past fp64's square root for fp64,
    and tiny ones (1e-30; a row whose largest entry is subnormal in the dtype)."""
    cases = [(f"{n:g}", n) for n in HUGE]
    if dtype == torch.float64:
        cases.append(("1e200", 1e200))
    cases += [("1e-30", 1e-30), ("subnormal", torch.finfo(dtype).tiny / 4)]
    return cases


CASES = [(dtype, side, name, value) for dtype in DTYPES for side in ("features", "weight")
         for name, value in _norm_cases(dtype)]


def _problem(loss_name, side, value, dtype):
    """(x, w, labels, scaled rows) in fp64 with the chosen rows scaled so that (in the storage dtype) their
    norm is ``value``, or their largest entry is ``value`` for the subnormal case; then stored in ``dtype``."""
    k = make_loss(loss_name).sub_centers
    x, w, y = random_problem(B, C, D, dtype=torch.float64, seed=3, sub_centers=k)
    if side == "features":
        rows, t = torch.tensor([1, 5]), x
    else:  # row 0's target class's rows and a class that is only a negative
        neg = next(c for c in range(C) if c not in y.tolist())
        rows, t = torch.cat([torch.arange(y[0] * k, y[0] * k + k), torch.arange(neg * k, neg * k + k)]), w
    t = t.clone()
    size = t[rows].abs().amax(dim=1, keepdim=True) if value < torch.finfo(dtype).tiny else t[rows].norm(dim=1,
                                                                                                 keepdim=True)
    t[rows] = t[rows] / size * value
    x, w = (t, w) if side == "features" else (x, t)
    return x.to(dtype), w.to(dtype), y, rows


def _errors(out, ref, x64, w64):
    loss, dx, dw = out
    ref_loss, ref_dx, ref_dw = ref
    scale = max(1.0, ref_loss.abs().max().item())
    row_units = lambda g, t: g.double() * norms.row_norms(t, torch.float64).unsqueeze(1)  # noqa: E731
    return ((loss.double() - ref_loss).abs().max().item() / scale,
            rel_err(row_units(dx, x64), row_units(ref_dx, x64)),
            rel_err(row_units(dw, w64), row_units(ref_dw, w64)))


def _run(backend, loss_name, x, w, y):
    margin = make_loss(loss_name)
    return loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, y, margin, backend=backend,
                                                               reduction="none"), x, w)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("dtype,side,name,value", CASES,
                         ids=[f"{str(d)[6:]}-{s}-{n}" for d, s, n, _ in CASES])
def test_the_reference_is_scale_invariant(loss_name, dtype, side, name, value):
    """The ground truth first: in float64 its loss with the rows scaled equals the unscaled problem's (the
    cosines are the same), and its gradients scale by the inverse factor (compared in the rows' own units).
    Tiny rows are floored (x / max(||x||, eps)): no invariance to check there."""
    if value < 1.0:
        pytest.skip("a row below eps is floored, not scale invariant")
    x, w, y, _ = _problem(loss_name, side, value, dtype)
    x64, w64 = x.double(), w.double()
    unit_x, unit_w = x64 / norms.row_norms(x64, torch.float64)[:, None], w64 / norms.row_norms(w64, torch.float64)[:, None]
    if loss_name == "magface" and side == "features":
        pytest.skip("MagFace reads the feature norm: scaling a feature changes its loss")
    scaled = _run("reference", loss_name, x64, w64, y)
    if side == "features":
        plain = _run("reference", loss_name, unit_x * 30.0, w64, y)
        got = (scaled[0], scaled[1] * norms.row_norms(x64, torch.float64)[:, None], scaled[2])
        want = (plain[0], plain[1] * 30.0, plain[2])
    else:
        plain = _run("reference", loss_name, x64, unit_w, y)
        got = (scaled[0], scaled[1], scaled[2] * norms.row_norms(w64, torch.float64)[:, None])
        want = plain
    assert torch.isfinite(scaled[0]).all() and torch.isfinite(scaled[1]).all() and torch.isfinite(scaled[2]).all()
    assert (got[0] - want[0]).abs().max().item() <= 1e-12 * max(1.0, want[0].abs().max().item())
    assert rel_err(got[1], want[1]) <= 1e-12 and rel_err(got[2], want[2]) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("dtype,side,name,value", CASES,
                         ids=[f"{str(d)[6:]}-{s}-{n}" for d, s, n, _ in CASES])
def test_huge_and_tiny_norms_match_the_reference(backend, loss_name, dtype, side, name, value):
    x, w, y, rows = _problem(loss_name, side, value, dtype)
    x64, w64 = x.double(), w.double()
    ref = _run("reference", loss_name, x64, w64, y)
    out = _run(backend, loss_name, x, w, y)
    for what, t in zip(("loss", "dx", "dw"), out):
        assert torch.isfinite(t).all(), f"{what} not finite"
    margin = make_loss(loss_name)
    bound = bounds(backend, dtype, margin.negative_kind)[torch.float64]
    extra = subnormal_bounds(dtype, value if side == "weight" else 0.0, margin.s)
    loss_err, dx_err, dw_err = _errors(out, ref, x64, w64)
    assert loss_err <= bound.loss + extra[0], f"loss {loss_err:.2e}"
    assert dx_err <= bound.dx + extra[1], f"dx {dx_err:.2e}"
    assert dw_err <= bound.dw + extra[2], f"dw {dw_err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_row_norms_cannot_overflow(dtype):
    """norms.py itself: a row of the dtype's largest entries has the exact norm (or inf only where the norm is
    beyond the dtype's range), rows normalise to unit rows, inverse norms are right down to the subnormals, and
    ordinary rows are bit for bit the plain torch norm."""
    big = torch.finfo(dtype).max
    rows = torch.tensor([[big / 64] * 16, [big / 4, -big / 4, 0.0, 0.0] * 4, [1.0, 2.0, 3.0, 4.0] * 4,
                         [1e-30] * 16], dtype=torch.float64).to(dtype)
    stored = rows.double()  # the entries as the dtype rounded them
    exact = torch.tensor([stored[0, 0].item() * 4, stored[1, 0].item() * 8 ** 0.5, 120 ** 0.5,
                          stored[3, 0].item() * 4], dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = norms.row_norms(rows, acc)
    finite = exact < torch.finfo(acc).max
    eps = torch.finfo(acc).eps
    # the 1e-30 row's squares underflow in fp32 (its norm reads 0): below eps, so floored alike
    assert torch.allclose(got[:3][finite[:3]].double(), exact[:3][finite[:3]], rtol=8 * eps, atol=0), (got, exact)
    assert norms.floored(got[3]).item() == norms.floored(exact[3].to(acc)).item()
    assert torch.isinf(got[:3][~finite[:3]]).all()
    unit, norm = norms.normalized(rows, acc)
    assert torch.equal(norm, got)
    assert torch.allclose(unit[:3].double().norm(dim=1), torch.ones(3, dtype=torch.float64), rtol=8 * eps)
    inv = norms.inverse_norms(rows, acc).double()
    want = 1.0 / exact.clamp_min(norms.NORM_EPS)
    # 1/||r|| may be subnormal in fp32: its absolute spacing there is 2^-149
    assert torch.allclose(inv, want, rtol=8 * eps, atol=2.0 ** -148 if acc == torch.float32 else 0.0), (inv, want)
    plain = rows[2:].to(acc)
    assert torch.equal(norms.row_norms(plain, acc), plain.norm(dim=1))
    assert torch.equal(norms.normalized(plain, acc)[0], plain / plain.norm(dim=1, keepdim=True).clamp_min(1e-12))


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_row_keeps_its_non_finite_norm(value):
    rows = torch.tensor([[1e30, value, 1.0], [1.0, 2.0, 2.0]], dtype=torch.float32)
    got = norms.row_norms(rows, torch.float32)
    assert (torch.isinf(got[0]) if value == float("inf") else torch.isnan(got[0])) and got[1].item() == 3.0
