"""Worlds in which one rank fails, for tests/test_distributed_failures.py: rank FAILING raises, dies (SIGKILL)
or never arrives, and every other rank must raise (never hang) within the process group's timeout.

Each worker runs one scenario and writes what happened to ``<outdir>/rank<r>.json``: the exception's type and
message and the seconds from the step's start to the raise (a rank that dies writes nothing)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import margin_kernels as mk
from margin_kernels.distributed import DistributedMarginHead, load_sharded, save_sharded

FAILING = 1
CLASSES, DIM, ROWS = 40, 8, 4


def _head():
    return DistributedMarginHead(CLASSES, DIM, mk.ArcFace(), backend="torch", seed=0)


def _step(head, rank):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(ROWS, DIM, generator=gen)
    y = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    head(x, y).backward()


def dies(rank, outdir, timeout_s):
    """One good step, then rank FAILING is SIGKILLed before the second."""
    head = _head()
    _step(head, rank)
    if rank == FAILING:
        os.kill(os.getpid(), signal.SIGKILL)
    _step(head, rank)


def raises_outside(rank, outdir, timeout_s):
    """Rank FAILING raises in its own code (the backbone, say) and its process exits; the others step."""
    head = _head()
    _step(head, rank)
    if rank == FAILING:
        raise RuntimeError("the backbone of rank 1 failed")
    _step(head, rank)


def hangs(rank, outdir, timeout_s):
    """Rank FAILING stays alive but never calls the head again (stuck in its data loader)."""
    head = _head()
    _step(head, rank)
    if rank == FAILING:
        time.sleep(3 * timeout_s + 30)
        return
    _step(head, rank)


def bad_input(rank, outdir, timeout_s):
    """Rank FAILING passes a label out of range: the head knows who failed and says so on every rank."""
    head = _head()
    _step(head, rank)
    y = torch.randint(0, CLASSES, (ROWS,))
    if rank == FAILING:
        y[0] = CLASSES + 7
    head(torch.randn(ROWS, DIM), y)


def corrupted_checkpoint(rank, outdir, timeout_s):
    """Rank 0's shard of a saved checkpoint is truncated: every rank's load_sharded names the file."""
    head = _head()
    directory = os.path.join(outdir, "ckpt")
    path = save_sharded(head, directory)
    if rank == 0:
        with open(path, "r+b") as handle:
            handle.truncate(100)
    dist.barrier()
    load_sharded(_head(), directory)


SCENARIOS = {fn.__name__: fn for fn in (dies, raises_outside, hangs, bad_input, corrupted_checkpoint)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, outdir, name, timeout_s):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    started = time.monotonic()
    record = {"raised": None}
    try:
        SCENARIOS[name](rank, outdir, timeout_s)
    except BaseException as exc:  # noqa: BLE001 - what the test inspects
        record = {"raised": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        if rank == FAILING and name == "raises_outside":
            raise
    finally:
        record["seconds"] = time.monotonic() - started
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as handle:
            json.dump(record, handle)
    # no destroy_process_group: a peer may be dead, and a hung peer's group cannot be torn down cleanly
    os._exit(0)


def run_failing_world(name: str, outdir: str, *, world: int = 2, timeout_s: float = 5.0,
                      wait_s: float = 240.0) -> dict:
    """Run scenario ``name`` on ``world`` gloo processes; {rank: record or None (no record: it died)}. Raises
    TimeoutError if a surviving rank is still running after ``wait_s`` (a hang)."""
    context = mp.get_context("spawn")
    port = _free_port()
    procs = [context.Process(target=_worker, args=(r, world, port, outdir, name, timeout_s)) for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + wait_s
    survivors = [p for r, p in enumerate(procs) if not (name == "hangs" and r == FAILING)]
    try:
        for proc in survivors:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                raise TimeoutError(f"{name}: a rank still runs after {wait_s} s (a hang)")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    records = {}
    for rank in range(world):
        path = os.path.join(outdir, f"rank{rank}.json")
        records[rank] = json.load(open(path)) if os.path.exists(path) else None
    return records
