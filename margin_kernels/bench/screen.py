"""What margin-bench prints: the full table (``report.tables``) when the output is piped or redirected, or when
the terminal is wide enough for it; otherwise the same rows fitted to the terminal's width.

The fitted form keeps every number whole: units go in the headers (ms, MiB, %) instead of each cell, a time
shows its median (the spread of the total in its own column; every repeat is in the JSON), and the notes
become numbered footnotes under the table (``[1]`` after the method's name). Numeric columns never wrap;
only the method names may fold, so 80 columns hold ten of them.
"""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from .report import (LEGEND, STATUS_STYLES, families, fmt_err, fmt_median, fmt_spread, note, summary_lines,
                     tables)
from .runner import Row, Sweep

#: (header, right-aligned): two-line headers keep the columns as narrow as their numbers
COMPACT_COLUMNS = (("C", True), ("method", False), ("fwd\nms", True), ("bwd\nms", True), ("total\nms", True),
                   ("±\n%", True), ("extra\nMiB", True), ("loss\ndiff", True), ("grad\nerr", True),
                   ("x\nfloor", True))
COMPACT_LEGEND = ("ms: median over the timed repeats (warm-up excluded); ±%: half-range of the total's repeats; "
                  "extra MiB: peak memory above the inputs minus the gradients dx, dW; loss diff / grad err: vs "
                  "the float64 reference; x floor: total / the GEMM floor (the 4 GEMMs alone). The full table: "
                  "pipe the output (margin-bench ... | cat) or --json")


def fmt_mib(n) -> str:
    if n is None:
        return "-"
    mib = max(0, n) / (1 << 20)  # RSS noise can put a tiny workspace a few pages below zero
    return f"{mib:,.0f}" if mib >= 100 else f"{mib:.1f}" if mib >= 10 else f"{mib:.2f}"


def compact_cells(row: Row, mark: str) -> list[str]:
    r, name = row.result, row.method + (f" [{mark}]" if mark else "")
    if row.status != "ok":
        return [f"{row.problem.classes:,}", name, "OOM" if row.status == "oom" else row.status] + [""] * 7
    return [f"{row.problem.classes:,}", name, fmt_median(r["forward"]), fmt_median(r["backward"]),
            fmt_median(r["total"]), fmt_spread(r["total"]), fmt_mib(r.get("extra_bytes")),
            fmt_err(row.check.get("loss_diff")), fmt_err(row.check.get("grad_err")),
            "-" if row.floor_ratio is None else f"{row.floor_ratio:.2f}"]


def compact_tables(sweep: Sweep) -> tuple[list[Table], list[str]]:
    """The fitted tables, and the footnotes their ``[n]`` marks point to (one number per distinct note)."""
    footnotes: dict = {}
    out = []
    for label, rows in families(sweep.rows).items():
        # no vertical rules, one space of padding each side: 2 columns between numbers, none at the edges
        table = Table(title=label, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                      padding=(0, 1), collapse_padding=True)
        for header, right in COMPACT_COLUMNS:
            numeric = header != "method"
            table.add_column(header, justify="right" if right else "left", no_wrap=numeric,
                             overflow="fold", min_width=None if numeric else 4)
        previous = None
        for row in rows:
            if previous is not None and row.problem.classes != previous:
                table.add_section()
            previous = row.problem.classes
            text = note(row)
            mark = str(footnotes.setdefault(text, len(footnotes) + 1)) if text else ""
            # Text, not markup: names and notes may contain [brackets]
            table.add_row(*map(Text, compact_cells(row, mark)), style=STATUS_STYLES.get(row.status))
        out.append(table)
    return out, [f"[{number}] {text}" for text, number in footnotes.items()]


def natural_width(table: Table, console: Console) -> int:
    """The width the table takes when nothing limits it (the console's own width would clamp the measure)."""
    return Measurement.get(console, console.options.update_width(1 << 16), table).maximum


def print_report(sweep: Sweep, console: Console) -> None:
    """The full tables when not on a terminal (each row on one line, however wide) or when they fit it, else
    the fitted ones; then the legend and the summary (both word-wrapped by the console)."""
    wide = tables(sweep)
    widths = [natural_width(table, console) for table in wide]
    if not console.is_terminal or max(widths, default=0) <= console.width:
        width = console.width
        for table, natural in zip(wide, widths):
            console.width = max(width, natural)  # print(width=) cannot exceed the console's own width
            console.print(table)
        console.width = width
        console.print(LEGEND, style="dim")
    else:
        fitted, footnotes = compact_tables(sweep)
        for table in fitted:
            console.print(table)
        for line in footnotes:
            console.print(line, markup=False, highlight=False)
        console.print(COMPACT_LEGEND, style="dim")
    for line in summary_lines(sweep):
        style = "bold yellow" if line.startswith("WARNING") else None
        console.print(line, markup=False, highlight=False, style=style)
