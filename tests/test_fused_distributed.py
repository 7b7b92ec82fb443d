"""Fused optimizers on the model-parallel head (gloo, CPU): 2 and 3 processes, uneven shards, Partial FC at
sample_rate < 1, against torch.optim stepping the full float64 weight on the reference's dense gradient; the
optimizer state resharded from 2 to 3 ranks mid-run."""
import pytest
import torch

from tests import distributed_scenarios as S
from tests import fused_distributed_scenarios as F
from tests.test_fused_optim import TorchReference, reference_gradient
from tests.tolerances import FUSED_TRAJECTORY

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(world, outdir, names, ckpt_dir=None):
    return S.run_world(world, outdir, names, ckpt_dir=ckpt_dir, module=F.__name__)


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fused_world2"))


@pytest.fixture(scope="module")
def world2(save_dir):
    return _run(2, save_dir, ("trajectories", "resharded_save"))


@pytest.fixture(scope="module")
def world3(tmp_path_factory, world2, save_dir):
    return _run(3, str(tmp_path_factory.mktemp("fused_world3")), ("trajectories", "resharded_load"),
                ckpt_dir=save_dir)


def _records(results, scenario):
    records = results[scenario]
    for rank, record in enumerate(records):
        if "error" in record:
            pytest.fail(f"{scenario} failed on rank {rank}:\n{record['error']}")
    return records


def _reference(case, steps_by_world):
    """torch.optim on the full weight; ``steps_by_world``: [(world, steps, per-rank sampled lists)]."""
    kind, options, sparse = F.CASES[case]
    ref = TorchReference(F.initial_weight(), kind, options, sparse, torch.float64, reference_gradient)
    for world, steps, sampled in steps_by_world:
        for i, step in enumerate(steps):
            x, y = F.batch(step, world)
            class_index = torch.cat([s[i] for s in sampled])  # shards are consecutive: sorted
            ref.step(x, y, class_index)
    return ref.w.detach()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", list(F.CASES))
def test_fused_trajectory_matches_torch_optim(request, world, case):
    records = [r[case] for r in _records(request.getfixturevalue(f"world{world}"), "trajectories")]
    ours = torch.cat([r["weight"] for r in records])
    ref = _reference(case, [(world, range(F.STEPS), [r["sampled"] for r in records])])
    bound, _ = FUSED_TRAJECTORY[torch.float64]
    assert ((ours - ref).norm() / ref.norm()).item() <= bound


def test_optimizer_state_reshards_from_2_to_3_ranks(world2, world3):
    saved = _records(world2, "resharded_save")
    loaded = _records(world3, "resharded_load")
    assert all(int(r["step"]) == F.STEPS for r in loaded)
    ours = torch.cat([r["weight"] for r in loaded])
    ref = _reference(F.RESHARDED_CASE, [(2, range(F.RESUME_AT), [r["sampled"] for r in saved]),
                                        (3, range(F.RESUME_AT, F.STEPS), [r["sampled"] for r in loaded])])
    bound, _ = FUSED_TRAJECTORY[torch.float64]
    assert ((ours - ref).norm() / ref.norm()).item() <= bound
