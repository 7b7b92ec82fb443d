"""backend="cpu" (the CPU default of backend="auto"): torch_chunked's loop with MKL GEMMs and the fused C++
epilogues of csrc/margin_cpu.cpp (OpenMP, vectorised; fp32 tiles, fp64 tiles for fp64 inputs)."""
from __future__ import annotations

from .native_epilogue import NativeBackend

#: elements of the B x chunk tile: 2 MiB of fp32 stays in cache between the GEMM that writes it, the epilogue
#: and the two GEMMs that read it (bench/bench_cpu_native.py --chunk compares sizes). Smaller chunks measured
#: ~1% faster on an idle machine but double the OpenMP fork/joins per call, which a busy machine punishes.
TILE_ELEMENTS = 1 << 19
MIN_CHUNK, MAX_CHUNK = 2048, 8192  # below: per-chunk overhead shows; above: W chunks leave the cache


def default_chunk_size(batch: int) -> int:  # 2048 at B >= 256, 4096 at 128, 8192 at <= 64
    """TILE_ELEMENTS / batch rounded down to a power of two, within [MIN_CHUNK, MAX_CHUNK]."""
    target = TILE_ELEMENTS // max(batch, 1)
    return max(MIN_CHUNK, min(MAX_CHUNK, 1 << max(target, 1).bit_length() - 1))


_BACKEND = NativeBackend("cpu", "cpu", default_chunk_size)
unavailable_reason = _BACKEND.unavailable_reason
lse_forward = _BACKEND.lse_forward
lse_backward = _BACKEND.lse_backward
