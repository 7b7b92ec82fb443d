"""The chunk loop's 16-bit gradient-operand path, which the ``cuda`` backend takes with bf16/fp16 weights (the
backward epilogue writes dL/dcos in the weights' dtype, fp16 scaled by a power of two, and the dx/dW GEMMs
multiply it on tensor cores with fp32 output: chunk_loop.gradient_operand_dtype).

No CUDA device here, so the same loop is forced onto CPU with the torch epilogue, whose 16-bit tile, factor
and finish_dw follow the CUDA epilogue's contract (tests/test_native_epilogues.py checks the two epilogues
agree where both run); ``mixed_mm`` on CPU widens exactly. The cuda rows of tests/tolerances.py are these
measurements."""
from __future__ import annotations

import pytest
import torch

from margin_kernels.backends import chunk_loop, gradient_scale
from margin_kernels.losses.negatives import NegativeKind, NegativeSpec
from tests.helpers import LOSS_NAMES, compare_with_references, make_loss
from tests.tolerances import bounds

DTYPES = (torch.bfloat16, torch.float16)
#: sub-center losses stay on the fp32 gradient path (their adapter scatters fp32 row gradients)
SINGLE_ROW = [name for name in LOSS_NAMES if make_loss(name).sub_centers == 1]
SUB_CENTER = [name for name in LOSS_NAMES if make_loss(name).sub_centers > 1]


@pytest.fixture
def force_operand_path(monkeypatch):
    """Makes every chunk take the 16-bit path in the dtype of the call's storage (as on CUDA)."""
    taken = []

    def forced(w_mm):
        taken.append(forced.dtype)
        return forced.dtype

    monkeypatch.setattr(chunk_loop, "gradient_operand_dtype", forced)
    return forced, taken


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SINGLE_ROW)
def test_operand_path_matches_reference(force_operand_path, name, dtype):
    forced, taken = force_operand_path
    forced.dtype = dtype
    kind = make_loss(name).negative_spec().kind
    errors = compare_with_references("torch", name, dtype, reference_dtypes=(torch.float64, dtype))
    assert taken, "the 16-bit path was not taken"
    for ref_dtype, bound in bounds("cuda", dtype, kind).items():
        assert not bound.violations(errors[ref_dtype]), (ref_dtype, errors[ref_dtype])


@pytest.mark.parametrize("name", SUB_CENTER)
def test_sub_center_losses_keep_the_fp32_gradient_path(force_operand_path, name):
    forced, taken = force_operand_path
    forced.dtype = torch.bfloat16
    kind = make_loss(name).negative_spec().kind
    errors = compare_with_references("torch", name, torch.bfloat16, reference_dtypes=(torch.float64,))
    assert not taken and not bounds("torch", torch.bfloat16, kind)[torch.float64].violations(errors[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_operand_path_with_class_index_and_raw_weights(force_operand_path, dtype):
    forced, _ = force_operand_path
    forced.dtype = dtype
    for name in ("arcface", "softmax"):
        kind = make_loss(name).negative_spec().kind
        errors = compare_with_references("torch", name, dtype, class_index=True, chunk_size=16,
                                         reference_dtypes=(torch.float64, dtype))
        for ref_dtype, bound in bounds("cuda", dtype, kind).items():
            assert not bound.violations(errors[ref_dtype]), (name, ref_dtype, errors[ref_dtype])


def test_fp16_factor_keeps_small_gradients_and_stays_finite():
    spec = NegativeSpec(NegativeKind.IDENTITY, 64.0)
    rows = torch.zeros(4, 2)
    g_lse = torch.full((4,), 1e-6)  # a tiny upstream gradient: dC ~ 1e-4 * p, far below fp16's normals
    factor, inv = gradient_scale.chunk_operand_scale(torch.float16, spec, rows, g_lse, torch.zeros(4),
                                                     torch.full((8,), 2.0))
    bound = 64.0 * 1e-6 * 2.0
    assert 2.0 ** 13 < (factor * bound).item() <= 2.0 ** 14  # the bound lands just below 2^14
    assert (factor * inv).item() == 1.0 and factor.item() == 2.0 ** round(torch.log2(factor).item())
    assert gradient_scale.chunk_operand_scale(torch.bfloat16, spec, rows, g_lse, torch.zeros(4), None) == (None, None)
    for extreme in (0.0, float("inf"), float("nan")):
        f, i = gradient_scale.chunk_operand_scale(torch.float16, spec, rows, torch.full((4,), extreme),
                                                  torch.zeros(4), None)
        assert torch.isfinite(f).all() and torch.isfinite(i).all() and (i > 0).all()
