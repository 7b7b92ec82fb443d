"""Sub-center machinery (K weight rows per class): memory stays flat in C (no B x C x K tensor), the tie rule
is the same in every backend, bad weights are refused, Partial FC samples whole classes, shards and
checkpoints keep a class's K rows together. Values against the float64 reference; bounds from
tests/tolerances.py where a dtype other than fp64 is involved."""
import pytest
import torch

import margin_kernels as mk
from margin_kernels.backends import torch_backend, unavailable_reason
from margin_kernels.backends.contract import CallState, OpConfig, OpInputs, RowGrads
from margin_kernels.distributed import reshard_state_dicts
from margin_kernels.distributed.sharding import row_range, shard_ranges
from margin_kernels.subcenters import class_rows, max_over_sub_centers
from tests.helpers import head_eager_and_compiled, loss_and_grads, random_problem, rel_err
from tests.tolerances import FP64_END_TO_END, NATIVE_VS_TORCH
from tests.test_memory import AllocationLog

# Triton's interpreter: a class split left without tiles merges log(0) = -inf (the conformance suite's filter)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

K = 3
FP64_TOL = FP64_END_TO_END  # fp64 end to end: summation order only


def _backends():
    out = ["torch", "cpu"]
    if unavailable_reason("triton") is None:
        out.append("triton")
    return out


def _run(backend, margin, x, w, labels, **kwargs):
    return loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, margin, backend=backend,
                                                               reduction="none", **kwargs), x, w)


def _assert_matches_reference(out, ref, tol=FP64_TOL):
    assert (out[0] - ref[0]).abs().max().item() <= tol * max(1.0, ref[0].abs().max().item())
    assert rel_err(out[1], ref[1]) <= tol and rel_err(out[2], ref[2]) <= tol


# ---- memory: nothing of B x C x K, nothing but dW of C x K x d ----------------------------------------------
B, C, D, CHUNK = 64, 1000, 16, 128  # B > K d, so a B x C tensor is bigger than W's C K x d


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_whole_call_allocates_no_batch_by_class_tensor(backend):
    x, w, labels = random_problem(B, C, D, dtype=torch.float32, ignore_rows=(3,), sub_centers=K)
    x.requires_grad_(True)
    w.requires_grad_(True)
    log = AllocationLog(big=B * C)
    with log:
        loss = mk.margin_cross_entropy(x, w, labels, mk.SubCenterArcFace(sub_centers=K), backend=backend,
                                       chunk_size=CHUNK)
        loss.backward()
    assert B * C > C * K * D, "the problem must make a B x C tensor bigger than dW"
    assert max(log.sizes) == C * K * D, "the largest tensor must be dW"
    assert not log.big_storages, "no tensor of B x C elements (let alone B x C x K)"


def test_chunk_loop_internals_stay_within_a_chunk_of_rows():
    """Every tensor the torch backend allocates is at most B x (chunk K), the chunk's own tile, except dW."""
    x, w, labels = random_problem(B, C, D, dtype=torch.float32, sub_centers=K)
    margin = mk.SubCenterArcFace(sub_centers=K)
    config, row_params = OpConfig(margin.negative_spec(), chunk_size=CHUNK, sub_centers=K), torch.zeros(B, 2)
    log = AllocationLog()
    with log:
        lse = torch_backend.lse_forward(OpInputs(x, w, labels, row_params, None), config, CallState())
    assert max(log.sizes) <= B * CHUNK * K
    log = AllocationLog()
    with log:
        torch_backend.lse_backward(OpInputs(x, w, labels, row_params, None), config,
                                   RowGrads(lse, torch.rand(B), torch.rand(B)), CallState())
    big = [n for n in log.sizes if n > B * CHUNK * K]
    assert big == [C * K * D], f"only dW may exceed a chunk's tile, got {big}"


def test_default_chunk_keeps_the_tile_size():
    """The default chunk counts classes: K sub-centers divide it by K, so the B x (chunk K) tile stays the
    size the CPU policy chose."""
    from margin_kernels.backends.chunk_loop import default_chunk_size
    assert default_chunk_size(256, "cpu", K) == default_chunk_size(256, "cpu") // K
    assert default_chunk_size(256, "cuda", 4) * 4 == default_chunk_size(256, "cuda")


# ---- the tie rule ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
def test_ties_go_to_the_lowest_sub_center_in_every_backend(backend):
    """Sub-centers 0 and 1 of every class are the same vector (exact ties); sub-center 2 differs. The
    gradient goes to row 0 only, never split, never to row 1, in every backend as in the reference."""
    x, w, labels = random_problem(12, 9, 16, seed=3, sub_centers=K)
    w = w.view(9, K, 16).clone()
    w[:, 1] = w[:, 0]
    w = w.reshape(9 * K, 16)
    margin = mk.SubCenterArcFace(sub_centers=K)
    ref = _run("reference", margin, x, w, labels)
    out = _run(backend, margin, x, w, labels, chunk_size=4)
    _assert_matches_reference(out, ref)
    dw = out[2].view(9, K, 16)
    assert (dw[:, 1] == 0).all(), "a tied sub-center that is not the lowest gets no gradient"
    assert (dw[:, 0].norm(dim=1) > 0).all()
    values, winner = max_over_sub_centers(torch.tensor([[0.5, 0.5, 0.1, 0.2, 0.7, 0.7]], dtype=torch.float64), K)
    assert winner.tolist() == [[0, 1]] and values.tolist() == [[0.5, 0.7]]


# ---- arguments ---------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_with_their_names():
    x, w, labels = random_problem(4, 5, 8, sub_centers=K)
    margin = mk.SubCenterArcFace(sub_centers=K)
    with pytest.raises(ValueError, match="num_classes \\* sub_centers rows"):
        mk.margin_cross_entropy(x, w[:-1], labels, margin)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        mk.margin_cross_entropy(x, w, torch.full_like(labels, 5), margin)
    with pytest.raises(ValueError, match=r"class_index values must be in \[0, 5\)"):
        mk.margin_cross_entropy(x, w, labels.clamp_max(0), margin, class_index=torch.tensor([0, 7]))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="sub_centers"):
            mk.SubCenterArcFace(sub_centers=bad)
    with pytest.raises(ValueError, match="mode"):
        mk.SubCenterArcFace(mode="paper")
    assert "sub_centers=3" in repr(margin)


# ---- Partial FC: whole classes ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
def test_class_index_selects_all_rows_of_each_sampled_class(backend):
    x, w, labels = random_problem(10, 20, 12, seed=5, ignore_rows=(2,), sub_centers=K)
    index = torch.tensor([19, 3, 7, 0, 11, 15, 8])
    labels = torch.where(labels >= 0, labels % index.numel(), labels)
    margin = mk.SubCenterArcFace(sub_centers=K)
    out = _run(backend, margin, x, w, labels, class_index=index, chunk_size=3)
    # the same problem with the sampled classes' rows copied out: no class_index at all
    rows = class_rows(index, K)
    ref = _run("reference", margin, x, w[rows].clone(), labels)
    assert (out[0] - ref[0]).abs().max().item() <= FP64_TOL * max(1.0, ref[0].abs().max().item())
    assert rel_err(out[1], ref[1]) <= FP64_TOL
    assert rel_err(out[2][rows], ref[2]) <= FP64_TOL
    untouched = torch.ones(20 * K, dtype=torch.bool)
    untouched[rows] = False
    assert (out[2][untouched] == 0).all()


def test_head_partial_fc_samples_whole_classes():
    head = mk.MarginHead(40, 8, mk.SubCenterArcFace(sub_centers=K), sample_rate=0.25, backend="torch",
                         dtype=torch.float64)
    x, _, labels = random_problem(6, 40, 8, seed=6, sub_centers=K)
    loss = head(x, labels)
    loss.backward()
    sampled = head.sampled_classes
    assert sampled.numel() == 10 and bool(torch.isin(labels, sampled).all())
    rows_with_grad = (head.weight.grad.norm(dim=1) > 0).nonzero().squeeze(1)
    assert torch.equal(torch.unique(rows_with_grad // K), sampled), "gradient only on rows of sampled classes"
    ref_labels = torch.searchsorted(sampled, labels)
    ref = mk.margin_cross_entropy(x, head.weight.detach()[class_rows(sampled, K)], ref_labels, head.margin,
                                  backend="reference")
    assert abs(loss.item() - ref.item()) <= FP64_TOL * max(1.0, abs(ref.item()))


# ---- shards and checkpoints: whole classes ---------------------------------------------------------------
@pytest.mark.parametrize("num_classes,world", [(37, 2), (38, 3), (7, 7)])
def test_weight_rows_of_shards_are_whole_classes(num_classes, world):
    rows = [row_range(num_classes, world, r, K) for r in range(world)]
    assert rows[0][0] == 0 and rows[-1][1] == num_classes * K
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    for (start, stop), (c0, c1) in zip(rows, shard_ranges(num_classes, world)):
        assert (start, stop) == (c0 * K, c1 * K)


def test_reshard_keeps_a_class_rows_together():
    """Two shards of a K = 3 head saved at world 2 (classes [0, 4) and [4, 7)) reassembled as [2, 6)."""
    full = torch.arange(7 * K * 2, dtype=torch.float64).view(7 * K, 2)

    def piece(lo, hi):
        return {"weight": full[lo * K:hi * K].clone(),
                "_extra_state": {"format": 1, "num_classes": 7, "embedding_dim": 2, "shard_range": [lo, hi],
                                 "sampler_state": None, "sub_centers": K}}

    out = reshard_state_dicts([piece(4, 7), piece(0, 4)], (2, 6))
    assert torch.equal(out["weight"], full[2 * K:6 * K])
    assert out["_extra_state"]["sub_centers"] == K
    mixed = piece(4, 7)
    mixed["_extra_state"]["sub_centers"] = 1
    with pytest.raises(ValueError, match="different sizes"):
        reshard_state_dicts([piece(0, 4), mixed], (2, 6))


def test_head_state_dict_refuses_another_sub_center_count():
    from margin_kernels.distributed import DistributedMarginHead
    head = DistributedMarginHead(9, 4, mk.SubCenterArcFace(sub_centers=K), backend="torch")
    assert head.weight.shape == (9 * K, 4)
    other = DistributedMarginHead(9, 4, mk.SubCenterArcFace(sub_centers=2), backend="torch")
    state = head.state_dict()
    state["weight"] = other.weight.detach().clone()
    with pytest.raises(ValueError, match="sub_centers=2"):
        other.load_state_dict(state)


def test_head_initialisation_is_the_k_row_matrix_at_every_shard():
    """MarginHead's initial weight is rows [0, C K) of the same seeded N(0, 0.01) matrix, whatever K's shard."""
    from margin_kernels.head_base import fill_rows_normal
    head = mk.MarginHead(11, 6, mk.SubCenterArcFace(sub_centers=K), backend="torch", seed=4)
    expected = torch.empty(11 * K, 6)
    fill_rows_normal(expected, 0, 4, 0.01)
    assert torch.equal(head.weight.detach(), expected)
    part = torch.empty(5 * K, 6)
    fill_rows_normal(part, 6 * K, 4, 0.01)  # rank 1 of 2 holds classes [6, 11)
    assert torch.equal(part, expected[6 * K:])


# ---- gradient filtering ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
def test_grad_filter_keeps_the_loss(backend):
    """The chunk loop filters whole chunks of classes; Triton does not filter with sub-centers (its flags
    assume one tiling): either way the loss is unchanged and the gradients within the filter's bound."""
    x, w, labels = random_problem(8, 30, 16, seed=8, sub_centers=K)
    margin = mk.SubCenterArcFace(sub_centers=K)
    exact = _run(backend, margin, x, w, labels, chunk_size=4)
    filtered = _run(backend, margin, x, w, labels, chunk_size=4, grad_filter=1e-3)
    assert torch.equal(filtered[0], exact[0])
    assert (filtered[1] - exact[1]).norm(dim=1).max().item() <= 1e-3 * 30


# ---- the fused native passes against the PyTorch ones, tile by tile ------------------------------------------
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("normalized", [True, False], ids=["normalised", "raw"])
def test_native_sub_center_passes_match_pytorch(device, dtype, normalized):
    """csrc's sub_center_max / sub_center_scatter (margin_math.h's sub_center_best) against
    subcenter_epilogue's PyTorch path on a strided tile with ties: same maxima, same winners (exactly), same
    gradient tile and per-row sums."""
    from margin_kernels import _native
    from margin_kernels.backends.native_epilogue import NativeEpilogue
    from margin_kernels.backends.subcenter_epilogue import SubCenterEpilogue
    from margin_kernels.backends.torch_backend import TorchEpilogue
    ext, reason = _native.load(with_cuda=device == "cuda")
    if ext is None:
        pytest.skip(f"the native extension is unavailable: {reason}")
    gen = torch.Generator().manual_seed(9)
    rows, classes = 13, 37
    storage = torch.randn(rows, classes * K + 5, generator=gen, dtype=dtype)
    storage[:, 3:6] = storage[:, 0:3]  # class 1 ties class 0 row for row; ...
    storage[:, 7] = storage[:, 6]      # ... and class 2's sub-centers 0 and 1 tie
    tile = storage[:, :classes * K].to(device)  # row stride classes K + 5: a strided view
    inv = (torch.rand(classes * K, generator=gen, dtype=dtype) + 0.5).to(device) if normalized else None
    native, torch_path = SubCenterEpilogue(NativeEpilogue(ext), K), SubCenterEpilogue(TorchEpilogue(), K)
    values_n, winner_n = native._class_cosines(tile.clone(), inv)
    values_t, winner_t = torch_path._class_cosines(tile.clone(), inv)
    assert torch.equal(winner_n.long(), winner_t) and torch.equal(values_n, values_t)
    if inv is None:  # raw dots: class 2's sub-centers 0 and 1 are equal, so 1 never wins
        assert (winner_t[:, 2] != 1).all()
    grad = torch.randn(rows, classes, generator=gen, dtype=dtype).to(device)
    out_n, dot_n = native._row_gradient(grad, values_n, winner_n, inv, tile.clone())
    out_t, dot_t = torch_path._row_gradient(grad, values_t, winner_t, inv, tile.clone())
    assert torch.allclose(out_n, out_t, rtol=0, atol=0)
    if normalized:
        assert torch.allclose(dot_n, dot_t, rtol=NATIVE_VS_TORCH[dtype], atol=0)
    else:
        assert dot_n is None and dot_t is None


# ---- torch.compile ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
def test_compiled_head_matches_eager(backend):
    """A sub-center MarginHead under torch.compile(fullgraph=True) (aot_eager: the op stays opaque, no graph
    break on the target pairs' B x K products around it): the same loss and gradients as eager."""
    from tests.tolerances import COMPILE_VS_EAGER
    x, w, labels = random_problem(8, 20, 16, dtype=torch.float32, ignore_rows=(2,), sub_centers=K)
    head = mk.MarginHead(20, 16, mk.SubCenterArcFace(sub_centers=K), backend=backend, chunk_size=8)
    with torch.no_grad():
        head.weight.copy_(w)

    eager, compiled = head_eager_and_compiled(head, x, labels, "aot_eager")
    assert abs(compiled[0].item() - eager[0].item()) <= COMPILE_VS_EAGER * max(1.0, abs(eager[0].item()))
    assert rel_err(compiled[1], eager[1]) <= COMPILE_VS_EAGER and rel_err(compiled[2], eager[2]) <= COMPILE_VS_EAGER


def test_triton_tilings_that_spill_with_sub_centers_are_not_candidates():
    """python -m bench kernels (bench/results/kernels_sm90.md): with K > 1 the forward's tilings of >= 128 x 128
    elements and its 4-warp tilings of >= 8192 spill; the autotuner keeps the rest, and the fixed tiling is one
    of them."""
    from margin_kernels.backends import triton_configs as configs
    kept = [t for t in configs.H100_FORWARD if configs.forward_candidate(t, 2, False, K)]
    assert configs.ForwardTiles(128, 256, 64, 8, 3) not in kept and configs.ForwardTiles(64, 128, 64, 4, 4) not in kept
    assert configs.ForwardTiles(128, 128, 64, 8, 3) not in kept and kept
    assert all(configs.forward_candidate(t, 2, False) for t in configs.H100_FORWARD)  # K = 1 unchanged
    assert configs.default_forward(2, False, K) in kept


def test_memory_model_counts_k_rows_per_class():
    """python -m bench memory-model --sub-centers K: W, dW and the optimizer state K x ArcFace's; the chunk's
    tile keeps its size (the chunk holds 1/K as many classes)."""
    from bench.memory_model import per_rank_bytes
    kwargs = dict(num_classes=10 ** 6, dim=512, world=2, dtype=torch.bfloat16, sample_rate=1.0, batch_per_rank=128)
    one, three = per_rank_bytes(**kwargs), per_rank_bytes(**kwargs, sub_centers=K)
    assert three["weight"] == K * one["weight"] and three["optimizer"] == K * one["optimizer"]
    assert three["local_classes"] == one["local_classes"]
    assert abs(three["torch_tiles"] - one["torch_tiles"]) <= 0.01 * one["torch_tiles"]


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
def test_a_non_finite_sub_center_is_never_skipped_by_the_max(backend):
    """A NaN in one sub-center row (not the target class's): an error with checks on, and with them off NaN on
    every row (that class is every row's negative), not a finite loss from the max skipping the NaN row."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=gen), torch.randn(5 * 3, 8, generator=gen)
    labels = torch.tensor([0, 1, 3, 4])
    w[2 * 3 + 1, 3] = float("nan")  # class 2, sub-center 1: nobody's target
    with pytest.raises(ValueError, match="weight contains NaN"):
        mk.margin_cross_entropy(x, w, labels, mk.SubCenterArcFace(), backend=backend)
    out = mk.margin_cross_entropy(x, w, labels, mk.SubCenterArcFace(), backend=backend, check_values=False,
                                  reduction="none")
    assert torch.isnan(out).all(), out
