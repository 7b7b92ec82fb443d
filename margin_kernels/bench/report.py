"""Output: the full table per curve (what a log or a pipe gets; ``screen`` fits it to a terminal), a summary of
where methods stopped, JSON and markdown for the record."""
from __future__ import annotations

import datetime
import os
import platform

import torch
from rich.table import Table
from rich.text import Text

from .conditions import warnings_for
from .memory import mem_available_bytes
from .runner import Row, Sweep

COLUMNS = ("C", "method", "fwd ms", "bwd ms", "total ms", "extra mem", "loss diff", "grad err", "x floor", "note")


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = max(0, n)  # RSS noise can put a tiny workspace a few pages below zero
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_median(stats) -> str:
    """A median time in ms: 3 significant digits below 100 ms, whole ms above."""
    if not stats:
        return "-"
    median = stats["median_ms"]
    return f"{median:.0f}" if median >= 100 else f"{median:.3g}"


def fmt_spread(stats) -> str:
    """The half-range of the timed repeats in % of the median ("-" for a single repeat)."""
    return f"{stats['spread'] * 100:.0f}" if stats and stats["n"] > 1 else "-"


def fmt_ms(stats) -> str:
    if not stats:
        return "-"
    return f"{fmt_median(stats)} ±{fmt_spread(stats)}%" if stats["n"] > 1 else fmt_median(stats)


def fmt_err(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def note(row: Row) -> str:
    notes = list(row.result.get("notes", []))
    if row.status == "ok" and row.result.get("total", {}).get("n", 0) == 1:
        notes.append("1 repeat")
    notes += [w for w in row.result.get("warnings", []) if "LinearCrossEntropy" in w or "fall" in w.lower()]
    if "check_note" in row.check:
        notes.append(row.check["check_note"])
    return "; ".join(notes)


def row_cells(row: Row) -> list[str]:
    r = row.result
    status = row.status
    if status != "ok":
        label = "OOM" if status == "oom" else status
        return [f"{row.problem.classes:,}", row.method, label, "", "", "", "", "", "", note(row)]
    return [f"{row.problem.classes:,}", row.method, fmt_ms(r["forward"]), fmt_ms(r["backward"]),
            fmt_ms(r["total"]), fmt_bytes(r.get("extra_bytes")), fmt_err(row.check.get("loss_diff")),
            fmt_err(row.check.get("grad_err")),
            "-" if row.floor_ratio is None else f"{row.floor_ratio:.2f}", note(row)]


def families(rows: list[Row]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault(row.problem.family_label(), []).append(row)
    return out


STATUS_STYLES = {"oom": "red", "error": "red", "timeout": "yellow", "skipped": "dim"}


def tables(sweep: Sweep) -> list[Table]:
    out = []
    for label, rows in families(sweep.rows).items():
        table = Table(title=label, title_justify="left")
        for name in COLUMNS:
            table.add_column(name, justify="left" if name in ("method", "note") else "right",
                             overflow="fold", max_width=60 if name == "note" else None)
        previous = None
        for row in rows:
            if previous is not None and row.problem.classes != previous:
                table.add_section()
            previous = row.problem.classes
            # Text, not markup: notes quote library messages that contain [brackets]
            table.add_row(*map(Text, row_cells(row)), style=STATUS_STYLES.get(row.status))
        out.append(table)
    return out


def sweep_warnings(sweep: Sweep) -> list[str]:
    return [] if sweep.load is None else warnings_for(sweep.rows, sweep.load)


def summary_lines(sweep: Sweep) -> list[str]:
    lines = [f"WARNING: {text}" for text in sweep_warnings(sweep)] + list(sweep.notes)
    if sweep.load is not None and sweep.load.line():
        lines.append(sweep.load.line())
    for label, stopped in sweep.stopped.items():
        for name, where in stopped.items():
            lines.append(f"{label}: {name}: {where}")
    limits: dict = {}
    for row in sweep.rows:
        if row.result.get("limit_bytes") and row.kind != "floor":  # the floor runs under the default limit
            limits.setdefault(row.result["limit_source"], []).append(row.result["limit_bytes"])
    for source, values in limits.items():
        low, high = fmt_bytes(min(values)), fmt_bytes(max(values))
        lines.append(f"memory limit above the inputs: {low if low == high else low + ' to ' + high} ({source})")
    for label, reasons in sweep.skipped.items():
        for name, reason in reasons.items():
            lines.append(f"not run ({label}): {name}: {reason}")
    return lines


LEGEND = ("times: median ±half-range over the timed repeats (warm-up excluded); extra mem: peak memory above "
          "the inputs minus the gradients dx, dW themselves; loss diff / grad err: vs the float64 reference "
          "(|loss diff|, max|g-g_ref|/max|g_ref|); x floor: total time / the GEMM floor (the 4 GEMMs of B x C x d "
          "alone, the faster of full-size and class-chunked, timed in the same run)")


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "mem_available_bytes": mem_available_bytes(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def payload(sweep: Sweep, command: str, settings) -> dict:
    return {"command": command, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "environment": environment(), "settings": settings.to_dict(),
            "rows": [row.to_dict() for row in sweep.rows], "stopped": sweep.stopped, "skipped": sweep.skipped,
            "load_1min": None if sweep.load is None else sweep.load.to_dict(), "warnings": sweep_warnings(sweep),
            "legend": LEGEND, "incomplete": sweep.incomplete}


def markdown(sweep: Sweep, command: str) -> str:
    lines = [f"`{command}`", ""]
    for label, rows in families(sweep.rows).items():
        lines += [f"**{label}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in rows:
            cells = [c.replace("|", "/") for c in row_cells(row)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [LEGEND, ""] + [f"- {line}" for line in summary_lines(sweep)]
    return "\n".join(lines) + "\n"
