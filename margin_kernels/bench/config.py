"""What to run: the problems of a sweep (loss, B, d, C, dtype on one device) and how to parse their lists.

A size list is comma-separated values and ranges, each value an integer written plainly or in scientific
notation (``1e5``, ``2.5e5``):

* ``a..b``   - the 1-2-5 series from a to b (both ends included): ``1e3..1e4`` = 1000, 2000, 5000, 10000;
* ``a..b:n`` - n points evenly spaced in log scale from a to b, rounded to two significant digits.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

import margin_kernels as mk
from margin_kernels.losses.registry import loss_names
from margin_kernels.losses.registry import make_loss as registry_make_loss

#: the CLI's --loss choices: every family (paper defaults) and named variant of the package's loss registry
LOSSES = tuple(loss_names())

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16",
                  "double": "float64", "float": "float32", "half": "float16"}


def make_loss(name: str) -> mk.MarginLoss:
    return registry_make_loss(name)


@dataclass(frozen=True)
class Problem:
    """One benchmark problem; every process rebuilds the same inputs from it (see ``problem.py``)."""

    loss: str
    batch: int
    dim: int
    classes: int
    dtype: str
    device: str
    seed: int = 0
    chunk_size: Optional[int] = None
    #: comma-separated head regularisers (bench/regularized.py), "" for none
    regularizers: str = ""

    def family(self) -> tuple:
        """Everything but C: the problems of one curve of a sweep over C."""
        return (self.loss, self.batch, self.dim, self.dtype, self.device, self.chunk_size, self.regularizers)

    def family_label(self) -> str:
        chunk = f", chunk={self.chunk_size}" if self.chunk_size else ""
        regularizers = f", + {self.regularizers}" if self.regularizers else ""
        return f"{self.loss}, B={self.batch}, d={self.dim}, {self.dtype}, {self.device}{chunk}{regularizers}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    """How each (problem, method) is measured."""

    repeats: int = 3              # timed fwd+bwd runs (median and spread reported)
    warmup: int = 1               # untimed runs after the memory-measuring run
    budget_s: Optional[float] = None   # cut the repeats so one case takes about this long (at least 1 repeat)
    mem_limit_bytes: Optional[int] = None  # extra memory allowed above the inputs (None: what the device has)
    check: bool = True            # compare loss and gradients with the float64 reference where it fits
    check_max_classes: Optional[int] = None  # ... and only up to this C (the check costs a run per method)
    timeout_s: Optional[float] = None  # a child that runs longer is stopped and reported as a timeout
    threads: Optional[int] = None  # torch.set_num_threads in each child (None: PyTorch's default)
    clock: str = "wall"           # timing.CLOCKS: "wall" or "process" (CPU seconds, steadier when shared)
    # all methods of a problem in one child, timed round-robin (one call each per repeat): drift of a shared
    # machine then hits them alike and their ratios stay steady; the default is one child per method
    interleave: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def parse_count(text: str, what: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise ValueError(f"{what}: {text!r} must be a positive integer")
    return int(value)


def _series_125(low: int, high: int) -> list[int]:
    out = {low, high}
    for exp in range(int(math.floor(math.log10(low))), int(math.log10(high)) + 1):
        for mant in (1, 2, 5):
            value = mant * 10 ** exp
            if low <= value <= high:
                out.add(value)
    return sorted(out)


def _log_points(low: int, high: int, n: int, what: str) -> list[int]:
    if n < 2:
        raise ValueError(f"{what}: a range with ':n' needs n >= 2, got {n}")
    out = set()
    for i in range(n):
        value = low * (high / low) ** (i / (n - 1))
        digits = max(0, int(math.floor(math.log10(value))) - 1)
        out.add(int(round(value / 10 ** digits)) * 10 ** digits)
    return sorted(out | {low, high})


def parse_sizes(text: str, what: str) -> list[int]:
    """``"1e3..4e6:7"``, ``"1000,5e4"``, ``"1e3..1e5,3e5"`` -> sorted distinct integers."""
    values: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"{what}: empty item in {text!r}")
        if ".." in item:
            span, _, count = item.partition(":")
            low_text, _, high_text = span.partition("..")
            low, high = parse_count(low_text, what), parse_count(high_text, what)
            if low > high:
                raise ValueError(f"{what}: range {item!r} goes down")
            values.update(_log_points(low, high, parse_count(count, what), what) if count else _series_125(low, high))
        else:
            values.add(parse_count(item, what))
    return sorted(values)


def parse_names(text: str, allowed, what: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{what}: empty list")
    for name in names:
        if name not in allowed:
            raise ValueError(f"{what}: unknown {name!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_dtypes(text: str) -> list[str]:
    names = [_DTYPE_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in text.split(",")]
    return parse_names(",".join(names), DTYPES, "--dtype")


def problem_grid(losses, batches, dims, classes, dtypes, device: str, seed: int,
                 chunk_size: Optional[int], regularizers: str = "") -> list[Problem]:
    """Every combination, grouped by family and sorted by C inside a family (so OOM can stop a curve)."""
    return [Problem(loss, b, d, c, dt, device, seed, chunk_size, regularizers)
            for loss, b, d, dt, c in itertools.product(losses, batches, dims, dtypes, classes)]
