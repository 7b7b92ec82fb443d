"""``margin-bench``: compare backends and peers on time, memory and accuracy, over sweeps.

With no arguments: the quick comparison on the default device (ArcFace, B=256, d=512, C=2e4 and 5e4,
float32; the reference against every margin_kernels backend usable there, plus the GEMM floor); on a CPU it
times them round-robin in one process with one thread (--interleave --threads 1), which keeps the ratios
steady on a shared machine. A warning is printed when the 1-minute load exceeds the cores or a median's
spread passes ±10%; the load is recorded beside the numbers. ``margin-bench compare ...`` is the same.

In a terminal the table fits its width (notes become numbered footnotes); piped or redirected, it is printed
in full. Ctrl-C stops the sweep: the rows measured so far are printed and written, marked incomplete.
The project's developer tools (chunk sizes, the compiled-kernel report, the memory model, ...) are not
installed: ``python -m bench -h`` in a source checkout.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from typing import Optional

from rich.console import Console

from margin_kernels.backends import BACKEND_NAMES, check_backend_name
from margin_kernels.validation import check_chunk_size

from .catalog import all_methods
from .conditions import LoadRecord
from .config import LOSSES, Settings, parse_count, parse_dtypes, parse_names, parse_sizes, problem_grid
from .methods import BACKENDS, BUDGET_SEPARATOR, GEMM_FLOOR, parse_budget
from .options import add_clock_argument, check_device, progress_bar
from .outputs import output_path_problem, output_paths, write_outputs
from .peers import PEERS
from .regularized import REGULARIZERS
from .plot import MISSING_MATPLOTLIB, matplotlib_missing
from .screen import print_report
from .runner import count_steps, plan, run_sweep

DEFAULT_BACKENDS = "reference,torch,cpu,triton,cuda"
#: what plain ``margin-bench`` (no option of what to run or how to measure) adds on a CPU: every method of a
#: problem timed round-robin in one process, one thread each, so that load from other jobs hits them alike.
#: Measured over 5 runs each on the project's shared 2-core machine (bench/README.md#the-quick-default): the
#: x-floor ratios of the former default (one process per method, torch's threads) spread by up to ±674%
#: between runs, these by ±4-11%
QUICK_CPU = ("--interleave", "--threads", "1")
#: options that say where results go, not what is measured: the quick default still applies with them
_OUTPUT_OPTIONS = ("json", "plot", "record", "no_progress", "list", "device")
_CONCRETE = [n for n in BACKEND_NAMES if n != "auto"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="margin-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sizes take lists and ranges: 1e3..1e6 (1-2-5 series), 1e3..4e6:7 (7 log-spaced points), "
               "1000,5e4. Every (problem, method) runs in its own process (with --interleave: every problem); "
               "out-of-memory is a result. Developer tools (chunks, kernels, ceilings, memory-model, "
               "optimizer-step, throughput, plot from JSON): python -m bench -h in a source checkout.")
    what = p.add_argument_group("what to run")
    what.add_argument("--loss", default="arcface", help=f"loss(es): {', '.join(LOSSES)} (default arcface)")
    what.add_argument("--batch", "-B", default="256", help="batch size(s) B (default 256)")
    what.add_argument("--dim", "-d", default="512", help="embedding dim(s) d (default 512)")
    what.add_argument("--classes", "-C", default="2e4,5e4", help="number(s) of classes C (default 2e4,5e4)")
    what.add_argument("--dtype", default="float32", help="storage dtype(s): float32, bfloat16, float16, float64")
    what.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="default: cuda when available, else cpu")
    what.add_argument("--backends", default=DEFAULT_BACKENDS,
                      help=f"margin_kernels backends among {', '.join(BACKEND_NAMES)}, or 'all' "
                           f"(default {DEFAULT_BACKENDS}: those unusable here are listed as not run)")
    what.add_argument("--peers", default="none",
                      help=f"other implementations: {', '.join(PEERS)}, 'all' or 'none' (default none); "
                           "each runs only where it applies (the Softmax peers for --loss softmax)")
    what.add_argument("--regularizers", default="",
                      help=f"head regularisers added to the loss, comma-separated: {', '.join(REGULARIZERS)} "
                           "(default none; margin_kernels backends only)")
    what.add_argument("--memory-budgets", default=None, metavar="LIST",
                      help="also run each chosen backend with memory_budget= each of these (auto, all, or a size "
                           "such as 64M, 1G): rows named backend@budget, time against memory")
    what.add_argument("--no-floor", action="store_true", help="skip the GEMM floor (no 'x floor' column)")
    what.add_argument("--chunk-size", type=int, default=None, help="class chunk of the fused backends")
    what.add_argument("--seed", type=int, default=0)
    how = p.add_argument_group("how to measure")
    how.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd repeats (default 3)")
    how.add_argument("--warmup", type=int, default=1,
                     help="untimed runs after the memory-measuring run, before the timed ones (default 1)")
    how.add_argument("--budget-s", type=float, default=None,
                     help="fewer repeats (at least 1) where one run is slow: about this many seconds per case")
    how.add_argument("--mem-limit-gb", type=float, default=None,
                     help="memory allowed above the inputs, gradients included (GiB); past it a run is OOM. "
                          "Default: the device's memory (CPU: 90%% of MemAvailable, enforced so that the "
                          "kernel's OOM killer never fires)")
    how.add_argument("--no-check", action="store_true", help="skip the comparison with the float64 reference")
    how.add_argument("--check-up-to", metavar="C", default=None,
                     help="compare with the float64 reference only up to this C (it costs one run per method)")
    how.add_argument("--threads", type=int, default=None,
                     help="CPU threads per measuring process (default: PyTorch's; 1 is steadier on a busy machine)")
    how.add_argument("--timeout-s", type=float, default=None, help="stop a case after this long (a result)")
    add_clock_argument(how)
    how.add_argument("--interleave", action="store_true",
                     help="time all methods of a problem in one process, round-robin (one run each per repeat): "
                          "steadier ratios on a shared machine; memory is still measured per method, one at a "
                          "time, and --timeout-s covers the whole problem")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': to stdout, table to stderr)")
    out.add_argument("--plot", metavar="PNG", help="time and memory against C, log-log (needs matplotlib)")
    out.add_argument("--record", metavar="PREFIX",
                     help="write PREFIX.json, PREFIX.md and PREFIX.png (e.g. bench/results/cpu_sweep)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--list", action="store_true", help="list the methods and whether they run here, then exit")
    return p


def _method_names(args) -> list[str]:
    if args.backends == "all":
        backends = _CONCRETE
    else:
        backends = [n.strip().lower() for n in args.backends.split(",") if n.strip()]
        for name in backends:  # the package's own check: the same wording as backend= everywhere
            try:
                check_backend_name(name)
            except ValueError as exc:
                raise ValueError(f"--backends: {exc}") from None
        backends = parse_names(",".join(backends), BACKENDS, "--backends")
    peers = [] if args.peers == "none" else list(PEERS) if args.peers == "all" else \
        parse_names(args.peers, PEERS, "--peers")
    if peers and args.regularizers:
        raise ValueError("--peers compute the plain loss: they cannot run with --regularizers")
    budgeted = []
    if args.memory_budgets:
        for budget in (b.strip() for b in args.memory_budgets.split(",") if b.strip()):
            parse_budget(budget)  # a bad size is a clear error here, not in a worker
            budgeted += [f"{b}{BUDGET_SEPARATOR}{budget}" for b in backends if b != "reference"]
    return backends + budgeted + peers + ([] if args.no_floor else [GEMM_FLOOR.name])


#: every numeric option and the values it takes: (option, attribute, lowest, whether the lowest is allowed)
_NUMERIC = (("--repeats", "repeats", 1, True), ("--warmup", "warmup", 0, True), ("--threads", "threads", 1, True),
            ("--seed", "seed", 0, True), ("--budget-s", "budget_s", 0, False),
            ("--timeout-s", "timeout_s", 0, False), ("--mem-limit-gb", "mem_limit_gb", 0, False))


def check_numbers(args) -> None:
    """A clear error naming the option for every number out of range (NaN and infinity included): argparse
    checks only that it parses."""
    for option, name, lowest, inclusive in _NUMERIC:
        value = getattr(args, name)
        if value is None:
            continue
        ok = math.isfinite(value) and (value >= lowest if inclusive else value > lowest)
        if not ok:
            raise ValueError(f"{option} must be a finite number {'>=' if inclusive else '>'} {lowest}, "
                             f"got {value!r}")


def _settings(args) -> Settings:
    check_numbers(args)
    if args.interleave and args.mem_limit_gb is not None:
        raise ValueError("--mem-limit-gb is per method: it needs one process per method (drop --interleave)")
    return Settings(repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s,
                    mem_limit_bytes=None if args.mem_limit_gb is None else int(args.mem_limit_gb * (1 << 30)),
                    check=not args.no_check, timeout_s=args.timeout_s, threads=args.threads,
                    clock=args.clock, interleave=args.interleave,
                    check_max_classes=None if args.check_up_to is None else
                    parse_count(args.check_up_to, "--check-up-to"))


def _problems(args, device: str):
    try:  # the package's own check: the same wording as chunk_size= everywhere
        check_chunk_size(args.chunk_size)
    except ValueError as exc:
        raise ValueError(f"--chunk-size: {exc}") from None
    return problem_grid(parse_names(args.loss, LOSSES, "--loss"), parse_sizes(args.batch, "--batch"),
                        parse_sizes(args.dim, "--dim"), parse_sizes(args.classes, "--classes"),
                        parse_dtypes(args.dtype), device, args.seed, args.chunk_size,
                        ",".join(parse_names(args.regularizers, REGULARIZERS, "--regularizers"))
                        if args.regularizers else "")


def list_status(method, problem) -> str:
    """``--list``'s verdict: runs / not installed (what to install) / installed but not here (why)."""
    missing = method.not_installed()
    if missing is not None:
        return missing
    reason = method.unavailable(problem)
    if reason is None:
        return "runs"
    return f"{'installed, ' if method.kind == 'peer' else ''}not here: {reason}"


def _list_methods(problems, console: Console) -> None:
    for name, method in all_methods().items():
        console.print(f"{name:22s} {method.kind:8s} {list_status(method, problems[0])}",
                      markup=False, highlight=False)
        console.print(f"{'':32s}{method.description}", style="dim", markup=False, highlight=False)


#: jobs margin-bench once ran that are now the developer tools of the source checkout (``python -m bench``)
MOVED_JOBS = ("chunks", "memory-model", "optimizer-step", "kernels", "ceilings", "throughput")
#: the exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def main(argv: Optional[list[str]] = None) -> int:
    """Plain ``margin-bench`` (or ``margin-bench compare``) is the comparison; a moved job's name is a clear
    error, not an option parse error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MOVED_JOBS:
        print(f"margin-bench: error: {argv[0]!r} moved out of the installed package: in a source checkout of "
              f"margin_kernels run `python -m bench {argv[0]} ...` from the repository root", file=sys.stderr)
        return 2
    try:
        return compare(argv[1:] if argv and argv[0] == "compare" else argv)
    except KeyboardInterrupt:  # outside the sweep (which keeps its rows): nothing measured is lost here
        print("margin-bench: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED


def is_quick_default(parser, args) -> bool:
    """True when no option of what to run or how to measure was given (output options may be)."""
    defaults = vars(parser.parse_args([]))
    return all(value == defaults[name] for name, value in vars(args).items() if name not in _OUTPUT_OPTIONS)


def _interrupted_line(sweep, written: list[str]) -> str:
    where = f"written to {', '.join(written)}" if written else "printed above"
    return (f"margin-bench: interrupted (Ctrl-C): the {len(sweep.rows)} row(s) measured so far are {where}, "
            "marked incomplete")


def compare(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = check_device(parser, args.device, args.clock)
    quick = device == "cpu" and is_quick_default(parser, args)
    if quick:
        args = parser.parse_args(list(QUICK_CPU) + list(argv))
    try:
        problems = _problems(args, device)
        settings = _settings(args)
        names = _method_names(args)
    except ValueError as exc:
        parser.error(str(exc))
    if (args.plot or args.record) and matplotlib_missing():
        parser.error(MISSING_MATPLOTLIB)
    if args.record and (args.record.endswith(("/", os.sep)) or os.path.isdir(args.record)):
        parser.error(f"--record takes a file prefix (PREFIX.json, .md, .png), not the folder {args.record!r}: "
                     f"e.g. --record {os.path.join(args.record, 'my_run')}")
    for path in output_paths(args):
        problem = output_path_problem(path)
        if problem is not None:
            parser.error(f"cannot write the results: {problem}")
    # the table goes to stderr when stdout carries JSON
    console = Console(stderr=args.json == "-")
    if not console.is_terminal:  # logs and files: the full table, never folded into 80 columns
        console.width = max(console.width, 160)
    if args.list:
        _list_methods(problems, console)
        return 0
    command = "margin-bench " + " ".join(shlex.quote(a) for a in argv)
    if quick:
        command += f" (the quick default on CPU: {' '.join(QUICK_CPU)})"
    runnable, _ = plan(problems, names)
    load = LoadRecord()
    load.sample()
    with progress_bar(console, args.no_progress) as progress:
        task = progress.add_task("", total=count_steps(problems, runnable, settings))
        started = [False]

        def advance(text: str) -> None:
            load.sample()
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=text)
        # Ctrl-C inside: the children are stopped and the sweep returns the rows done, marked incomplete
        sweep = run_sweep(problems, names, settings, advance)
        progress.update(task, completed=progress.tasks[0].total)
    load.sample()
    sweep.load = load
    print_report(sweep, console)
    written = write_outputs(args, sweep, settings, command, console)
    if sweep.incomplete:
        print(_interrupted_line(sweep, written), file=sys.stderr)
        return INTERRUPTED
    return 1 if any(row.status == "error" for row in sweep.rows) else 0
