"""The property-based fuzz suite's cases and oracle (hypothesis, derandomized), shared by the in-process smoke
run and the subprocess runs of tests/test_fuzz.py.

A case: a backend, a loss variant (with a parameter possibly re-assigned to an edge or invalid value), random
B (0, 1 and odd sizes), C, d (1 and odd), dtype, scale (up to 1e30 in fp32/fp64), reduction, class_index
(none, a subset, or one with a bad id or a duplicate), labels with ignored, duplicated and out-of-range
entries, in any integer dtype that holds them (uint8 ... int64), every row ignored, NaN/Inf injected into the
features or the weight at the first, last or a middle row (or a target row), a feature or weight row scaled to
a huge (1e20, 1e30: its squares overflow fp32) or tiny (1e-30) norm, check_values on or off; and, on valid
input, the loss through a ``MarginHead`` whose fused SGD applies the update in its backward. The oracle, one of:

* a ValueError/TypeError whose message names the argument that is wrong (the parameter, "features",
  "weight", "labels", "class_index"), when the input is invalid and checked;
* the documented NaN when it is invalid and unchecked: every valid row that reads a non-finite weight row,
  the row of a NaN feature or an out-of-range label, every row for a bad class id;
* otherwise the float64 reference within tests/tolerances.py (loss, dx, dW), plus the large-scale floor.
Never a finite wrong value, a crash or a hang (the subprocess runs have a timeout).

Run directly: ``python -m tests.fuzz_cases BACKEND EXAMPLES`` prints ``examples: N`` after N passing cases.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import margin_kernels as mk
from margin_kernels.losses.reductions import ReductionKind
from margin_kernels.optim import FusedSGD

from .helpers import LOSS_NAMES, loss_and_grads, make_loss, rel_err, twin
from .tolerances import LOW_PRECISION, TOLERANCES, bounds, scale_bound

BAD_VALUES = (float("nan"), float("inf"), float("-inf"))
#: values assigned to a loss's margin parameter after construction: edges, and invalid ones that must raise
M_VALUES = (None, 0.0, 0.05, 1.5, -0.1, 3.5, float("nan"))
SCALES = (None, 0.5, 8.0, 100.0, 1e4, 1e30)
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: a row's norm scaled by it: 1e20 and 1e30 overflow an fp32 sum of squares, 1e-30 is near fp32's smallest normal
NORM_FACTORS = (1.0, 1.0, 1.0, 1e20, 1e30, 1e-30)


@dataclass
class Case:
    backend: str
    loss: str
    batch: int
    classes: int
    dim: int
    dtype: torch.dtype
    scale: Optional[float]
    m: Optional[float]
    reduction: str
    use_index: str          # "none", "subset", "bad_id", "duplicate"
    bad_label: Optional[int]
    inject: str             # "none", "features", "weight", "target_weight"
    position: str           # "first", "last", "middle"
    bad_value: float
    ignore_some: bool
    check_values: bool
    seed: int
    label_dtype: torch.dtype = torch.int64  # used where it holds every label of the case
    ignore_all: bool = False
    norm_factor: float = 1.0                 # one feature or weight row scaled by it (fp32/fp64/bf16)
    norm_side: str = "features"
    fused_head: bool = False                 # valid input only: through MarginHead + FusedSGD as well


#: losses with one weight row per class (sub-center losses have their own NaN and layout tests in
#: tests/test_subcenter.py)
SINGLE_ROW_LOSSES = [name for name in LOSS_NAMES if make_loss(name).sub_centers == 1]


def cases(backend: str, max_classes: int = 70, max_batch: int = 9):
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    return st.builds(
        Case, backend=st.just(backend), loss=st.sampled_from(SINGLE_ROW_LOSSES),
        batch=st.integers(0, max_batch), classes=st.integers(1, max_classes), dim=st.integers(1, 19),
        dtype=st.sampled_from(dtypes), scale=st.sampled_from(SCALES), m=st.sampled_from(M_VALUES),
        reduction=st.sampled_from(["mean", "sum", "none"]),
        use_index=st.sampled_from(["none", "none", "subset", "bad_id", "duplicate"]),
        bad_label=st.sampled_from([None, None, None, -5, 0, 10**6]),  # 0 becomes C (one past the end)
        inject=st.sampled_from(["none", "none", "features", "weight", "target_weight"]),
        position=st.sampled_from(["first", "last", "middle"]), bad_value=st.sampled_from(BAD_VALUES),
        ignore_some=st.booleans(), check_values=st.booleans(), seed=st.integers(0, 2**16),
        label_dtype=st.sampled_from(LABEL_DTYPES), ignore_all=st.sampled_from([False] * 9 + [True]),
        norm_factor=st.sampled_from(NORM_FACTORS), norm_side=st.sampled_from(["features", "weight"]),
        fused_head=st.sampled_from([False, False, False, True]))


def _row(position: str, n: int) -> int:
    return {"first": 0, "last": n - 1, "middle": n // 2}[position]


def _margin(case: Case):
    """The loss, or the expected error of assigning the case's parameters to it."""
    margin = make_loss(case.loss)
    for name, value in (("s", case.scale), ("m", case.m)):
        if value is None or name not in type(margin)._rules or (name == "s" and case.loss == "softmax"):
            continue
        if name == "s" and case.dtype not in (torch.float32, torch.float64) and value > 256:
            continue  # large scales only where the tolerance floor is defined
        try:
            setattr(margin, name, value)
        except (ValueError, TypeError) as exc:
            assert name in str(exc), f"the error does not name {name!r}: {exc}"
            return None, name
    return margin, None


def problem(case: Case):
    gen = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.batch, case.dim, generator=gen, dtype=torch.float64) * 3.0
    w = torch.randn(case.classes, case.dim, generator=gen, dtype=torch.float64) * 0.05
    index = None
    columns = case.classes
    if case.use_index != "none" and case.classes >= 2:
        index = torch.randperm(case.classes, generator=gen)[: max(1, case.classes // 2)]
        if case.use_index == "bad_id":
            index[-1] = case.classes + 3
        elif case.use_index == "duplicate" and index.numel() >= 2:
            index[-1] = index[0]
        columns = index.numel()
    labels = torch.randint(0, columns, (case.batch,), generator=gen)
    if case.ignore_some and case.batch:
        labels[torch.rand(case.batch, generator=gen) < 0.3] = -1
    if case.ignore_all:
        labels[:] = -1
    if case.bad_label is not None and case.batch:
        labels[_row(case.position, case.batch)] = columns if case.bad_label == 0 else case.bad_label
    info = torch.iinfo(case.label_dtype)
    if labels.numel() and info.min <= int(labels.min()) and int(labels.max()) <= info.max:
        labels = labels.to(case.label_dtype)
    factor = _norm_factor(case)
    if factor != 1.0:
        t = x if case.norm_side == "features" else w
        if t.shape[0]:
            t[_row(case.position, t.shape[0])] *= factor
    return x.to(case.dtype), w.to(case.dtype), labels, index


def _norm_factor(case: Case) -> float:
    """The case's norm factor where its dtype holds the scaled row (fp16 does not: 65504 is its largest) and the
    gradient of a tiny row (~ s / norm) stays finite in fp32; else 1."""
    if case.norm_factor == 1.0 or case.dtype == torch.float16:
        return 1.0
    if case.norm_factor < 1.0 and (case.scale or 64.0) > 100.0:
        return 1.0
    return case.norm_factor


def check_case(case: Case) -> None:
    margin, bad_param = _margin(case)
    if bad_param is not None:
        return
    x, w, labels, index = problem(case)
    labels_i64 = labels.long()
    valid = labels_i64 != -1
    num_columns = case.classes if index is None else index.numel()
    out_of_range = valid & ((labels_i64 < 0) | (labels_i64 >= num_columns))
    bad_index = index is not None and bool(((index < 0) | (index >= case.classes)).any())
    duplicate = index is not None and torch.unique(index).numel() != index.numel()
    read = torch.arange(case.classes) if index is None else index[(index >= 0) & (index < case.classes)]
    poisoned_rows = torch.zeros(case.batch, dtype=torch.bool)
    weight_read = False
    if case.inject == "features" and case.batch:
        r = _row(case.position, case.batch)
        x[r, case.dim // 2] = case.bad_value
        poisoned_rows[r] = True
    elif case.inject in ("weight", "target_weight"):
        r = _row(case.position, case.classes)
        if case.inject == "target_weight" and bool((valid & ~out_of_range).any()):
            row = int(torch.nonzero(valid & ~out_of_range)[0, 0])
            r = int(labels_i64[row]) if index is None else int(index[labels_i64[row]].clamp(0, case.classes - 1))
        w[r, case.dim // 2] = case.bad_value
        weight_read = bool((read == r).any())
    bad_input = bool(poisoned_rows.any()) or weight_read or bool(out_of_range.any()) or bad_index or duplicate

    def call(a, b):
        return mk.margin_cross_entropy(a, b, labels, twin(margin), backend=case.backend, reduction=case.reduction,
                                       class_index=index, check_values=case.check_values, chunk_size=16)

    if case.check_values and bad_input:
        try:
            call(x, w)
        except ValueError as exc:
            named = ("features" if poisoned_rows.any() else "class_index" if (bad_index or duplicate)
                     else "labels" if out_of_range.any() else "weight")
            if case.batch == 0 and named == "weight":
                return
            assert named in str(exc) or any(k in str(exc) for k in ("features", "labels", "class_index", "weight")), exc
            return
        # allowed without an error: nothing reads the bad value (no valid row, B = 0)
        assert not (valid & ~out_of_range).any() and not (bad_index or duplicate) and not out_of_range.any() \
            and not poisoned_rows.any(), f"{case}: bad input accepted"
        return
    if not case.check_values and bad_input:
        if duplicate or case.backend == "reference":
            return  # documented: duplicates are counted twice; the reference needs checked input
        per_row = mk.margin_cross_entropy(x, w, labels, twin(margin), backend=case.backend, reduction="none",
                                          class_index=index, check_values=False, chunk_size=16)
        usable = valid & ~out_of_range
        must_be_nan = out_of_range | (poisoned_rows & valid)
        if bad_index:
            must_be_nan = valid.clone()
        if weight_read:
            must_be_nan = must_be_nan | usable
        assert not torch.isfinite(per_row[must_be_nan]).any(), f"{case}: finite loss on a bad row {per_row}"
        return
    # valid input: the float64 reference within the table
    if case.batch == 0 and case.reduction == "none":
        return
    out = loss_and_grads(lambda a, b: call(a, b), x, w)
    ref_margin = margin
    ref = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels_i64, twin(ref_margin),
                                                              backend="reference", reduction=case.reduction,
                                                              class_index=index),
                         x.double(), w.double())
    # "reference" in a storage dtype against itself in float64: the portable chunk loop's bounds apply (it
    # computes in the same accumulation dtype, with no more rounding)
    table_key = {"auto": "cpu", "reference": "torch"}.get(case.backend, case.backend)
    tol = bounds(table_key, case.dtype, margin.negative_kind)[torch.float64]
    if case.dtype in LOW_PRECISION and margin.reduction_kind == ReductionKind.SOFTPLUS_SUM:
        # the binary family in bf16/fp16: every one of the B x C sigmoids carries the rounding of x/||x||
        # (2^-9 bf16, 2^-12 fp16) through r * h'(c) (SphereFace2: r = 40 times t ((c+1)/2)^(t-1), up to 120;
        # the M variant's multiplicative margin more), and at the fuzz's tiny d (2, 3) nothing averages it out
        # (observed worst: loss 7.4e-3, dx 6.5e-2, dW 7.9e-2 at d = 2-3, C = 1). Here the oracle catches
        # garbage and NaN; the binary family's sharp low-precision checks are tests/test_binary.py's.
        tol = TOLERANCES[(table_key, torch.bfloat16)].float64_thresholded
    floor = scale_bound(case.dtype, margin.s, case.dim)
    assert all(torch.isfinite(t).all() for t in out), f"{case}: non-finite result on valid input"
    scale = max(1.0, ref[0].abs().max().item()) if ref[0].numel() else 1.0
    loss_err = (out[0].double() - ref[0]).abs().max().item() / scale if ref[0].numel() else 0.0
    # d = 1 with normalised features and weights: every cosine is exactly +-1, where a target formula's
    # clamped arccos (acos(1 - 1e-7): 1 - 1e-7 is no fp32 number) differs between fp32 and fp64 by ~5e-5 rad,
    # times s: the loss value is compared there in fp64 only (finiteness above, always)
    exact_unit_cosines = case.dim == 1 and margin.normalize_features and margin.normalize_weight
    if case.dtype == torch.float64 or not exact_unit_cosines:
        assert loss_err <= tol.loss + floor, f"{case}: loss error {loss_err:.2e}"
    # a gradient that is exactly 0 in theory (d = 1 with normalised features: x/|x| is constant) is measured
    # against 1e-3 of the larger gradient, not against its own rounding noise
    eps = torch.finfo(torch.float64 if case.dtype == torch.float64 else torch.float32).eps
    # (or, when both are, against the rounding of the terms that cancel: s |x| / |w_j| per element of the
    # B x C tile, the normalisation backward's two halves)
    x_max = x.double().abs().max().item() if x.numel() else 0.0
    w_min = max(w.double().norm(dim=1).min().item(), 1e-6)
    noise = 10 * eps * max(1.0, margin.s) * max(1.0, x_max) / min(1.0, w_min) * math.sqrt(case.batch * case.classes)
    grad_floor = max(1e-3 * max(ref[1].norm().item(), ref[2].norm().item()), noise, 1e-12)
    dx_err, dw_err = rel_err(out[1], ref[1], grad_floor), rel_err(out[2], ref[2], grad_floor)
    # d = 1: a normalised side is the constant +-1 and its exact gradient is 0; what a backend returns there
    # is the rounding of two cancelling halves (checked finite above), not a value to compare
    if not (case.dim == 1 and margin.normalize_features):
        assert dx_err <= tol.dx + floor, f"{case}: dx error {dx_err:.2e}"
    if not (case.dim == 1 and margin.normalize_weight):
        assert dw_err <= tol.dw + floor, f"{case}: dw error {dw_err:.2e}"
        if case.fused_head:
            check_fused_head(case, margin, x, w, labels, index, tol)


def check_fused_head(case: Case, margin, x, w, labels, index, tol) -> None:
    """The same valid problem through a ``MarginHead`` with a fused plain SGD (lr 1): the loss the functional
    call gives, and a weight moved by exactly minus the reference gradient, within the table's dW bound."""
    if case.backend == "reference" or case.dtype not in (torch.float32, torch.float64) or not margin.s < 1e4:
        return  # the reference has no fused update; low precision and huge scales are the oracle above's
    head = mk.MarginHead(case.classes, case.dim, twin(margin), backend=case.backend, reduction=case.reduction,
                         dtype=case.dtype, check_values=case.check_values, chunk_size=16)
    with torch.no_grad():
        head.weight.copy_(w)
    head.fuse(FusedSGD(head.parameters(), lr=1.0))
    features = x.clone().requires_grad_()
    loss = head(features, labels, class_index=index)
    (loss.sum() if case.reduction == "none" else loss).backward()
    head.fused_optimizer.step()
    assert head.weight.grad is None
    _, _, ref_dw = loss_and_grads(lambda a, b: mk.margin_cross_entropy(
        a, b, labels.long(), twin(margin), backend="reference", reduction=case.reduction, class_index=index),
        x.double(), w.double())
    moved = (w.double() - head.weight.detach().double())
    grad_floor = max(1e-3 * ref_dw.norm().item(), 1e-12)
    err = rel_err(moved, ref_dw, grad_floor)
    assert torch.isfinite(head.weight).all(), f"{case}: the fused update wrote a non-finite weight"
    assert err <= tol.dw + scale_bound(case.dtype, margin.s, case.dim), f"{case}: fused update error {err:.2e}"


def run(backend: str, examples: int, **limits) -> int:
    """Check ``examples`` derandomized cases on ``backend``; returns how many ran."""
    count = [0]

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(cases(backend, **limits))
    def test(case):
        count[0] += 1
        check_case(case)

    test()
    return count[0]


if __name__ == "__main__":
    name, n = sys.argv[1], int(sys.argv[2])
    limits = {"max_classes": int(sys.argv[3])} if len(sys.argv) > 3 else {}
    print(f"examples: {run(name, n, **limits)}")
