"""What each spawned gloo process of tests/test_fused_distributed.py runs: DistributedMarginHeads with a fused
optimizer, 20 steps with Partial FC sampling on uneven shards, and a checkpoint saved by the 2-process world and
resumed by the 3-process one (the optimizer state resharded). Results go back through
``distributed_scenarios.run_world`` (``module=`` this one)."""
from __future__ import annotations

import os

import torch

import margin_kernels as mk
from margin_kernels.distributed import DistributedMarginHead, load_sharded, save_sharded
from margin_kernels.optim import FusedAdamW, FusedSGD
from tests.helpers import random_problem

NUM_CLASSES, DIM, STEPS, RESUME_AT, SAMPLE_RATE = 37, 16, 20, 10, 0.4
ROWS = {2: (5, 4), 3: (4, 2, 5)}  # uneven batches per rank (uneven shards: 37 classes)
CASES = {
    "sgd_nesterov": ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3), False),
    "sgd_sparse": ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=5e-3), True),
    "adamw": ("adamw", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-2), False),
    "adamw_sparse": ("adamw", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.0), True),
}
RESHARDED_CASE = "sgd_nesterov"


def initial_weight():
    return random_problem(1, NUM_CLASSES, DIM, seed=0)[1]


def batch(step: int, world: int):
    """The global batch of ``step`` (rows split over the ranks as ROWS[world])."""
    x, _, y = random_problem(sum(ROWS[world]), NUM_CLASSES, DIM, seed=100 + step)
    return x, y


def _make_head(world, case, seed=7):
    kind, options, sparse = CASES[case]
    cls = FusedSGD if kind == "sgd" else FusedAdamW
    head = DistributedMarginHead(NUM_CLASSES, DIM, mk.ArcFace(), dtype=torch.float64, backend="auto",
                                 sample_rate=SAMPLE_RATE, seed=seed,
                                 optimizer=lambda params: cls(params, sparse=sparse, **options))
    start, stop = head.shard_range
    with torch.no_grad():
        head.weight.copy_(initial_weight()[start:stop])
    return head


def _train(head, rank, world, steps):
    """Steps of the loop; each step's sampled classes (global ids on this shard)."""
    sampled = []
    for step in steps:
        x, y = batch(step, world)
        start = sum(ROWS[world][:rank])
        rows = slice(start, start + ROWS[world][rank])
        head(x[rows], y[rows]).backward()
        assert head.weight.grad is None
        head.fused_optimizer.step()
        head.fused_optimizer.zero_grad()
        sampled.append(head.sampled_classes.clone())
    return sampled


def trajectories(rank, world, outdir):
    """Every case, STEPS steps: the final weight shard and the sampled classes."""
    out = {}
    for case in CASES:
        head = _make_head(world, case)
        sampled = _train(head, rank, world, range(STEPS))
        out[case] = {"weight": head.weight.detach().clone(), "sampled": sampled}
    return out


def resharded_save(rank, world, outdir):
    """World 2: RESUME_AT steps, then save (weight + optimizer state) shard-wise."""
    head = _make_head(world, RESHARDED_CASE)
    sampled = _train(head, rank, world, range(RESUME_AT))
    save_sharded(head, os.path.join(outdir, "ckpt_fused"))
    return {"sampled": sampled}


def resharded_load(rank, world, outdir, ckpt_dir=None):
    """World 3: load world 2's checkpoint into a head of another seed, train the remaining steps."""
    head = _make_head(world, RESHARDED_CASE, seed=123)
    load_sharded(head, os.path.join(ckpt_dir, "ckpt_fused"))
    sampled = _train(head, rank, world, range(RESUME_AT, STEPS))
    return {"weight": head.weight.detach().clone(), "sampled": sampled,
            "step": torch.tensor(head.fused_optimizer.state[head.weight]["step"])}


SCENARIOS = {fn.__name__: fn for fn in (trajectories, resharded_save, resharded_load)}
