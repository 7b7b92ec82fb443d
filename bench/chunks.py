"""``python -m bench chunks``: one backend's forward+backward time against its class chunk, beside the GEMM floor.

This is how a backend's default chunk is picked (``chunk_loop.default_chunk_size`` on CPU,
``DEFAULT_CHUNK_SIZE`` on CUDA): memory per chunk is a few B x chunk tiles, so the smallest chunk within
``--within`` (5 %) of the fastest is the pick. The GEMM floor (``methods.floor_ms``) is measured once, at the
backends' default chunk, so every row's "x floor" divides by the same number. Each chunk runs in its own
process, like the comparison; no accuracy check (the tests own correctness at every chunk).

    python -m bench chunks --backend torch -B 256 -C 1e5 -d 512
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
from dataclasses import replace
from typing import Optional

from rich.console import Console
from rich.table import Table

from margin_kernels.bench.config import (LOSSES, Problem, Settings, parse_count, parse_dtypes, parse_names,
                                         parse_sizes)
from margin_kernels.bench.methods import BACKENDS, GEMM_FLOOR
from margin_kernels.bench.options import add_clock_argument, check_device, progress_bar
from margin_kernels.bench.report import environment, fmt_bytes, fmt_ms
from margin_kernels.bench.runner import run_sweep

_CHUNKED = [name for name in BACKENDS if name not in ("reference", "auto")]  # the backends that take a chunk
COLUMNS = ("chunk", "fwd ms", "bwd ms", "total ms", "extra mem", "x floor", "note")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench chunks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=_CHUNKED, default="torch", help="the backend timed (default torch)")
    p.add_argument("--loss", default="arcface", help=f"one of {', '.join(LOSSES)} (default arcface)")
    p.add_argument("--batch", "-B", default="256", help="batch size B (default 256)")
    p.add_argument("--dim", "-d", default="512", help="embedding dim d (default 512)")
    p.add_argument("--classes", "-C", default="1e5", help="number of classes C (default 1e5)")
    p.add_argument("--dtype", default="float32", help="storage dtype (default float32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--chunks", default="1024,2048,4096,8192,16384,32768", help="chunk widths (a size list)")
    p.add_argument("--within", type=float, default=0.05, help="pick: smallest chunk within this of the fastest")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout-s", type=float, default=None)
    p.add_argument("--json", metavar="PATH", help="write the rows, the floor and the pick as JSON")
    p.add_argument("--no-progress", action="store_true")
    add_clock_argument(p)
    return p


def pick(totals: dict, within: float) -> Optional[int]:
    """The smallest chunk whose time is within ``within`` of the fastest (chunk -> ms; None: none ran)."""
    if not totals:
        return None
    best = min(totals.values())
    return min(chunk for chunk, ms in totals.items() if ms <= best * (1 + within))


def _table(rows, floor, label: str) -> Table:
    notes = "; ".join(floor.result.get("notes", []))
    table = Table(title=f"{label}; floor {fmt_ms(floor.result.get('total'))} ms ({notes})", title_justify="left")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "note" else "right")
    for row in rows:
        r = row.result
        if row.status != "ok":
            table.add_row(str(row.problem.chunk_size), row.status, "", "", "", "", "; ".join(r.get("notes", [])))
            continue
        table.add_row(str(row.problem.chunk_size), fmt_ms(r["forward"]), fmt_ms(r["backward"]), fmt_ms(r["total"]),
                      fmt_bytes(r.get("extra_bytes")), "-" if row.floor_ratio is None else f"{row.floor_ratio:.2f}",
                      "; ".join(r.get("notes", [])))
    return table


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = check_device(parser, args.device, args.clock)
    try:
        base = Problem(parse_names(args.loss, LOSSES, "--loss")[0], parse_count(args.batch, "--batch"),
                       parse_count(args.dim, "--dim"), parse_count(args.classes, "--classes"),
                       parse_dtypes(args.dtype)[0], device)
        chunks = parse_sizes(args.chunks, "--chunks")
        if args.repeats < 1 or args.warmup < 0:
            raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    except ValueError as exc:
        parser.error(str(exc))
    reason = BACKENDS[args.backend].unavailable(base)
    if reason is not None:
        parser.error(f"--backend {args.backend}: {reason}")
    settings = Settings(repeats=args.repeats, warmup=args.warmup, check=False, timeout_s=args.timeout_s,
                        threads=args.threads, clock=args.clock)
    console = Console()
    with progress_bar(console, args.no_progress) as progress:
        task = progress.add_task("", total=len(chunks) + 1)

        def advance(text: str) -> None:
            progress.update(task, description=text)
            progress.advance(task)
        floor = run_sweep([base], [GEMM_FLOOR.name], settings, advance).rows[0]
        rows = run_sweep([replace(base, chunk_size=c) for c in chunks], [args.backend], settings, advance).rows
    for row in rows:
        if row.status == "ok" and floor.status == "ok":
            row.floor_ratio = row.total_ms() / floor.total_ms()
    chosen = pick({row.problem.chunk_size: row.total_ms() for row in rows if row.status == "ok"}, args.within)
    console.print(_table(rows, floor, f"{args.backend}, {base.family_label()}, C={base.classes:,}"))
    console.print(f"pick: chunk {chosen} (the smallest within {args.within:.0%} of the fastest)", markup=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m bench chunks " + " ".join(shlex.quote(a) for a in (argv or [])),
                       "created": datetime.datetime.now().isoformat(timespec="seconds"),
                       "environment": environment(), "settings": settings.to_dict(), "backend": args.backend,
                       "floor": floor.to_dict(), "rows": [row.to_dict() for row in rows], "pick": chosen},
                      f, indent=1)
            f.write("\n")
    return 1 if floor.status == "error" or any(row.status == "error" for row in rows) else 0
