"""The contract between a loss description and the backends that compute it.

A margin loss is softmax cross-entropy over logits z_ij (docs/losses.md). Every backend splits it the same way:

* the *negative* logits of all B x C pairs are ``scale * g(c_ij)`` with ``g`` one of the kinds in
  ``negatives.py``; kernels stream these in class tiles and return only the per-row log-sum-exp over the
  negatives (the target column excluded);
* the *target* logit of each row involves one pair, so it is computed here, outside any kernel, in plain
  differentiable PyTorch on B-vectors: any formula works and autograd differentiates it;
* per-row inputs that negatives need (a threshold from the target cosine, CurricularFace's t) are computed
  here without gradient, once per call, after the state update.

A subclass states its formulas in ``target_logit`` (and ``regularizer``); kernels never restate them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..norms import floored, normalized, row_norms
from .negatives import NegativeKind, NegativeSpec
from .reductions import NO_CLAMP, ReductionKind



@dataclass
class RowInputs:
    """What a target formula may depend on, one entry per row (all B-vectors).

    ``cos`` is the kernel's cosine of the target pair: x_eff_i . w_{y_i} divided by ||w_{y_i}|| when the loss
    normalises weights, where x_eff is x/||x|| or x itself (see ``MarginLoss.normalize_features``). It is 0
    on ignored rows. ``feature_norm`` is ||x_i|| and ``weight_norm`` is ||w_{y_i}|| (1 on ignored rows).
    All three carry gradients in ``target_logit``; they are detached in ``update_state``/``row_params``.
    """

    cos: torch.Tensor
    feature_norm: torch.Tensor
    weight_norm: torch.Tensor
    valid: torch.Tensor

    def detach(self) -> "RowInputs":
        return RowInputs(self.cos.detach(), self.feature_norm.detach(), self.weight_norm.detach(), self.valid)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum().clamp_min(1)
    return torch.where(valid, values, torch.zeros_like(values)).sum() / count


def cos_plus_margin(c: torch.Tensor, m) -> torch.Tensor:
    """cos(theta + m) with theta = arccos(clamp(c, -1, 1)), written as c cos m - sin theta sin m.

    ``1 - c^2`` is floored at 1e-12 so the exact gradient stays finite at |c| = 1.
    """
    c = c.clamp(-1.0, 1.0)
    sin_theta = torch.sqrt((1.0 - c * c).clamp_min(1e-12))
    cos_m = math.cos(m) if isinstance(m, float) else torch.cos(m)
    sin_m = math.sin(m) if isinstance(m, float) else torch.sin(m)
    return c * cos_m - sin_theta * sin_m


#: what ArcFace's target does where theta + m would pass pi (cos(theta + m) rises again there), by the code
#: each rule comes from: "th_mm" insightface before 2022-12 and most papers' code (c - sin(pi - m) m),
#: "easy" insightface's easy margin (c where c <= 0), "margin_am" FaceX-Zoo (c - margin_am), "none" insightface
#: arcface_torch since 2022-12 (cos(theta + m) everywhere)
ARC_RULES = ("th_mm", "easy", "margin_am", "none")


def check_margin_am(margin_am: float, mode: str) -> None:
    """``margin_am`` is FaceX-Zoo's fallback past pi - m (the "margin_am" rule of ``arc_target``): only the
    losses' mode="facexzoo" takes it."""
    if margin_am and mode != "facexzoo":
        raise ValueError(f"margin_am is FaceX-Zoo's fallback: use it with mode='facexzoo', not {mode!r}")


def arc_target(c: torch.Tensor, m, rule: str = "th_mm", margin_am: float = 0.0) -> torch.Tensor:
    """ArcFace's cos(theta + m) with one of ``ARC_RULES`` for targets where theta + m would pass pi.

    th_mm: where c <= cos(pi - m) use c - sin(pi - m) * m; easy: keep c where c <= 0; margin_am: where
    c <= cos(pi - m) use c - margin_am; none: no rule. ``m`` may be a float or a per-row tensor (MagFace).
    """
    cos_theta_m = cos_plus_margin(c, m)
    if rule == "none":
        return cos_theta_m
    if rule == "easy":
        return torch.where(c > 0, cos_theta_m, c)
    threshold = math.cos(math.pi - m) if isinstance(m, float) else torch.cos(math.pi - m)
    if rule == "margin_am":
        return torch.where(c > threshold, cos_theta_m, c - margin_am)
    if rule != "th_mm":
        raise ValueError(f"rule must be one of {ARC_RULES}, got {rule!r}")
    mm = math.sin(math.pi - m) * m if isinstance(m, float) else torch.sin(math.pi - m) * m
    return torch.where(c > threshold, cos_theta_m, c - mm)


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` forward, gradient of ``surrogate`` backward (insightface's no_grad margins)."""
    return surrogate + (value - surrogate).detach()


# ---- hyperparameter rules: checked on every assignment (``MarginLoss.params``) ----------------------------
def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive(name: str, value) -> float:
    """A positive finite number (scales, norms)."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def in_range(low: float, high: float):
    """A rule: a number in [low, high] (high may be math.inf; NaN never passes)."""
    def rule(name: str, value) -> float:
        if not _is_real(value) or not (low <= value <= high):
            raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        return float(value)
    return rule


def integer_in(low: int, high: int):
    """A rule: an int in [low, high]."""
    def rule(name: str, value) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        return value
    return rule


def one_of(*choices):
    """A rule: one of ``choices``."""
    def rule(name: str, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value
    return rule


def flag(name: str, value) -> bool:
    """A bool (0/1 ints are accepted as the constructors always did: bool(value))."""
    if not isinstance(value, (bool, int)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def optional_flag(name: str, value) -> Optional[bool]:
    """None (a default derived from other settings when used) or a bool (``flag``)."""
    return None if value is None else flag(name, value)


class _ParamsReady(type):
    """Metaclass of MarginLoss: once the outermost constructor returns, the cross-parameter checks run and
    from then on run after every assignment (not during construction, when not every name is set yet)."""

    def __call__(cls, *args, **kwargs):
        loss = super().__call__(*args, **kwargs)
        loss.finish_init()
        return loss


class MarginLoss(nn.Module, metaclass=_ParamsReady):
    """Base of every loss description. Subclasses set the class attributes and override the hooks.

    Hyperparameters are validated where they are set, in the constructor and on any later assignment
    (``loss.s = -64`` raises): ``params`` maps each name to a rule ``(name, value) -> stored value`` that raises
    a ValueError/TypeError naming it (``positive``, ``in_range(lo, hi)``, ``integer_in``, ``one_of``, ``flag``).
    A subclass lists only its own names (the rules of base classes are inherited) and assigns plainly in
    ``__init__`` (``self.m = m``). Constraints between parameters go in ``check_params`` (called after each
    assignment once the constructor has finished; a failing assignment is undone).
    """

    #: name -> rule, merged over the class hierarchy (see the class docstring)
    params: dict = {"s": positive}
    #: constructor values that only shaped state at construction (a seeded generator, an initial scale or
    #: bias): assigning one afterwards would change nothing, so it raises an AttributeError naming it
    fixed_after_init: tuple = ()

    #: the kernels dot x/||x|| (True) or x itself (False) with the weights
    normalize_features: bool = True
    #: the kernels divide each class's dot product by ||w_j|| (True) or not
    normalize_weight: bool = True
    #: the shape of the negative function
    negative_kind: NegativeKind = NegativeKind.IDENTITY
    #: rows of the weight per class (sub-center ArcFace's K): class j owns rows [j K, (j + 1) K) and its cosine
    #: is the max over them, taken inside every backend's tile (``margin_kernels.subcenters``)
    sub_centers: int = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("params", {}))
        cls._rules = merged

    #: how the negatives are reduced per row: softmax's log-sum-exp, or the binary family's softplus sum
    reduction_kind: ReductionKind = ReductionKind.LSE
    #: why the heads refuse Partial FC (sample_rate < 1) for this loss; None: sampling is supported
    no_partial_fc_reason: Optional[str] = None

    def __init__(self, s: float = 1.0):
        super().__init__()
        self.s = s

    def __setattr__(self, name: str, value) -> None:
        if name in type(self).fixed_after_init and self.__dict__.get("_params_ready", False):
            raise AttributeError(f"{name} of {type(self).__name__} only sets its initial state at construction; "
                                 f"construct a new {type(self).__name__}({name}=...) instead")
        rule = type(self)._rules.get(name)
        if rule is None:
            return super().__setattr__(name, value)
        checked = rule(name, value)
        had_value = name in self.__dict__  # no sentinel object(): dynamo traces this when a schedule sets s
        previous = self.__dict__.get(name)
        super().__setattr__(name, checked)
        if not self.__dict__.get("_params_ready", False):
            return
        try:
            self.check_params()
        except Exception:
            if had_value:
                super().__setattr__(name, previous)
            else:
                del self.__dict__[name]
            raise

    def check_params(self) -> None:
        """Constraints between hyperparameters (raise a ValueError naming them); the base has none."""

    def finish_init(self) -> None:
        """Called when the constructor has returned (``_ParamsReady``): from now on ``check_params`` runs
        after each assignment."""
        self.check_params()
        self.__dict__["_params_ready"] = True

    # ---- what kernels see -------------------------------------------------------------------------------
    def negative_spec(self) -> NegativeSpec:
        a, b = self.negative_constants()
        return NegativeSpec(self.negative_kind, self.s, float(a), float(b), self.reduction_kind,
                            float(self.logit_clamp()))

    def logit_clamp(self) -> float:
        """The binary family's clamp of every logit before its softplus (reductions.py); inf: none."""
        return NO_CLAMP

    def logit_shift(self) -> Optional[torch.Tensor]:
        """A differentiable scalar added to every negative logit (the binary family's bias); None: 0."""
        return None

    def row_loss(self, target: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Per-row loss from the target logit and the reduced negatives (here their log-sum-exp): softmax
        cross-entropy, logaddexp(lse_neg, z_y) - z_y. The binary family overrides it."""
        return torch.logaddexp(negatives, target) - target

    def negative_constants(self) -> tuple[float, float]:
        return 0.0, 0.0

    # ---- per-call hooks, in the order the driver calls them ---------------------------------------------
    def prepare_features(self, features: torch.Tensor, acc_dtype: torch.dtype):
        """(x_eff in the storage dtype, ||x|| in acc_dtype), both differentiable."""
        if not self.normalize_features:
            return features, row_norms(features, acc_dtype)
        x_eff, norm = normalized(features, acc_dtype)
        return x_eff.to(features.dtype), norm

    def update_state(self, rows: RowInputs) -> None:
        """Advance running state (training mode only; called once per call, under no_grad)."""

    def row_params(self, rows: RowInputs) -> torch.Tensor:
        """(B, 2) per-row inputs of the negative function: threshold T_i and auxiliary U_i (no gradient)."""
        return torch.zeros(rows.cos.shape[0], 2, dtype=rows.cos.dtype, device=rows.cos.device)

    def target_logit(self, rows: RowInputs) -> torch.Tensor:
        raise NotImplementedError

    def regularizer(self, rows: RowInputs) -> Optional[torch.Tensor]:
        """Per-row term added to each row's loss (MagFace's g(a)); None for most losses."""
        return None

    # ---- optional per-row statistics over the negatives (margin_kernels/row_statistics.py) ----------------
    def statistics_request(self, rows: RowInputs, num_classes: int):
        """A ``row_statistics.StatisticsRequest`` when the loss needs a statistic of each row's negatives
        before ``begin_call`` (called every call, before it, on detached rows; ``num_classes`` is the number
        of classes of the whole problem); None for most losses."""
        return None

    def receive_statistics(self, rows: RowInputs, statistics: torch.Tensor) -> None:
        """The requested statistic, over every class (all shards), before ``begin_call``."""

    #: True when the loss wants ``end_call`` to see the forward's negative lse (AdaCos' lagged mode)
    observes_negative_lse: bool = False

    def end_call(self, rows: RowInputs, lse_neg: torch.Tensor) -> None:
        """After the forward, training mode only, under no_grad: the per-row lse over the negatives."""

    def begin_call(self, rows: RowInputs) -> torch.Tensor:
        """State update (if training) then the row params; the one entry point every backend uses."""
        with torch.no_grad():
            detached = rows.detach()
            schedule = self._modules.get("scale_schedule")  # margin_kernels.schedules.schedule_scale
            if schedule is not None:
                self.s = schedule.advance(self.training)
            if self.training:
                self.update_state(detached)
            return self.row_params(detached)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._hparams().items())

    def _hparams(self) -> dict:
        return {"s": self.s}


MarginLoss._rules = dict(MarginLoss.params)


def _check_positive(name: str, value) -> None:
    positive(name, value)


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_range(name: str, value, low: float, high: float) -> None:
    in_range(low, high)(name, value)
