"""The machine's conditions during a sweep, and the warnings they call for.

Times taken on a busy machine are not the code's: the 1-minute load average is sampled before the sweep,
before each child and after it, recorded beside the numbers (JSON, markdown) and a warning is printed when it
exceeds the cores this process may use, or when a median's spread (half the min..max range of its timed
repeats, relative to it) passes ``SPREAD_BOUND``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

#: a median whose timed repeats spread by more than this (half-range / median) is flagged as unsteady
SPREAD_BOUND = 0.10


def load_average() -> Optional[float]:
    """The 1-minute load average, None where the platform has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class LoadRecord:
    """1-minute load averages seen during a sweep (the sweep's own processes included)."""

    cores: int = field(default_factory=usable_cores)
    samples: list = field(default_factory=list)

    def sample(self) -> None:
        value = load_average()
        if value is not None:
            self.samples.append(round(value, 2))

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.samples:
            out.update(min=min(self.samples), max=max(self.samples))
        return out

    def line(self) -> Optional[str]:
        if not self.samples:
            return None
        low, high = min(self.samples), max(self.samples)
        span = f"{low:.1f}" if low == high else f"{low:.1f}-{high:.1f}"
        return (f"1-minute load average {span} during the run ({self.cores} usable cores, this run's own "
                "processes included)")


def warnings_for(rows, load: LoadRecord, bound: float = SPREAD_BOUND) -> list[str]:
    """What makes these numbers doubtful: a load above the cores, medians whose spread passes ``bound``."""
    out = []
    if load.samples and max(load.samples) > load.cores:
        out.append(f"the 1-minute load reached {max(load.samples):.1f} on {load.cores} cores: other work shared "
                   "the machine, so the times are not this code's alone: rerun on an idle machine for absolute "
                   "times (--interleave --threads 1 keeps the ratios steadier)")
    unsteady = [(row.result["total"]["spread"], row) for row in rows
                if row.status == "ok" and row.result["total"]["n"] > 1 and row.result["total"]["spread"] > bound]
    if unsteady:
        worst, row = max(unsteady, key=lambda pair: pair[0])
        out.append(f"{len(unsteady)} of the timed medians spread by more than ±{bound:.0%} over their repeats "
                   f"(worst ±{worst:.0%}: {row.method} at C = {row.problem.classes:,}): more --repeats, "
                   "--interleave or an idle machine give steadier numbers")
    return out
