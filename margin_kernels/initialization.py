"""Seeded initial rows of a class matrix (the head's weight, Center loss's centers) that do not depend on how
the classes are sharded: a row's value is a function of the seed and its global row id alone."""
from __future__ import annotations

import torch

from .sampling import INIT_STREAM, derived_seed

#: classes per independently seeded block of the initial weight
INIT_BLOCK_ROWS = 4096


def fill_rows_normal(weight: torch.Tensor, start: int, seed: int, std: float) -> None:
    """Fill ``weight`` with rows [start, start + len) of one virtual N(0, std^2) class matrix. Rows are drawn
    in blocks of INIT_BLOCK_ROWS classes, each block from its own generator, so the full matrix does not depend
    on how it is sharded (on one device type)."""
    stop = start + weight.shape[0]
    draw_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    generator = torch.Generator(device=weight.device)
    for block in range(start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS + 1):
        first = block * INIT_BLOCK_ROWS
        generator.manual_seed(derived_seed(seed, INIT_STREAM, first))
        rows = torch.randn(INIT_BLOCK_ROWS, weight.shape[1], generator=generator, dtype=draw_dtype,
                           device=weight.device).mul_(std)
        lo, hi = max(start, first), min(stop, first + INIT_BLOCK_ROWS)
        weight[lo - start:hi - start].copy_(rows[lo - first:hi - first])
