"""Collective input checks: a bad input on one rank must raise the same clear error on *every* rank.

If one rank raised on its own while the others entered the next collective, they would wait forever. So each
rank only *records* what is wrong with its inputs, then all ranks exchange one small int64 vector (which also
carries the per-rank batch sizes the gathers need) and raise together, with each bad rank's message.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import (NON_FINITE_FEATURES, bad_labels, check_tensors, label_range_message,
                          value_checks_apply)
from .comm import RowLayout, all_gather_objects, all_gather_stacked, group_rank_and_size

# layout of the exchanged vector
_ROWS, _STRUCTURE, _BAD_LABEL, _NON_FINITE = range(4)


def _structure_problem(features, labels, weight) -> Optional[str]:
    """The single-process checks of the tensors (``validation.check_tensors``), as a message instead of a raise.
    Features of another floating dtype are checked as the head will use them: cast to the weight's dtype."""
    if isinstance(features, torch.Tensor) and features.is_floating_point():
        features = features.to(weight.dtype)
    try:
        check_tensors(features, weight, labels)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def check_and_layout(features, labels, weight, *, num_classes: int, ignore_index: int, check_values: bool,
                     group) -> RowLayout:
    """Validate this rank's inputs together with every other rank's; return the batch's row layout.

    Costs one all-gather of ``4 * world`` int64 and one host sync per step (the sizes are needed on the host
    anyway to pad the uneven gathers). With ``check_values=False`` (or under torch.compile) the value flags
    (labels in range, finite features) are not computed."""
    rank, world = group_rank_and_size(group)
    problem = _structure_problem(features, labels, weight)
    device = weight.device
    zero = torch.zeros((), dtype=torch.long, device=device)
    if problem is None:
        if value_checks_apply(check_values):
            bad_label = bad_labels(labels, num_classes, ignore_index).any().long()
            non_finite = (~torch.isfinite(features).all()).long() if features.numel() else zero
        else:
            bad_label = non_finite = zero
        rows = torch.full((), features.shape[0], dtype=torch.long, device=device)
        flags = torch.stack([rows, zero, bad_label, non_finite])
    else:
        flags = torch.stack([zero, zero + 1, zero, zero])
    table = all_gather_stacked(flags, group, sum_grads=False).tolist()
    if any(any(entry[_STRUCTURE:]) for entry in table):
        if problem is None:
            problem = _value_problem(features, labels, num_classes, ignore_index)
        raise_on_every_rank(problem, group, "DistributedMarginHead: invalid input")
    return RowLayout(tuple(entry[_ROWS] for entry in table), rank, group)


def raise_on_every_rank(problem: Optional[str], group, what: str) -> None:
    """Collective: every rank passes its problem (None if fine); if any rank has one, all raise the same
    ValueError naming each bad rank. Every rank of ``group`` must call it."""
    reports = all_gather_objects(problem, group)
    if any(msg is not None for msg in reports):
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in enumerate(reports) if msg is not None)
        raise ValueError(f"{what} ({detail})")


def _value_problem(features, labels, num_classes: int, ignore_index: int) -> Optional[str]:
    bad = bad_labels(labels, num_classes, ignore_index)
    if bool(bad.any()):
        return label_range_message(labels, bad, num_classes, ignore_index)
    if features.numel() and not bool(torch.isfinite(features).all()):
        return NON_FINITE_FEATURES
    return None


def run_collectively(fn, group, what: str):
    """Collective: run ``fn()`` on every rank. If it raises anywhere, it raises everywhere: a failing rank
    re-raises its own exception, the others a ValueError naming the failing ranks. Returns fn's result."""
    error = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        error = exc
    reports = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    if any(msg is not None for msg in reports):
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in enumerate(reports) if msg is not None)
        raise ValueError(f"{what} failed on other ranks ({detail})")
    return result
