"""The parent side of a sweep: one child process per (problem, method), then one accuracy check per problem.

Within a curve (same loss, B, d, dtype; growing C) a method that ran out of memory or time at some C is not
run again at larger C: its rows say where it stopped. Same for the float64 check once it no longer fits.

Ctrl-C (KeyboardInterrupt) stops the running child and ends the sweep early: it returns the rows measured so
far (those of the interrupted problem included, unchecked) with ``incomplete`` set, for the caller to write.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .config import Problem, Settings
from .catalog import all_methods
from .worker import child_main

_STOP_WORDS = {"oom": "OOM", "timeout": "timed out"}


@dataclass
class Row:
    problem: Problem
    method: str
    kind: str
    result: dict
    check: dict = field(default_factory=dict)
    floor_ratio: Optional[float] = None

    @property
    def status(self) -> str:
        return self.result.get("status", "error")

    def total_ms(self) -> Optional[float]:
        return self.result["total"]["median_ms"] if self.status == "ok" else None

    def to_dict(self) -> dict:
        out = {**self.problem.to_dict(), "method": self.method, "kind": self.kind}
        out.update(self.result)  # an error row keeps its traceback here (the table shows only the message)
        out.update(self.check)
        out["floor_ratio"] = self.floor_ratio
        return out


@dataclass
class Sweep:
    rows: list = field(default_factory=list)
    #: family label -> {method: reason it was not run}
    skipped: dict = field(default_factory=dict)
    #: family label -> {method: "OOM at C = ..."} (also "check")
    stopped: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    #: the 1-minute load averages seen while it ran (conditions.LoadRecord; None: not sampled)
    load: Optional[object] = None
    #: stopped by Ctrl-C before every problem was measured
    incomplete: bool = False


_context = None


def _child_context():
    """A forkserver whose server process has imported torch and the worker once: each child is a fork of
    it (fast, and fresh: no thread pool, allocator cache or CUDA context inherited from this process)."""
    global _context
    if _context is None:
        methods = multiprocessing.get_all_start_methods()
        _context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            # torch._dynamo: a margin_kernels call imports it lazily (~2 s); import-only, so still fork-safe
            _context.set_forkserver_preload(["margin_kernels.bench.cli", "margin_kernels.bench.worker",
                                             "torch._dynamo"])
    return _context


def run_child(job: dict, timeout_s: Optional[float]) -> dict:
    """Run one worker job in its own process; a dead, killed or silent child is a result too."""
    ctx = _child_context()
    receive, send = ctx.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(prefix="margin-bench-") as tmp:
        log_path = os.path.join(tmp, "child.log")
        proc = ctx.Process(target=child_main, args=(job, send, log_path), daemon=True)
        proc.start()
        send.close()  # ours: the child's copy is then the only writer, so its death reads as EOF
        try:
            if receive.poll(timeout_s):
                return receive.recv()
            proc.kill()
            return {"status": "timeout", "notes": [f"stopped after {timeout_s:g} s (--timeout-s)"]}
        except EOFError:  # died without a result
            proc.join()
            return _death_result(proc.exitcode, log_path)
        except KeyboardInterrupt:  # Ctrl-C: the child must not outlive the sweep (nor finish a long case)
            proc.kill()
            raise
        finally:
            proc.join()
            receive.close()


def _death_result(exitcode: Optional[int], log_path: str) -> dict:
    try:
        with open(log_path) as f:
            tail = [line for line in f.read().strip().splitlines() if line.strip()][-3:]
    except OSError:
        tail = []
    if exitcode == -signal.SIGKILL:
        return {"status": "oom", "notes": ["child killed by SIGKILL: most likely the kernel's OOM killer"] + tail}
    return {"status": "error", "notes": [f"child died (exit code {exitcode})"] + tail}


def _families(problems: list[Problem]) -> dict:
    out: dict = {}
    for p in problems:
        out.setdefault(p.family(), []).append(p)
    return {k: sorted(v, key=lambda p: p.classes) for k, v in out.items()}


def plan(problems: list[Problem], method_names: list[str]) -> tuple[dict, dict]:
    """(family -> runnable method names, family label -> {method: reason}) decided before any child runs."""
    methods = all_methods()
    runnable, skipped = {}, {}
    for family, members in _families(problems).items():
        names, reasons = [], {}
        for name in method_names:
            reason = methods[name].unavailable(members[0])
            if reason is None:
                names.append(name)
            else:
                reasons[name] = reason
        runnable[family] = names
        if reasons:
            skipped[members[0].family_label()] = reasons
    return runnable, skipped


def _checks(problem: Problem, names: list[str], settings: Settings) -> bool:
    """Whether ``problem`` gets a float64 check (at most one per problem: one step of the progress bar)."""
    methods = all_methods()
    return (settings.check and any(methods[n].checkable for n in names)
            and (settings.check_max_classes is None or problem.classes <= settings.check_max_classes))


def count_steps(problems: list[Problem], runnable: dict, settings: Settings) -> int:
    measures = (lambda names: 1) if settings.interleave else len
    return sum(measures(runnable[p.family()]) + int(_checks(p, runnable[p.family()], settings)) for p in problems)


def _settings_for(kind: str, settings: Settings) -> dict:
    """A forced memory limit is for the methods compared; the GEMM floor (a time yardstick) and the float64
    check (a correctness yardstick) run under the default safety limit only."""
    if kind in ("floor", "check"):
        return replace(settings, mem_limit_bytes=None).to_dict()
    return settings.to_dict()


def _attach_floor_ratios(rows: list[Row]) -> None:
    floor = next((r for r in rows if r.kind == "floor" and r.status == "ok"), None)
    if floor is None:
        return
    for row in rows:
        if row.status == "ok":
            row.floor_ratio = row.total_ms() / floor.total_ms()


def one_minute_load():
    """The machine's 1-minute load average (recorded with every problem: a busy machine explains a slow row)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def run_sweep(problems: list[Problem], method_names: list[str], settings: Settings,
              advance: Callable[[str], None] = lambda text: None, child=None) -> Sweep:
    """``advance(text)`` is called before each child (for a progress bar); ``child`` runs one job (default
    ``run_child``). Ctrl-C ends it early with the rows so far (``Sweep.incomplete``)."""
    sweep = Sweep()
    try:
        _sweep(sweep, problems, method_names, settings, advance, child or run_child)
    except KeyboardInterrupt:
        sweep.incomplete = True
        sweep.notes.append(f"incomplete: interrupted (Ctrl-C) after {len(sweep.rows)} row(s); the problems after "
                           "them were not measured")
    return sweep


def _sweep(sweep: Sweep, problems: list[Problem], method_names: list[str], settings: Settings, advance,
           child) -> None:
    runnable, skipped = plan(problems, method_names)
    sweep.skipped = skipped
    if settings.check and settings.check_max_classes is not None:
        sweep.notes.append(f"loss diff / grad err: checked up to C = {settings.check_max_classes:,} only")
    for family, members in _families(problems).items():
        label = members[0].family_label()
        stopped = sweep.stopped.setdefault(label, {})  # filled as the curve goes (kept if Ctrl-C cuts it)
        try:
            for problem in members:
                _problem_rows(problem, runnable[family], stopped, settings, advance, child, sweep)
        finally:
            if not stopped:
                del sweep.stopped[label]


def _problem_rows(problem: Problem, names: list, stopped: dict, settings: Settings, advance, child,
                  sweep: Sweep) -> None:
    """Add the rows of one problem to ``sweep``: measured, given their floor ratios, checked; on Ctrl-C the
    methods that finished are added (unchecked) before the interrupt goes on."""
    methods = all_methods()
    results: dict = {}
    try:
        load_before = one_minute_load()
        _measure(problem, names, stopped, settings, advance, child, results)
        load = [load_before, one_minute_load()]
        if None not in load:
            sweep.notes.append(f"1-minute load average {load[0]:.2f} before, {load[1]:.2f} after "
                               f"{problem.family_label()}, C = {problem.classes:,}")
        rows = []
        for name in names:
            result = results[name]
            if name not in stopped and result.get("status") in ("oom", "timeout"):
                stopped[name] = f"{_STOP_WORDS[result['status']]} at C = {problem.classes:,}"
            result.setdefault("load_1min", load)
            rows.append(Row(problem, name, methods[name].kind, result))
        _attach_floor_ratios(rows)
        _check(problem, rows, settings, stopped, advance, child)
    except KeyboardInterrupt:
        done = [Row(problem, name, methods[name].kind, results[name]) for name in names
                if name in results and results[name].get("status") != "skipped"]
        _attach_floor_ratios(done)
        sweep.rows.extend(done)
        raise
    sweep.rows.extend(rows)


def _measure(problem: Problem, names: list, stopped: dict, settings: Settings, advance, child, out: dict) -> None:
    """Fill ``out`` (name -> result) at one problem as the results come (so Ctrl-C keeps those done): a child
    per method, or (interleave) one child for all of them."""
    methods = all_methods()
    out.update({name: {"status": "skipped", "notes": [f"not run: {stopped[name]}"]} for name in names
                if name in stopped})
    todo = [name for name in names if name not in stopped]
    if settings.interleave and todo:
        advance(f"C={problem.classes:,} {len(todo)} methods interleaved")
        result = child({"mode": "interleave", "problem": problem.to_dict(), "methods": todo,
                        "settings": settings.to_dict()}, settings.timeout_s)
        # a dead or stopped child is the result of every method it was running
        out.update(result["methods"] if result.get("status") == "ok" else {name: result for name in todo})
        return
    for name in names:
        advance(f"C={problem.classes:,} {name}")
        if name not in out:
            out[name] = child({"mode": "measure", "problem": problem.to_dict(), "method": name,
                               "settings": _settings_for(methods[name].kind, settings)}, settings.timeout_s)


def _check(problem: Problem, rows: list[Row], settings: Settings, stopped: dict, advance, child) -> None:
    methods = all_methods()
    names = [r.method for r in rows if r.status == "ok" and methods[r.method].checkable]
    if not _checks(problem, [r.method for r in rows], settings):
        return
    advance(f"C={problem.classes:,} check vs float64 reference")
    if "check" in stopped:
        note = f"check not run: {stopped['check']}"
    elif not names:
        note = "check not run: no method ran"
    else:
        result = child({"mode": "check", "problem": problem.to_dict(), "methods": names,
                        "settings": _settings_for("check", settings)}, settings.timeout_s)
        if result.get("status") == "ok":
            for row in rows:
                if row.method in result["methods"]:
                    row.check = result["methods"][row.method]
            return
        if result.get("status") in ("oom", "timeout"):
            stopped["check"] = f"float64 reference {_STOP_WORDS[result['status']]} at C = {problem.classes:,}"
            note = f"no check: float64 reference {_STOP_WORDS[result['status']]}"
        else:
            note = "check failed: " + "; ".join(result.get("notes", [])[:2])
    for row in rows:
        if row.method in names:
            row.check = {"check_note": note}
