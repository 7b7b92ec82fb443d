"""Shard-wise checkpoints of a DistributedMarginHead that load at any world size.

``save_sharded`` writes one file per rank, ``classes_<start>_<stop>.pt`` (the class range in the name), holding
that rank's ``state_dict()``: its weight rows (and the regularisers' per-class rows, e.g. Center loss
centers: the extra state's ``row_keys``), the loss's buffers and the head's extra state (class range,
sizes, the Partial FC generator). ``load_sharded`` reads, on each rank, only the files whose classes overlap
its new range (memory-mapped) and assembles its rows, so a run saved on 8 ranks resumes on 4 or 16.
The margin buffers are identical on every rank by construction; loading checks that the files agree and that
every rank ends with the same buffers. Errors are raised on every rank together (no rank left waiting).
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
    path = os.path.join(directory, shard_file_name(*head.shard_range))
    partial = path + ".partial"
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write never leaves a file that looks complete
    return path


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
    k = first.get("sub_centers", 1)  # weight rows per class: shards are cut, and rejoined, in whole classes
    for piece in pieces:
        if (piece[EXTRA_STATE]["num_classes"], piece[EXTRA_STATE]["embedding_dim"],
                piece[EXTRA_STATE].get("sub_centers", 1)) != (first["num_classes"], first["embedding_dim"], k):
            raise ValueError("shard state dicts come from heads of different sizes")
    row_keys = first.get("row_keys", [WEIGHT])  # checkpoints written before regularisers hold only the weight
    # the weight has K rows per class, the regularisers' per-class state (centers) one
    out = {key: _class_rows(pieces, key, start, stop, k if key == WEIGHT else 1) for key in row_keys}
    for key, value in pieces[0].items():
        if key in row_keys or key == EXTRA_STATE:
            continue
        for other in pieces[1:]:
            if not torch.equal(other[key], value):
                raise ValueError(f"buffer {key!r} differs between shards: the saved ranks were out of step")
        out[key] = value
    same_shard = len(pieces) == 1 and tuple(first["shard_range"]) == (start, stop)
    out[EXTRA_STATE] = dict(first, shard_range=[start, stop],
                            sampler_state=first.get("sampler_state") if same_shard else None)
    return out


def _class_rows(pieces: list[dict], key: str, start: int, stop: int, rows_per_class: int = 1) -> torch.Tensor:
    """Classes [start, stop) of the class-sharded tensor ``key`` (``rows_per_class`` adjacent rows each), cut
    from the sorted pieces that hold them."""
    rows, position = [], start
    for piece in pieces:
        lo, hi = piece[EXTRA_STATE]["shard_range"]
        if hi <= position or lo >= stop:
            continue
        if lo > position:
            raise ValueError(f"no shard holds classes [{position}, {lo})")
        rows.append(piece[key][(position - lo) * rows_per_class:(min(hi, stop) - lo) * rows_per_class])
        position = min(hi, stop)
    if position != stop:
        raise ValueError(f"no shard holds classes [{position}, {stop})")
    return torch.cat(rows) if len(rows) > 1 else rows[0].clone()


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
    head.load_state_dict(reshard_state_dicts(pieces, head.shard_range))


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
