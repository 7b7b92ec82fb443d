"""The power-of-two factor dL/dcos is multiplied by before it is rounded to a 16-bit GEMM operand.

The gradient GEMMs (dx = dC . W_hat, dW = dC^T . X) run on tensor cores when dC = dL/dcos is stored in the
operands' 16-bit dtype. bf16 has fp32's exponent range, so dC is rounded as it is (factor 1). fp16 does not:
its smallest normal is 2^-14 and the softmax probabilities in dC reach far below that, so dC is first
multiplied by one power of two that brings its bound to 2^FP16_TARGET_EXPONENT (fp16's largest finite value is
65504: headroom for the bound being loose by 4x), and the GEMMs' fp32 outputs are divided by it again (exact:
a power of two). Every quantity here is a device scalar: no host sync.

The bound: |dc_ij| <= s * max|g'| * max|g_lse| off the target (the probabilities are <= 1), or the largest
target gradient; ``column_scale`` multiplies it when the stored operand carries 1/|w_j| (the chunk loop folds
the weight norm into dC; the Triton kernels apply it in registers instead and pass none).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..losses.negatives import NegativeSpec, derivative_bound

FP16_TARGET_EXPONENT = 14.0
#: the exponent is clamped so the factor stays finite (and 1/factor non-zero) for any bound, even inf/NaN
_EXPONENT_LIMIT = 100.0


def needs_factor(operand_dtype: torch.dtype) -> bool:
    """Whether dC needs scaling before it is rounded to ``operand_dtype`` (only fp16's range is too narrow)."""
    return operand_dtype == torch.float16


def operand_factor(spec: NegativeSpec, row_params: torch.Tensor, g_lse: torch.Tensor, g_cos_target: torch.Tensor,
                   column_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fp16 factor (a 1-element tensor on row_params' device): 2^(14 - ceil(log2(bound)))."""
    bound = torch.maximum(abs(spec.scale) * derivative_bound(spec, row_params) * g_lse.abs().max(),
                          g_cos_target.abs().max())
    if column_scale is not None and column_scale.numel() > 0:
        bound = bound * column_scale.abs().max()
    exponent = torch.where(bound > 0, torch.log2(bound).ceil().clamp(-_EXPONENT_LIMIT, _EXPONENT_LIMIT),
                           torch.zeros_like(bound))
    return torch.exp2(FP16_TARGET_EXPONENT - exponent).reshape(1)


def chunk_operand_scale(operand_dtype: torch.dtype, spec: NegativeSpec, row_params: torch.Tensor,
                        g_lse: torch.Tensor, g_cos_target: torch.Tensor, inv_norm: Optional[torch.Tensor]):
    """(factor, 1/factor) for one chunk of the chunk loop, whose 16-bit dC carries 1/|w_j| (so the chunk's
    largest inverse norm enters the bound), or (None, None) when no scaling is needed (bf16)."""
    if not needs_factor(operand_dtype):
        return None, None
    factor = operand_factor(spec, row_params, g_lse, g_cos_target, inv_norm)
    return factor, 1.0 / factor
