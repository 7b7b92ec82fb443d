"""Model parallel head on torch.distributed (gloo, CPU): 2- and 3-process worlds against float64 references.

Each world is spawned once (see tests/distributed_scenarios.py) and runs every scenario; the tests below
compare its saved results with single-process computations. Pure helpers (sharding, sampler, resharding,
initialisation, the refactored single-process driver) are tested in this process.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

import margin_kernels as mk
from margin_kernels import reference
from margin_kernels.backends import resolve_backend
from margin_kernels.distributed import (DistributedMarginHead, PartialFCSampler, num_sampled, reshard_state_dicts,
                                        shard_range, shard_ranges)
from margin_kernels.distributed.checkpoint import check_tiling
from margin_kernels.distributed.comm import lse_from_shifted_sum
from margin_kernels.head_base import INIT_BLOCK_ROWS, fill_rows_normal
from tests import distributed_scenarios as S
from tests.helpers import LOSS_NAMES, make_loss, random_problem, rel_err
from tests.tolerances import BF16_FEATURE_GRAD, FP32_END_TO_END, FP64_END_TO_END, FP64_FEW_ULPS, FP64_SAME_SUMS

FP64_TOL, FP32_TOL = FP64_END_TO_END, FP32_END_TO_END
BF16_GRAD_TOL = BF16_FEATURE_GRAD  # the features' gradient is rounded to bf16

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

WORLD_SCENARIOS = {
    2: ("losses_sweep", "losses_fp32", "sampling", "bad_inputs", "checkpoint_save", "ddp_and_amp", "binary_bias"),
    3: ("losses_sweep", "losses_fp32", "sampling", "bad_inputs", "checkpoint_load", "ddp_and_amp", "empty_rank",
        "binary_bias"),
}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """The world-2 run's output folder; its checkpoint_save scenario writes the checkpoints there."""
    return str(tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world2(checkpoint_dir):
    return S.run_world(2, checkpoint_dir, WORLD_SCENARIOS[2])


@pytest.fixture(scope="module")
def world3(tmp_path_factory, world2, checkpoint_dir):
    return S.run_world(3, str(tmp_path_factory.mktemp("world3")), WORLD_SCENARIOS[3], ckpt_dir=checkpoint_dir)


def ranks_of(request, world: int, scenario: str) -> list:
    results = request.getfixturevalue(f"world{world}")[scenario]
    for rank, result in enumerate(results):
        if "error" in result:
            pytest.fail(f"scenario {scenario!r} failed on rank {rank} of {world}:\n{result['error']}")
    return results


def cat_ranks(results, key_path):
    """Concatenate a per-rank tensor (rows in rank order)."""
    return torch.cat([_dig(r, key_path) for r in results])


def _dig(record, key_path):
    for key in key_path:
        record = record[key]
    return record


def reference_step(margin, x, w, y, class_index=None):
    xr, wr = x.detach().double().clone().requires_grad_(True), w.detach().double().clone().requires_grad_(True)
    loss = reference.margin_cross_entropy(xr, wr, y, margin, class_index=class_index)
    loss.backward()
    return loss.detach(), xr.grad, wr.grad


def assert_close(loss, dx, dw, ref, tol):
    """max-abs on the loss (relative above 1), ||out - ref|| / ||ref|| on the gradients."""
    ref_loss, ref_dx, ref_dw = ref
    assert abs(loss.double().item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))
    assert rel_err(dx, ref_dx) <= tol
    assert rel_err(dw, ref_dw) <= tol


def assert_step_matches(records, key_path, ref, tol):
    """records: per-rank results; key_path leads to a {"loss", "dx", "dw"} step record. Every rank must return
    the very same loss; the rows of dx and dW concatenate in rank order."""
    steps = [_dig(r, key_path) for r in records]
    losses = [s["loss"] for s in steps]
    assert all(torch.equal(losses[0], other) for other in losses[1:]), f"ranks returned different losses {losses}"
    assert_close(losses[0], torch.cat([s["dx"] for s in steps]), torch.cat([s["dw"] for s in steps]), ref, tol)


def driver_step(x, w, fn):
    """(loss, dx, dw) of fn(x_leaf, w_leaf) on fresh float64 leaves."""
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fn(xr, wr)
    loss.backward()
    return loss.detach(), xr.grad, wr.grad


# ---- spawned worlds ----------------------------------------------------------------------------------------
@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_loss_and_grads_match_single_process(request, world, loss_name):
    """fp64, uneven batch rows and class shards, labels in every shard, one ignored row, two training steps
    (stateful losses advance); buffers identical on every rank and equal to the single-process ones."""
    results = ranks_of(request, world, "losses_sweep")
    assert results[0][loss_name]["backend"] == resolve_backend(S.BACKENDS[world], torch.device("cpu"))
    margin = make_loss(loss_name)
    x, w, y = S.problem(world, sub_centers=margin.sub_centers)
    for i in range(2):
        assert_step_matches(results, (loss_name, "steps", i), reference_step(margin, x, w, y), FP64_TOL)
    for name, ref in margin.named_buffers():
        for rank_result in results:
            got = rank_result[loss_name]["buffers"][name]
            assert torch.equal(got, results[0][loss_name]["buffers"][name]), f"{name} differs between ranks"
            assert rel_err(got, ref) <= FP64_TOL


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_fp32_matches_float64_reference(request, world, loss_name):
    results = ranks_of(request, world, "losses_fp32")
    x, w, y = S.problem(world, dtype=torch.float32, sub_centers=make_loss(loss_name).sub_centers)
    assert_step_matches(results, (loss_name, "steps", 0), reference_step(make_loss(loss_name), x, w, y), FP32_TOL)


@needs_gloo
@pytest.mark.parametrize("loss_name", S.EMPTY_RANK_LOSSES)
def test_rank_without_rows(request, loss_name):
    results = ranks_of(request, 3, "empty_rank")
    assert results[1][loss_name]["dx"].shape == (0, S.DIM)
    x, w, y = S.problem(3, sizes=S.EMPTY_RANK_SIZES)
    assert_step_matches(results, (loss_name,), reference_step(make_loss(loss_name), x, w, y), FP64_TOL)


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("loss_name", S.SAMPLED_LOSSES)
def test_partial_fc_sampling(request, world, loss_name):
    """Every positive kept, the requested size, same seed -> same draw, and the loss/grads equal the
    single-process computation restricted to the union of the sampled classes; eval mode uses every class."""
    results = ranks_of(request, world, "sampling")
    margin = make_loss(loss_name)
    x, w, y = S.problem(world, sub_centers=margin.sub_centers)
    ranges = shard_ranges(S.LAYOUTS[world][1], world)
    differs_with_other_seed = False
    for i in range(2):
        indices = [r[loss_name][i]["index"] for r in results]
        for (start, stop), index, rank_result in zip(ranges, indices, results):
            positives = torch.unique(y[(y >= start) & (y < stop)])
            assert bool(torch.isin(positives, index).all()), "a positive class was not sampled"
            assert index.numel() == max(num_sampled(stop - start, S.SAMPLE_RATE), positives.numel())
            assert bool((index >= start).all() and (index < stop).all()) and bool((index.diff() > 0).all())
            assert torch.equal(rank_result[loss_name][i]["twin_index"], index)
            differs_with_other_seed |= not torch.equal(rank_result[loss_name][i]["other_index"], index)
        global_index = torch.cat(indices)
        labels = torch.where(y >= 0, torch.searchsorted(global_index, y.clamp_min(0)), y)
        assert_step_matches(results, (loss_name, i), reference_step(margin, x, w, labels, global_index), FP64_TOL)
    assert differs_with_other_seed
    assert all(r[loss_name][2]["eval_index_is_none"] for r in results)
    margin.eval()
    assert_step_matches(results, (loss_name, 2), reference_step(margin, x, w, y), FP64_TOL)


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_on_every_rank(request, world):
    results = ranks_of(request, world, "bad_inputs")
    for result in results:
        assert "rank 1: labels must be in [0," in result["label"], result["label"]
        # the single-process wording of the same condition (validation.check_tensors)
        assert "rank 0: weight has embedding_dim 16 but features have 15" in result["shape"], result["shape"]
        assert "same arguments on every rank" in result["config"], result["config"]
    assert results[1]["build"].startswith("chunk_size must be a positive int"), results[1]["build"]
    for result in results[:1] + results[2:]:
        assert "failed on other ranks (rank 1: ValueError: chunk_size" in result["build"], result["build"]
    # the group is still in step afterwards: a good call gives the right answer
    x, w, y = S.problem(world)
    assert_step_matches(results, ("after",), reference_step(make_loss("arcface"), x, w, y), FP64_TOL)


@needs_gloo
@pytest.mark.parametrize("loss_name", S.CHECKPOINT_LOSSES)
def test_checkpoint_reshards_from_2_to_3_and_1(request, loss_name, checkpoint_dir):
    saved = ranks_of(request, 2, "checkpoint_save")
    full_weight = cat_ranks(saved, (loss_name, "weight"))
    k = make_loss(loss_name).sub_centers  # weight rows per class
    saved_buffers = saved[0][loss_name]["buffers"]
    loaded3 = ranks_of(request, 3, "checkpoint_load")
    loaded1 = [S.checkpoint_load(0, 1, None, ckpt_dir=checkpoint_dir)]
    for loaded in (loaded3, loaded1):
        for result in loaded:
            start, stop = result[loss_name]["shard_range"].tolist()
            assert torch.equal(result[loss_name]["weight"], full_weight[start * k:stop * k])
            for name, value in saved_buffers.items():
                assert torch.equal(result[loss_name]["buffers"][name], value)
        # the next step: same loss, gradients and state as the world-2 run that kept going
        reference_next = saved[0][loss_name]["next"]
        for result in loaded:
            assert abs(result[loss_name]["next"]["loss"].item() - reference_next["loss"].item()) \
                <= FP64_SAME_SUMS * abs(reference_next["loss"].item())
            for name, value in saved[0][loss_name]["buffers_after"].items():
                assert rel_err(result[loss_name]["buffers_after"][name], value) <= FP64_SAME_SUMS
        assert rel_err(cat_ranks(loaded, (loss_name, "next", "dx")), cat_ranks(saved, (loss_name, "next", "dx"))) \
            <= FP64_SAME_SUMS
        assert rel_err(cat_ranks(loaded, (loss_name, "next", "dw")), cat_ranks(saved, (loss_name, "next", "dw"))) \
            <= FP64_SAME_SUMS


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_backbone_gets_the_single_process_gradient(request, world):
    results = ranks_of(request, world, "ddp_and_amp")
    x, w, y = S.problem(world)
    inputs = S._backbone_inputs(x.shape[0], torch.float64)
    backbone = S._backbone(torch.float64)
    wr = w.clone().requires_grad_(True)
    loss = reference.margin_cross_entropy(backbone(inputs), wr, y, make_loss("arcface"))
    loss.backward()
    for result in results:
        assert abs(result["ddp"]["loss"].item() - loss.item()) <= FP64_TOL * abs(loss.item())
        for got, param in zip(result["ddp"]["grads"], backbone.parameters()):
            assert rel_err(got, param.grad) <= FP64_TOL
    assert rel_err(cat_ranks(results, ("ddp", "dw")), wr.grad) <= FP64_TOL


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_amp_autocast_features_meet_fp32_weight(request, world):
    """Under CPU bf16 autocast the backbone emits bf16 features; the head casts them to its fp32 weight, so
    the loss and dW are those of fp32 math on the bf16 values (fp32 tolerance); the features' gradient
    comes back in bf16 (bf16 rounding tolerance)."""
    results = ranks_of(request, world, "ddp_and_amp")
    _, w, y = S.problem(world)
    features = cat_ranks(results, ("amp", "features"))
    assert features.dtype == torch.bfloat16
    ref_loss, ref_dx, ref_dw = reference_step(make_loss("arcface"), features, w.float(), y)
    for result in results:
        assert abs(result["amp"]["loss"].item() - ref_loss.item()) <= FP32_TOL * max(1.0, abs(ref_loss.item()))
        assert result["amp"]["loss"].dtype == torch.float32
        assert result["amp"]["features_grad"].dtype == torch.bfloat16
    assert rel_err(cat_ranks(results, ("amp", "dw")), ref_dw) <= FP32_TOL
    assert rel_err(cat_ranks(results, ("amp", "features_grad")), ref_dx) <= BF16_GRAD_TOL


# ---- in this process ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes,world", [(10, 1), (10, 3), (37, 2), (38, 3), (7, 7), (1000, 64)])
def test_shards_are_contiguous_uneven_and_cover(num_classes, world):
    ranges = shard_ranges(num_classes, world)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match="at least the world size"):
        shard_range(3, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="num_classes"):
        shard_range(0, 1, 0)


def test_sampler_keeps_positives_and_size_and_is_reproducible():
    positives = torch.tensor([3, 17, 3, 40])
    draws = []
    for _ in range(2):
        sampler = PartialFCSampler(50, 0.2, seed=11, shard_start=100)
        draws.append([sampler.sample(positives) for _ in range(3)])
    for index in draws[0]:
        assert index.numel() == 10 and bool(torch.isin(positives, index).all()) and bool((index.diff() > 0).all())
    assert all(torch.equal(a, b) for a, b in zip(*draws))
    assert not torch.equal(draws[0][0], draws[0][1])  # the stream advances per step
    many = torch.arange(0, 50, 3)  # more positives than num_sampled: exactly the positives
    assert torch.equal(PartialFCSampler(50, 0.2).sample(many), many)
    assert not PartialFCSampler(50, 1.0).active and PartialFCSampler(50, 0.99).active
    index = torch.tensor([2, 5, 9])
    assert PartialFCSampler.remap(index, torch.tensor([5, -1, 9, 2])).tolist() == [1, -1, 2, 0]
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFCSampler(50, 0.0)


@pytest.mark.parametrize("loss_name", ["arcface", "curricularface", "softmax"])
def test_full_class_index_equals_no_index(loss_name):
    """sample_rate 1.0 is the full computation: an index holding every class changes nothing."""
    x, w, y = random_problem(7, 11, 8, seed=3, ignore_rows=(0,))
    margin = make_loss(loss_name)
    indexed = driver_step(x, w, lambda xr, wr: mk.margin_cross_entropy(xr, wr, y, margin, backend="torch",
                                                                       class_index=torch.arange(11)))
    assert_close(*indexed, reference_step(make_loss(loss_name), x, w, y), FP64_TOL)


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_single_process_driver_still_matches_reference(loss_name):
    """The refactor of functional.py into steps keeps margin_cross_entropy as it was."""
    margin = make_loss(loss_name)
    x, w, y = random_problem(9, 13, 8, seed=1, ignore_rows=(2,), sub_centers=margin.sub_centers)
    fused = driver_step(x, w, lambda xr, wr: mk.margin_cross_entropy(xr, wr, y, margin, backend="torch",
                                                                     chunk_size=4))
    assert_close(*fused, reference_step(make_loss(loss_name), x, w, y), FP64_TOL)


@pytest.mark.parametrize("loss_name", ["adaface", "sphereface"])
def test_head_without_process_group_is_single_process(loss_name):
    x, w, y = random_problem(9, 13, 8, seed=1, ignore_rows=(2,))
    head = DistributedMarginHead(13, 8, make_loss(loss_name), dtype=torch.float64, backend="torch")
    assert head.shard_range == (0, 13)
    with torch.no_grad():
        head.weight.copy_(w)
    loss, dx, _ = driver_step(x, w, lambda xr, _: head(xr, y))  # dW is on the head's own parameter
    assert_close(loss, dx, head.weight.grad, reference_step(make_loss(loss_name), x, w, y), FP64_TOL)
    with pytest.raises(ValueError, match=r"rank 0: labels must be in \[0, 13\)"):
        head(x, torch.full_like(y, 13))


def test_state_dict_round_trip_and_wrong_shard_is_refused():
    head = DistributedMarginHead(13, 4, mk.CurricularFace(), backend="torch", sample_rate=0.5)
    head.margin.t.fill_(0.3)
    head.sampler.sample(torch.tensor([1]))  # advance the Partial FC stream
    state = head.state_dict()
    other = DistributedMarginHead(13, 4, mk.CurricularFace(), backend="torch", sample_rate=0.5, seed=9)
    other.load_state_dict(state)
    assert torch.equal(other.weight, head.weight) and other.margin.t.item() == pytest.approx(0.3)
    assert torch.equal(other.sampler.sample(torch.tensor([2])), head.sampler.sample(torch.tensor([2])))
    wrong = dict(state, weight=state["weight"][:7], _extra_state=dict(state["_extra_state"], shard_range=[0, 7]))
    with pytest.raises(ValueError, match="load_sharded"):
        other.load_state_dict(wrong)


def test_head_arguments_are_checked():
    with pytest.raises(ValueError, match="reduction"):
        DistributedMarginHead(10, 4, mk.ArcFace(), reduction="none", backend="torch")
    with pytest.raises(ValueError, match="reference"):
        DistributedMarginHead(10, 4, mk.ArcFace(), backend="reference")
    with pytest.raises(ValueError, match="ignore_index"):
        DistributedMarginHead(10, 4, mk.ArcFace(), ignore_index=3, backend="torch")
    with pytest.raises(ValueError, match="sample_rate"):
        DistributedMarginHead(10, 4, mk.ArcFace(), sample_rate=1.5, backend="torch")
    with pytest.raises(ValueError, match="chunk_size"):
        DistributedMarginHead(10, 4, mk.ArcFace(), chunk_size=0, backend="torch")
    with pytest.raises(TypeError, match="margin"):
        DistributedMarginHead(10, 4, "arcface", backend="torch")


def test_initial_weight_does_not_depend_on_world_size():
    num_classes, dim = 2 * INIT_BLOCK_ROWS + 100, 3
    whole = torch.empty(num_classes, dim)
    fill_rows_normal(whole, 0, 5, 0.01)
    assert abs(whole.std().item() - 0.01) < 1e-3
    for world in (2, 3, 5):
        parts = []
        for start, stop in shard_ranges(num_classes, world):
            part = torch.empty(stop - start, dim)
            fill_rows_normal(part, start, 5, 0.01)
            parts.append(part)
        assert torch.equal(torch.cat(parts), whole)


def _shard_state(start, stop, weight, t=0.5):
    return {"weight": weight[start:stop], "margin.t": torch.tensor(t),
            "_extra_state": {"format": 1, "num_classes": weight.shape[0], "embedding_dim": weight.shape[1],
                             "shard_range": [start, stop], "sampler_state": None}}


def test_reshard_state_dicts_assembles_any_range_and_rejects_bad_sets():
    weight = torch.randn(10, 3, dtype=torch.float64)
    pieces = [_shard_state(0, 4, weight), _shard_state(4, 7, weight), _shard_state(7, 10, weight)]
    for start, stop in [(0, 10), (2, 9), (4, 7), (5, 6)]:
        state = reshard_state_dicts(pieces[::-1], (start, stop))
        assert torch.equal(state["weight"], weight[start:stop])
        assert state["_extra_state"]["shard_range"] == [start, stop]
    with pytest.raises(ValueError, match=r"no shard holds classes \[4, 7\)"):
        reshard_state_dicts([pieces[0], pieces[2]], (0, 10))
    with pytest.raises(ValueError, match="differs between shards"):
        reshard_state_dicts([pieces[0], _shard_state(4, 7, weight, t=0.25)], (2, 6))
    assert check_tiling([(0, 4), (4, 10)], 10) is None
    assert "overlap" in check_tiling([(0, 5), (4, 10)], 10)
    assert "gap" in check_tiling([(0, 3), (4, 10)], 10)
    assert "cover classes [0, 10)" in check_tiling([(0, 10)], 12)


def test_lse_across_shards_handles_rows_without_negatives():
    """shift + log(sum_r exp(lse_r - shift)) is the log-sum-exp of the shards' lse (any shift), and a row with
    no negative on any shard gives -inf with a zero gradient (not NaN)."""
    parts = torch.tensor([[0.5, float("-inf"), float("-inf")], [1.5, 2.0, float("-inf")]], dtype=torch.float64,
                         requires_grad=True)
    shift = torch.tensor([1.5, 0.0, 0.0], dtype=torch.float64)  # a max (row 0), an arbitrary one (row 1), none
    out = lse_from_shifted_sum(shift, torch.exp(parts - shift).sum(dim=0))
    expected = torch.logsumexp(parts.detach()[:, :2], dim=0)
    assert torch.allclose(out[:2], expected, rtol=FP64_FEW_ULPS, atol=0) and out[2].item() == float("-inf")
    out[:2].sum().backward()
    assert torch.allclose(parts.grad[:, :2], torch.softmax(parts.detach()[:, :2], dim=0), rtol=FP64_FEW_ULPS, atol=0)
    assert parts.grad[:, 2].abs().sum() == 0


def test_memory_model_uses_the_code_sizes():
    from bench import memory_model as model
    row = model.per_rank_bytes(num_classes=10 ** 6 + 3, dim=512, world=8, dtype=torch.bfloat16,
                               sample_rate=0.1, batch_per_rank=128)
    local = shard_range(10 ** 6 + 3, 8, 0)[1]
    assert row["weight"] == local * 512 * 2 and row["grad"] == local * 512 * 2
    assert row["sampled_classes"] == max(num_sampled(local, 0.1), 1)
    assert model.render_markdown(model.table(classes=(10 ** 6,), worlds=(1, 2))).count("\n") >= 4


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("loss_name", S.BINARY_LOSSES)
def test_binary_bias_gradient_is_summed_over_shards(request, world, loss_name):
    """The binary family sums its softplus terms across shards and its bias gradient over the ranks: every
    rank holds the single-process gradient of the replicated bias, and after three SGD steps the same value."""
    results = ranks_of(request, world, "binary_bias")
    x, w, y = S.problem(world)
    margin = make_loss(loss_name)
    bias = margin.logit_shift_parameter()
    assert_step_matches(results, (loss_name,), reference_step(margin, x, w, y), FP64_TOL)
    ref_grad = bias.grad.clone()
    optimizer = torch.optim.SGD([bias], lr=S.LR)
    ww = w.clone()
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        reference_step(margin, x, ww, y)
    for rank_result in results:
        got = rank_result[loss_name]
        assert torch.equal(got["bias_grad"], results[0][loss_name]["bias_grad"]), "ranks hold different gradients"
        assert rel_err(got["bias_grad"], ref_grad) <= FP32_TOL  # the parameter is fp32, its gradient too
        assert rel_err(got["bias_after"], bias.detach()) <= FP32_TOL
