"""Timing of one forward+backward: device synchronised around each phase, warm-up runs excluded,
median and spread over the timed repeats.

Two clocks: ``wall`` (elapsed time, the figure to record on a quiet machine) and ``process`` (CPU seconds of
all the process's threads: on a shared CPU it does not count the time another job holds a core, so ratios
stay steadier; run with ``OMP_WAIT_POLICY=PASSIVE`` so idle OpenMP threads do not spin and bill CPU time).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional, Protocol

import torch


class Run(Protocol):
    """One measured computation on fixed inputs: ``forward`` then ``backward``, ``reset`` drops the outputs."""

    def forward(self) -> None: ...

    def backward(self) -> None: ...

    def reset(self) -> None: ...


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def timed_run(run: Run, device: torch.device, clock: str = "wall") -> tuple[float, float]:
    """(forward seconds, backward seconds) of one run; outputs are dropped afterwards."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    run.forward()
    synchronize(device)
    middle = now()
    run.backward()
    synchronize(device)
    end = now()
    run.reset()
    return middle - start, end - middle


def repeats_within(budget_s: Optional[float], seconds_per_run: float, repeats: int) -> int:
    """How many timed repeats fit ``budget_s`` (at least 1, at most ``repeats``); large C gets fewer."""
    if budget_s is None or seconds_per_run <= 0:
        return repeats
    return max(1, min(repeats, int(math.floor(budget_s / seconds_per_run))))


def summarize(seconds: list[float]) -> dict:
    """Median and spread in milliseconds; ``spread`` is half the min..max range relative to the median."""
    ms = [s * 1e3 for s in seconds]
    median = statistics.median(ms)
    return {"median_ms": median, "min_ms": min(ms), "max_ms": max(ms), "n": len(ms),
            "spread": (max(ms) - min(ms)) / 2 / median if median > 0 else 0.0, "values_ms": ms}
