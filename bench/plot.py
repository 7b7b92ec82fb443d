"""``python -m bench plot RUN.json [...]``: redraw a recorded run's plot from its JSON.

The JSON (``margin-bench --record``/``--json``) is the record; a PNG is derived data, drawn by the same
``margin_kernels.bench.plot.write_plot`` as the run itself, so only the PNGs a README shows are kept in
``bench/results/`` and any other is made when wanted:

    python -m bench plot bench/results/cpu_quick_default.json            # -> bench/results/cpu_quick_default.png
    python -m bench plot bench/results/X.json --out /tmp/x.png
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional

from margin_kernels.bench.conditions import LoadRecord
from margin_kernels.bench.config import Problem
from margin_kernels.bench.plot import MISSING_MATPLOTLIB, matplotlib_missing, write_plot
from margin_kernels.bench.runner import Row, Sweep

_PROBLEM_FIELDS = {f.name for f in dataclasses.fields(Problem)}
#: keys a row's dict gets from the float64 check (``Row.check``), the rest of the row's own keys are its result
_CHECK_KEYS = ("loss_diff", "dx_err", "dw_err", "grad_err", "check_note")


def sweep_from_payload(data: dict) -> Sweep:
    """The inverse of ``report.payload`` as far as the plot needs: rows, and the load samples."""
    rows = []
    for flat in data.get("rows", []):
        problem = Problem(**{k: v for k, v in flat.items() if k in _PROBLEM_FIELDS})
        rest = {k: v for k, v in flat.items() if k not in _PROBLEM_FIELDS and k not in ("method", "kind",
                                                                                         "floor_ratio")}
        check = {k: rest.pop(k) for k in _CHECK_KEYS if k in rest}
        rows.append(Row(problem, flat["method"], flat["kind"], rest, check, flat.get("floor_ratio")))
    load = data.get("load_1min")
    record = None if not load else LoadRecord(cores=load["cores"], samples=list(load["samples"]))
    return Sweep(rows=rows, skipped=data.get("skipped", {}), stopped=data.get("stopped", {}), load=record)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.json", help="margin-bench JSON file(s)")
    parser.add_argument("--out", metavar="PNG", help="the PNG to write (one run only; default: RUN.png beside it)")
    args = parser.parse_args(argv)
    if args.out and len(args.runs) > 1:
        parser.error("--out names one PNG: give one RUN.json with it")
    if matplotlib_missing():
        parser.error(MISSING_MATPLOTLIB)
    for path in args.runs:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            parser.error(f"{path}: {exc}")
        out = args.out or os.path.splitext(path)[0] + ".png"
        write_plot(sweep_from_payload(data), out, command=data.get("command", ""))
        print(f"plot written to {out}")
    return 0
