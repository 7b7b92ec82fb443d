"""The update formulas of the fused optimizers, on a block of rows, written once.

They are torch.optim's own (``torch/optim/sgd.py`` and ``adam.py``'s single-tensor paths; ``sparse_adam.py``
for the lazy AdamW), transcribed operation by operation so a float64 trajectory matches torch's to rounding.
Every function works in place on its arguments, which are the rows of one chunk in the math dtype (fp32 for
16-bit weights, the weight's dtype otherwise): ``p`` the weight rows, ``g`` their gradient (may be
overwritten), and the state rows.

SGD and AdamW run as one pass over the rows where torch has its fused optimizer kernel for the device and
dtype (``torch._fused_sgd_`` / ``torch._fused_adamw_``, what ``fused=True`` runs: the same formulas, SGD bit
for bit, AdamW to an ulp), instead of three to seven elementwise ops: the update runs once per class chunk, so
on a CPU each op is a parallel region whose barrier costs more than its work when the cores are shared. Where
the kernel is missing (an older torch, another device) the op-by-op transcription below runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

#: (kernel, device type, dtype) -> whether torch's fused kernel ran there (absent: not tried yet)
_FUSED_KERNEL_OK: dict = {}


def _fused_or(name: str, p: torch.Tensor, fused, fallback) -> None:
    """Run ``fused()`` (torch's fused optimizer kernel) if it works for p's device and dtype, else
    ``fallback()``; a kernel that is missing fails at dispatch, before touching any tensor."""
    key = (name, p.device.type, p.dtype)
    if _FUSED_KERNEL_OK.get(key, True):
        try:
            fused()
            _FUSED_KERNEL_OK[key] = True
            return
        except (AttributeError, NotImplementedError, RuntimeError, TypeError):
            if _FUSED_KERNEL_OK.get(key):
                raise  # it has worked here before: a real error
            _FUSED_KERNEL_OK[key] = False
    fallback()


_step_tensors: dict = {}


def _step_tensor(step: int, device: torch.device) -> torch.Tensor:
    """The step count as the one-element fp32 tensor torch's fused Adam kernels read (reused within a step:
    one per device, not one per chunk)."""
    cached = _step_tensors.get(device)
    if cached is None or cached[0] != step:
        cached = _step_tensors[device] = (step, torch.tensor(float(step), dtype=torch.float32, device=device))
    return cached[1]


def sgd_rows(p: torch.Tensor, g: torch.Tensor, momentum_buffer: Optional[torch.Tensor], *, lr: float,
             momentum: float, dampening: float, weight_decay: float, nesterov: bool, first_step: bool) -> None:
    """torch.optim.SGD: the buffer starts as the first step's gradient (torch's ``clone(grad)``)."""
    _fused_or("sgd", p, lambda: torch._fused_sgd_(
        [p], [g], [] if momentum == 0 else [momentum_buffer], weight_decay=weight_decay, momentum=momentum, lr=lr,
        dampening=dampening, nesterov=nesterov, maximize=False, is_first_step=first_step),
        lambda: _sgd_rows_by_op(p, g, momentum_buffer, lr=lr, momentum=momentum, dampening=dampening,
                                weight_decay=weight_decay, nesterov=nesterov, first_step=first_step))


def _sgd_rows_by_op(p, g, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov, first_step):
    if weight_decay != 0:
        g = g.add_(p, alpha=weight_decay)
    if momentum != 0:
        if first_step:
            momentum_buffer.copy_(g)
        else:
            momentum_buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add_(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    p.add_(g, alpha=-lr)


def adamw_rows(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """torch.optim.AdamW (amsgrad off): decoupled decay, then Adam with bias correction at ``step`` (1-based)."""
    _fused_or("adamw", p, lambda: torch._fused_adamw_(
        [p], [g], [exp_avg], [exp_avg_sq], [], [_step_tensor(step, p.device)], lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False),
        lambda: _adamw_rows_by_op(p, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                  weight_decay=weight_decay, step=step))


def _adamw_rows_by_op(p, g, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step):
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def lazy_adamw_rows(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """torch.optim.SparseAdam on the rows of the step's class set (eps outside the bias correction, as there),
    plus AdamW's decoupled decay of those rows (SparseAdam has none: weight_decay=0 is SparseAdam exactly)."""
    p.mul_(1 - lr * weight_decay)
    old_exp_avg, old_exp_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
    exp_avg_update = g.sub(old_exp_avg).mul_(1 - beta1)
    exp_avg.add_(exp_avg_update)
    exp_avg_sq_update = g.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
    exp_avg_sq.add_(exp_avg_sq_update)
    numer = exp_avg_update.add_(old_exp_avg)
    denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(eps)
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    p.add_(numer.div_(denom).mul_(-step_size))
