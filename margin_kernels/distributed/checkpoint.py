"""Shard-wise checkpoints of a DistributedMarginHead that load at any world size.

``save_sharded`` writes one file per rank, ``classes_<start>_<stop>.pt`` (the class range in the name), holding
that rank's ``state_dict()``: its weight rows, the loss's buffers and the head's extra state (class range,
sizes, the Partial FC generator). ``load_sharded`` reads, on each rank, only the files whose classes overlap
its new range (memory-mapped) and assembles its rows, so a run saved on 8 ranks resumes on 4 or 16.
The margin buffers are identical on every rank by construction; loading checks that the files agree and that
every rank ends with the same buffers. Errors are raised on every rank together (no rank left waiting).
A head with a fused optimizer (``head.fuse``) saves that optimizer's state with it (``OPTIMIZER``: its
C x d state rows, resharded like the weight, its step count and param_groups), and loading restores it into
the loading head's fused optimizer.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch
import torch.distributed as dist

from .comm import all_gather_stacked, group_rank_and_size
from .head import CHECKPOINT_FORMAT, DistributedMarginHead
from .validation import run_collectively

EXTRA_STATE = "_extra_state"
WEIGHT = "weight"
OPTIMIZER = "_fused_optimizer"
_FILE = re.compile(r"^classes_(\d+)_(\d+)\.pt$")


def shard_file_name(start: int, stop: int) -> str:
    return f"classes_{start:012d}_{stop:012d}.pt"


def save_sharded(head: DistributedMarginHead, directory: str) -> str:
    """Collective: each rank writes its shard file into ``directory`` (created if needed); returns its path.
    Returns after every rank's file is complete."""
    return run_collectively(lambda: _save(head, directory), head.process_group, f"save_sharded({directory!r})")


def _save(head: DistributedMarginHead, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    state = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in head.state_dict().items()}
    optimizer = getattr(head, "fused_optimizer", None)
    if optimizer is not None:
        state[OPTIMIZER] = fused_optimizer_rows(optimizer, head.weight)
    path = os.path.join(directory, shard_file_name(*head.shard_range))
    partial = path + ".partial"
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write never leaves a file that looks complete
    return path


def fused_optimizer_rows(optimizer, weight: torch.Tensor) -> dict:
    """A fused optimizer's state for ``weight``: its per-row tensors (on the CPU), the rest, its param_groups."""
    state = optimizer.state.get(weight, {})
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {"rows": {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)},
            "scalars": {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)},
            "param_groups": groups}


def load_fused_optimizer_rows(optimizer, weight: torch.Tensor, saved: dict) -> None:
    """The inverse of ``fused_optimizer_rows`` (rows already cut to this shard)."""
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(saved_group)
    dtype = optimizer.state_dtype_for(weight)
    optimizer.state[weight] = dict(saved["scalars"], **{
        k: v.to(device=weight.device, dtype=dtype, copy=True) for k, v in saved["rows"].items()})


def list_shard_files(directory: str) -> list[tuple[int, int, str]]:
    """(start, stop, path) of every shard file in ``directory``, sorted by class range."""
    found = []
    for name in os.listdir(directory):
        match = _FILE.match(name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), os.path.join(directory, name)))
    return sorted(found)


def check_tiling(ranges: list[tuple[int, int]], num_classes: int) -> Optional[str]:
    """None if the sorted ranges cover [0, num_classes) exactly once, else what is wrong."""
    if not ranges:
        return "no shard files (classes_<start>_<stop>.pt) found"
    position = 0
    for start, stop in ranges:
        if start != position:
            kind = "overlap (files from two different saves?)" if start < position else "gap"
            return f"shard files {kind} at class {min(start, position)}: ranges {ranges}"
        position = stop
    if position != num_classes:
        return f"shard files cover classes [0, {position}) but the head has {num_classes} classes"
    return None


def reshard_state_dicts(pieces: list[dict], shard_range: tuple[int, int]) -> dict:
    """Assemble the state dict of the shard ``[start, stop)`` from shard state dicts (any order) whose ranges
    cover it. Buffers must agree across pieces. Pure function: no I/O, no communication."""
    start, stop = shard_range
    pieces = sorted(pieces, key=lambda p: p[EXTRA_STATE]["shard_range"][0])
    first = pieces[0][EXTRA_STATE] if pieces else None
    if first is None or any(p[EXTRA_STATE].get("format") != CHECKPOINT_FORMAT for p in pieces):
        raise ValueError("reshard_state_dicts needs at least one DistributedMarginHead shard state dict")
    rows, segments, position = [], [], start
    for piece in pieces:
        lo, hi = piece[EXTRA_STATE]["shard_range"]
        if (piece[EXTRA_STATE]["num_classes"], piece[EXTRA_STATE]["embedding_dim"]) != \
                (first["num_classes"], first["embedding_dim"]):
            raise ValueError("shard state dicts come from heads of different sizes")
        if hi <= position or lo >= stop:
            continue
        if lo > position:
            raise ValueError(f"no shard holds classes [{position}, {lo})")
        rows.append(piece[WEIGHT][position - lo:min(hi, stop) - lo])
        segments.append((piece, position - lo, min(hi, stop) - lo))
        position = min(hi, stop)
    if position != stop:
        raise ValueError(f"no shard holds classes [{position}, {stop})")
    out = {WEIGHT: torch.cat(rows) if len(rows) > 1 else rows[0].clone()}
    if OPTIMIZER in pieces[0]:
        out[OPTIMIZER] = _reshard_optimizer(segments)
    for key, value in pieces[0].items():
        if key in (WEIGHT, EXTRA_STATE, OPTIMIZER):
            continue
        for other in pieces[1:]:
            if not torch.equal(other[key], value):
                raise ValueError(f"buffer {key!r} differs between shards: the saved ranks were out of step")
        out[key] = value
    same_shard = len(pieces) == 1 and tuple(first["shard_range"]) == (start, stop)
    out[EXTRA_STATE] = dict(first, shard_range=[start, stop],
                            sampler_state=first.get("sampler_state") if same_shard else None)
    return out


def _reshard_optimizer(segments) -> dict:
    """The fused optimizer's state of the new shard: per-row tensors cut like the weight (``segments``: piece,
    first row, end row), step count and param_groups, which must agree between the pieces."""
    first = segments[0][0][OPTIMIZER]
    for piece, _, _ in segments:
        if OPTIMIZER not in piece or piece[OPTIMIZER]["scalars"] != first["scalars"]:
            raise ValueError("fused optimizer state missing or at different steps between shards")
    rows = {key: torch.cat([piece[OPTIMIZER]["rows"][key][lo:hi] for piece, lo, hi in segments])
            for key in first["rows"]}
    return dict(first, rows=rows)


def load_sharded(head: DistributedMarginHead, directory: str) -> None:
    """Collective: load a ``save_sharded`` checkpoint saved at any world size into ``head``."""
    run_collectively(lambda: _load(head, directory), head.process_group, f"load_sharded({directory!r})")
    check_buffers_consistent(head)


def _load(head: DistributedMarginHead, directory: str) -> None:
    files = list_shard_files(directory)
    problem = check_tiling([(start, stop) for start, stop, _ in files], head.num_classes)
    if problem is not None:
        raise ValueError(f"{directory}: {problem}")
    start, stop = head.shard_range
    pieces = [torch.load(path, map_location="cpu", mmap=True, weights_only=True)
              for lo, hi, path in files if lo < stop and hi > start]
    state = reshard_state_dicts(pieces, head.shard_range)
    saved_optimizer = state.pop(OPTIMIZER, None)
    head.load_state_dict(state)
    optimizer = getattr(head, "fused_optimizer", None)
    if saved_optimizer is not None and optimizer is not None:
        load_fused_optimizer_rows(optimizer, head.weight, saved_optimizer)


def check_buffers_consistent(module: torch.nn.Module, group=None) -> None:
    """Collective: raise on every rank unless every rank holds bit-identical buffers (the margin's state)."""
    group = getattr(module, "process_group", group)
    if group_rank_and_size(group)[1] == 1 or not dist.is_initialized():
        return
    buffers = [b.detach().reshape(-1).to(torch.float64) for _, b in sorted(module.named_buffers())]
    if not buffers:
        return
    mine = torch.cat(buffers).to(next(module.parameters()).device)
    everyone = all_gather_stacked(mine, group, sum_grads=False)
    differing = [r for r in range(everyone.shape[0]) if not torch.equal(everyone[r], everyone[0])]
    if differing:
        raise ValueError(f"margin buffers differ between ranks {differing} and rank 0")
