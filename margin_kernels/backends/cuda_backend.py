"""backend="cuda": the chunk loop with cuBLAS GEMMs and the fused CUDA epilogues of csrc/margin_cuda.cu
(one pass over each fp32 tile; deterministic). With 16-bit weights (or fp32 under a 16-bit product) every GEMM
runs on tensor cores with fp32 output and the backward epilogue writes dL/dcos in the operand dtype for the
dx/dW GEMMs (chunk_loop.gradient_operand_dtype). Robust on any CUDA GPU and torch build; the Triton backend is
the fully fused one (the epilogues inside its GEMMs: the cuda backend's remaining gap, see bench/kernels.py)."""
from __future__ import annotations

from .native_epilogue import NativeBackend

_BACKEND = NativeBackend("cuda", "cuda")
unavailable_reason = _BACKEND.unavailable_reason
lse_forward = _BACKEND.lse_forward
lse_backward = _BACKEND.lse_backward
