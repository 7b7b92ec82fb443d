"""Which GEMM path backend="cuda" runs for a call: "cutlass-sm90" (the epilogue-fused CUTLASS GEMMs of
csrc/cutlass/margin_sm90.cu: Hopper, 16-bit operands) or "cublas" (cuBLAS GEMMs with the separate epilogues of
csrc/margin_cuda.cu: every other GPU and dtype, and every case the fused kernels do not cover).

The decision is a pure function of scalars (``select``), so the CPU tests check it without a GPU. The fused path
is compile-checked only (``python -m bench cutlass``): no GPU has validated it, so ``backend="auto"`` never picks
it (auto resolves to a backend name; this choice is inside the cuda backend and needs the extension to hold the
fused kernels, built only for sm_90a), and the cuda backend takes it only where every condition below holds.
"""
from __future__ import annotations

from typing import Optional

import torch

from .chunk_loop import product_operand_dtype

CUTLASS = "cutlass-sm90"
CUBLAS = "cublas"
#: the 16-bit operand dtypes the fused GEMMs are instantiated for
FUSED_DTYPES = (torch.bfloat16, torch.float16)
#: TMA: rows of 16-bit operands must be a multiple of 16 bytes
DIM_MULTIPLE = 8


def select(capability: Optional[tuple], operand_dtype: Optional[torch.dtype], dim: int, has_fused: bool,
           sub_centers: int = 1, grad_filter: float = 0.0, keep_cols: int = 0,
           acc_dtype: torch.dtype = torch.float32, mixed_mm: bool = True) -> tuple[str, str]:
    """(variant, why): the fused path only on compute capability 9.0 (sm_90a kernels), with 16-bit operands
    (bf16/fp16 storage, or fp32 under a 16-bit product), d a multiple of 8, fp32 accumulation, a torch whose
    mm multiplies 16-bit operands into fp32 (the dx/dW GEMMs on the fused backward's 16-bit dL/dcos), an
    extension built with the fused kernels, and none of the options they do not implement (sub-centers, the
    gradient filter, kept tiles). Partial FC takes the fused path too, though the kernels do not read the class
    index: the chunk loop gathers each chunk's sampled rows into a copy the chunk's GEMMs read (three exposed
    passes over the sampled rows per step; bench/cutlass_check.py's ``estimate(partial_fc=True)``)."""
    if not has_fused:
        return CUBLAS, "the CUDA extension was built without the CUTLASS kernels (no headers or no sm_90a target)"
    if capability is None or tuple(capability) != (9, 0):
        return CUBLAS, f"the fused kernels are sm_90a only (this device: {capability})"
    if operand_dtype not in FUSED_DTYPES:
        return CUBLAS, f"operands multiply in {operand_dtype} (the fused kernels: bf16/fp16 operands)"
    if dim % DIM_MULTIPLE:
        return CUBLAS, f"d = {dim} is not a multiple of {DIM_MULTIPLE} (TMA rows of 16 bytes)"
    if sub_centers != 1:
        return CUBLAS, "sub-centers (the class max over K rows) are not in the fused epilogue"
    if grad_filter > 0:
        return CUBLAS, "the gradient filter needs each tile's max |dL/dcos| (not in the fused epilogue)"
    if keep_cols:
        return CUBLAS, "kept forward tiles need the B x chunk tile written (the fused forward writes none)"
    if acc_dtype != torch.float32:
        return CUBLAS, f"the call accumulates in {acc_dtype} (the fused epilogues: fp32)"
    if not mixed_mm:
        return CUBLAS, "this torch's mm has no out_dtype (16-bit operands into fp32) for the dx/dW GEMMs"
    return CUTLASS, "sm_90, 16-bit operands"


def has_fused_kernels(ext) -> bool:
    """Whether the compiled extension holds the CUTLASS kernels (its bindings say so)."""
    return bool(getattr(ext, "has_cutlass_sm90", lambda: False)())


def operand_dtype(x: torch.Tensor, weight: torch.Tensor, product: str) -> Optional[torch.dtype]:
    """The dtype the call's GEMMs multiply in on CUDA: 16-bit storage itself, or fp32's cast product."""
    if weight.dtype in FUSED_DTYPES:
        return weight.dtype
    return product_operand_dtype(product, x)
