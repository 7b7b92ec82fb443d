"""Counts of backward tiles skipped by gradient filtering (``grad_filter > 0``), summed over calls.

Backends add plain ints or device tensors (so a GPU backend never syncs to record); reading converts."""
from __future__ import annotations

_skipped = 0
_total = 0


def record(skipped, total) -> None:
    global _skipped, _total
    _skipped = _skipped + skipped
    _total = _total + total


def grad_filter_stats() -> dict:
    """{"skipped_tiles": int, "total_tiles": int} since the last reset."""
    return {"skipped_tiles": int(_skipped), "total_tiles": int(_total)}


def reset_grad_filter_stats() -> None:
    global _skipped, _total
    _skipped, _total = 0, 0
