"""backend="torch": the portable backend, the neutral chunk loop (``chunk_loop``) with an epilogue written in
PyTorch ops over ``losses/negatives.py``. Runs on any device and dtype (fp64 too); it is also the reference
implementation of the epilogue contract that the native epilogues are tested against tile by tile."""
from __future__ import annotations

import torch

from ..losses.negatives import negative_derivative, negative_logits
from ..losses.reductions import ReductionKind, softplus_grad, softplus_terms
from ..norms import inverse_norms
from .chunk_loop import chunked_backward, chunked_forward, product_operand_dtype
from .epilogue import TileGrad
from .gradient_scale import chunk_operand_scale


def _target_columns(labels: torch.Tensor, col0: int, width: int):
    """(rows, local columns) of the target pairs whose class falls in [col0, col0 + width)."""
    inside = (labels >= col0) & (labels < col0 + width)
    rows = inside.nonzero().squeeze(1)
    return rows, labels[rows] - col0


class TorchEpilogue:
    def inv_norms(self, w, acc_dtype):
        return inverse_norms(w, acc_dtype)

    def forward_tile(self, cos, inv_norm, labels, col0, row_params, spec, run_max, run_sum, shift=None):
        if inv_norm is not None:  # not in place: the tile may be kept for the backward (kept_tiles)
            cos = cos * inv_norm
        z = negative_logits(cos, spec, row_params)
        rows, cols = _target_columns(labels, col0, cos.shape[1])
        if spec.reduction == ReductionKind.SOFTPLUS_SUM:
            terms = softplus_terms(z if shift is None else z + shift, spec.clamp)
            terms[rows, cols] = 0.0
            run_sum.add_(terms.sum(dim=1))
            return
        z[rows, cols] = float("-inf")
        new_max = torch.maximum(run_max, z.amax(dim=1))
        # rows whose max is still -inf have nothing to merge; keep exp() away from inf - inf
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        run_sum.mul_(torch.exp(run_max - shift)).add_(torch.exp(z - shift.unsqueeze(1)).sum(dim=1))
        run_max.copy_(new_max)

    def backward_tile(self, cos, inv_norm, labels, col0, row_params, spec, lse, g_lse, g_cos_target,
                      want_max_abs, grad_dtype=None, shift=None):
        if inv_norm is not None:
            cos.mul_(inv_norm)
        z = negative_logits(cos, spec, row_params)
        rows, cols = _target_columns(labels, col0, cos.shape[1])
        shift_grad = None
        if spec.reduction == ReductionKind.SOFTPLUS_SUM:  # dL/dz = g sigmoid(z + shift), per element
            p = softplus_grad(z if shift is None else z + shift, spec.clamp) * g_lse.unsqueeze(1)
            p[rows, cols] = 0.0
            shift_grad = p.sum().reshape(1)
        else:
            z[rows, cols] = float("-inf")
            p = torch.exp(z - lse.unsqueeze(1)) * g_lse.unsqueeze(1)
        dcos = p.mul_(negative_derivative(cos, spec, row_params)).mul_(spec.scale)
        dcos[rows, cols] = g_cos_target[rows]
        max_abs = dcos.abs().amax() if want_max_abs else None
        col_dot = None
        if inv_norm is not None:
            # d cos_ij / d w_j = (x_i - cos_ij w_j/|w_j|) / |w_j|: fold 1/|w_j| into dcos, the rest into a
            # per-class correction of the dW rows (finish_dw)
            col_dot = (dcos * cos).sum(dim=0)
            dcos.mul_(inv_norm)
        if grad_dtype is None:
            return TileGrad(dcos, col_dot, max_abs, None, shift_grad)
        factor, inv_factor = chunk_operand_scale(grad_dtype, spec, row_params, g_lse, g_cos_target, inv_norm)
        grad = (dcos if factor is None else dcos.mul_(factor)).to(grad_dtype)
        return TileGrad(grad, col_dot, max_abs, inv_factor, shift_grad)

    def finish_dw(self, dw, w, col_dot, inv_norm, inv_factor=None, out=None):
        if inv_factor is not None:
            dw.mul_(inv_factor)
        if col_dot is not None:
            # (col_dot / |w|) (w / |w|), never col_dot / |w|^2: that underflows to 0 in fp32 for |w| > ~1e19
            dw.sub_((col_dot * inv_norm).unsqueeze(1) * (w.to(dw.dtype) * inv_norm.unsqueeze(1)))
        if out is not None:
            out.copy_(dw)


_TORCH_EPILOGUE = TorchEpilogue()


def lse_forward(inputs, config, state):
    return chunked_forward(inputs, config, state, _TORCH_EPILOGUE, product_operand_dtype(config.product, inputs.x))


def lse_backward(inputs, config, grads, state):
    return chunked_backward(inputs, config, grads, state, _TORCH_EPILOGUE,
                            product_operand_dtype(config.product, inputs.x))


def unavailable_reason():
    return None  # plain PyTorch: runs wherever torch does
