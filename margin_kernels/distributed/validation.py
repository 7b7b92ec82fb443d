"""Collective input checks: a bad input on one rank must raise the same clear error on *every* rank.

If one rank raised on its own while the others entered the next collective, they would wait forever. So each
rank only *records* what is wrong with its inputs, then all ranks exchange one small int64 vector (which also
carries the per-rank batch sizes the gathers need) and raise together, with each bad rank's message.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import FLOAT_DTYPES
from .comm import RowLayout, all_gather_objects, all_gather_stacked, group_rank_and_size

# layout of the exchanged vector
_ROWS, _STRUCTURE, _BAD_LABEL, _NON_FINITE = range(4)


def _structure_problem(features, labels, embedding_dim: int, device: torch.device) -> Optional[str]:
    if not isinstance(features, torch.Tensor):
        return f"features must be a torch.Tensor, got {type(features).__name__}"
    if not isinstance(labels, torch.Tensor):
        return f"labels must be a torch.Tensor, got {type(labels).__name__}"
    if features.dim() != 2 or features.shape[1] != embedding_dim:
        return f"features must have shape (batch, {embedding_dim}), got {tuple(features.shape)}"
    if features.dtype not in FLOAT_DTYPES:
        return f"features must be a floating tensor (fp16, bf16, fp32, fp64), got {features.dtype}"
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        return f"labels must be an integer tensor, got {labels.dtype}"
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        return f"labels must have shape ({features.shape[0]},) to match features, got {tuple(labels.shape)}"
    if features.device != device or labels.device != device:
        return f"features ({features.device}) and labels ({labels.device}) must be on the head's device {device}"
    return None


def _bad_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def check_and_layout(features, labels, *, num_classes: int, embedding_dim: int, ignore_index: int,
                     device: torch.device, group) -> RowLayout:
    """Validate this rank's inputs together with every other rank's; return the batch's row layout.

    Costs one all-gather of ``4 * world`` int64 and one host sync per step (the sizes are needed on the host
    anyway to pad the uneven gathers)."""
    rank, world = group_rank_and_size(group)
    problem = _structure_problem(features, labels, embedding_dim, device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    if problem is None:
        bad_label = _bad_labels(labels, num_classes, ignore_index).any().long()
        non_finite = (~torch.isfinite(features).all()).long() if features.numel() else zero
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
    bad = _bad_labels(labels, num_classes, ignore_index)
    if bool(bad.any()):
        return (f"labels must be in [0, {num_classes}) (num_classes) or equal ignore_index={ignore_index}; "
                f"found {int(labels[bad][0])}")
    if features.numel() and not bool(torch.isfinite(features).all()):
        return "features contain NaN or Inf"
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
