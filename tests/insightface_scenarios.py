"""Training trajectories of arcface_torch's PartialFC_V2 (tests/originals_insightface.py) and its drop-in
(margin_kernels.integrations.insightface) from the same seed, as train_v2.py runs them: a backbone, SGD with
momentum and weight decay over the backbone's and the head's parameters, clip_grad_norm_(backbone, 5).

Used in one process by tests/test_integration_insightface.py and, through ``SCENARIOS``, in spawned gloo worlds
(tests/distributed_scenarios.run_world), where each rank runs both codes on its rows of the same global batch.
"""
from __future__ import annotations

import contextlib

import torch

from margin_kernels.integrations import insightface as ours
from tests import originals_insightface as theirs

DIM, INPUTS, CLASSES, ROWS_PER_RANK, STEPS, LR = 16, 6, 41, 6, 20, 0.1
#: margin settings of arcface_torch's configs: ArcFace, CosFace, ArcFace with interclass filtering
MARGINS = {"arcface": (64, 1.0, 0.5, 0.0, 0.0), "cosface": (64, 1.0, 0.0, 0.4, 0.0),
           "filter": (64, 1.0, 0.5, 0.0, 0.3)}


@contextlib.contextmanager
def default_dtype(dtype):
    """insightface allocates every buffer in torch's default dtype: a float64 run sets it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def batch(step, rank, world):
    """This rank's rows of step ``step``'s global batch (the same in every process); features pulled toward
    their classes' directions so that targets span easy and hard pairs, some past pi - m."""
    gen = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(ROWS_PER_RANK * world, INPUTS, generator=gen, dtype=torch.get_default_dtype())
    labels = torch.randint(0, CLASSES, (ROWS_PER_RANK * world,), generator=gen)
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return inputs[rows], labels[rows]


def backbone():
    layer = torch.nn.Linear(INPUTS, DIM)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(6)
        layer.weight.copy_(torch.randn(DIM, INPUTS, generator=gen) * 2.0)
        layer.bias.copy_(torch.randn(DIM, generator=gen))
    return layer


def build(code, margin, sample_rate, fp16=False, seed=0):
    """(backbone, PartialFC_V2, optimizer) as train_v2.py builds them, from ``setup_seed(seed)``."""
    torch.manual_seed(seed)
    net = backbone()
    margin_loss = code.CombinedMarginLoss(*MARGINS[margin])
    kwargs = {"backend": "torch", "chunk_size": 16} if code is ours else {}
    pfc = code.PartialFC_V2(margin_loss, DIM, CLASSES, sample_rate, fp16, **kwargs)
    pfc.train()
    opt = torch.optim.SGD(params=[{"params": net.parameters()}, {"params": pfc.parameters()}], lr=LR,
                          momentum=0.9, weight_decay=5e-4)
    return net, pfc, opt


def train(net, pfc, opt, steps, rank, world, first_step=0):
    """train_v2.py's inner loop (fp32 branch); returns the per-step losses and the final parameters."""
    losses = []
    for step in range(first_step, first_step + steps):
        inputs, labels = batch(step, rank, world)
        loss = pfc(net(inputs), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return {"losses": torch.stack(losses), "weight": pfc.weight.detach().clone(),
            "backbone": net.weight.detach().clone()}


def trajectory(code, margin, sample_rate, dtype, rank=0, world=1, steps=STEPS):
    with default_dtype(dtype):
        net, pfc, opt = build(code, margin, sample_rate)
        return train(net, pfc, opt, steps, rank, world)


def resumed(first, then, margin, sample_rate, dtype, rank=0, world=1, steps=STEPS // 2):
    """Train ``steps`` with code ``first``, save train_v2.py's checkpoint entries, resume with code ``then`` (a
    fresh process would: setup_seed, build, load_state_dict) for ``steps`` more."""
    with default_dtype(dtype):
        net, pfc, opt = build(first, margin, sample_rate)
        train(net, pfc, opt, steps, rank, world)
        checkpoint = {"state_dict_backbone": net.state_dict(), "state_dict_softmax_fc": pfc.state_dict(),
                      "state_optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
        net, pfc, opt = build(then, margin, sample_rate, seed=1)
        net.load_state_dict(checkpoint["state_dict_backbone"])
        pfc.load_state_dict(checkpoint["state_dict_softmax_fc"])
        opt.load_state_dict(checkpoint["state_optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        out = train(net, pfc, opt, steps, rank, world, first_step=steps)
        out["keys"] = list(checkpoint["state_dict_softmax_fc"])
        return out


# ---- spawned worlds: each rank runs both codes -------------------------------------------------------------
def _both(rank, world, margin, sample_rate, dtype):
    return {"theirs": trajectory(theirs, margin, sample_rate, dtype, rank, world),
            "ours": trajectory(ours, margin, sample_rate, dtype, rank, world)}


def world_arcface_fp64(rank, world, outdir):
    return _both(rank, world, "arcface", 1.0, torch.float64)


def world_arcface_sampled_fp64(rank, world, outdir):
    return _both(rank, world, "arcface", 0.5, torch.float64)


def world_cosface_sampled_fp32(rank, world, outdir):
    return _both(rank, world, "cosface", 0.5, torch.float32)


def world_resume_fp64(rank, world, outdir):
    return {"theirs": resumed(theirs, theirs, "arcface", 0.5, torch.float64, rank, world),
            "ours_from_theirs": resumed(theirs, ours, "arcface", 0.5, torch.float64, rank, world)}


SCENARIOS = {fn.__name__: fn for fn in (world_arcface_fp64, world_arcface_sampled_fp64,
                                          world_cosface_sampled_fp32, world_resume_fp64)}
