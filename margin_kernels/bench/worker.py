"""The measuring child: one process per (problem, method), so each peak and each crash is its own.

Children are forked from a server process that has imported torch and this package once (see ``runner``),
so a child costs a fork, not an interpreter start. A job is
``{"mode": "measure", "problem": {...}, "method": name, "settings": {...}}`` or
``{"mode": "check", "problem": {...}, "methods": [names], "settings": {...}}``; the result dict goes back
through a pipe, and the child's stdout/stderr go to a log file.

measure: build the inputs, run the method once on a tiny problem (loads libraries, thread pools, JIT caches),
take the memory baseline, run fwd+bwd once under the memory limit (the memory run), then the warm-ups, then
the timed repeats. An out-of-memory exception anywhere is the result "oom". With a time budget, a memory
run longer than the budget is the only warm-up (one-off costs are small against a run that long).

check: the float64 reference (inputs upcast) gives the ground truth loss and gradients; each method then runs
once on the storage-dtype inputs and is compared: |loss - loss_ref| and, per gradient, max|g - g_ref| /
max|g_ref|. If the float64 reference does not fit, nothing is compared (the report says so).
"""
from __future__ import annotations

import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import replace

import torch

import margin_kernels as mk

from .config import Problem, Settings, make_loss
from .memory import is_out_of_memory, memory_probe, timing_allocator
from .methods import all_methods, resolved_auto
from .problem import make_inputs
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


def _warm_up_tiny(method, problem: Problem) -> None:
    tiny = replace(problem, batch=min(problem.batch, _TINY_BATCH), classes=min(problem.classes, _TINY_CLASSES))
    run = method.build(tiny, make_inputs(tiny))
    run.forward()
    run.backward()
    run.reset()


def measure(problem: Problem, method_name: str, settings: Settings) -> dict:
    method = all_methods()[method_name]
    out = {"status": "ok", "notes": []}
    reason = method.unavailable(problem)
    if reason is not None:
        return {"status": "skipped", "notes": [reason]}
    if method_name == "auto":
        out["notes"].append(f"auto -> {resolved_auto(problem.device)}")
    device = torch.device(problem.device)
    inputs = make_inputs(problem)
    out["input_bytes"] = inputs.nbytes()
    _warm_up_tiny(method, problem)
    run = method.build(problem, inputs)
    probe = memory_probe(device)
    out["limit_bytes"], out["limit_source"] = probe.limit(settings.mem_limit_bytes)
    out["memory_method"] = probe.method
    try:
        probe.begin()
        start = time.perf_counter()
        run.forward()
        run.backward()
        out["peak_bytes"] = probe.peak_extra()
        first_run_s = time.perf_counter() - start
        out["grad_bytes"] = _tensor_bytes(run.grads())
        out["extra_bytes"] = None if out["peak_bytes"] is None else out["peak_bytes"] - out["grad_bytes"]
        out["loss_value"] = float(run.loss.detach()) if run.loss is not None else None
        run.reset()
        out["first_run_ms"] = first_run_s * 1e3
        if device.type == "cpu":
            timing_allocator()
        warmup = settings.warmup
        if settings.budget_s is not None and first_run_s > settings.budget_s:
            warmup = 0
            out["notes"].append("no warm-up beyond the memory run")
        for _ in range(warmup):
            timed_run(run, device)
        repeats = repeats_within(settings.budget_s, first_run_s, settings.repeats)
        fwd, bwd = zip(*(timed_run(run, device) for _ in range(repeats)))
    except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else is reported, not raised
        run.reset()
        if not is_out_of_memory(exc):
            raise
        out.update(status="oom", notes=out["notes"] + [_oom_note(exc)])
        return out
    finally:
        probe.unlimit()
    out["forward"], out["backward"] = summarize(list(fwd)), summarize(list(bwd))
    out["total"] = summarize([f + b for f, b in zip(fwd, bwd)])
    return out


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
    _redirect_output(log_path)
    try:
        result = run_job(job)
    except Exception as exc:  # noqa: BLE001 - the parent shows it as an error row
        result = {"status": "error", "notes": [f"{type(exc).__name__}: {_first_line(exc)}"],
                  "traceback": traceback.format_exc()[-4000:]}
    conn.send(result)
    conn.close()
