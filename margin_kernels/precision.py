"""Which dtype the products of fp32 weights run in, by PyTorch's rules (decided once per call, outside the op).

* under autocast on the tensors' device: the autocast dtype (bf16 or fp16), the operands cast in registers
  after they are loaded (never a C x d copy of W) — insightface trains fp32 master weights under fp16 autocast;
* otherwise ``torch.get_float32_matmul_precision()``: "highest" -> IEEE fp32 products, "high" -> TF32,
  "medium" -> bf16.

bf16/fp16 storage multiplies in its own dtype and fp64 in fp64 ("storage"). Accumulation is fp32 (fp64 for
fp64) in every case. Under torch.compile the choice is a constant of the trace (read when it is traced).
The Triton backend honours every mode; the chunk-loop backends multiply with ``torch.mm``, which reads the
same global setting on CUDA and computes fp32 exactly on CPU.
"""
from __future__ import annotations

import torch

#: the storage dtypes the package takes for features and weights (every backend, the validation)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: product modes, in the order the Triton kernels number them (``PRODUCT`` constexpr)
PRODUCTS = ("storage", "ieee", "tf32", "bf16", "fp16")
_MATMUL_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}
_AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "fp16"}
#: the products whose fp32 operands are cast to a 16-bit dtype (in registers, or one chunk at a time)
CAST_DTYPES = {mode: dtype for dtype, mode in _AUTOCAST.items()}


def _autocast_dtype(device_type: str):
    """The autocast dtype on ``device_type`` if autocast is on there, else None (torch >= 2.4 and older)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # pragma: no cover - torch < 2.4
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
        dtype = torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()
    return dtype if enabled else None


@torch.compiler.assume_constant_result
def _product_for_fp32(device_type: str) -> str:
    autocast = _autocast_dtype(device_type)
    if autocast in _AUTOCAST:
        return _AUTOCAST[autocast]
    return _MATMUL_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def product_mode(storage_dtype: torch.dtype, device_type: str) -> str:
    """One of PRODUCTS for storage of ``storage_dtype`` on ``device_type``, by the rules above."""
    if storage_dtype != torch.float32:
        return "storage"
    return _product_for_fp32(device_type)
