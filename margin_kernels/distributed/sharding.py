"""Which classes each rank owns: contiguous ranges, sizes differing by at most one (insightface's split).

The first ``C % world`` ranks hold ``C // world + 1`` classes, the others ``C // world``. Everything that
needs shard sizes (the head, the checkpoint loader, ``python -m bench memory-model``) calls these functions.
Shards are cut in classes: with K sub-centers per class a shard holds K rows per class (``row_range``), so a
class's rows never straddle two ranks and its max over them stays local.
"""
from __future__ import annotations


def _check(num_classes: int, world_size: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if num_classes < world_size:
        raise ValueError(f"num_classes ({num_classes}) must be at least the world size ({world_size}): "
                         "every rank holds at least one class")


def shard_size(num_classes: int, world_size: int, rank: int) -> int:
    start, stop = shard_range(num_classes, world_size, rank)
    return stop - start


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)``: the classes ``[start, stop)`` held by ``rank``."""
    _check(num_classes, world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    _check(num_classes, world_size)  # before range(world_size) can fail on a bad one
    return [shard_range(num_classes, world_size, r) for r in range(world_size)]


def max_shard_size(num_classes: int, world_size: int) -> int:
    """The largest shard (rank 0's): what memory planning must provision on every rank."""
    return shard_size(num_classes, world_size, 0)


def row_range(num_classes: int, world_size: int, rank: int, sub_centers: int = 1) -> tuple[int, int]:
    """The weight rows ``[start, stop)`` of ``rank``'s classes when each class has ``sub_centers`` adjacent rows."""
    start, stop = shard_range(num_classes, world_size, rank)
    return start * sub_centers, stop * sub_centers
