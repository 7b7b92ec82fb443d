"""``python -m bench optimizer-step``: one training step of the head's weight, forward + backward + optimizer,
with the update fused into backward (``margin_kernels.optim``) against backward followed by torch.optim.

    python -m bench optimizer-step -C 2e6 -d 512 -B 64 --dtype fp32 --optimizer sgd --momentum 0.9 --steps 3

Per mode: the peak resident memory above the weight over the first step (``memory.CpuMemory``: VmHWM reset
before it, glibc returning large blocks on free), which allocates the optimizer state, split into the
optimizer state (C x d buffers, counted from the optimizer) and
the workspace (everything else: dW unfused, the chunk buffers fused); then seconds per step, the median of
the ``--steps`` - 1 steps after it, with glibc's usual allocation policy (``memory.timing_allocator``; the
first step's time is reported apart). CPU only (the resident-set method); the
machine's load average is recorded beside the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Optional

import torch

import margin_kernels as mk
from margin_kernels.bench.memory import CpuMemory, timing_allocator
from margin_kernels.optim import FusedAdamW, FusedSGD

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
MODES = ("fused", "unfused")


def _optimizer(mode: str, kind: str, params, lr: float, momentum: float, state_dtype):
    if kind == "sgd":
        return (FusedSGD(params, lr=lr, momentum=momentum, state_dtype=state_dtype) if mode == "fused"
                else torch.optim.SGD(params, lr=lr, momentum=momentum))
    return (FusedAdamW(params, lr=lr, state_dtype=state_dtype) if mode == "fused"
            else torch.optim.AdamW(params, lr=lr))


def _state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def run_mode(mode: str, *, classes: int, dim: int, batch: int, dtype: torch.dtype, backend: str, kind: str,
             lr: float, momentum: float, steps: int, state_dtype=None, seed: int = 0) -> dict:
    """Build a MarginHead of ``classes`` x ``dim``, run ``steps`` training steps in ``mode``; the measurements."""
    generator = torch.Generator().manual_seed(seed)
    warm = mk.MarginHead(64, dim, mk.ArcFace(), backend=backend, dtype=dtype)
    warm_opt = _optimizer(mode, kind, warm.parameters(), lr, momentum, state_dtype)
    if mode == "fused":
        warm.fuse(warm_opt)
    warm(torch.randn(4, dim, dtype=dtype), torch.randint(0, 64, (4,))).backward()  # load the code paths
    warm_opt.step()
    del warm, warm_opt
    head = mk.MarginHead(classes, dim, mk.ArcFace(), backend=backend, dtype=dtype, check_values=False)
    optimizer = _optimizer(mode, kind, head.parameters(), lr, momentum, state_dtype)
    if mode == "fused":
        head.fuse(optimizer)
    data = [(torch.randn(batch, dim, generator=generator).to(dtype),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(steps)]
    memory = CpuMemory()
    memory.begin()
    times, extra = [], None
    for step, (x, y) in enumerate(data):
        start = time.perf_counter()
        head(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if step == 0:
            extra = memory.peak_extra()
            timing_allocator()
    weight = head.weight.numel() * head.weight.element_size()
    state = _state_bytes(optimizer)
    return {"mode": mode, "classes": classes, "dim": dim, "batch": batch, "dtype": str(dtype).split(".")[-1],
            "backend": head.resolved_backend, "optimizer": kind, "momentum": momentum, "steps": steps,
            "seconds_per_step": statistics.median(times[1:] or times), "first_step_seconds": times[0],
            "weight_bytes": weight, "state_bytes": state, "peak_extra_bytes": extra,
            "workspace_bytes": None if extra is None else extra - state,
            "memory_method": memory.method, "load_average": os.getloadavg(), "cpu_threads": torch.get_num_threads()}


def _render(rows: list[dict]) -> str:
    mib = 2 ** 20
    lines = ["| mode | s/step | first step s | W MiB | state MiB | peak above W MiB | workspace MiB (% of W) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        work = r["workspace_bytes"]
        share = "n/a" if work is None else f"{work / mib:.0f} ({100 * work / r['weight_bytes']:.1f}%)"
        peak = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / mib:.0f}"
        lines.append(f"| {r['mode']} | {r['seconds_per_step']:.3g} | {r['first_step_seconds']:.3g} | "
                     f"{r['weight_bytes'] / mib:.0f} | {r['state_bytes'] / mib:.0f} | {peak} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench optimizer-step", description=__doc__.split("\n\n")[0])
    parser.add_argument("-C", "--classes", type=float, default=1e6)
    parser.add_argument("-d", "--dim", type=int, default=512)
    parser.add_argument("-B", "--batch", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    parser.add_argument("--state-dtype", choices=sorted(DTYPES), default=None, help="fused mode only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON ('-': stdout, the table to stderr)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.classes < 1:
        parser.error("--steps and --classes must be >= 1")
    rows = [run_mode(mode, classes=int(args.classes), dim=args.dim, batch=args.batch, dtype=DTYPES[args.dtype],
                     backend=args.backend, kind=args.optimizer, lr=args.lr, momentum=args.momentum,
                     steps=args.steps, state_dtype=DTYPES.get(args.state_dtype)) for mode in args.modes]
    table = _render(rows)
    if args.json == "-":
        import sys
        print(table, file=sys.stderr)
        print(json.dumps(rows))
    else:
        print(table)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    return 0
