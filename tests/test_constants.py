"""Constants restated in another language must equal Python's: the negative kinds, the reductions and the norm eps in the
compiled C++ (csrc/margin_math.h) and in the Triton kernels, and the N(0, 0.01) initialisation of both heads."""
import pytest

import margin_kernels as mk
from margin_kernels import _native, norms
from margin_kernels.losses.negatives import NegativeKind
from margin_kernels.losses.reductions import ReductionKind


def _extension():
    ext, reason = _native.load()
    if ext is None:
        pytest.skip(f"the compiled CPU extension is unavailable: {reason}")
    return ext


def test_cpp_negative_kinds_reductions_and_norm_eps_match_python():
    constants = _extension().constants()
    assert constants["negative_kinds"] == {kind.name: int(kind) for kind in NegativeKind}
    assert constants["reduction_kinds"] == {kind.name: int(kind) for kind in ReductionKind}
    assert constants["num_negative_kinds"] == len(NegativeKind)
    assert constants["norm_eps"] == norms.NORM_EPS


def test_cpp_abi_version_matches_python():
    assert _extension().abi_version() == _native.ABI_VERSION


def test_triton_constants_come_from_python():
    pytest.importorskip("triton", reason="triton is not installed: nothing to compare")
    from margin_kernels.backends import triton_negatives, triton_tiles
    for kind in NegativeKind:
        assert getattr(triton_negatives, kind.name).value == int(kind)
    assert triton_tiles.NORM_EPS.value == norms.NORM_EPS


def test_both_heads_draw_the_same_initial_weight():
    from margin_kernels.distributed import DistributedMarginHead
    single = mk.MarginHead(5000, 8, mk.ArcFace(), seed=3)
    sharded = DistributedMarginHead(5000, 8, mk.ArcFace(), seed=3)  # no process group: world size 1
    assert single.weight.shape == (5000, 8)
    assert single.weight.equal(sharded.weight)
    assert abs(single.weight.std().item() - 0.01) < 3e-4
    assert not single.weight.equal(mk.MarginHead(5000, 8, mk.ArcFace(), seed=4).weight)
