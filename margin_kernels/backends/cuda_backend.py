"""backend="cuda": the chunk loop with cuBLAS GEMMs and the fused CUDA epilogues of csrc/margin_cuda.cu
(one pass over each fp32 tile; deterministic). With 16-bit weights (or fp32 under a 16-bit product) every GEMM
runs on tensor cores with fp32 output and the backward epilogue writes dL/dcos in the operand dtype for the
dx/dW GEMMs (chunk_loop.gradient_operand_dtype). Robust on any CUDA GPU and torch build; the Triton backend is
the fully fused one (the epilogues inside its GEMMs: the cuda backend's remaining gap, see bench/kernels.py)."""
from __future__ import annotations

import torch

from .. import _native
from . import cuda_variant
from .native_epilogue import NativeBackend

_BACKEND = NativeBackend("cuda", "cuda")
unavailable_reason = _BACKEND.unavailable_reason
lse_forward = _BACKEND.lse_forward
lse_backward = _BACKEND.lse_backward


def variant(x, weight, config) -> str:
    """The GEMM path a call with these inputs and ``config`` (contract.OpConfig) runs: "cutlass-sm90" or
    "cublas" (cuda_variant.select says why). The fused kernels are compiled (csrc/cutlass/) but bindings.cpp does
    not expose them yet: the extension reports ``has_cutlass_sm90`` only together with the calls that run them,
    so until then every call runs, and this says, "cublas"."""
    ext, _ = _native.load(with_cuda=True)
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    chosen, _why = cuda_variant.select(capability, cuda_variant.operand_dtype(x, weight, config.product),
                                       x.shape[-1], ext is not None and cuda_variant.has_fused_kernels(ext),
                                       config.sub_centers, config.grad_filter, config.keep_cols)
    return chosen
