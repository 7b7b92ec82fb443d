"""backend="cuda": the chunk loop with cuBLAS GEMMs and the fused CUDA epilogues of csrc/margin_cuda.cu
(one pass over each fp32 tile; deterministic). Robust on any CUDA GPU and torch build; the Triton backend is
the fully fused one."""
from __future__ import annotations

from .native_epilogue import NativeBackend

_BACKEND = NativeBackend("cuda", "cuda")
unavailable_reason = _BACKEND.unavailable_reason
lse_forward = _BACKEND.lse_forward
lse_backward = _BACKEND.lse_backward
