"""margin-bench as a user meets it: the table in an 80-column terminal (every number whole, notes as
footnotes) and in full when piped; every numeric option checked with an error naming it; every output file
opened before the sweep; Ctrl-C stopping the children and keeping the rows measured so far."""
from __future__ import annotations

import glob
import io
import json
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from bench.plot import sweep_from_payload
from margin_kernels.bench import cli, outputs, screen
from margin_kernels.bench.config import Problem, Settings, problem_grid
from margin_kernels.bench.runner import Row, Sweep, run_sweep

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records() -> list[str]:
    """The recorded margin-bench runs of bench/results/ (other tools' JSON files have other shapes)."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "bench", "results", "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and str(data.get("command", "")).startswith("margin-bench") and data["rows"]:
            out.append(path)
    return out


RECORDS = _records()


def _stats(ms: float, n: int = 3, spread: float = 0.04) -> dict:
    return {"median_ms": ms, "min_ms": ms * (1 - spread), "max_ms": ms * (1 + spread), "n": n, "spread": spread,
            "values_ms": [ms] * n}


def _row(method, classes, ms, kind="backend", notes=(), status="ok") -> Row:
    problem = Problem("arcface", 64, 64, classes, "float32", "cpu")
    if status != "ok":
        return Row(problem, method, kind, {"status": status, "notes": list(notes)})
    result = {"status": "ok", "forward": _stats(ms / 3), "backward": _stats(2 * ms / 3), "total": _stats(ms),
              "extra_bytes": int(ms * 1e6), "grad_bytes": 1 << 20, "notes": list(notes)}
    row = Row(problem, method, kind, result, {"loss_diff": 1.2e-7, "grad_err": 3.4e-6})
    row.floor_ratio = 1.234
    return row


def _example_sweep() -> Sweep:
    """The brief's case (margin-bench -C 1e3..1e4 -B 64 -d 64) with the widest cells a row can have: a 7-digit
    C, a long peer name, times of minutes, an OOM and a note on most rows."""
    rows = []
    for classes in (1000, 2000, 5000, 10000, 4000000):
        rows += [_row("reference", classes, 123456.0, notes=["1 repeat"]),
                 _row("torch", classes, 27.3),
                 _row("auto", classes, 3.31, notes=["auto -> torch (the fastest usable here)"]),
                 _row("naive-arcface-compiled", classes, 1.25, kind="peer"),
                 _row("cpu@25M", classes, 0, status="oom", notes=["OOM: allocating 2.0 MiB failed"]),
                 _row("gemm-floor", classes, 0.123, kind="floor")]
    return Sweep(rows=rows)


def _render(sweep: Sweep, width: int, terminal: bool) -> str:
    buf = io.StringIO()
    screen.print_report(sweep, Console(file=buf, width=width, force_terminal=terminal, color_system=None))
    return buf.getvalue()


def _assert_fits_with_whole_numbers(sweep: Sweep, text: str, width: int = 80) -> None:
    lines = text.splitlines()
    assert max(map(len, lines)) <= width, max(lines, key=len)
    marks: dict = {}
    for row in sweep.rows:
        note = screen.note(row)
        cells = screen.compact_cells(row, str(marks.setdefault(note, len(marks) + 1)) if note else "")
        numbers = [c for i, c in enumerate(cells) if i != 1 and c]  # all but the method's name
        # a row's numbers sit on one line, each as a whole word (no '10,00' + '0' on the next line)
        assert any(set(numbers) <= set(line.split()) for line in lines), (numbers, text)


def test_the_table_fits_80_columns_with_every_number_whole():
    sweep = _example_sweep()
    text = _render(sweep, 80, terminal=True)
    _assert_fits_with_whole_numbers(sweep, text)
    assert "[1] 1 repeat" in text and "[2] auto -> torch (the fastest usable here)" in text  # footnotes
    assert "auto [2]" in text
    header, body = text.split("─" * 10, 1)
    assert "ms" in header and "MiB" in header and "%" in header  # the units are in the header, not the cells
    assert not re.search(r"\d ?(ms|MiB|GiB|%)", body.split("[1]")[0])


def test_every_recorded_run_fits_80_columns():
    """Real rows: OOM and skipped rows, notes, C up to 4e6, budgets (cpu@25M), the peers' long names."""
    assert len(RECORDS) >= 8, RECORDS
    for path in RECORDS:
        with open(path) as f:
            sweep = sweep_from_payload(json.load(f))
        _assert_fits_with_whole_numbers(sweep, _render(sweep, 80, terminal=True))


def test_a_wide_terminal_and_a_pipe_get_the_full_table(monkeypatch, capsys):
    sweep = _example_sweep()
    wide = _render(sweep, 250, terminal=True)
    assert re.search(r"fwd ms .* x floor .* note", wide) and "auto -> torch (the fastest usable here)" in wide
    assert "[1]" not in wide
    # piped (capsys is not a terminal): the full table, whatever the width, one row per line
    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: sweep)
    assert cli.main(["-C", "1e3..1e4", "-B", "64", "-d", "64"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fwd ms .* x floor .* note", out)
    assert re.search(r"10,000 .* auto .* 1\.1 ±4% .* auto -> torch \(the fastest usable here\)", out)


# ---- numeric options ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [
    ("--timeout-s", "-1"), ("--timeout-s", "0"), ("--timeout-s", "nan"), ("--budget-s", "0"), ("--budget-s", "inf"),
    ("--mem-limit-gb", "-2"), ("--mem-limit-gb", "nan"), ("--repeats", "0"), ("--warmup", "-1"),
    ("--threads", "0"), ("--seed", "-1"), ("--check-up-to", "0"), ("--chunk-size", "-5"), ("--repeats", "x")])
def test_every_numeric_option_is_checked_before_the_sweep(option, value, monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: pytest.fail("the sweep must not start"))
    with pytest.raises(SystemExit) as exc:
        cli.main([option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: (argument )?{re.escape(option)}\b", err), err


# ---- output files ---------------------------------------------------------------------------------------------

def test_an_output_that_cannot_be_opened_is_refused_before_the_sweep(tmp_path, monkeypatch, capsys):
    """The folder exists and is writable (what os.access checked), the file still cannot be created: found by
    opening it, before any measurement."""
    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: pytest.fail("the sweep must not start"))
    too_long = str(tmp_path / ("r" * 300 + ".json"))
    for argv in (["--json", too_long], ["--plot", too_long[:-5] + ".png"], ["--record", too_long[:-5]]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "cannot write the results" in err and "cannot be opened" in err
    assert os.listdir(tmp_path) == []


def test_a_read_only_output_is_refused_and_a_writable_one_left_as_it_was(tmp_path):
    kept = tmp_path / "old.json"
    kept.write_text("an earlier run")
    assert outputs.output_path_problem(str(kept)) is None and kept.read_text() == "an earlier run"
    if os.geteuid() == 0:
        pytest.skip("root writes read-only files: the permission case needs an ordinary user")
    kept.chmod(0o444)
    assert "is not writable" in outputs.output_path_problem(str(kept))


# ---- Ctrl-C ---------------------------------------------------------------------------------------------------

def test_an_interrupted_sweep_keeps_the_rows_done():
    """KeyboardInterrupt in the second problem's second child: the first problem's rows (checked) and the
    second's finished method (unchecked) are kept, the sweep marked incomplete."""
    calls = []

    def child(job, timeout_s):
        calls.append(job["mode"])
        if len(calls) == 5:
            raise KeyboardInterrupt
        if job["mode"] == "check":
            return {"status": "ok", "methods": {m: {"loss_diff": 0.0, "grad_err": 0.0} for m in job["methods"]}}
        return {"status": "ok", "total": _stats(2.0), "forward": _stats(1.0), "backward": _stats(1.0)}
    problems = problem_grid(["arcface"], [8], [16], [100, 200, 300], ["float32"], "cpu", 0, None)
    sweep = run_sweep(problems, ["torch", "gemm-floor"], Settings(), child=child)
    assert calls == ["measure", "measure", "check", "measure", "measure"]
    assert sweep.incomplete and any("interrupted" in n for n in sweep.notes)
    assert [(r.method, r.problem.classes, bool(r.check)) for r in sweep.rows] == \
        [("torch", 100, True), ("gemm-floor", 100, False), ("torch", 200, False)]


INTERRUPT = r"""
import multiprocessing, os, signal, sys, threading, time
from margin_kernels.bench import cli, runner

# Ctrl-C as a terminal delivers it: a process started in the background by a non-interactive shell (a CI
# script's `cmd &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)

real, jobs, pids = runner.run_child, [], []


def child(job, timeout_s):
    jobs.append(job)
    if len(jobs) == 2:  # the second problem's child: SIGINT to this process while the child runs
        def interrupt():
            while not multiprocessing.active_children():
                time.sleep(0.002)
            pids.extend(p.pid for p in multiprocessing.active_children())
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=interrupt, daemon=True).start()
    return real(job, timeout_s)


runner.run_child = child
code = cli.main(sys.argv[1:])
alive = []
for pid in pids:
    try:
        os.kill(pid, 0)
        alive.append(pid)
    except ProcessLookupError:
        pass
print("children left:", alive, len(pids), file=sys.stderr)
sys.exit(code)
"""


def test_sigint_stops_the_child_writes_the_rows_so_far_and_exits_130(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-c", INTERRUPT, "-C", "300,300000", "-B", "64", "-d", "64",
                           "--backends", "torch", "--no-floor", "--no-check", "--repeats", "50", "--warmup", "0",
                           "--threads", "1", "--no-progress", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == cli.INTERRUPTED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "children left: [] 1" in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and str(out) in lines[0] and "incomplete" in lines[0], proc.stderr
    payload = json.loads(out.read_text())
    assert payload["incomplete"] is True
    assert [(r["method"], r["classes"], r["status"]) for r in payload["rows"]] == [("torch", 300, "ok")]
    # the table of the rows done is printed, and says it is incomplete
    assert re.search(r"300 .* torch", proc.stdout) and "incomplete: interrupted (Ctrl-C) after 1 row" in proc.stdout
