"""backend="cpu" (the CPU default of backend="auto"): torch_chunked's loop with MKL GEMMs and the fused C++
epilogues of csrc/margin_cpu.cpp (OpenMP, vectorised; fp32 tiles, fp64 tiles for fp64 inputs)."""
from __future__ import annotations

from .native_epilogue import NativeBackend

#: a B x 4096 fp32 tile and a 4096-row chunk of W stay in the last-level cache between the GEMMs and the
#: epilogue passes over them (bench/bench_cpu_native.py measures the alternatives)
DEFAULT_CHUNK_SIZE = 4096

_BACKEND = NativeBackend("cpu", "cpu", DEFAULT_CHUNK_SIZE)
unavailable_reason = _BACKEND.unavailable_reason
lse_forward = _BACKEND.lse_forward
lse_backward = _BACKEND.lse_backward
