"""AdaCos (Zhang et al., CVPR 2019): no margin, z_ij = s c_ij for every class, with the scale s chosen from the
number of classes (fixed) or from the batch's statistics (dynamic)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .statistics import NEGATIVE_LSE, StatisticsRequest
from .base import MarginLoss, RowInputs
from .negatives import NegativeKind, NegativeSpec

#: when the dynamic scale is computed from B_avg (docs/losses.md, AdaCos)
UPDATES = ("faithful", "lagged")
#: FaceX-Zoo clamps the cosines by this much before arccos
ACOS_EPS = 1e-7


def fixed_scale(num_classes: int) -> float:
    """sqrt(2) log(C - 1), the paper's fixed scale and the dynamic one's start (C - 1 floored at 2: a problem
    with fewer than three classes would give a scale <= 0)."""
    return math.sqrt(2.0) * math.log(max(num_classes - 1, 2))


class AdaCos(MarginLoss):
    """z_ij = s c_ij for every j (target included), s in the buffer ``scale``.

    ``num_classes`` (FaceX-Zoo's argument) sets the initial scale sqrt(2) log(C - 1); None takes C from the
    first call (the number of classes of ``weight``, all shards in the model-parallel head). ``dynamic=False``
    keeps that scale. ``dynamic=True`` (FaceX-Zoo's head) re-chooses it in training mode:

        B_avg = mean over rows of sum_{j != y_i} exp(s_prev c_ij),  theta_med = median_i arccos(c_iy)
        s = log(B_avg) / cos(min(pi/4, theta_med))

    (median: torch.median, the lower of the two middle values; cosines clamped to +-(1 - 1e-7) first; no
    gradient.) ``update="faithful"`` is FaceX-Zoo's order: B_avg of *this* batch at the previous scale, then
    this call's loss at the new one; the lse at the previous scale is one extra forward pass over the classes
    (the backend's own kernel, no backward). ``update="lagged"`` needs no extra pass: B_avg is the forward's
    own negative log-sum-exp at the scale it used, so the scale chosen from batch t is the one batch t + 1
    uses (theta_med from batch t as well). Ignored rows take no part; a call with no valid row, or whose
    B_avg is 0 (no negatives), keeps the scale.

    The scale reaches the kernels as a per-row value (negative kind ROW_SCALE), never as a Python float: no
    host sync per step, and torch.compile traces the state like any other buffer.
    """

    negative_kind = NegativeKind.ROW_SCALE
    fixed_after_init = ("num_classes",)  # the initial scale

    @property
    def observes_negative_lse(self) -> bool:  # type: ignore[override]
        """The lagged update reads the forward's lse (derived on use: ``dynamic``/``update`` may be assigned)."""
        return self.dynamic and self.update == "lagged"

    def __init__(self, num_classes: Optional[int] = None, dynamic: bool = True, update: str = "faithful"):
        super().__init__(1.0)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 3):
            raise ValueError(f"num_classes must be an int >= 3 or None, got {num_classes!r}")
        if not isinstance(dynamic, bool):
            raise ValueError(f"dynamic must be a bool, got {dynamic!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        self.num_classes, self.dynamic, self.update = num_classes, dynamic, update
        initial = math.nan if num_classes is None else fixed_scale(num_classes)
        # float64: the scale is a B-independent scalar that every later step is computed from
        self.register_buffer("scale", torch.full((), initial, dtype=torch.float64))
        self._prev_lse: Optional[torch.Tensor] = None

    # ---- the scale's life cycle ------------------------------------------------------------------------
    def _start(self, num_classes: int) -> None:
        if self.num_classes is None:  # a where, not an if on the value: no host sync, traceable
            self.scale.copy_(torch.where(torch.isnan(self.scale), fixed_scale(num_classes), self.scale))

    def statistics_request(self, rows: RowInputs, num_classes: int):
        self._start(num_classes)
        if not (self.training and self.dynamic and self.update == "faithful"):
            return None
        return StatisticsRequest(NEGATIVE_LSE, NegativeSpec(NegativeKind.ROW_SCALE, 1.0), self._row_params(rows))

    def receive_statistics(self, rows: RowInputs, statistics: torch.Tensor) -> None:
        self._prev_lse = statistics

    def update_state(self, rows: RowInputs) -> None:
        if self._prev_lse is not None:
            self._rescale(rows, self._prev_lse)
            self._prev_lse = None

    def end_call(self, rows: RowInputs, lse_neg: torch.Tensor) -> None:
        self._rescale(rows, lse_neg)

    def _rescale(self, rows: RowInputs, lse_neg: torch.Tensor) -> None:
        valid = rows.valid
        count = valid.sum()
        b_avg = torch.where(valid, torch.exp(lse_neg.to(rows.cos.dtype)), torch.zeros_like(rows.cos)).sum() \
            / count.clamp_min(1)
        theta = torch.acos(rows.cos.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS))
        # the lower median of the valid rows: invalid rows sort last (inf), then take index (count - 1) // 2
        ranked = torch.sort(torch.where(valid, theta, torch.full_like(theta, math.inf))).values
        middle = ((count - 1).clamp_min(0) // 2).reshape(1)  # index_select: a tensor index, no host sync
        theta_med = ranked.index_select(0, middle).squeeze(0)
        new = torch.log(b_avg) / torch.cos(torch.clamp(theta_med, max=math.pi / 4))
        keep = (count == 0) | ~(b_avg > 0)
        self.scale.copy_(torch.where(keep, self.scale, new.to(self.scale.dtype)))

    # ---- what kernels and the target see ----------------------------------------------------------------
    def _row_params(self, rows: RowInputs) -> torch.Tensor:
        scale = self.scale.to(rows.cos.dtype).expand_as(rows.cos)
        return torch.stack([torch.zeros_like(rows.cos), scale], dim=1)

    def row_params(self, rows: RowInputs) -> torch.Tensor:
        return self._row_params(rows)

    def target_logit(self, rows: RowInputs):
        return self.scale.to(rows.cos.dtype, copy=True) * rows.cos  # a copy: end_call may update the buffer

    def _hparams(self):
        return {"num_classes": self.num_classes, "dynamic": self.dynamic, "update": self.update}
