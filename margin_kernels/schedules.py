"""Scale schedules: the scale ``s`` of a loss as a function of the training iteration.

``schedule_scale(loss, schedule)`` attaches a schedule to any loss with a scale (``s``; Circle's ``gamma``).
It is stepped as L-Softmax / SphereFace's lambda annealing is: the ``iteration`` buffer advances once per call
in training mode, before the call's value is computed (so training call k runs at ``schedule.value(k)``; an
eval call uses the value of the last training call), and it is saved in ``state_dict`` with the loss's other
state (``margin.scale_schedule.iteration``). A call at iteration k equals the same loss built with
``s = schedule.value(k)``: the schedule only sets ``loss.s`` before anything reads it.

The scale is a host float (the kernels take it as a constant), so the iteration is mirrored on the host: no
device sync per step. Under ``torch.compile`` each distinct scale value is a new constant of the graph, so a
schedule that changes every step recompiles every step; HeatedUp changes once.

* ``HeatedUp(s_start, s_end, at)``: Zhang et al. 2018 ("heated-up" softmax embedding): train at a large scale
  (a low temperature) and drop to a small one late in training, s_start for iterations <= at, s_end after.
* ``LinearScale(s_start, s_end, steps)``: s_start + (s_end - s_start) min(k / steps, 1).
* ``CosineScale(s_start, s_end, steps)``: s_end + (s_start - s_end) (1 + cos(pi min(k / steps, 1))) / 2.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .losses.base import MarginLoss, _check_positive


def _check_steps(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class ScaleSchedule(nn.Module):
    """Base: subclasses define ``value(iteration) -> float`` (iteration >= 0; 0 before any training call)."""

    def __init__(self, s_start: float, s_end: float):
        super().__init__()
        _check_positive("s_start", s_start)
        _check_positive("s_end", s_end)
        self.s_start, self.s_end = float(s_start), float(s_end)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self._host_iteration = 0  # the buffer's value, kept on the host so no step reads the device

    def value(self, iteration: int) -> float:
        raise NotImplementedError

    def advance(self, training: bool) -> float:
        """The scale of this call: in training mode the iteration advances first (as the lambda annealing)."""
        if training:
            self._host_iteration += 1
            self.iteration.add_(1)
        return self.value(self._host_iteration)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_iteration = int(self.iteration)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._hparams().items())

    def _hparams(self) -> dict:
        return {"s_start": self.s_start, "s_end": self.s_end}


class HeatedUp(ScaleSchedule):
    """s_start up to iteration ``at``, then s_end (Zhang et al. 2018 lower the scale for the last epochs)."""

    def __init__(self, s_start: float = 16.0, s_end: float = 4.0, at: int = 10000):
        super().__init__(s_start, s_end)
        _check_steps("at", at, 0)
        self.at = at

    def value(self, iteration: int) -> float:
        return self.s_start if iteration <= self.at else self.s_end

    def _hparams(self):
        return {"s_start": self.s_start, "s_end": self.s_end, "at": self.at}


class LinearScale(ScaleSchedule):
    def __init__(self, s_start: float, s_end: float, steps: int):
        super().__init__(s_start, s_end)
        _check_steps("steps", steps, 1)
        self.steps = steps

    def value(self, iteration: int) -> float:
        return self.s_start + (self.s_end - self.s_start) * min(iteration / self.steps, 1.0)

    def _hparams(self):
        return {"s_start": self.s_start, "s_end": self.s_end, "steps": self.steps}


class CosineScale(LinearScale):
    def value(self, iteration: int) -> float:
        progress = min(iteration / self.steps, 1.0)
        return self.s_end + (self.s_start - self.s_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def has_scale(loss: MarginLoss) -> bool:
    """Whether the loss's logits are multiplied by ``s`` (Softmax, L-Softmax and SphereFace have none)."""
    hparams = loss._hparams()
    return "s" in hparams or "gamma" in hparams


def schedule_scale(loss: MarginLoss, schedule: ScaleSchedule) -> MarginLoss:
    """Attach ``schedule`` to ``loss`` (as its ``scale_schedule`` submodule) and set ``loss.s`` to the value at
    the schedule's current iteration; returns ``loss``."""
    if not isinstance(loss, MarginLoss):
        raise TypeError(f"loss must be a margin_kernels loss, got {type(loss).__name__}")
    if not isinstance(schedule, ScaleSchedule):
        raise TypeError(f"schedule must be a margin_kernels ScaleSchedule (HeatedUp, LinearScale, CosineScale), "
                        f"got {type(schedule).__name__}")
    if not has_scale(loss):
        raise ValueError(f"schedule_scale: {type(loss).__name__} has no scale s to schedule")
    loss.scale_schedule = schedule
    loss.s = schedule.value(schedule._host_iteration)
    return loss
