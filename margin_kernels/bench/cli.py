"""``margin-bench``: compare backends and peers on time, memory and accuracy, over sweeps.

With no arguments: the quick comparison on the default device (ArcFace, B=256, d=512, C=2e4 and 5e4,
float32; the reference against every margin_kernels backend usable there, plus the GEMM floor); on a CPU it
times them round-robin in one process with one thread (--interleave --threads 1), which keeps the ratios
steady on a shared machine. A warning is printed when the 1-minute load exceeds the cores or a median's
spread passes ±10%; the load is recorded beside the numbers.

Other jobs, as a first argument: ``margin-bench chunks ...`` (a backend's time against its class chunk, to pick
the default), ``margin-bench kernels ...`` (the Triton kernels compiled for sm_90: registers, spills, wgmma;
a roofline estimate), ``margin-bench ceilings ...`` (the GEMM rate and copy bandwidths that roofline assumes,
measured on the device) and ``margin-bench memory-model ...`` (memory per rank of the distributed head, no timing);
``margin-bench compare ...`` is the comparison spelled out.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from margin_kernels.backends import BACKEND_NAMES, check_backend_name
from margin_kernels.validation import check_chunk_size

from .conditions import LoadRecord
from .config import LOSSES, Settings, parse_count, parse_dtypes, parse_names, parse_sizes, problem_grid
from .methods import BACKENDS, BUDGET_SEPARATOR, GEMM_FLOOR, all_methods, parse_budget
from .peers import PEERS
from .regularized import REGULARIZERS
from .plot import MISSING_MATPLOTLIB, matplotlib_missing, write_plot
from .report import payload, markdown, print_report
from .runner import count_steps, plan, run_sweep
from .timing import CLOCKS

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
        epilog="Jobs: margin-bench [compare] (this), margin-bench chunks -h, margin-bench memory-model -h, "
               "margin-bench optimizer-step -h, "
               "margin-bench kernels -h (compiled sm_90 facts of the Triton kernels, and a roofline), "
               "margin-bench ceilings -h (that roofline's ceilings measured on the device). "
               "Sizes take lists and ranges: 1e3..1e6 (1-2-5 series), 1e3..4e6:7 (7 log-spaced points), "
               "1000,5e4. Every (problem, method) runs in its own process (with --interleave: every problem); "
               "out-of-memory is a result.")
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


def add_clock_argument(group) -> None:
    group.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                       help="wall (default: the figure to record) or process: CPU seconds of all threads, "
                            "steadier on a busy CPU (set OMP_WAIT_POLICY=PASSIVE so idle threads do not spin)")


def check_device(parser, requested: Optional[str], clock: str = "wall") -> str:
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device: none is visible to this torch build "
                     "(GPU figures are only ever measured, never estimated)")
    if device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: on CUDA the benchmark times compiled Triton kernels")
    if device == "cuda" and clock == "process":
        parser.error("--clock process counts CPU time: on CUDA use the default wall clock")
    return device


def _method_names(args) -> list[str]:
    if args.backends == "all":
        backends = _CONCRETE
    else:
        backends = [n.strip().lower() for n in args.backends.split(",") if n.strip()]
        for name in backends:  # the package's own check: the same wording as backend= everywhere
            check_backend_name(name)
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


def _settings(args) -> Settings:
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.mem_limit_gb is not None and args.mem_limit_gb <= 0:
        raise ValueError("--mem-limit-gb must be positive")
    if args.interleave and args.mem_limit_gb is not None:
        raise ValueError("--mem-limit-gb is per method: it needs one process per method (drop --interleave)")
    return Settings(repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s,
                    mem_limit_bytes=None if args.mem_limit_gb is None else int(args.mem_limit_gb * (1 << 30)),
                    check=not args.no_check, timeout_s=args.timeout_s, threads=args.threads,
                    clock=args.clock, interleave=args.interleave,
                    check_max_classes=None if args.check_up_to is None else
                    parse_count(args.check_up_to, "--check-up-to"))


def _problems(args, device: str):
    check_chunk_size(args.chunk_size)  # the package's own check: the same wording as chunk_size= everywhere
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


def output_paths(args) -> list[str]:
    """Every file the run will write (--json, --plot, --record's three)."""
    paths = [p for p in (args.json, args.plot) if p and p != "-"]
    if args.record:
        paths += [args.record + suffix for suffix in (".json", ".md", ".png")]
    return paths


def output_path_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be written, checked before the run so that a long sweep never ends in a
    traceback that loses its results; None when it can."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path!r} is a folder, not a file name"
    if not os.path.isdir(folder):
        return f"the folder {folder!r} of {path!r} does not exist (create it first)"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder!r} of {path!r} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path!r} exists and is not writable"
    return None


def _progress(console: Console, disabled: bool) -> Progress:
    return Progress(TextColumn("[bold]margin-bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=console, disable=disabled, transient=True)


def _write_outputs(args, sweep, settings, command: str, console: Console) -> None:
    json_paths = [p for p in (args.json, args.record and args.record + ".json") if p]
    plot_paths = [p for p in (args.plot, args.record and args.record + ".png") if p]
    if args.record:
        with open(args.record + ".md", "w") as f:
            f.write(markdown(sweep, command))
    if json_paths:
        text = json.dumps(payload(sweep, command, settings), indent=1) + "\n"
        for path in json_paths:
            if path == "-":
                sys.stdout.write(text)
                continue
            with open(path, "w") as f:
                f.write(text)
    for path in plot_paths:
        write_plot(sweep, path, command=command)
        console.print(f"plot written to {path}", markup=False, highlight=False)


def main(argv: Optional[list[str]] = None) -> int:
    """Dispatch on the first argument: a job name, else the comparison (so plain ``margin-bench`` is it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in JOBS:
        return JOBS[argv[0]](argv[1:])
    return compare(argv)


def _chunks(argv: list[str]) -> int:
    from .chunks import main as chunks_main  # imported on use: each job keeps its own parser
    return chunks_main(argv)


def _memory_model(argv: list[str]) -> int:
    from .memory_model import main as memory_model_main
    return memory_model_main(argv)


def is_quick_default(parser, args) -> bool:
    """True when no option of what to run or how to measure was given (output options may be)."""
    defaults = vars(parser.parse_args([]))
    return all(value == defaults[name] for name, value in vars(args).items() if name not in _OUTPUT_OPTIONS)


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
    if not console.is_terminal:  # logs and files: do not fold the table into 80 columns
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
    with _progress(console, args.no_progress) as progress:
        task = progress.add_task("", total=count_steps(problems, runnable, settings))
        started = [False]

        def advance(text: str) -> None:
            load.sample()
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=text)
        sweep = run_sweep(problems, names, settings, advance)
        progress.update(task, completed=progress.tasks[0].total)
    load.sample()
    sweep.load = load
    print_report(sweep, console)
    _write_outputs(args, sweep, settings, command, console)
    return 1 if any(row.status == "error" for row in sweep.rows) else 0


def _optimizer_step(argv: list[str]) -> int:
    from .optimizer_step import main as optimizer_step_main
    return optimizer_step_main(argv)


def _kernels(argv: list[str]) -> int:
    from .kernels import main as kernels_main
    return kernels_main(argv)


def _ceilings(argv: list[str]) -> int:
    from .ceilings import main as ceilings_main
    return ceilings_main(argv)


JOBS = {"compare": compare, "chunks": _chunks, "memory-model": _memory_model, "kernels": _kernels,
        "optimizer-step": _optimizer_step, "ceilings": _ceilings}
