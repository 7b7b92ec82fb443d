"""Fused CPU path (backend="cpu") forward+backward against the naive full-logit implementation
(backend="reference" on fp32 inputs: the B x C logits materialised, autograd backward), the pure-torch chunked
backend (backend="torch") and the GEMM floor, all timed in one run and reported as ratios to the floor.

The floor is the four GEMMs of B*C*d every exact method needs (forward logits, their recompute in backward,
dx and dW) as four full-size products into preallocated outputs. The same products chunk by chunk at the fused
path's chunk size ("chunked GEMMs", the loop's own floor, often a little faster than the full-size ones) are
timed too. Neither floor allocates dW; every loss method does (a fresh gradient, as after zero_grad()).
Methods run round-robin, one call each per repeat, so drift of a shared machine hits them alike; medians are
reported. Target: cpu/floor <= 1.15 at C >= 1e5.

    python bench/bench_cpu_native.py                              # the recorded sweep (minutes)
    python bench/bench_cpu_native.py --batch 8 --classes 1000 --dim 32 --repeats 1   # smoke test
    python bench/bench_cpu_native.py --out bench/results/cpu_native.md   # also write markdown (+ .json)
    OMP_WAIT_POLICY=PASSIVE python bench/bench_cpu_native.py --clock process ...   # on a busy machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import margin_kernels as mk  # noqa: E402
from margin_kernels.backends import chunk_loop, unavailable_reason  # noqa: E402

LOSSES = {"arcface": mk.ArcFace, "cosface": mk.CosFace, "softmax": mk.Softmax, "curricularface": mk.CurricularFace}


def _problem(batch, classes, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen)
    w = torch.randn(classes, dim, generator=gen) * 0.05
    y = torch.randint(0, classes, (batch,), generator=gen)
    return x, w, y


def _loss_step(backend, xx, ww, y, loss_name, chunk_size):
    """One training step's loss work; every method shares the leaves xx, ww (grads dropped each time, so each
    step allocates its dW like a training loop with zero_grad(set_to_none=True))."""
    margin = LOSSES[loss_name]()

    def step():
        xx.grad = ww.grad = None
        loss = mk.margin_cross_entropy(xx, ww, y, margin, backend=backend, chunk_size=chunk_size,
                                       check_values=False)
        loss.backward()
        xx.grad = ww.grad = None

    return step


def _floor_full(x, w, dx, dw):
    logits = torch.empty(x.shape[0], w.shape[0])

    def step():
        torch.mm(x, w.t(), out=logits)
        torch.mm(x, w.t(), out=logits)
        torch.mm(logits, w, out=dx)
        torch.mm(logits.t(), x, out=dw)

    return step


def _floor_chunked(x, w, chunk, dx, dw):
    tile = torch.empty(x.shape[0] * chunk)

    def step():
        dx.zero_()
        for col0 in range(0, w.shape[0], chunk):
            wc = w[col0:col0 + chunk]
            t = tile[: x.shape[0] * wc.shape[0]].view(x.shape[0], wc.shape[0])
            torch.mm(x, wc.t(), out=t)
            torch.mm(x, wc.t(), out=t)
            dx.addmm_(t, wc)
            torch.mm(t.t(), x, out=dw[col0:col0 + chunk])

    return step


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _time_round_robin(methods: dict, warmup: int, repeats: int, clock) -> dict:
    for _ in range(warmup):
        for step in methods.values():
            step()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, step in methods.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return times


def run_config(batch, classes, dim, args) -> dict:
    x, w, y = _problem(batch, classes, dim)
    chunk = chunk_loop.default_chunk_size(batch, "cpu")
    dx, dw = torch.empty_like(x), torch.empty_like(w)  # the floors' outputs, allocated once
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    methods = {
        "floor_full": _floor_full(x, w, dx, dw),
        "floor_chunked": _floor_chunked(x, w, chunk, dx, dw),
        "cpu": _loss_step("cpu", xx, ww, y, args.loss, None),
        "torch": _loss_step("torch", xx, ww, y, args.loss, None),
    }
    for other in args.chunk:  # other chunk sizes of the fused path, for tuning
        methods[f"cpu@{other}"] = _loss_step("cpu", xx, ww, y, args.loss, other)
    # the naive path keeps several B x C tensors alive for autograd; skip it where that would crowd the machine
    naive_gib = args.naive_copies * batch * classes * 4 / 2 ** 30
    naive_note = None
    if naive_gib <= args.naive_max_gib:
        methods["naive"] = _loss_step("reference", xx, ww, y, args.loss, None)
    else:
        naive_note = f"skipped: ~{naive_gib:.0f} GiB of B x C temporaries > --naive-max-gib {args.naive_max_gib}"
    times = _time_round_robin(methods, args.warmup, args.repeats, CLOCKS[args.clock])
    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor = med["floor_full"]
    row = {"B": batch, "C": classes, "d": dim, "chunk": chunk, "floor_s": floor,
           "median_s": med, "spread_s": {name: max(ts) - min(ts) for name, ts in times.items()},
           "vs_floor": {name: med[name] / floor for name in med}}
    if naive_note:
        row["naive_note"] = naive_note
    return row


def _fmt_row(row) -> str:
    ratio, med = row["vs_floor"], row["median_s"]
    naive = f"{ratio['naive']:.2f}x" if "naive" in ratio else "—"
    naive_over_cpu = f"{med['naive'] / med['cpu']:.1f}x" if "naive" in ratio else "—"
    return (f"| {row['B']} | {row['C']:.0e} | {row['d']} | {row['chunk']} | {row['floor_s']:.3f} | {med['cpu']:.3f} | "
            f"**{ratio['cpu']:.2f}x** | {ratio['torch']:.2f}x | {naive} | {med['cpu'] / med['floor_chunked']:.2f}x | "
            f"{naive_over_cpu} |")


HEADER = ("| B | C | d | chunk | floor (s) | cpu (s) | cpu / floor | torch / floor | naive / floor | "
          "cpu / chunked GEMMs | naive / cpu |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--classes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--loss", choices=sorted(LOSSES), default="arcface")
    parser.add_argument("--chunk", type=int, nargs="*", default=[],
                        help="also time the cpu backend at these chunk sizes (cpu@N columns of the JSON/stdout)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (the figure to record, on a quiet machine) or process: CPU seconds of all "
                             "threads, steadier on a shared machine (run with OMP_WAIT_POLICY=PASSIVE so idle "
                             "OpenMP threads do not spin)")
    parser.add_argument("--naive-max-gib", type=float, default=8.0)
    parser.add_argument("--naive-copies", type=int, default=6,
                        help="B x C fp32 tensors the naive path keeps alive (measured: ~3.5 besides dW)")
    parser.add_argument("--out", type=Path, default=None, help="write markdown here and JSON next to it")
    args = parser.parse_args(argv)
    reason = unavailable_reason("cpu")
    if reason is not None:
        parser.error(f"the cpu backend is unavailable: {reason}")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
           platform.machine(), "cores": os.cpu_count(), "loss": args.loss, "repeats": args.repeats,
           "clock": args.clock, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
           "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))}
    print(f"# fused CPU margin loss, fwd+bwd, fp32; {env}")
    print(HEADER)
    rows = []
    for batch in args.batch:
        for classes in args.classes:
            row = run_config(batch, int(classes), args.dim, args)
            rows.append(row)
            extra = "".join(f" {name}: {ratio:.2f}x" for name, ratio in row["vs_floor"].items() if "@" in name)
            print(_fmt_row(row) + (f" ({row['naive_note']})" if "naive_note" in row else "") + extra, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"fused CPU margin loss ({args.loss}), forward+backward, fp32, median of {args.repeats} "
                 f"({args.clock} clock)",
                 "", f"`{env['command']}`", "", f"torch {env['torch']}, {env['threads']} threads, "
                 f"{env['cores']} cores", "", HEADER]
        lines += [_fmt_row(row) for row in rows]
        lines += [f"\n{row['B']} x {row['C']:.0e}: naive {row['naive_note']}" for row in rows if "naive_note" in row]
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return rows


if __name__ == "__main__":
    main()
