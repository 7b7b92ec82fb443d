"""What each spawned gloo process of tests/test_distributed_regularizers.py runs (through
tests/distributed_scenarios.py's worker): heads with Center / Ring loss regularisers, training steps, and a
checkpoint saved by 2 ranks and loaded by 3. Inputs are tests/distributed_scenarios.py's (uneven batches and
class shards); the pytest side replays them in one process."""
from __future__ import annotations

import os

import torch

from margin_kernels.distributed import DistributedMarginHead, check_buffers_consistent, load_sharded, save_sharded
from margin_kernels.regularizers import CenterLoss, RingLoss
from tests import distributed_scenarios as S

STEPS = 2
LR = 0.5
CHECKPOINT_WORLD = 2
MARGIN = "arcface"


def configurations() -> dict:
    """name -> a fresh list of regularisers (every update rule and term, the ring variants' batch mean)."""
    return {
        "center_alpha": lambda: [CenterLoss(0.05, alpha=0.5, init_std=1.0)],
        "center_gradient_invariant": lambda: [CenterLoss(0.05, update="gradient", invariant_weight=0.2,
                                                         init_std=1.0)],
        "ring_auto_and_center": lambda: [RingLoss(1.0, variant="auto"), CenterLoss(0.02, alpha=0.3)],
    }


def record_step(head, x, y, sizes, rank) -> dict:
    """S.step plus the regularisers' state after the step and their parameter gradients."""
    for parameter in head.regularizers.parameters():
        parameter.grad = None
    out = S.step(head, x, y, sizes, rank)
    for name, parameter in head.regularizers.named_parameters():
        out[name] = parameter.detach().clone()
        if parameter.grad is not None:
            out[name + ".grad"] = parameter.grad.clone()
    return out


def train(head, world, rank, steps=STEPS, first_seed=0) -> list:
    sizes = S.LAYOUTS[world][0]
    records = []
    for step in range(steps):
        x, _, y = S.problem(world, seed=first_seed + step)
        records.append(record_step(head, x, y, sizes, rank))
    return records


def regularizer_sweep(rank, world, outdir):
    """Every configuration, STEPS training steps on the world's batch layout."""
    _, w, _ = S.problem(world)
    out = {}
    for name, factory in configurations().items():
        head = S.make_head(world, S.make_loss(MARGIN), w, regularizers=factory())
        out[name] = {"steps": train(head, world, rank), "shard_range": torch.tensor(head.shard_range)}
    return out


def regularizer_empty_rank(rank, world, outdir):
    """A rank that feeds no rows still owns classes (and centers) and takes part: one alpha-rule step."""
    x, w, y = S.problem(world, sizes=S.EMPTY_RANK_SIZES)
    head = S.make_head(world, S.make_loss(MARGIN), w, regularizers=configurations()["ring_auto_and_center"]())
    return record_step(head, x, y, S.EMPTY_RANK_SIZES, rank)


def regularizer_checkpoint_save(rank, world, outdir):
    """One step (SGD on the weight and the centers), save shard-wise, then the next step."""
    _, w, _ = S.problem(world)
    head = S.make_head(world, S.make_loss(MARGIN), w, regularizers=_checkpointed())
    train(head, world, rank, steps=1)
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.grad is not None:
                parameter.sub_(LR * parameter.grad)
    save_sharded(head, os.path.join(outdir, "ckpt_regularizers"))
    return {"next": train(head, world, rank, steps=1, first_seed=1)[0]}


def regularizer_checkpoint_load(rank, world, outdir, ckpt_dir=None):
    """Load the world-2 checkpoint into a head built with another seed; the same next step (the world-2 batch
    split this world's way)."""
    head = DistributedMarginHead(S.LAYOUTS[CHECKPOINT_WORLD][1], S.DIM, S.make_loss(MARGIN), dtype=torch.float64,
                                 backend=S.BACKENDS[world], seed=123, regularizers=_checkpointed())
    load_sharded(head, os.path.join(ckpt_dir or outdir, "ckpt_regularizers"))
    check_buffers_consistent(head)
    x, _, y = S.problem(CHECKPOINT_WORLD, seed=1)
    sizes = S._split(x.shape[0], world)
    return {"next": record_step(head, x, y, sizes, rank), "shard_range": torch.tensor(head.shard_range)}


def _checkpointed():
    return [CenterLoss(0.05, update="gradient", invariant_weight=0.2, init_std=1.0), RingLoss(0.02)]
