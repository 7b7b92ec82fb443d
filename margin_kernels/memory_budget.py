"""``memory_budget=``: bytes the fused op may spend keeping forward tiles so the backward skips a GEMM.

Values: ``None`` or ``0`` recompute every tile in backward (the default: the op's extra memory stays O(B x
chunk) besides dW); an int > 0 is a budget in bytes; ``"auto"`` keeps tiles where keeping is faster than
recomputing on this device (``keeping_pays``), within ``AUTO_FRACTION`` of the memory free at the call.
Each kept column costs B x 4 bytes (fp32 tiles; 8 for fp64): ``backends/kept_tiles.py`` has the layout and
the one place that decides, per chunk, between reading a kept tile and recomputing it. The loss and both
gradients are the same either way (the kept tile is the forward's GEMM output, in the accumulation dtype).

When keeping pays. Per class column of a tile (B entries; d = embedding size; fp32 tile, 4·B bytes):
recomputing it is one more GEMM column, 2·B·d FLOPs; keeping it is 4·B bytes written by the forward and
4·B read back by the backward. GPU (H100 SXM: ~990 TFLOP/s dense bf16, ~3.35 TB/s HBM), bf16 weights,
B = 512, nanoseconds per class column:

    d      forward: compute / bytes without -> with keep   backward: recompute vs read   net of keeping
    512    0.53 / 0.31 -> 0.92 (now memory-bound: +0.39)    0.53 vs 0.61 (+0.08)          +0.47: loses
    1024   1.06 / 0.61 -> 1.22 (+0.16)                       1.06 vs 0.61 (-0.45)          -0.29: wins
    2048   2.12 / 1.22 -> 1.83 (still compute-bound: 0)      2.12 vs 0.61 (-1.51)          -1.51: wins

(forward bytes: the weight row, 2d, plus the kept column, 4B; the forward kernel is compute-bound at
2Bd / 2d = B FLOP per byte and turns memory-bound once it also writes the tile: 2Bd / (2d + 4B) = 171 FLOP
per byte at d = 512, below the ~295 ridge.) At d = 512 recomputing costs about what re-reading a bf16 copy
of the tile would (0.53 vs 0.31 + 0.31 ns), and the fp32 tile loses; from d = 1024 keeping wins. So on CUDA
``"auto"`` keeps at d >= ``GPU_KEEP_MIN_DIM`` = 1024 and recomputes below (an estimate: no GPU has measured
it yet; ``bench/gpu_session.sh`` has the step that will).

CPU (this project's 2-core x86-64: MKL fp32 ~175 GFLOP/s per core measured on a B x 2048 x 512 chunk, DRAM
~10 GB/s): at d = 512 a recomputed tile entry costs 2·512 FLOP / 175e9 = 5.9 ns, a kept one 8 bytes / 10e9 =
0.8 ns (plus the page faults of the fresh buffer, ~1 ns): keeping always wins (measured,
``bench/results/cpu_budget_arcface_B256_d512_t1``: B = 256, C = 1e5, every tile kept, 0.87x the time of the
recomputing step), so ``"auto"`` keeps on CPU.

Why the default is None, not ``"auto"``: the measured rule above is what ``"auto"`` applies per device, but
what it keeps grows with C (4·B·C bytes: 10 GB at B = 256, C = 10^7), and the fused head's promise is memory
flat in C, the reason to use it at 10^7 classes. Taking a quarter of the free memory unasked would move a
user's out-of-memory point (activations, the optimizer state) without their knowing; so the budget is
opt-in, and ``"auto"`` is the one word that asks for the measured per-device choice.
"""
from __future__ import annotations

import os

import torch

#: the share of the free memory at the call that ``"auto"`` may spend on kept tiles
AUTO_FRACTION = 0.25
#: on CUDA, ``"auto"`` keeps tiles from this embedding size up (the arithmetic in the module docstring)
GPU_KEEP_MIN_DIM = 1024
AUTO = "auto"


def check_memory_budget(memory_budget) -> None:
    """None, a non-negative int of bytes, or "auto"; anything else is a ValueError naming the argument."""
    if memory_budget is None or isinstance(memory_budget, str) and memory_budget == AUTO:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0:
        raise ValueError(f"memory_budget must be None, a number of bytes >= 0 (int) or 'auto', got "
                         f"{memory_budget!r}")


def keeping_pays(device_type: str, dim: int) -> bool:
    """Whether reading a kept fp32 tile beats recomputing it on ``device_type`` at embedding size ``dim``."""
    if device_type == "cuda":
        return dim >= GPU_KEEP_MIN_DIM
    return True


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


@torch.compiler.assume_constant_result
def free_bytes(device_type: str, index: int) -> int:
    """Memory free on the device now (CUDA: mem_get_info; CPU: MemAvailable); a constant of a compiled trace."""
    if device_type == "cuda":
        return int(torch.cuda.mem_get_info(index)[0])
    return _cpu_available_bytes()


def budget_bytes(memory_budget, device: torch.device, dim: int) -> int:
    """The budget of one call in bytes (0: recompute everything)."""
    if not memory_budget:
        return 0
    if memory_budget == AUTO:
        if not keeping_pays(device.type, dim):
            return 0
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else 0)
        return int(AUTO_FRACTION * free_bytes(device.type, index))
    return int(memory_budget)
