"""backend="cpu" (the CPU default of backend="auto"): the chunk loop with MKL GEMMs and the fused C++
epilogues of csrc/margin_cpu.cpp (OpenMP, vectorised; fp32 tiles, fp64 tiles for fp64 inputs)."""
from __future__ import annotations

from .chunk_loop import default_chunk_size
from .native_epilogue import NativeBackend

_BACKEND = NativeBackend("cpu", "cpu", lambda batch: default_chunk_size(batch, "cpu"))
unavailable_reason = _BACKEND.unavailable_reason
lse_forward = _BACKEND.lse_forward
lse_backward = _BACKEND.lse_backward
