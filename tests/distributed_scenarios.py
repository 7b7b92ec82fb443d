"""What each spawned gloo process of tests/test_distributed.py runs, and the inputs both sides regenerate.

Process start-up is the cost (~2-4 s per world), so one world runs every scenario in turn; each rank saves
its results (tensors, messages) to ``<outdir>/<scenario>.rank<r>.pt`` and the pytest process compares them
with single-process float64 references. A scenario that fails on a rank saves its traceback instead.
"""
from __future__ import annotations

import gc
import importlib
import os
import socket
import time
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from margin_kernels.distributed import (DistributedMarginHead, check_buffers_consistent, load_sharded,
                                        save_sharded, shard_ranges)
from margin_kernels.distributed.sharding import row_range
from tests.helpers import LOSS_NAMES, make_loss, random_problem

DIM = 16
# per world: rows each rank feeds (uneven) and the class count (uneven shards)
LAYOUTS = {1: ((9,), 37), 2: ((5, 4), 37), 3: ((4, 2, 5), 38)}
EMPTY_RANK_SIZES = (4, 0, 5)
SAMPLE_RATE = 0.4
SAMPLED_LOSSES = ("arcface", "curricularface", "magface", "mv_arc", "adacos", "npcface", "elastic_arc_plus",
                  "subcenter_arcface")
EMPTY_RANK_LOSSES = ("arcface", "magface", "adaface")
CHECKPOINT_LOSSES = ("curricularface", "adaface", "subcenter_arcface")  # K rows per class reshard whole
CHECKPOINT_WORLD = 2  # the checkpoint is saved by the 2-process world and loaded at 3 and 1
LR = 0.5
# the 2-process world runs the portable torch backend, the 3-process world the fastest one available ("auto":
# the native cpu backend where it is built), so both paths are held to the same references
BACKENDS = {1: "torch", 2: "torch", 3: "auto"}


# ---- inputs, identical in every process --------------------------------------------------------------------
def problem(world: int, seed: int = 0, sizes=None, dtype=torch.float64, sub_centers: int = 1):
    """(x, w, y) of the global batch: random_problem's inputs (one ignored row), redrawn until every rank's
    class shard holds at least one label, so every rank owns targets. ``sub_centers``: K rows per class in w."""
    sizes, num_classes = (sizes or LAYOUTS[world][0]), LAYOUTS[world][1]
    ranges = shard_ranges(num_classes, world)
    for attempt in range(1000):
        x, w, y = random_problem(sum(sizes), num_classes, DIM, dtype=dtype, seed=1000 * seed + attempt,
                                 ignore_rows=(1,), sub_centers=sub_centers)
        if all(bool(((y >= a) & (y < b)).any()) for a, b in ranges):
            return x, w, y
    raise AssertionError("no labelling covers every shard")


def local_rows(tensor, sizes, rank):
    start = sum(sizes[:rank])
    return tensor[start:start + sizes[rank]]


def make_head(world, margin, w, **kwargs):
    head = DistributedMarginHead(LAYOUTS[world][1], DIM, margin, dtype=w.dtype, backend=BACKENDS[world], **kwargs)
    start, stop = row_range(LAYOUTS[world][1], world, dist.get_rank() if dist.is_initialized() else 0,
                            margin.sub_centers)  # a class's K rows all on its owner
    assert (start, stop) == (head.shard_range[0] * margin.sub_centers, head.shard_range[1] * margin.sub_centers)
    with torch.no_grad():
        head.weight.copy_(w[start:stop])
    return head


def step(head, x, y, sizes, rank):
    """One forward/backward on this rank's rows: (loss, d loss/d local x, d loss/d local weight)."""
    local_x = local_rows(x, sizes, rank).clone().requires_grad_(True)
    head.weight.grad = None
    loss = head(local_x, local_rows(y, sizes, rank))
    loss.backward()
    return {"loss": loss.detach(), "dx": local_x.grad, "dw": head.weight.grad.clone()}


def buffers(module):
    return {name: b.clone() for name, b in module.named_buffers()}


# ---- scenarios ---------------------------------------------------------------------------------------------
def losses_sweep(rank, world, outdir, dtype=torch.float64, steps=2):
    """Every loss, training mode, ``steps`` calls (stateful losses advance between them)."""
    sizes = LAYOUTS[world][0]
    out = {}
    for name in LOSS_NAMES:
        x, w, y = problem(world, dtype=dtype, sub_centers=make_loss(name).sub_centers)
        head = make_head(world, make_loss(name), w)
        out[name] = {"steps": [step(head, x, y, sizes, rank) for _ in range(steps)],
                     "buffers": buffers(head.margin), "shard_range": torch.tensor(head.shard_range),
                     "backend": head.resolved_backend}
    return out


def losses_fp32(rank, world, outdir):
    return losses_sweep(rank, world, outdir, dtype=torch.float32, steps=1)


def empty_rank(rank, world, outdir):
    """A rank that feeds no rows still owns classes and takes part."""
    x, w, y = problem(world, sizes=EMPTY_RANK_SIZES)
    return {name: step(make_head(world, make_loss(name), w), x, y, EMPTY_RANK_SIZES, rank)
            for name in EMPTY_RANK_LOSSES}


def sampling(rank, world, outdir):
    """Partial FC at SAMPLE_RATE: two training steps per loss, the sampled classes recorded, plus a second
    head with the same seed (same draws) and one with another seed."""
    sizes = LAYOUTS[world][0]
    out = {}
    for name in SAMPLED_LOSSES:
        x, w, y = problem(world, sub_centers=make_loss(name).sub_centers)
        head = make_head(world, make_loss(name), w, sample_rate=SAMPLE_RATE, seed=7)
        twin = make_head(world, make_loss(name), w, sample_rate=SAMPLE_RATE, seed=7)
        other = make_head(world, make_loss(name), w, sample_rate=SAMPLE_RATE, seed=8)
        records = []
        for _ in range(2):
            record = step(head, x, y, sizes, rank)
            step(twin, x, y, sizes, rank)
            step(other, x, y, sizes, rank)
            record.update(index=head.sampled_classes.clone(), twin_index=twin.sampled_classes.clone(),
                          other_index=other.sampled_classes.clone())
            records.append(record)
        head.eval()
        records.append(dict(step(head, x, y, sizes, rank), eval_index_is_none=head.sampled_classes is None))
        out[name] = records
    return out


def bad_inputs(rank, world, outdir):
    """Rank 1 feeds an out-of-range label, then rank 0 a wrongly shaped batch: every rank must raise a
    ValueError naming the bad rank (instead of hanging), and the group must still work afterwards. Then heads
    built with different arguments per rank, and one whose construction fails on rank 1 only."""
    x, w, y = problem(world)
    sizes, num_classes = LAYOUTS[world]
    head = make_head(world, make_loss("arcface"), w)
    local_x, local_y = local_rows(x, sizes, rank), local_rows(y, sizes, rank).clone()
    out = {}
    if rank == 1:
        local_y[0] = num_classes + 3
    out["label"] = _raised(lambda: head(local_x, local_y))
    bad_x = local_x[:, :DIM - 1] if rank == 0 else local_x
    out["shape"] = _raised(lambda: head(bad_x, local_rows(y, sizes, rank)))
    out["after"] = step(head, x, y, sizes, rank)
    out["config"] = _raised(lambda: DistributedMarginHead(num_classes + rank, DIM, make_loss("arcface")))
    out["build"] = _raised(lambda: DistributedMarginHead(num_classes, DIM, make_loss("arcface"),
                                                         chunk_size=0 if rank == 1 else None))
    return out


def _raised(fn):
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def checkpoint_save(rank, world, outdir):
    """Train one step (SGD on the weight), save shard-wise, then the next step's loss (state advances)."""
    return {name: _train_save_next(rank, world, outdir, name) for name in CHECKPOINT_LOSSES}


def _train_save_next(rank, world, outdir, name):
    x, w, y = problem(world, sub_centers=make_loss(name).sub_centers)
    sizes = LAYOUTS[world][0]
    head = make_head(world, make_loss(name), w)
    step(head, x, y, sizes, rank)
    with torch.no_grad():
        head.weight.sub_(LR * head.weight.grad)
    save_sharded(head, os.path.join(outdir, f"ckpt_{name}"))
    saved = {"weight": head.weight.detach().clone(), "buffers": buffers(head.margin)}
    x2, _, y2 = problem(world, seed=1, sub_centers=make_loss(name).sub_centers)  # the next step's batch
    return dict(saved, next=step(head, x2, y2, sizes, rank), buffers_after=buffers(head.margin))


def checkpoint_load(rank, world, outdir, ckpt_dir=None):
    """Load the world-2 checkpoint at this world size into a head built with another seed, then run the
    same next step (the next batch is the world-2 batch: same rows, split this world's way)."""
    out = {}
    for name in CHECKPOINT_LOSSES:
        head = DistributedMarginHead(LAYOUTS[CHECKPOINT_WORLD][1], DIM, make_loss(name), dtype=torch.float64,
                                     backend=BACKENDS[world], seed=123)
        load_sharded(head, os.path.join(ckpt_dir or outdir, f"ckpt_{name}"))
        check_buffers_consistent(head)
        loaded = {"weight": head.weight.detach().clone(), "shard_range": torch.tensor(head.shard_range),
                  "buffers": buffers(head.margin)}
        x2, _, y2 = problem(CHECKPOINT_WORLD, seed=1, sub_centers=make_loss(name).sub_centers)
        sizes = _split(x2.shape[0], world)
        out[name] = dict(loaded, next=step(head, x2, y2, sizes, rank), buffers_after=buffers(head.margin))
    return out


def _split(total, world):
    base, extra = divmod(total, world)
    return tuple(base + (r < extra) for r in range(world))


def ddp_and_amp(rank, world, outdir):
    """A DDP-wrapped backbone feeding the head (ddp_backbone=True), and a bf16 autocast backbone output
    meeting an fp32 weight."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, w, y = problem(world)
    sizes = LAYOUTS[world][0]
    inputs = _backbone_inputs(x.shape[0], torch.float64)
    backbone = _backbone(torch.float64)
    ddp = DDP(backbone)
    head = make_head(world, make_loss("arcface"), w, ddp_backbone=True)
    loss = head(ddp(local_rows(inputs, sizes, rank)), local_rows(y, sizes, rank))
    loss.backward()
    out = {"ddp": {"loss": loss.detach(), "grads": [p.grad.clone() for p in backbone.parameters()],
                   "dw": head.weight.grad.clone()}}

    backbone32 = _backbone(torch.float32)
    head32 = make_head(world, make_loss("arcface"), w.float())
    local_in = local_rows(inputs, sizes, rank).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = backbone32(local_in)
        features.retain_grad()
        loss = head32(features, local_rows(y, sizes, rank))
    loss.backward()
    out["amp"] = {"loss": loss.detach(), "features": features.detach(), "features_grad": features.grad,
                  "dw": head32.weight.grad.clone()}
    return out


def _backbone_inputs(total, dtype):
    return torch.randn(total, 6, generator=torch.Generator().manual_seed(5), dtype=dtype)


def _backbone(dtype):
    layer = torch.nn.Linear(6, DIM, dtype=dtype)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(6)
        layer.weight.copy_(torch.randn(DIM, 6, generator=gen, dtype=dtype) * 3.0)
        layer.bias.copy_(torch.randn(DIM, generator=gen, dtype=dtype))
    return layer


BINARY_LOSSES = ("sphereface2", "sphereface2_exact", "uniface", "uniface_clamp")


def binary_bias(rank, world, outdir):
    """The binary family's learnable bias (replicated on every rank, each shard's op returning its classes'
    share of the gradient): its gradient after one step and its value after SGD_STEPS plain SGD steps."""
    x, w, y = problem(world)
    sizes = LAYOUTS[world][0]
    out = {}
    for name in BINARY_LOSSES:
        head = make_head(world, make_loss(name), w)
        bias = head.margin.logit_shift_parameter()
        record = step(head, x, y, sizes, rank)
        record["bias_grad"] = bias.grad.clone()
        optimizer = torch.optim.SGD([bias], lr=LR)
        for _ in range(3):
            optimizer.step()
            optimizer.zero_grad()
            step(head, x, y, sizes, rank)
        record["bias_after"] = bias.detach().clone()
        out[name] = record
    return out


SCENARIOS = {fn.__name__: fn for fn in (losses_sweep, losses_fp32, empty_rank, sampling, bad_inputs,
                                          checkpoint_save, checkpoint_load, ddp_and_amp, binary_bias)}


# ---- process management ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, outdir, names, ckpt_dir, module=__name__):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    warnings.filterwarnings("ignore", message="margin_kernels: backend='auto' skips")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        for name in names:
            try:
                kwargs = {"ckpt_dir": ckpt_dir} if name.endswith(("checkpoint_load", "resharded_load")) else {}
                result = _scenario(name, module)(rank, world, outdir, **kwargs)
            except Exception:  # noqa: BLE001 - reported to the pytest side, which fails the scenario's tests
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(outdir, f"{_file_name(name)}.rank{rank}.pt"))
    finally:
        # torch 2.13 + gloo: without this collect, ~10-20% of worker exits aborted in interpreter finalisation
        # ("terminate called without an active exception"), after every result was written. The cyclic
        # garbage comes from torch's lazy imports on a custom op's first call (torch._dynamo, triton), not
        # from the head; collecting it before destroying the group avoided the abort in every trial.
        gc.collect()
        dist.destroy_process_group()


def _scenario(name: str, module: str):
    """A scenario by name from ``module``'s SCENARIOS, or ``"module:function"`` from another scenario file (the
    worker is spawned fresh, so other files' scenarios are found by import, not by registration)."""
    if ":" not in name:
        return importlib.import_module(module).SCENARIOS[name]
    other, function = name.split(":")
    return getattr(importlib.import_module(other), function)


def run_world(world: int, outdir: str, names, *, ckpt_dir=None, timeout: float = 150.0,
              module: str = __name__) -> dict:
    """Spawn ``world`` gloo processes on loopback running ``names`` (functions of ``module``'s ``SCENARIOS``, or
    ``"module:function"``, called as ``fn(rank, world, outdir)``); {name: [rank results]}."""
    context = mp.start_processes(_worker, args=(world, _free_port(), outdir, list(names), ckpt_dir, module),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"world {world} did not finish within {timeout} s (a hang?)")
    return {name: [torch.load(os.path.join(outdir, f"{_file_name(name)}.rank{r}.pt"), weights_only=True)
                   for r in range(world)] for name in names}


def _file_name(name: str) -> str:
    return name.split(":")[-1]
