"""The update formulas of the fused optimizers, on a block of rows, written once.

They are torch.optim's own (``torch/optim/sgd.py`` and ``adam.py``'s single-tensor paths; ``sparse_adam.py``
for the lazy AdamW), transcribed operation by operation so a float64 trajectory matches torch's to rounding.
Every function works in place on its arguments, which are the rows of one chunk in the math dtype (fp32 for
16-bit weights, the weight's dtype otherwise): ``p`` the weight rows, ``g`` their gradient (may be
overwritten), and the state rows.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def sgd_rows(p: torch.Tensor, g: torch.Tensor, momentum_buffer: Optional[torch.Tensor], *, lr: float,
             momentum: float, dampening: float, weight_decay: float, nesterov: bool, first_step: bool) -> None:
    """torch.optim.SGD: the buffer starts as the first step's gradient (torch's ``clone(grad)``)."""
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
