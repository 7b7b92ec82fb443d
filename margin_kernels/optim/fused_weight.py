"""The class a head's weight takes once its optimizer is fused (``HeadBase.fuse``): an ``nn.Parameter`` that
refuses to be clipped or unscaled, because it never has a gradient to clip or unscale.

Its optimizer updates it inside the backward pass, a class chunk at a time, so ``weight.grad`` stays None. Two
consumers of ``.grad`` would then silently skip it and do something else than the user asked:
``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` (a global norm needs all of dW before any row is
updated: the head's rows would go unclipped, and the norm would leave them out) and ``torch.amp.GradScaler``
(the update has already been applied with the scaled gradient, unscaled and unchecked for inf/NaN). Both read
each parameter's ``.grad`` from their own module (torch/nn/utils/clip_grad.py and torch/amp/grad_scaler.py
since torch 2.3; ``p.grad`` in every torch from 2.4 to 2.13), so the ``.grad`` getter, which torch routes
through ``__torch_function__`` for Parameter subclasses, raises when called from one of them and returns the
gradient (None) to everyone else: ``zero_grad``, DDP-style ``p.grad is not None`` checks, our own code.

Everything else is a plain Parameter: torch functions run with subclass dispatch disabled (``nn.Parameter``'s
own rule), so results, ``state_dict()`` entries and ``detach()`` are plain tensors and a saved state dict
loads anywhere. The limit: code that reads ``.grad`` from elsewhere (a hand-written clipping loop, another
library's scaler) sees None and skips the weight; ``torch.nn.utils.get_total_norm`` over grads the caller
collected itself cannot see the weight at all.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

CLIPPING_REFUSAL = (
    "gradient clipping cannot include the weight of a head with a fused optimizer: the update is applied chunk "
    "by chunk inside backward, so dW never exists as a whole (a global norm needs all of it before any row is "
    "updated) and weight.grad stays None. Clip the other parameters only (insightface clips the backbone), e.g. "
    "clip_grad_norm_(backbone.parameters(), ...), or use an unfused optimizer for the head")
GRAD_SCALER_REFUSAL = (
    "torch.amp.GradScaler cannot be used with a head whose optimizer is fused: the update is applied inside "
    "backward, before the scaler could unscale the gradient or skip the step on inf/NaN. Train the head in bf16 "
    "or fp32 without a scaler, or use an unfused torch.optim optimizer for it")
COMPILE_REFUSAL = (
    "a head with a fused optimizer cannot run under torch.compile: its backward updates the weight and optimizer "
    "state in place, outside the traced graph. Compile the backbone only, or use an unfused optimizer for the "
    "head")
#: modules whose reads of a fused weight's .grad raise, and why
_REFUSING_MODULES = {"torch.nn.utils.clip_grad": CLIPPING_REFUSAL, "torch.amp.grad_scaler": GRAD_SCALER_REFUSAL,
                     "torch.cuda.amp.grad_scaler": GRAD_SCALER_REFUSAL}
#: caller frames inspected above the getter (a list comprehension is its own frame before Python 3.12)
_FRAMES = 3


def _refusal() -> str | None:
    frame = sys._getframe(2)  # above _refusal and __torch_function__
    for _ in range(_FRAMES):
        if frame is None:
            return None
        reason = _REFUSING_MODULES.get(frame.f_globals.get("__name__"))
        if reason is not None:
            return reason
        frame = frame.f_back
    return None


class FusedWeight(nn.Parameter):
    """A head weight whose optimizer is fused (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if torch.compiler.is_compiling():  # dynamo traces this method: say why before it fails inside it
            raise RuntimeError(COMPILE_REFUSAL)
        if getattr(func, "__self__", None) is torch.Tensor.grad and func.__name__ == "__get__":  # p.grad
            reason = _refusal()
            if reason is not None:
                raise RuntimeError(reason)
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})


def mark_fused(weight: nn.Parameter) -> None:
    """Turn ``weight`` (the head's Parameter, the very object its optimizer holds) into a FusedWeight in place."""
    if not isinstance(weight, FusedWeight):
        weight.__class__ = FusedWeight
