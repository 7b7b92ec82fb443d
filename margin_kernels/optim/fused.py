"""``FusedSGD`` / ``FusedAdamW``: torch.optim.Optimizers whose update runs inside a head's backward pass.

A head that is given one (``head.fuse(optimizer)``) never allocates dW: each class chunk's gradient rows, as
the backend finishes them (``sink.UpdateSink``), are applied to those rows of the weight and of the optimizer
state, and dropped. After ``loss.backward()`` the weight is already updated and ``weight.grad`` stays None.

* ``step()`` closes the step: it applies nothing to the head's weight (the update happened in backward) but
  must be called before the next backward; the optimizer's other parameters with a ``.grad`` (a binary loss's
  learnable bias, a regulariser's parameters: ``FusedSGD(head.parameters())`` holds them) get the same rule
  there, unfused; a second backward without it is gradient accumulation, which a fused update cannot do
  (the first micro-batch's update is already applied) and raises naming it. ``zero_grad()`` is torch's (the
  head's weight has no gradient to clear). ``param_groups`` (lr, momentum, betas, ...) are read at each
  backward, so LR schedulers work unchanged; the state lives in ``state_dict()``.
* ``sparse=False`` (default): torch.optim.SGD / AdamW's step on every row, including the rows that were not in
  the batch or not sampled by Partial FC (weight decay and momentum still move them): those rows are updated
  after the chunk loop, a chunk at a time, with a zero gradient. ``sparse=True``: only the rows of the step's
  class set are touched (insightface's Partial FC v1; AdamW lazy as torch.optim.SparseAdam, plus decoupled
  decay of those rows); without sampling every class is in the set and the two modes agree.
* math in fp32 for 16-bit weights (the weight's dtype otherwise); the state dtype is ``state_dtype`` (default
  fp32 for 16-bit weights, the weight's dtype otherwise).
* an fp16 ``GradScaler`` cannot be honoured (the update happens in backward, before it could unscale or skip
  it): ``scaler.unscale_(optimizer)`` and ``scaler.step(optimizer)`` raise naming it, at the first step, when
  the first backward's update has already been applied with the scaled gradient (nothing in the forward or
  backward pass can see a scaler). Neither can clipping the head's weight by a global norm (it needs all of dW
  before any row is updated): ``clip_grad_norm_`` / ``clip_grad_value_`` over parameters that include it
  raise with the reason (``fused_weight.FusedWeight``); insightface clips only the backbone.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import rules
from .fused_weight import GRAD_SCALER_REFUSAL

Rows = Union[tuple, torch.Tensor]  # (start, stop) of a contiguous block, or row ids


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _load(t: torch.Tensor, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
    block = t[rows[0]:rows[1]] if isinstance(rows, tuple) else t.index_select(0, rows)
    return block if block.dtype == dtype else block.to(dtype)


def _store(t: torch.Tensor, rows: Rows, block: torch.Tensor) -> None:
    if isinstance(rows, tuple):
        target = t[rows[0]:rows[1]]
        if target.data_ptr() != block.data_ptr() or target.dtype != block.dtype:  # not updated in place
            target.copy_(block)
    else:
        t.index_copy_(0, rows, block.to(t.dtype))


class FusedOptimizer(torch.optim.Optimizer):
    """What FusedSGD and FusedAdamW share: the state layout, the step protocol, the row update."""

    #: names of the C x d state tensors of one parameter
    state_keys: tuple = ()
    #: GradScaler calls step(grad_scaler=...) instead of unscaling: so it reaches the error below
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, state_dtype: Optional[torch.dtype]):
        if state_dtype is not None and state_dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                                           torch.float16):
            raise ValueError(f"state_dtype must be a floating dtype, got {state_dtype!r}")
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self._updated = set()  # ids of parameters updated by a backward since the last step()

    # ---- the step protocol ----------------------------------------------------------------------------
    def step(self, closure=None, grad_scaler=None):
        """Close the step (the update was applied in backward); returns the closure's loss if given."""
        # GradScaler passes itself (torch <= 2.13), or, as it announces, will set grad_scale/found_inf instead
        if grad_scaler is not None or getattr(self, "grad_scale", None) is not None \
                or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(f"{type(self).__name__}: {GRAD_SCALER_REFUSAL}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if id(param) not in self._updated and param.grad is not None:
                    self._step_plain(param, group)
        self._updated.clear()
        return loss

    @torch.no_grad()
    def _step_plain(self, param: torch.Tensor, group: dict) -> None:
        """The same update rule, unfused, for a parameter with a ``.grad`` that no backward has updated: the
        head's other parameters (a binary loss's learnable bias, a Ring loss radius, Center loss centers), so
        ``FusedSGD(head.parameters(), ...)`` trains all of them. Dense: ``sparse`` is the fused weight's mode."""
        if param.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__}: sparse gradients are not supported (parameter of shape "
                               f"{tuple(param.shape)})")
        state = self._state_of(param, group)
        state["step"] += 1
        dtype = self.math_dtype_for(param)
        keys = self.state_keys_for(group)
        tensors = [param.data] + [state[k] for k in keys]
        blocks = [t if t.dtype == dtype else t.to(dtype) for t in tensors]
        grad = param.grad.to(dtype, copy=True)
        self.update_rule(blocks[0], grad, dict(zip(keys, blocks[1:])), dict(group, sparse=False), state["step"])
        for t, block in zip(tensors, blocks):
            if t is not block:
                t.copy_(block)

    def begin_update(self, param: torch.Tensor) -> tuple:
        """Called once per backward of a fused head: (group, state, step number). Refuses accumulation."""
        if id(param) in self._updated:
            raise RuntimeError(
                f"{type(self).__name__}: a second backward through the fused head before optimizer.step() "
                "(gradient accumulation) is not supported: the first backward has already applied its update. "
                "Call optimizer.step() after every backward, or accumulate with an unfused optimizer")
        group = self._group_of(param)
        state = self._state_of(param, group)
        state["step"] += 1
        self._updated.add(id(param))
        return group, state, state["step"]

    def _state_of(self, param: torch.Tensor, group: dict) -> dict:
        """``param``'s state, made (step 0, zero buffers in the state dtype) on first use."""
        state = self.state[param]
        if not state:
            dtype = self.state_dtype_for(param)
            state["step"] = 0
            for key in self.state_keys_for(group):
                state[key] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        return state

    def apply_rows(self, param: torch.Tensor, group: dict, state: dict, step: int, rows: Rows,
                   grad: torch.Tensor) -> None:
        """Update ``rows`` of ``param`` and of its state from their gradient ``grad`` (math dtype; consumed)."""
        dtype = grad.dtype
        keys = self.state_keys_for(group)
        tensors = self.row_tensors(param, group, state)
        blocks = [_load(t, rows, dtype) for t in tensors]
        self.update_rule(blocks[0], grad, dict(zip(keys, blocks[1:])), group, step)
        for t, block in zip(tensors, blocks):
            _store(t, rows, block)

    def row_tensors(self, param: torch.Tensor, group: dict, state: dict) -> list:
        """The tensors whose rows an update touches: the weight, then its C x d state."""
        return [param.data] + [state[k] for k in self.state_keys_for(group)]

    def math_dtype_for(self, param: torch.Tensor) -> torch.dtype:
        return _math_dtype(param.dtype)

    def state_dtype_for(self, param: torch.Tensor) -> torch.dtype:
        return self.state_dtype or _math_dtype(param.dtype)

    def is_sparse(self, param: torch.Tensor) -> bool:
        return bool(self._group_of(param)["sparse"])

    def _group_of(self, param: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError(f"the parameter of shape {tuple(param.shape)} is not in this {type(self).__name__}")

    # ---- what a subclass defines ------------------------------------------------------------------------
    def state_keys_for(self, group: dict) -> tuple:
        return self.state_keys

    def update_rule(self, p, g, state: dict, group: dict, step: int) -> None:
        raise NotImplementedError

    # ---- state_dict: the state keeps its own dtype ------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, except that the C x d state keeps ``state_dtype`` (torch would cast it to the parameter's
        dtype: fp32 momentum of a bf16 weight would be rounded to bf16)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            param = params[int(index)]
            self.state[param] = {
                key: (value.to(device=param.device, dtype=self.state_dtype_for(param), copy=True)
                      if isinstance(value, torch.Tensor) and key != "step" else value)
                for key, value in values.items()}
        self._updated.clear()

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["state_dtype"] = self.state_dtype
        return out


def _check_nonnegative(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


class FusedSGD(FusedOptimizer):
    """torch.optim.SGD (momentum, dampening, weight_decay, nesterov), applied in the head's backward. State:
    ``momentum_buffer`` (with momentum != 0) and ``step``."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, sparse: bool = False,
                 state_dtype: Optional[torch.dtype] = None):
        _check_nonnegative(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=bool(nesterov), sparse=bool(sparse)), state_dtype)

    def state_keys_for(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def update_rule(self, p, g, state, group, step):
        rules.sgd_rows(p, g, state.get("momentum_buffer"), lr=group["lr"], momentum=group["momentum"],
                       dampening=group["dampening"], weight_decay=group["weight_decay"],
                       nesterov=group["nesterov"], first_step=step == 1)


class FusedAdamW(FusedOptimizer):
    """torch.optim.AdamW (amsgrad off), applied in the head's backward; ``sparse=True``: lazy, as
    torch.optim.SparseAdam. State: ``exp_avg``, ``exp_avg_sq``, ``step``."""

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, sparse: bool = False, state_dtype: Optional[torch.dtype] = None):
        _check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      sparse=bool(sparse)), state_dtype)

    def update_rule(self, p, g, state, group, step):
        rule = rules.lazy_adamw_rows if group["sparse"] else rules.adamw_rows
        beta1, beta2 = group["betas"]
        rule(p, g, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1, beta2=beta2,
             eps=group["eps"], weight_decay=group["weight_decay"], step=step)
