"""backend="cpu" (the CPU default of backend="auto"): the chunk loop with MKL GEMMs and the fused C++
epilogues of csrc/margin_cpu.cpp (OpenMP, vectorised; fp32 tiles, fp64 tiles for fp64 inputs)."""
from __future__ import annotations

from .native_epilogue import NativeBackend

_BACKEND = NativeBackend("cpu", "cpu")
unavailable_reason = _BACKEND.unavailable_reason
lse_forward = _BACKEND.lse_forward
lse_backward = _BACKEND.lse_backward
