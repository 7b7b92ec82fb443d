"""Tile sizes of the Triton kernels and how they are chosen.

* On a GPU the kernels are autotuned over a short config list written for H100 (autotuning times each config
  once per (B, N, d, dtypes) and keeps the fastest). ``MARGIN_KERNELS_TRITON_AUTOTUNE=0`` uses one fixed
  config per d instead, so separate processes always run the same tiling (bitwise-reproducible runs; a
  given config is deterministic anyway: no atomics, fixed merge orders).
* Under TRITON_INTERPRET (CPU) there is no autotuning: a small fixed config (tiles of 16, two class
  splits) that still exercises several tiles, masked tails and the split merge on tiny test shapes.
* ``fixed_configs(...)`` overrides the choice (tests use it to force other tilings).

Forward tiles: BLOCK_B rows x BLOCK_C classes with a K loop of BLOCK_K. Backward tiles: an accumulator of
ACC_ROWS full embedding rows (BLOCK_D = next power of two >= d) and a loop tile of LOOP_ROWS; the dW kernel
accumulates classes and loops over batch rows, the dx kernel the other way around.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton


@dataclass(frozen=True)
class ForwardTiles:
    block_b: int
    block_c: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class BackwardTiles:
    acc_rows: int
    loop_rows: int
    num_warps: int = 4
    num_stages: int = 1


#: tried by the autotuner on CUDA (bf16 GEMM shapes that suit an H100's wgmma and 228 KB of shared memory)
H100_FORWARD = [
    ForwardTiles(128, 128, 64, 8, 3),
    ForwardTiles(128, 256, 64, 8, 3),
    ForwardTiles(64, 128, 64, 4, 4),
    ForwardTiles(128, 64, 64, 4, 4),
    ForwardTiles(64, 64, 64, 4, 4),
    ForwardTiles(128, 128, 32, 8, 4),
]
#: in order of preference (the first that fits is the fixed config when autotuning is off)
H100_BACKWARD = [
    BackwardTiles(128, 64, 8, 2),
    BackwardTiles(64, 64, 8, 2),
    BackwardTiles(64, 128, 8, 1),
    BackwardTiles(64, 32, 4, 2),
    BackwardTiles(32, 64, 8, 2),
    BackwardTiles(32, 32, 8, 2),
    BackwardTiles(32, 32, 4, 2),
    BackwardTiles(16, 64, 4, 2),
    BackwardTiles(16, 32, 4, 1),
    BackwardTiles(16, 16, 4, 1),
]
#: the interpreter's fixed tiling (dot needs >= 16 on GPUs; the same config must stay valid there)
INTERPRETER_FORWARD = ForwardTiles(16, 16, 16)
INTERPRETER_BACKWARD = BackwardTiles(16, 16)
INTERPRETER_SPLITS = 2

_SHARED_MEMORY_BUDGET = 200 * 1024   # bytes of the 228 KB an H100 SM has, leaving room for the compiler
_ACCUMULATOR_REGISTERS = 128         # fp32 accumulator registers per thread we allow before spilling
_PARTIAL_BUDGET = 64 * 2 ** 20       # bytes for the dx split partials


def block_d(dim: int) -> int:
    """Backward tiles hold whole rows: d padded to a power of two (>= 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(dim))


def backward_fits(tiles: BackwardTiles, dim: int, elem_bytes: int) -> bool:
    """Accumulator in registers and both operand tiles (loop tile pipelined) in shared memory.

    Checked against Triton 3.9's sm_90 compile of both kernels (bench/triton_compile_check.py) for every d in
    64..1024: shared memory is at most these operand tiles, except that fp64 keeps a second copy of the loop
    tile."""
    width = block_d(dim)
    loop_copies = max(tiles.num_stages, 1) + (1 if elem_bytes == 8 else 0)
    smem = (tiles.acc_rows + tiles.loop_rows * loop_copies) * width * elem_bytes
    registers = tiles.acc_rows * width * max(elem_bytes // 4, 1) // (32 * tiles.num_warps)
    return registers <= _ACCUMULATOR_REGISTERS and smem <= _SHARED_MEMORY_BUDGET


def default_backward(dim: int, elem_bytes: int) -> BackwardTiles:
    """The GPU's fixed backward tiling when autotuning is off: the first listed tiling that fits."""
    for tiles in H100_BACKWARD:
        if backward_fits(tiles, dim, elem_bytes):
            return tiles
    raise ValueError(f"the 'triton' backend's backward holds whole embedding rows in shared memory; d={dim} in "
                     f"{elem_bytes}-byte elements does not fit an H100's (use fp32/bf16 storage, or "
                     f"backend='torch')")


def forward_fits(tiles: ForwardTiles, elem_bytes: int) -> bool:
    """Both operand tiles of the K loop, pipelined over num_stages, in shared memory."""
    return (tiles.block_b + tiles.block_c) * tiles.block_k * elem_bytes * tiles.num_stages <= _SHARED_MEMORY_BUDGET


def default_forward(elem_bytes: int) -> ForwardTiles:
    """The GPU's fixed forward tiling when autotuning is off (fp32/fp64 tiles need fewer stages)."""
    preferred = ForwardTiles(64, 128, 64, 4, 4)
    for stages in (4, 3, 2, 1):
        tiles = ForwardTiles(preferred.block_b, preferred.block_c, preferred.block_k, 4, stages)
        if forward_fits(tiles, elem_bytes):
            return tiles
    return ForwardTiles(32, 32, 32, 4, 1)


@dataclass
class _Override:
    forward: Optional[ForwardTiles] = None
    backward: Optional[BackwardTiles] = None
    splits: Optional[int] = None


_override = _Override()


@contextlib.contextmanager
def fixed_configs(forward: Optional[ForwardTiles] = None, backward: Optional[BackwardTiles] = None,
                  splits: Optional[int] = None):
    """Force tile sizes (and the class split count of the forward and dx kernels) inside the block."""
    global _override
    saved = _override
    _override = _Override(forward, backward, splits)
    try:
        yield
    finally:
        _override = saved


def smallest_class_tile(tiles: Optional[BackwardTiles]) -> int:
    """Class tile of the dW kernel: the fixed one, or the smallest the autotuner may pick."""
    return tiles.acc_rows if tiles is not None else min(t.acc_rows for t in H100_BACKWARD)


def autotune_enabled(interpret: bool) -> bool:
    return not interpret and os.environ.get("MARGIN_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def forward_tiles(interpret: bool, elem_bytes: int) -> Optional[ForwardTiles]:
    """The fixed forward tiling, or None to autotune."""
    if _override.forward is not None:
        return _override.forward
    if interpret:
        return INTERPRETER_FORWARD
    return None if autotune_enabled(interpret) else default_forward(elem_bytes)


def backward_tiles(interpret: bool, dim: int, elem_bytes: int) -> Optional[BackwardTiles]:
    if _override.backward is not None:
        return _override.backward
    if interpret:
        return INTERPRETER_BACKWARD
    tiles = default_backward(dim, elem_bytes)  # raises a clear error if no tiling fits this d and dtype
    return None if autotune_enabled(interpret) else tiles


def class_splits(device: torch.device, interpret: bool, batch: int, num_cols: int, partial_row_bytes: int) -> int:
    """How many class ranges the forward / dx grids split into, so that small batches still fill the GPU.

    Aims at two programs per SM with row blocks of 64; never more splits than class tiles of 64, and the
    partials (``partial_row_bytes`` per batch row and split) stay within a fixed memory budget."""
    if _override.splits is not None:
        return _override.splits
    if interpret or device.type != "cuda":
        return INTERPRETER_SPLITS
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = math.ceil(batch / 64)
    splits = min(math.ceil(programs / row_blocks), math.ceil(num_cols / 64),
                 max(1, _PARTIAL_BUDGET // max(1, batch * partial_row_bytes)))
    return max(1, splits)


def forward_autotune_configs():
    return [triton.Config({"BLOCK_B": t.block_b, "BLOCK_C": t.block_c, "BLOCK_K": t.block_k},
                          num_warps=t.num_warps, num_stages=t.num_stages) for t in H100_FORWARD]


def prune_forward(configs, named_args, **kwargs):
    """Drop tilings whose pipelined operand tiles exceed shared memory for this dtype (keeps at least one)."""
    elem_bytes = named_args["x_ptr"].element_size()
    kept = [c for c in configs if forward_fits(ForwardTiles(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"],
                                                            c.kwargs["BLOCK_K"], c.num_warps, c.num_stages),
                                               elem_bytes)]
    return kept or [triton.Config({"BLOCK_B": 32, "BLOCK_C": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]


def backward_autotune_configs(acc_name: str, loop_name: str):
    return [triton.Config({acc_name: t.acc_rows, loop_name: t.loop_rows}, num_warps=t.num_warps,
                          num_stages=t.num_stages) for t in H100_BACKWARD]


def prune_backward(configs, named_args, *, acc_name: str, loop_name: str, **kwargs):
    """Drop tilings whose accumulator or shared-memory tiles cannot fit at this d (keeps at least one).

    Bound with functools.partial to the kernel's names of its accumulator and loop tiles."""
    dim = named_args["D"]
    elem_bytes = named_args["x_ptr"].element_size()
    kept = [c for c in configs if backward_fits(
        BackwardTiles(c.kwargs[acc_name], c.kwargs[loop_name], c.num_warps, c.num_stages), dim, elem_bytes)]
    return kept or [min(configs, key=lambda c: c.kwargs[acc_name] * c.kwargs[loop_name])]
