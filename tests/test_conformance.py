"""One conformance suite for every backend: backend x dtype x loss x shape variant against the float64
full-logit reference (tests/helpers.compare_with_references), bounded only by tests/tolerances.py; and the
negative functions of every backend at their branch points against losses/negatives.py.

What runs (the full cross product is too slow under Triton's interpreter):
  * every loss of the registry x every dtype on the base shape (B=12, C=83, d=24, chunk 32, one ignored row);
  * every shape variant (SHAPES) x every dtype on BRANCH_LOSSES, which together reach every negative kind
    (the ten of losses/negatives.py: IDENTITY arcface, CLAMP adaface, CURRICULAR, MV, CIRCLE, FILTER combined,
    ROW_SCALE adacos, AFFINE npcface, POWER_ST / POWER sphereface2 with the binary reduction) plus unnormalised
    weights (softmax); by default only on SHAPE_LOSSES, the rest slow-marked.
Triton runs with 16-wide tiles forced (triton_configs.fixed_configs), so every case spans several class tiles,
K steps and class splits; a shape may set its own split count. The CUDA backend runs on a CUDA device only
(skipped with the reason otherwise), as does Triton outside the interpreter.

MK_RECORD_ERRORS=<file> appends every case's errors to <file> (json lines); ``python -m tests.tolerances
<file>`` prints the worst cases, which is how the table's ``observed`` values were measured.
"""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from margin_kernels import _native
from margin_kernels.backends import unavailable_reason
from margin_kernels.losses.negatives import NegativeKind, negative_derivative, negative_value

from .helpers import LOSS_NAMES, SPECS, compare_with_references, make_loss
from .tolerances import NEGATIVE_FUNCTION, THRESHOLDED_KINDS, bounds

CUDA = torch.cuda.is_available()
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: one loss per negative kind, and Softmax for unnormalised weights
BRANCH_LOSSES = ["softmax", "arcface", "adaface", "curricularface", "mv_arc", "circle", "combined_filter", "adacos",
                 "npcface", "sphereface2", "sphereface2_exact"]  # POWER_ST, POWER: also the binary reduction
#: the losses the shape variants run by default: one per way through the chunk loop, the Triton tiles and row
#: blocks that a shape can change. Unnormalised weights (softmax) and normalised IDENTITY (arcface); the kinds
#: with state across elements: CURRICULAR (a per-row threshold from the target cosine, and its running t
#: buffer), FILTER (chunks and Triton tiles skipped by the interclass filter), ROW_SCALE (AdaCos's per-row
#: scale from statistics over every class); and the binary reduction (sphereface2, SOFTPLUS_SUM, POWER_ST).
#: The other kinds (CLAMP adaface, MV, CIRCLE, AFFINE npcface, POWER sphereface2_exact) differ from these only
#: in the elementwise negative function of the same epilogues, which every loss runs on the base shape (every
#: backend and dtype) and test_negative_functions_at_branch_points checks at its branch points; their shape
#: variants are slow-marked (CI runs them). Same line and branch coverage of margin_kernels either way
#: (coverage.py, measured when this was split).
SHAPE_LOSSES = ["softmax", "arcface", "curricularface", "combined_filter", "adacos", "sphereface2"]
#: kinds whose derivative is a smooth function computed differently per backend (a power): compared to
#: rounding, not bit for bit
SMOOTH_DERIVATIVE_KINDS = {NegativeKind.POWER}

#: keyword arguments of compare_with_references (``splits``: Triton's class split count, default 2); the base
#: shape is the helper's default (B=12, C=83, d=24, chunk 32, row 3 ignored)
SHAPES = {
    "classes_not_multiple_of_tile": dict(classes=257, chunk_size=50),  # last Triton tile holds one class
    "odd_dim_one_chunk": dict(dim=33, classes=97, chunk_size=None),
    "single_row_wide_dim": dict(batch=1, classes=37, dim=200, chunk_size=8, ignore_rows=()),
    "duplicated_labels_one_chunk": dict(batch=12, classes=64, dim=40, chunk_size=64, ignore_rows=(),
                                        duplicate=True),
    "chunk_of_one_class": dict(batch=6, classes=23, dim=24, chunk_size=1, ignore_rows=(0,), duplicate=True),
    "ignored_rows_dim96": dict(batch=9, classes=50, dim=96, chunk_size=16, ignore_rows=(2, 5)),
    "class_index_and_ignored_rows": dict(class_index=True, ignore_rows=(0, 5, 6)),
    # C = 1: every labelled row has no negative (lse = -inf, loss 0); the ignored row has one
    "only_the_target_class": dict(batch=5, classes=1, ignore_rows=(2,), chunk_size=None),
    "all_rows_ignored": dict(batch=4, ignore_rows=(0, 1, 2, 3)),
    "non_contiguous_weight": dict(batch=9, classes=120, dim=20, chunk_size=32, transposed_weight=True),
    "wide_tile_many_strips": dict(batch=5, classes=1500, dim=8, chunk_size=700),
    # two Triton row blocks, C = 37 (3 tiles, the last partial), odd d, one to seven class splits (7 > tiles:
    # empty splits), duplicated labels and ignored rows
    "two_row_blocks_1_split": dict(batch=20, classes=37, dim=17, chunk_size=16, ignore_rows=(0, 19),
                                   duplicate=True, splits=1),
    "two_row_blocks_3_splits": dict(batch=20, classes=37, dim=40, chunk_size=16, ignore_rows=(0, 19),
                                    duplicate=True, splits=3),
    "two_row_blocks_7_splits": dict(batch=20, classes=37, dim=24, chunk_size=16, ignore_rows=(0, 19),
                                    duplicate=True, splits=7),
}
#: cases slow enough under Triton's interpreter (~2 s each, 94 class tiles) to run only with the slow ones
SLOW = {("triton", "wide_tile_many_strips")}
#: known bugs (strict: the test fails once they are fixed, so the mark must go)
#: (backend, dtype, loss, shape) -> why it fails; a strict xfail until fixed (none known now)
KNOWN_BUGS: dict = {}


def _backend_skip_reason(backend):
    if backend == "cuda" and not CUDA:
        return (f"needs a CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}, reports "
                f"torch.cuda.is_available() == False)")
    if backend == "cuda":
        module, reason = _native.load(with_cuda=True)
        return None if module is not None else f"the CUDA extension is unavailable: {reason}"
    reason = unavailable_reason(backend)
    return None if reason is None else f"the {backend!r} backend cannot run here: {reason}"


def _backends():
    return [pytest.param(b, marks=pytest.mark.cuda) if b == "cuda" else b for b in ("torch", "cpu", "triton", "cuda")]


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and CUDA) else "cpu"


@contextlib.contextmanager
def _tiles(backend, splits):
    if backend != "triton":
        yield
        return
    from margin_kernels.backends import triton_configs as configs
    with configs.fixed_configs(forward=configs.ForwardTiles(16, 16, 16), backward=configs.BackwardTiles(16, 16),
                               splits=splits):
        yield


def check_conformance(backend, dtype_name, name, shape="base"):
    reason = _backend_skip_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    dtype = DTYPES[dtype_name]
    kwargs = dict(SHAPES.get(shape, {}))
    splits = kwargs.pop("splits", 2)
    kind = make_loss(name).negative_spec().kind
    required = bounds(backend, dtype, kind)
    with _tiles(backend, splits):
        errors = compare_with_references(backend, name, dtype, device=_device(backend),
                                         reference_dtypes=tuple(required), **kwargs)
    record = os.environ.get("MK_RECORD_ERRORS")
    if record:
        with open(record, "a") as f:
            for ref_dtype, err in errors.items():
                f.write(json.dumps(dict(backend=backend, dtype=dtype_name, loss_name=name, shape=shape,
                                        reference=str(ref_dtype).replace("torch.", ""),
                                        thresholded=kind in THRESHOLDED_KINDS, **err.as_dict())) + "\n")
    bad = [f"vs {str(ref).replace('torch.', '')} reference: {v}" for ref, b in required.items()
           for v in b.violations(errors[ref])]
    assert not bad, f"{backend} {name} {dtype_name} {shape}: " + "; ".join(bad)


def _marks(backend, dtype_name, name, shape):
    marks = []
    if (backend, shape) in SLOW or name not in SHAPE_LOSSES:
        marks.append(pytest.mark.slow)
    bug = KNOWN_BUGS.get((backend, dtype_name, name, shape))
    if bug is not None and not (backend == "triton" and CUDA):  # seen in the interpreter; GPUs may flush denormals
        marks.append(pytest.mark.xfail(strict=True, reason=bug))
    return marks


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # interpreter, C = 1
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", _backends())
def test_every_loss_on_the_base_shape(backend, dtype_name, name):
    check_conformance(backend, dtype_name, name)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend, dtype_name, name, shape", [
    pytest.param(backend, dtype_name, name, shape,
                 marks=_marks(backend, dtype_name, name, shape) + ([pytest.mark.cuda] if backend == "cuda" else []),
                 id=f"{backend}-{dtype_name}-{name}-{shape}")
    for backend in ("torch", "cpu", "triton", "cuda") for dtype_name in DTYPES for name in BRANCH_LOSSES
    for shape in SHAPES])
def test_shape_variants(backend, dtype_name, name, shape):
    check_conformance(backend, dtype_name, name, shape)


def test_branch_losses_reach_every_negative_kind():
    kinds = {make_loss(name).negative_spec().kind for name in BRANCH_LOSSES}
    assert kinds == set(NegativeKind)
    assert set(SHAPE_LOSSES) <= set(BRANCH_LOSSES)
    assert {make_loss(name).negative_spec().reduction for name in SHAPE_LOSSES} == \
        {make_loss(name).negative_spec().reduction for name in BRANCH_LOSSES}
    assert not make_loss("softmax").normalize_weight


# ---- the negative functions at their branch points ----------------------------------------------------------
ROWS, COLS = 8, 64


def branch_point_inputs(kind, dtype):
    """(c, row_params): random cosines in [-1.2, 1.2], and in columns 0..11 every branch point (T_i, a, b, -a)
    exactly, one ulp below and one ulp above (in ``dtype``: where > and >= differ)."""
    spec = SPECS[kind]
    gen = torch.Generator().manual_seed(int(kind))
    row_params = torch.stack([torch.rand(ROWS, generator=gen, dtype=torch.float64) * 1.6 - 0.8,
                              torch.rand(ROWS, generator=gen, dtype=torch.float64) * 0.5], dim=1).to(dtype)
    c = (torch.rand(ROWS, COLS, generator=gen, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    points = [row_params[:, 0]] + [torch.full((ROWS,), v, dtype=dtype) for v in (spec.a, spec.b, -spec.a)]
    for i, p in enumerate(points):
        c[:, 3 * i] = p
        c[:, 3 * i + 1] = torch.nextafter(p, torch.full_like(p, -2.0))
        c[:, 3 * i + 2] = torch.nextafter(p, torch.full_like(p, 2.0))
    return c, row_params


def _native_negatives(c, row_params, spec):
    module, reason = _native.load()
    if module is None:
        pytest.skip(f"the native CPU extension is unavailable: {reason}")
    return module.negative_eval(c, row_params, int(spec.kind), spec.a, spec.b)


try:  # conftest.py has set TRITON_INTERPRET=1 on machines without a GPU before this import
    import triton
    import triton.language as tl

    from margin_kernels.backends import triton_negatives as tn

    @triton.jit
    def _negatives_kernel(c_ptr, rp_ptr, consts_ptr, value_ptr, deriv_ptr, ROWS_: tl.constexpr,
                          COLS_: tl.constexpr, KIND: tl.constexpr):
        """One (ROWS_, COLS_) tile through triton_negatives, exactly as the loss kernels call them: T and U
        as (rows, 1) columns, a and b as scalars in the tile's dtype."""
        rows = tl.arange(0, ROWS_)
        offs = rows[:, None] * COLS_ + tl.arange(0, COLS_)[None, :]
        c = tl.load(c_ptr + offs)
        T = tl.load(rp_ptr + rows * 2)[:, None]
        U = tl.load(rp_ptr + rows * 2 + 1)[:, None]
        a = tl.load(consts_ptr)
        b = tl.load(consts_ptr + 1)
        tl.store(value_ptr + offs, tn.negative_value(c, T, U, a, b, KIND))
        tl.store(deriv_ptr + offs, tn.negative_derivative(c, T, U, a, b, KIND))
except ImportError:
    triton = None


def _triton_negatives(c, row_params, spec):
    reason = unavailable_reason("triton")
    if reason is not None or triton is None:
        pytest.skip(f"the 'triton' backend cannot run here: {reason}")
    device = "cuda" if CUDA else "cpu"
    c_dev, rp = c.to(device).contiguous(), row_params.to(device).contiguous()
    consts = torch.tensor([spec.a, spec.b], dtype=c.dtype, device=device)
    value, deriv = torch.empty_like(c_dev), torch.empty_like(c_dev)
    _negatives_kernel[(1,)](c_dev, rp, consts, value, deriv, ROWS, COLS, int(spec.kind))
    return value.cpu(), deriv.cpu()


NEGATIVE_IMPLEMENTATIONS = {
    "native": _native_negatives,  # csrc/margin_math.h: the CPU epilogues and (the same header) the CUDA ones
    "triton": _triton_negatives,  # backends/triton_negatives.py through a one-tile test kernel
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(NegativeKind), ids=[k.name for k in NegativeKind])
@pytest.mark.parametrize("implementation", list(NEGATIVE_IMPLEMENTATIONS))
def test_negative_functions_at_branch_points(implementation, kind, dtype):
    spec = SPECS[kind]
    c, row_params = branch_point_inputs(kind, dtype)
    value, deriv = NEGATIVE_IMPLEMENTATIONS[implementation](c, row_params, spec)
    ref_value = negative_value(c, spec, row_params)
    ref_deriv = negative_derivative(c, spec, row_params)
    assert value.dtype == dtype and deriv.dtype == dtype
    tol = NEGATIVE_FUNCTION[dtype]
    assert torch.allclose(value, ref_value, rtol=tol, atol=tol), (value - ref_value).abs().max()
    if kind in SMOOTH_DERIVATIVE_KINDS:
        assert torch.allclose(deriv, ref_deriv, rtol=tol, atol=tol), (deriv - ref_deriv).abs().max()
    else:
        assert torch.equal(deriv, ref_deriv)  # 0/1/a or U + 2c: exact, and on the right side of every branch point


@pytest.mark.parametrize("kind", list(NegativeKind), ids=lambda k: k.name)
def test_derivative_bound_holds_over_the_cosine_range(kind):
    """negatives.derivative_bound (what the Triton backward scales fp16 dL/dcos by) is an upper bound of
    |g'(c)| for every c in [-1, 1] and every row's parameters."""
    from margin_kernels.losses.negatives import derivative_bound
    spec = SPECS[kind]
    row_params = torch.stack([torch.linspace(-0.9, 0.9, 7), torch.linspace(0.0, 1.0, 7)], dim=1).double()
    c = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64).expand(7, -1)
    bound = derivative_bound(spec, row_params)
    assert negative_derivative(c, spec, row_params).abs().max() <= bound


# ---- sub-centers (K rows per class): the shape variants that move chunk, tile and split boundaries --------
#: the base shape already runs every registry loss (both sub-center modes) on every backend and dtype; these
#: put chunk and Triton tile boundaries inside and between classes' row groups, Partial FC, non-contiguous W
SUBCENTER_SHAPES = ("classes_not_multiple_of_tile", "chunk_of_one_class", "class_index_and_ignored_rows",
                    "only_the_target_class", "non_contiguous_weight", "two_row_blocks_3_splits")


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend, dtype_name, shape", [
    pytest.param(backend, dtype_name, shape, marks=[pytest.mark.cuda] if backend == "cuda" else [],
                 id=f"{backend}-{dtype_name}-subcenter_arcface-{shape}")
    for backend in ("torch", "cpu", "triton", "cuda") for dtype_name in DTYPES for shape in SUBCENTER_SHAPES])
def test_sub_center_shape_variants(backend, dtype_name, shape):
    check_conformance(backend, dtype_name, "subcenter_arcface", shape)
