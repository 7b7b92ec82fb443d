"""``--plot out.png``: total time and extra memory against C, log-log, one line per method (and curve).

Each time point is the median of the timed repeats with a bar from their minimum to their maximum; the title
names the problem (loss, B, d, dtype, device), the repeats and the machine's load, the command line is
printed small at the bottom.

A method that ran out of memory gets an "x" at the C where it did, on the top edge of both panels. The memory
panel also draws the size of dW (C x d in the storage dtype) for scale: every method must write it, the
"extra" memory is what comes on top.
"""
from __future__ import annotations

import textwrap

from .runner import Row, Sweep

_MIB = float(1 << 20)
_FLOOR_MIB = 0.1  # a log axis cannot show 0: workspaces below 0.1 MiB are drawn at 0.1


def _short_count(value: float) -> str:
    for suffix, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


MISSING_MATPLOTLIB = ("--plot and --record need matplotlib: pip install 'margin_kernels[plot]' (or pip install "
                      "matplotlib)")


def matplotlib_missing() -> bool:
    """Checked before a sweep starts, so a long run never ends in an import error."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def _import_pyplot():
    if matplotlib_missing():
        raise SystemExit(MISSING_MATPLOTLIB)
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _curves(rows: list[Row]) -> dict:
    families = {r.problem.family_label() for r in rows}
    out: dict = {}
    for row in rows:
        label = row.method if len(families) == 1 else f"{row.method} ({row.problem.family_label()})"
        out.setdefault(label, []).append(row)
    return out


def plot_title(sweep: Sweep) -> str:
    """What the figure shows, in words: the problem family(ies), what a point is, the load while it ran."""
    families = list(dict.fromkeys(r.problem.family_label() for r in sweep.rows))
    repeats = sorted({r.result["total"]["n"] for r in sweep.rows if r.status == "ok"})
    counts = f"{repeats[0]}" if len(repeats) == 1 else f"{repeats[0]}-{repeats[-1]}" if repeats else "0"
    lines = ["margin-bench: forward + backward time and peak extra memory against the number of classes",
             "; ".join(families) if len(families) <= 2 else f"{len(families)} problem families",
             f"points: median of {counts} timed runs, bars: min to max"]
    if sweep.load is not None and sweep.load.line():
        lines[-1] += f"; {sweep.load.line()}"
    return "\n".join(lines)


def _time_bars(ok: list[Row]) -> list[list[float]]:
    """Distances from each median down to the fastest and up to the slowest timed run (errorbar's yerr)."""
    totals = [r.result["total"] for r in ok]
    return [[t["median_ms"] - t.get("min_ms", t["median_ms"]) for t in totals],
            [t.get("max_ms", t["median_ms"]) - t["median_ms"] for t in totals]]


def write_plot(sweep: Sweep, path: str, command: str = "") -> None:
    plt = _import_pyplot()
    from matplotlib import ticker
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    dw_points = {}
    for label, rows in _curves(sweep.rows).items():
        ok = [r for r in rows if r.status == "ok"]
        if ok:
            cs = [r.problem.classes for r in ok]
            line, _, _ = ax_time.errorbar(cs, [r.total_ms() for r in ok], yerr=_time_bars(ok), marker="o",
                                          capsize=3, label=label)
            measured = [r for r in ok if r.result.get("extra_bytes") is not None]
            if measured and ok[0].kind != "floor":
                ax_mem.plot([r.problem.classes for r in measured],
                            [max(r.result["extra_bytes"] / _MIB, _FLOOR_MIB) for r in measured], marker="o",
                            label=label, color=line.get_color())
            color = line.get_color()
        else:
            color = None
        for r in rows:
            if r.status == "ok":
                dw_points[r.problem.classes] = r.result.get("grad_bytes", 0) / _MIB
            if r.status in ("oom", "timeout"):
                for ax in (ax_time, ax_mem):
                    ax.plot([r.problem.classes], [1.0], marker="x", markersize=12, color=color or "red",
                            transform=ax.get_xaxis_transform(), clip_on=False, linestyle="none",
                            label=f"{label}: {r.status.upper()} at C={r.problem.classes:,}")
    if dw_points:
        cs = sorted(dw_points)
        ax_mem.plot(cs, [dw_points[c] for c in cs], linestyle=":", color="gray", label="dx + dW (the gradients)")
    for ax, ylabel in ((ax_time, "fwd+bwd time (ms): median, min..max"),
                       (ax_mem, "peak extra memory beyond inputs and grads (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: _short_count(value)))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("number of classes C")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(plot_title(sweep), fontsize=9)
    if command:
        fig.text(0.01, 0.005, "\n".join(textwrap.wrap(command, 180)), fontsize=6, color="gray", va="bottom")
    fig.tight_layout(rect=(0, 0.04 if command else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
