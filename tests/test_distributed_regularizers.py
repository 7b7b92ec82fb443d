"""Head regularisers in the model-parallel head: 2- and 3-process gloo worlds (uneven batches and class
shards) against the same steps replayed by a single-process MarginHead, which tests/test_regularizers.py holds
to the float64 reference and the authors' code. Centers are sharded like the weight: each rank's rows
concatenate to the single-process centers, after every step and after a checkpoint resharded from 2 ranks to 3.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import margin_kernels as mk
from tests import distributed_regularizer_scenarios as R
from tests import distributed_scenarios as S
from tests.helpers import rel_err
from tests.tolerances import REGULARIZER_TOLERANCES

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")
MODULE = R.__name__
SWEEP, SAVE, LOAD, EMPTY = (f"{MODULE}:{fn}" for fn in ("regularizer_sweep", "regularizer_checkpoint_save",
                                                        "regularizer_checkpoint_load", "regularizer_empty_rank"))
TOL = REGULARIZER_TOLERANCES[torch.float64]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("regularizers_world2"))


@pytest.fixture(scope="module")
def world2(checkpoint_dir):
    return S.run_world(2, checkpoint_dir, (SWEEP, SAVE))


@pytest.fixture(scope="module")
def world3(tmp_path_factory, world2, checkpoint_dir):
    return S.run_world(3, str(tmp_path_factory.mktemp("regularizers_world3")), (SWEEP, LOAD, EMPTY),
                       ckpt_dir=checkpoint_dir)


def ranks_of(request, world, scenario):
    results = request.getfixturevalue(f"world{world}")[scenario]
    for rank, result in enumerate(results):
        if "error" in result:
            pytest.fail(f"scenario {scenario!r} failed on rank {rank} of {world}:\n{result['error']}")
    return results


def single_head(num_classes, w, regularizers):
    head = mk.MarginHead(num_classes, S.DIM, S.make_loss(R.MARGIN), dtype=torch.float64, backend="torch",
                         regularizers=regularizers)
    with torch.no_grad():
        head.weight.copy_(w)
    return head


def single_steps(head, world, steps, first_seed=0, sizes=None):
    total = sum(sizes or S.LAYOUTS[world][0])
    return [R.record_step(head, *S.problem(world, seed=first_seed + s, sizes=sizes)[::2], (total,), 0)
            for s in range(steps)]


def assert_ranks_match(records, expected):
    """Every rank returns the same loss; rows of dx, dW and the centers (and their gradient) concatenate in
    rank order to the single process's; replicated parameters (the ring radius) equal it on every rank."""
    losses = [r["loss"] for r in records]
    assert all(torch.equal(losses[0], other) for other in losses[1:]), losses
    assert abs(losses[0].item() - expected["loss"].item()) <= TOL.loss * max(1.0, abs(expected["loss"].item()))
    assert rel_err(torch.cat([r["dx"] for r in records]), expected["dx"]) <= TOL.dx
    assert rel_err(torch.cat([r["dw"] for r in records]), expected["dw"]) <= TOL.dw
    for key, value in expected.items():
        if key.endswith("centers") or key.endswith("centers.grad"):
            assert rel_err(torch.cat([r[key] for r in records]), value) <= TOL.dw, key
        elif "radius" in key:
            for r in records:
                assert rel_err(r[key], value) <= TOL.dx, key


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(R.configurations()))
def test_regularized_steps_match_single_process(request, world, name):
    records = ranks_of(request, world, SWEEP)
    _, w, _ = S.problem(world)
    expected = single_steps(single_head(S.LAYOUTS[world][1], w, R.configurations()[name]()), world, R.STEPS)
    for step in range(R.STEPS):
        assert_ranks_match([r[name]["steps"][step] for r in records], expected[step])
    ranges = [tuple(r[name]["shard_range"].tolist()) for r in records]
    for (start, stop), r in zip(ranges, records):
        for key, value in r[name]["steps"][-1].items():
            if key.endswith("centers"):
                assert value.shape[0] == stop - start, "each rank holds only its class shard's centers"


@needs_gloo
def test_checkpoint_reshards_centers_from_2_to_3_ranks(request):
    """Saved after one SGD step on 2 ranks, loaded on 3 (another seed: everything comes from the files): the
    next step equals the single process's next step, centers and radius included."""
    save, load = ranks_of(request, 2, SAVE), ranks_of(request, 3, LOAD)
    _, w, _ = S.problem(R.CHECKPOINT_WORLD)
    head = single_head(S.LAYOUTS[R.CHECKPOINT_WORLD][1], w, R._checkpointed())
    single_steps(head, R.CHECKPOINT_WORLD, 1)
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.grad is not None:
                parameter.sub_(R.LR * parameter.grad)
    expected = single_steps(head, R.CHECKPOINT_WORLD, 1, first_seed=1)[0]
    assert_ranks_match([r["next"] for r in save], expected)
    assert_ranks_match([r["next"] for r in load], expected)
    assert [tuple(r["shard_range"].tolist()) for r in load] == S.shard_ranges(S.LAYOUTS[R.CHECKPOINT_WORLD][1], 3)


@needs_gloo
def test_rank_without_rows_keeps_its_centers_in_step(request):
    """3 ranks, the middle one feeds no rows: the loss, gradients and updated centers are the single process's."""
    records = ranks_of(request, 3, EMPTY)
    _, w, _ = S.problem(3, sizes=S.EMPTY_RANK_SIZES)
    head = single_head(S.LAYOUTS[3][1], w, R.configurations()["ring_auto_and_center"]())
    assert_ranks_match(records, single_steps(head, 3, 1, sizes=S.EMPTY_RANK_SIZES)[0])
