"""backend="cuda": the chunk loop with cuBLAS GEMMs and the fused CUDA epilogues of csrc/margin_cuda.cu
(one pass over each fp32 tile; deterministic). With 16-bit weights (or fp32 under a 16-bit product) every GEMM
runs on tensor cores with fp32 output and the backward epilogue writes dL/dcos in the operand dtype for the
dx/dW GEMMs (chunk_loop.gradient_operand_dtype). Robust on any CUDA GPU and torch build; the Triton backend is
the fully fused one (the epilogues inside its GEMMs: the cuda backend's remaining gap, see bench/kernels.py).

On an sm_90 device with an extension built with the CUTLASS kernels (csrc/cutlass/margin_sm90.cu), calls that
cuda_variant.select admits run the forward, the backward's recompute GEMM and (16-bit storage) the dW GEMM
with finish_dw with the epilogues fused in (``variant`` says which path a call runs); the dx GEMM and the
gradient sinks are the cuBLAS path's. Compile-checked only: no GPU has validated the fused path yet."""
from __future__ import annotations

import torch

from .. import _native
from . import chunk_loop, cuda_variant
from .native_epilogue import NativeBackend

_BACKEND = NativeBackend("cuda", "cuda")
unavailable_reason = _BACKEND.unavailable_reason


def choose(x, weight, config, row_params=None) -> tuple[str, str]:
    """(variant, why) of a call: "cutlass-sm90" or "cublas" (cuda_variant.select)."""
    ext, _ = _native.load(with_cuda=True)
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    acc = torch.float32 if row_params is None else row_params.dtype
    return cuda_variant.select(capability, cuda_variant.operand_dtype(x, weight, config.product),
                               x.shape[-1], ext is not None and cuda_variant.has_fused_kernels(ext),
                               config.sub_centers, config.grad_filter, config.keep_cols,
                               acc_dtype=acc, mixed_mm=chunk_loop._MIXED_MM)


def variant(x, weight, config, row_params=None) -> str:
    """The GEMM path a call with these inputs and ``config`` (contract.OpConfig) runs: "cutlass-sm90" or
    "cublas" (``choose`` says why)."""
    return choose(x, weight, config, row_params)[0]


def _fused(inputs, config) -> bool:
    return variant(inputs.x, inputs.weight, config, inputs.row_params) == cuda_variant.CUTLASS


def lse_forward(inputs, config, state):
    return _BACKEND.lse_forward(inputs, config, state, fused=_fused(inputs, config))


def lse_backward(inputs, config, grads, state):
    return _BACKEND.lse_backward(inputs, config, grads, state, fused=_fused(inputs, config))
