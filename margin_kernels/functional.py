"""``margin_cross_entropy``: the one driver every fused backend runs behind.

Per call: check the arguments, normalise the features (B x d, autograd), compute the B target pairs, let the
loss update its state and produce per-row inputs, run the backend's class-tiled log-sum-exp over the negatives
(a custom op with a hand-written backward), then combine with the target logits on B-vectors:

    L_i = logaddexp(lse_neg_i, z_iy) - z_iy  (+ the loss's per-row regulariser)

The steps are separate functions (``prepare_rows``, ``initial_target_pairs``, ``start_call``, ``negative_lse``,
``finish_loss``) so the model-parallel head (``margin_kernels.distributed``) composes the same ones around its
collectives: no formula and no loss tail exists twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import ops, reference, row_statistics
from .backends import keeps_tiles, resolve_backend
from .backends.chunk_loop import num_columns
from .backends.contract import OpConfig, OpInputs
from .backends.kept_tiles import keep_columns
from .memory_budget import budget_bytes
from .losses.base import MarginLoss, RowInputs
from .precision import product_mode
from .batch_reduction import accumulation_dtype, empty_batch_loss, reduce_rows
from .validation import (NON_FINITE_WEIGHT, bad_labels, check_arguments, check_no_bad_rows,
                         value_check_mode)


@dataclass
class PreparedRows:
    """Per-row quantities that depend on the features only (rows are independent of each other)."""

    x_eff: torch.Tensor        # (B, d) storage dtype: x/||x|| or x, what the kernels dot with the weights
    feature_norm: torch.Tensor  # (B,) acc dtype, ||x_i||, differentiable
    acc: torch.dtype            # accumulation dtype of the lse and gradient math


def prepare_rows(features: torch.Tensor, margin: MarginLoss) -> PreparedRows:
    acc = accumulation_dtype(features.dtype)
    x_eff, feature_norm = margin.prepare_features(features, acc)
    return PreparedRows(x_eff, feature_norm, acc)


def column_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Class ids as the op's column ids: ignored rows become -1 (no target). Widened first (``bad_labels``)."""
    labels = labels.long()
    return torch.where(labels != ignore_index, labels, torch.full_like(labels, -1))


class SafeColumns(NamedTuple):
    """What the kernels may be given whatever the labels and class ids hold (``safe_columns``)."""

    columns: torch.Tensor      # (B,) column ids in [0, num_columns), -1 for rows without a target
    usable: torch.Tensor       # (B,) bool: rows with a target column (what the loss's state sees)
    poisoned: torch.Tensor     # (B,) bool: rows whose loss is NaN (a label or class id out of range)
    class_index: Optional[torch.Tensor]  # int64, clamped into [0, C) (a bad id poisons every row instead)


def safe_columns(labels: torch.Tensor, ignore_index: int, num_columns: int, class_index: Optional[torch.Tensor],
                 num_classes: int) -> SafeColumns:
    """Labels and class ids that can never be read out of bounds, without a host sync (so it also holds with
    ``check_values=False`` and under torch.compile, where nothing stops a bad value first). A label outside
    [0, num_columns) that is not ``ignore_index`` gets no target column and a NaN loss; a class id outside
    [0, C) makes every row's loss NaN (the op clamps ids before any gather): never a finite wrong value."""
    labels = labels.long()  # widened before any comparison: a uint8 label 255 is not ignore_index -1
    bad = bad_labels(labels, num_columns, ignore_index)
    usable = (labels != ignore_index) & ~bad
    columns = torch.where(usable, labels, torch.full_like(labels, -1)).long()
    if class_index is not None:
        class_index = class_index.long()
        bad = bad | ((class_index < 0) | (class_index >= num_classes)).any()
        class_index = class_index.clamp(0, num_classes - 1)  # the NaN rows' gathers (regularisers too) stay in W
    return SafeColumns(columns, usable, bad, class_index)


def initial_target_pairs(x_eff: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor,
                         class_index: Optional[torch.Tensor], margin: MarginLoss, acc: torch.dtype) -> ops.TargetPairs:
    """The target pairs (cos, ||w_y||, weight row; 0, 1 and any row on rows without a target column), without
    gradient: what the loss's state update and row params see, computed once per call and passed through the
    op, which gives cos and norm their gradient and adds the norms' share of dW at those rows."""
    with torch.no_grad():
        return ops.target_pairs(x_eff, weight, columns, class_index, margin.normalize_weight, acc,
                                margin.sub_centers)


def negative_statistics(margin: MarginLoss, request: row_statistics.StatisticsRequest, x_eff: torch.Tensor,
                        weight: torch.Tensor, columns: torch.Tensor, class_index: Optional[torch.Tensor],
                        backend: str, chunk_size: Optional[int]) -> torch.Tensor:
    """The statistic a loss asked for (``MarginLoss.statistics_request``) over these columns, no gradient."""
    return row_statistics.chunked(x_eff, weight, columns, class_index, request, margin.normalize_weight, backend,
                                  chunk_size, product_mode(weight.dtype, weight.device.type))


def start_call(margin: MarginLoss, rows: RowInputs, acc: torch.dtype) -> torch.Tensor:
    """The loss's once-per-call state update (training mode) and its (B, 2) per-row negative parameters."""
    return margin.begin_call(rows).to(acc).contiguous()


def negative_lse(x_eff: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor, row_params: torch.Tensor,
                 class_index: Optional[torch.Tensor], targets: ops.TargetPairs, margin: MarginLoss, backend: str,
                 chunk_size: Optional[int], grad_filter: float, product: Optional[str] = None,
                 shift: Optional[torch.Tensor] = None, memory_budget=None, sink_factory=None):
    """The custom op: (lse over the negatives, or their softplus sum for the binary family, target cos,
    target ||w||), each (B,), differentiable. The target pair goes in as computed by ``initial_target_pairs``
    and comes out attached to the op's backward. ``product``: the product mode (``precision.PRODUCTS``), by
    default decided here from autocast and the matmul precision; a caller that turns autocast off around the
    op decides it before. ``shift``: the logit shift as ``logit_shift`` makes it (the default), or wrapped by
    the caller (the model-parallel head sums its gradient over the ranks). ``memory_budget``
    (``margin_kernels.memory_budget``) sets how many weight rows' forward tiles the op keeps for its backward
    (an op output, so torch.compile sees it). ``sink_factory``: a fused optimizer's gradient sink
    (``HeadBase.gradient_sink``), None for none."""
    if product is None:
        product = product_mode(weight.dtype, weight.device.type)
    keep = 0
    if memory_budget and keeps_tiles(backend, margin.sub_centers):
        keep = keep_columns(budget_bytes(memory_budget, x_eff.device, x_eff.shape[1]), x_eff.shape[0],
                            ops.weight_rows(weight, class_index, margin.sub_centers), row_params.dtype)
    config = OpConfig(margin.negative_spec(), margin.normalize_weight, backend, chunk_size or 0, float(grad_filter),
                      product, margin.sub_centers, keep)
    inputs = OpInputs(x_eff.contiguous(), weight, columns, row_params, class_index)
    lse, cos, norm, _kept = ops.margin_lse(inputs, targets, logit_shift(margin, row_params) if shift is None else shift,
                                           config, sink_factory)
    return lse, cos, norm


def logit_shift(margin: MarginLoss, row_params: torch.Tensor) -> torch.Tensor:
    """The loss's shift of every negative logit as the op's (1,) input in the accumulation dtype (its
    gradient flows back to the loss's bias); zero for losses without one."""
    shift = margin.logit_shift()
    if shift is None:
        return row_params.new_zeros(1)
    return shift.reshape(1).to(device=row_params.device, dtype=row_params.dtype)


def check_weight_values(lse_neg: torch.Tensor, rows: RowInputs, mode: Optional[str]) -> None:
    """The forward's flag for a NaN/Inf weight: every backend's lse is NaN for a row that met a non-finite
    class among its negatives (losses/negatives.py), its target cosine is non-finite when the target class
    is. B values, read after the op: no extra pass over W."""
    bad = rows.valid & (torch.isnan(lse_neg.detach()) | ~torch.isfinite(rows.cos.detach()))
    check_no_bad_rows(bad, NON_FINITE_WEIGHT, mode)


def finish_loss(margin: MarginLoss, lse_neg: torch.Tensor, rows: RowInputs, reduction: str,
                poisoned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row loss from the reduced negatives (their lse, or the binary family's softplus sum) and the target
    logit (``MarginLoss.row_loss``), plus the regulariser, reduced. ``poisoned`` rows (``safe_columns``) get a
    NaN loss and count as rows of the mean."""
    target = margin.target_logit(rows)
    if margin.training and margin.observes_negative_lse:  # after the target: it uses this call's state
        with torch.no_grad():
            margin.end_call(rows.detach(), lse_neg.detach())
    per_row = margin.row_loss(target, lse_neg)
    regularizer = margin.regularizer(rows)
    if regularizer is not None:
        per_row = per_row + regularizer
    if poisoned is None:
        return reduce_rows(per_row, rows.valid, reduction)
    per_row = torch.where(poisoned, torch.full_like(per_row, float("nan")), per_row)
    return reduce_rows(per_row, rows.valid | poisoned, reduction)


def margin_cross_entropy(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: MarginLoss, *,
                         backend: str = "auto", reduction: str = "mean", ignore_index: int = -1,
                         chunk_size: Optional[int] = None, class_index: Optional[torch.Tensor] = None,
                         grad_filter: float = 0.0, check_values: bool = True,
                         memory_budget=None) -> torch.Tensor:
    """Margin softmax cross-entropy of ``features`` (B, d) against class ``weight`` (C, d); (C K, d) for a loss
    with K sub-centers per class (``SubCenterArcFace``: class j's rows j K .. j K + K - 1).

    Never builds the B x C logits (except ``backend="reference"``, the full-logit ground truth). ``labels``
    are class ids in [0, C), or ``ignore_index`` for rows that contribute nothing. With ``class_index`` (K class
    ids, Partial FC) only those classes are used and ``labels`` index into ``class_index``. The loss is
    returned in fp32 (fp64 for fp64 inputs). ``grad_filter > 0`` lets the backward skip the dx/dW products of a
    class tile whose every |dL/dc_ij| is below it (Cut Cross-Entropy's gradient filtering; off by default; the
    loss is unchanged, see ``margin_kernels.grad_filter_stats()``).

    ``check_values`` (finite features and weights, labels and class ids in range, no duplicate class ids):
    on CPU a ValueError naming the argument; on a GPU and under torch.compile the same conditions without a
    host sync (``torch._assert_async``; see ``validation.value_check_mode``). With ``check_values=False``
    nothing is checked and nothing is ever read out of bounds: a bad label gives its row a NaN loss, a bad
    class id or a NaN/Inf feature or weight the loss NaN; duplicated class ids are counted twice.

    ``memory_budget`` (bytes, ``"auto"``, or None/0 = recompute) lets the forward keep its B x chunk tiles so
    the backward skips its recompute GEMM (``margin_kernels.memory_budget``); the loss and gradients are the
    same either way.
    """
    check_arguments(features, weight, labels, margin, backend=backend, reduction=reduction,
                    ignore_index=ignore_index, chunk_size=chunk_size, class_index=class_index,
                    grad_filter=grad_filter, check_values=check_values, memory_budget=memory_budget)
    return checked_margin_cross_entropy(features, weight, labels, margin, backend=backend, reduction=reduction,
                                        ignore_index=ignore_index, chunk_size=chunk_size,
                                        class_index=class_index, grad_filter=grad_filter,
                                        check_values=check_values, memory_budget=memory_budget)


def checked_margin_cross_entropy(features, weight, labels, margin: MarginLoss, *, backend: str, reduction: str,
                                 ignore_index: int, chunk_size: Optional[int], class_index: Optional[torch.Tensor],
                                 grad_filter: float, check_values: bool = True,
                                 memory_budget=None) -> torch.Tensor:
    """``margin_cross_entropy`` on arguments its caller has already checked (``validation.check_arguments``)."""
    safe = safe_columns(labels, ignore_index, num_label_columns(weight, class_index, margin), class_index,
                        weight.shape[0] // margin.sub_centers)
    return columns_cross_entropy(features, weight, safe, margin, backend=backend, reduction=reduction,
                                 chunk_size=chunk_size, grad_filter=grad_filter, check_values=check_values,
                                 memory_budget=memory_budget)


def num_label_columns(weight: torch.Tensor, class_index: Optional[torch.Tensor], margin: MarginLoss) -> int:
    """How many values a label may take: the classes of ``weight`` (rows / K), or the entries of ``class_index``."""
    return num_columns(weight, class_index, margin.sub_centers)


def columns_cross_entropy(features, weight, safe: SafeColumns, margin: MarginLoss, *, backend: str, reduction: str,
                          chunk_size: Optional[int], grad_filter: float, check_values: bool = True,
                          memory_budget=None, sink_factory=None) -> torch.Tensor:
    """The loss from labels already made safe (``safe_columns``, once per call: the heads remap them for
    Partial FC in between). ``sink_factory``: a fused optimizer's gradient sink (``HeadBase.gradient_sink``)."""
    if backend == "reference":  # the ground truth takes labels: a bad one as an out-of-range id, -2
        labels = torch.where(safe.poisoned, torch.full_like(safe.columns, -2), safe.columns)
        return reference.margin_cross_entropy(features, weight, labels, margin, reduction=reduction,
                                              ignore_index=-1, class_index=safe.class_index,
                                              check_values=check_values)
    if features.shape[0] == 0:
        return empty_batch_loss(features, weight if sink_factory is None else None, reduction)
    if sink_factory is not None and not bool((safe.usable | safe.poisoned).any()):
        # a fused update with no row to learn from would still step every row (decay, momentum): an all-ignored
        # batch changes no state. Eager only (fused heads refuse torch.compile), so the host read is allowed.
        return reduce_rows(empty_batch_loss(features, None, "none", features.shape[0]), safe.usable, reduction)
    backend = resolve_backend(backend, features.device)
    columns, valid, class_index = safe.columns, safe.usable, safe.class_index

    prepared = prepare_rows(features, margin)
    targets = initial_target_pairs(prepared.x_eff, weight, columns, class_index, margin, prepared.acc)
    rows0 = RowInputs(targets.cos, prepared.feature_norm, targets.norm, valid)
    request = margin.statistics_request(rows0.detach(), weight.shape[0])
    if request is not None:
        margin.receive_statistics(rows0.detach(), negative_statistics(margin, request, prepared.x_eff, weight, columns,
                                                                      class_index, backend, chunk_size))
    row_params = start_call(margin, rows0, prepared.acc)
    lse_neg, cos, weight_norm = negative_lse(prepared.x_eff, weight, columns, row_params, class_index, targets,
                                             margin, backend, chunk_size, grad_filter, memory_budget=memory_budget,
                                             sink_factory=sink_factory)
    rows = RowInputs(cos, prepared.feature_norm, weight_norm, valid)
    check_weight_values(lse_neg, rows, value_check_mode(check_values, features.device))
    return finish_loss(margin, lse_neg, rows, reduction, safe.poisoned)
