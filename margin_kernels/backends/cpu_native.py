"""backend="cpu" (the CPU default of backend="auto"): torch_chunked's loop with MKL GEMMs and the fused C++
epilogues of csrc/margin_cpu.cpp (OpenMP, vectorised; fp32 tiles, fp64 tiles for fp64 inputs)."""
from __future__ import annotations

from .native_epilogue import NativeBackend
from .torch_chunked import CPU_MAX_CHUNK as MAX_CHUNK  # noqa: F401  (the chunk policy is the torch backend's)
from .torch_chunked import CPU_MIN_CHUNK as MIN_CHUNK  # noqa: F401
from .torch_chunked import CPU_TILE_ELEMENTS as TILE_ELEMENTS  # noqa: F401
from .torch_chunked import default_chunk_size as _chunk_policy


def default_chunk_size(batch: int) -> int:
    """The same cache-sized tile policy as the torch backend on CPU (torch_chunked.default_chunk_size)."""
    return _chunk_policy(batch, "cpu")


_BACKEND = NativeBackend("cpu", "cpu", default_chunk_size)
unavailable_reason = _BACKEND.unavailable_reason
lse_forward = _BACKEND.lse_forward
lse_backward = _BACKEND.lse_backward
