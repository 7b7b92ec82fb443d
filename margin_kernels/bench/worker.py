"""The measuring child: one process per (problem, method), so each peak and each crash is its own.

Children are forked from a server process that has imported torch and this package once (see ``runner``),
so a child costs a fork, not an interpreter start. A job is
``{"mode": "measure", "problem": {...}, "method": name, "settings": {...}}``,
``{"mode": "interleave", "problem": {...}, "methods": [names], "settings": {...}}`` (``--interleave``) or
``{"mode": "check", "problem": {...}, "methods": [names], "settings": {...}}``; the result dict goes back
through a pipe, and the child's stdout/stderr go to a log file.

measure: build the inputs, run each method once on a tiny problem (loads libraries, thread pools, JIT caches),
then per method take the memory baseline and run fwd+bwd once under the memory limit (the memory run), then
the warm-ups, then the timed repeats, round-robin over the methods of the job (one, or all with interleave).
An out-of-memory exception anywhere is the result "oom" of that method. With a time budget, memory runs
longer than the budget in all are the only warm-up (one-off costs are small against runs that long). The GEMM
floor is two runs, full size and class-chunked, and its row is the faster (``methods.floor_ms``).

check: the float64 reference (inputs upcast) gives the ground truth loss and gradients; each method then runs
once on the storage-dtype inputs and is compared: |loss - loss_ref| and, per gradient, max|g - g_ref| /
max|g_ref|. If the float64 reference does not fit, nothing is compared (the report says so).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
import traceback
import warnings
from dataclasses import replace

import torch

import margin_kernels as mk

from .config import Problem, Settings, make_loss
from .memory import is_out_of_memory, memory_probe, timing_allocator
from .catalog import all_methods
from .methods import floor_ms, floor_variants, resolved_auto
from .problem import make_inputs
from .regularized import regularized_loss
from .timing import repeats_within, summarize, timed_run

_TINY_BATCH, _TINY_CLASSES = 4, 64


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _oom_note(exc: BaseException) -> str:
    """The size that failed, from PyTorch's CPU ("you tried to allocate N bytes") or CUDA ("Tried to allocate
    2.00 GiB") allocator messages; else the message's first line."""
    text = str(exc)
    match = re.search(r"tried to allocate (\d+) bytes", text)
    if match:
        return f"OOM: allocating {int(match.group(1)) / (1 << 20):,.1f} MiB failed"
    match = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", text)
    if match:
        return f"OOM: allocating {match.group(1)} failed"
    return "OOM: " + _first_line(exc)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _variants(method, problem: Problem) -> dict:
    """name -> builder(inputs) of the runs that make one method's row: the floor has two (see ``floor_ms``)."""
    if method.kind == "floor":
        return floor_variants(problem)
    return {method.name: lambda inputs: method.build(problem, inputs)}


def _warm_up_tiny(method, variant: str, problem: Problem) -> None:
    tiny = replace(problem, batch=min(problem.batch, _TINY_BATCH), classes=min(problem.classes, _TINY_CLASSES))
    run = _variants(method, tiny)[variant](make_inputs(tiny))
    run.forward()
    run.backward()
    run.reset()


class _Measured:
    """One run under measurement: its result fields (memory, notes, then times) and its timed repeats."""

    def __init__(self, name: str, variant: str, out: dict):
        self.name, self.variant, self.out = name, variant, out
        self.run = None
        self.run_width = None  # the floor's class tile, kept for its note once the run is dropped
        self.first_s = 0.0
        self.fwd: list = []
        self.bwd: list = []

    def memory_run(self, build, inputs, probe) -> None:
        self.run = build(inputs)
        self.run_width = getattr(self.run, "width", None)
        probe.begin()
        start = time.perf_counter()
        self.run.forward()
        self.run.backward()
        self.out["peak_bytes"] = probe.peak_extra()
        self.first_s = time.perf_counter() - start
        self.out["grad_bytes"] = _tensor_bytes(self.run.grads())
        self.out["extra_bytes"] = None if self.out["peak_bytes"] is None else \
            self.out["peak_bytes"] - self.out["grad_bytes"]
        self.out["loss_value"] = float(self.run.loss.detach()) if self.run.loss is not None else None
        self.run.reset()
        self.out["first_run_ms"] = self.first_s * 1e3

    def fail(self, exc: BaseException) -> None:
        if self.run is not None:
            self.run.reset()
        self.run = None  # out of the round-robin: its memory goes back before the others go on
        if is_out_of_memory(exc):
            self.out.update(status="oom", notes=self.out["notes"] + [_oom_note(exc)])
        else:
            self.out.update(status="error", notes=self.out["notes"] + [f"{type(exc).__name__}: {_first_line(exc)}"],
                            traceback=traceback.format_exc()[-4000:])


def _guarded(item: _Measured, step) -> None:
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - OOM is a result, an error that method's row: the others go on
        item.fail(exc)


def _round_robin(items: list, count: int, device, clock: str, record: bool) -> None:
    """``count`` rounds, each running every live item once, so slow drift of the machine hits all alike."""
    for _ in range(count):
        for item in items:
            if item.run is None:
                continue

            def step(item=item):
                fwd, bwd = timed_run(item.run, device, clock)
                if record:
                    item.fwd.append(fwd)
                    item.bwd.append(bwd)
            _guarded(item, step)


def _finish_floor(out: dict, variants: list) -> None:
    """The floor's row: the winning variant's fields (see ``floor_ms``), every variant's median kept."""
    medians = {v.variant: v.out["total"]["median_ms"] if v.out["status"] == "ok" else None for v in variants}
    out["floor_variants"] = {name: ms if ms is not None else "oom" for name, ms in medians.items()}
    if all(ms is None for ms in medians.values()):
        failed = variants[-1].out  # the chunked variant: the one that fits wherever anything does
        out.update(status=failed["status"], notes=out["notes"] + failed["notes"][-1:])
        if "traceback" in failed:
            out["traceback"] = failed["traceback"]
        return
    best, _ = floor_ms(medians)
    winner = next(v for v in variants if v.variant == best)
    out.update({k: val for k, val in winner.out.items() if k not in ("notes", "status")})
    widths = {v.variant: "B x C" if v.variant == "full" else f"{v.run_width} weight rows" for v in variants}
    parts = [f"{name} ({widths[name]}) " + (f"{ms:.3g} ms" if isinstance(ms, float) else ms)
             for name, ms in out["floor_variants"].items()]
    out["notes"].append(f"floor = {best}, the min of " + ", ".join(parts))


def measure_group(problem: Problem, method_names: list, settings: Settings) -> dict:
    """Measure several methods on one problem in this process: memory runs one by one, then the warm-ups
    and the timed repeats round-robin. One name is the default mode (a child per method); many is
    ``--interleave``. Returns method name -> result."""
    methods = all_methods()
    device = torch.device(problem.device)
    inputs = make_inputs(problem)
    results, items = {}, []
    for name in method_names:
        method = methods[name]
        reason = method.unavailable(problem)
        if reason is not None:
            results[name] = {"status": "skipped", "notes": [reason]}
            continue
        results[name] = {"status": "ok", "notes": [f"auto -> {resolved_auto(problem.device)}"] if name == "auto"
                         else [], "input_bytes": inputs.nbytes()}
        for variant in _variants(method, problem):
            _warm_up_tiny(method, variant, problem)
            out = results[name] if method.kind != "floor" else {"status": "ok", "notes": []}
            items.append(_Measured(name, variant, out))
    probe = memory_probe(device)
    limit, source = probe.limit(settings.mem_limit_bytes)
    try:
        for item in items:
            item.out.update(limit_bytes=limit, limit_source=source, memory_method=probe.method)
            build = _variants(methods[item.name], problem)[item.variant]
            _guarded(item, lambda: item.memory_run(build, inputs, probe))
        if device.type == "cpu":
            timing_allocator()
        first_s = sum(item.first_s for item in items if item.run is not None)
        warmup = settings.warmup
        if settings.budget_s is not None and first_s > settings.budget_s:
            warmup = 0
            for out in results.values():
                out["notes"].append("no warm-up beyond the memory run")
        _round_robin(items, warmup, device, settings.clock, record=False)
        _round_robin(items, repeats_within(settings.budget_s, first_s, settings.repeats), device,
                     settings.clock, record=True)
    finally:
        probe.unlimit()
    for item in items:
        if item.out["status"] == "ok":
            item.out["forward"], item.out["backward"] = summarize(item.fwd), summarize(item.bwd)
            item.out["total"] = summarize([f + b for f, b in zip(item.fwd, item.bwd)])
            item.run = None
    for name, out in results.items():
        if methods[name].kind == "floor" and out["status"] == "ok":
            _finish_floor(out, [item for item in items if item.name == name])
    return results


def measure(problem: Problem, method_name: str, settings: Settings) -> dict:
    return measure_group(problem, [method_name], settings)[method_name]


def _max_rel(diff_max: float, ref_max: float) -> float:
    return diff_max / ref_max if ref_max > 0 else diff_max


def _compare(loss: torch.Tensor, grads, truth) -> dict:
    ref_loss, ref_grads = truth
    out = {"loss_diff": abs(float(loss.detach()) - ref_loss)}
    for name, g, ref in zip(("dx", "dw"), grads, ref_grads):
        if g is None:
            out[f"{name}_err"] = None
            continue
        # blockwise so no full-size float64 copy of dW is made next to the truth
        diff, peak = 0.0, 0.0
        for row0 in range(0, ref.shape[0], 1 << 14):
            block_ref = ref[row0:row0 + (1 << 14)]
            diff = max(diff, float((g[row0:row0 + (1 << 14)].double() - block_ref).abs().max()))
            peak = max(peak, float(block_ref.abs().max()))
        out[f"{name}_err"] = _max_rel(diff, peak)
    out["grad_err"] = max(v for k, v in out.items() if k.endswith("_err") and v is not None)
    return out


def _float64_truth(problem: Problem, inputs):
    x = inputs.features.double().requires_grad_(True)
    w = inputs.weight.double().requires_grad_(True)
    if problem.regularizers:
        loss = regularized_loss(make_loss(problem.loss), problem.regularizers, problem.classes, problem.dim,
                                torch.float64, x.device, backend="reference")(x, w, inputs.labels)
    else:
        loss = mk.margin_cross_entropy(x, w, inputs.labels, make_loss(problem.loss), backend="reference")
    dx, dw = torch.autograd.grad(loss, [x, w])
    return float(loss), (dx, dw)


def check(problem: Problem, method_names: list, settings: Settings) -> dict:
    methods = all_methods()
    inputs = make_inputs(problem)
    probe = memory_probe(torch.device(problem.device))
    probe.limit(settings.mem_limit_bytes)
    out = {"status": "ok", "notes": [], "methods": {}}
    try:
        try:
            truth = _float64_truth(problem, inputs)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            return {"status": "oom", "notes": ["float64 reference " + _oom_note(exc)], "methods": {}}
        for name in method_names:
            run = methods[name].build(problem, inputs)
            try:
                run.forward()
                run.backward()
                out["methods"][name] = _compare(run.loss, run.grads(), truth)
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    raise
                out["methods"][name] = {"check_note": "check " + _oom_note(exc)}
            finally:
                run.reset()
    finally:
        probe.unlimit()
    return out


def run_job(job: dict) -> dict:
    problem = Problem(**job["problem"])
    settings = Settings(**job["settings"])
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if job["mode"] == "measure":
            result = measure(problem, job["method"], settings)
        elif job["mode"] == "interleave":
            result = {"status": "ok", "methods": measure_group(problem, job["methods"], settings)}
        else:
            result = check(problem, job["methods"], settings)
    seen = list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught))
    result["warnings"] = seen[:5]
    return result


def _redirect_output(log_path: str) -> None:
    """Library prints and warnings go to a log (kept for error reports), not through the parent's display."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def child_main(job: dict, conn, log_path: str) -> None:
    """Entry point of a measuring child (forked from the runner's preloaded server): result -> ``conn``."""
    # Ctrl-C reaches the whole process group: the parent alone decides (it kills this child and keeps the rows
    # done), so the child neither prints a traceback nor sends back a half-measured result
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _redirect_output(log_path)
    try:
        result = run_job(job)
    except Exception as exc:  # noqa: BLE001 - the parent shows it as an error row
        result = {"status": "error", "notes": [f"{type(exc).__name__}: {_first_line(exc)}"],
                  "traceback": traceback.format_exc()[-4000:]}
    conn.send(result)
    conn.close()
