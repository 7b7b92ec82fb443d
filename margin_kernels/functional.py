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
from typing import Optional

import torch

from . import ops, reference
from .backends import resolve_backend
from .losses.base import MarginLoss, RowInputs
from .precision import product_mode
from .reduction import accumulation_dtype, empty_batch_loss, reduce_rows
from .validation import check_arguments


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
    """Class ids as the op's column ids: ignored rows become -1 (no target)."""
    return torch.where(labels != ignore_index, labels, torch.full_like(labels, -1)).long()


def initial_target_pairs(x_eff: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor,
                         class_index: Optional[torch.Tensor], margin: MarginLoss, acc: torch.dtype):
    """(cos, ||w_y||) of the target pairs, without gradient (0 and 1 on rows without a target column): what the
    loss's state update and row params see, computed once per call and passed through the op, which gives
    them their gradient."""
    with torch.no_grad():
        return ops.target_pairs(x_eff, weight, columns, class_index, margin.normalize_weight, acc)


def start_call(margin: MarginLoss, rows: RowInputs, acc: torch.dtype) -> torch.Tensor:
    """The loss's once-per-call state update (training mode) and its (B, 2) per-row negative parameters."""
    return margin.begin_call(rows).to(acc).contiguous()


def negative_lse(x_eff: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor, row_params: torch.Tensor,
                 class_index: Optional[torch.Tensor], target_cos: torch.Tensor, target_norm: torch.Tensor,
                 margin: MarginLoss, backend: str, chunk_size: Optional[int], grad_filter: float,
                 product: Optional[str] = None, optimizer_slot: int = -1):
    """The custom op: (lse over the negatives, target cos, target ||w||), each (B,), differentiable. The target
    pair goes in as computed by ``initial_target_pairs`` and comes out attached to the op's backward.
    ``product``: the product mode (``precision.PRODUCTS``), by default decided here from autocast and the
    matmul precision; a caller that turns autocast off around the op decides it before. ``optimizer_slot``: a
    fused optimizer's binding (``HeadBase.fuse``), -1 for none."""
    spec = margin.negative_spec()
    if product is None:
        product = product_mode(weight.dtype, weight.device.type)
    return torch.ops.margin_kernels.margin_lse(
        x_eff.contiguous(), weight, columns, row_params, class_index, target_cos, target_norm,
        margin.normalize_weight, int(spec.kind), spec.scale, spec.a, spec.b, backend, chunk_size or 0,
        float(grad_filter), product, optimizer_slot)


def finish_loss(margin: MarginLoss, lse_neg: torch.Tensor, rows: RowInputs, reduction: str) -> torch.Tensor:
    """Per-row cross-entropy from the negatives' lse and the target logit, plus the regulariser, reduced."""
    target = margin.target_logit(rows)
    per_row = torch.logaddexp(lse_neg, target) - target
    regularizer = margin.regularizer(rows)
    if regularizer is not None:
        per_row = per_row + regularizer
    return reduce_rows(per_row, rows.valid, reduction)


def margin_cross_entropy(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: MarginLoss, *,
                         backend: str = "auto", reduction: str = "mean", ignore_index: int = -1,
                         chunk_size: Optional[int] = None, class_index: Optional[torch.Tensor] = None,
                         grad_filter: float = 0.0, check_values: bool = True) -> torch.Tensor:
    """Margin softmax cross-entropy of ``features`` (B, d) against class ``weight`` (C, d).

    Never builds the B x C logits (except ``backend="reference"``, the full-logit ground truth). ``labels``
    are class ids in [0, C), or ``ignore_index`` for rows that contribute nothing. With ``class_index`` (K class
    ids, Partial FC) only those classes are used and ``labels`` index into ``class_index``. The loss is
    returned in fp32 (fp64 for fp64 inputs). ``grad_filter > 0`` lets the backward skip the dx/dW products of a
    class tile whose every |dL/dc_ij| is below it (Cut Cross-Entropy's gradient filtering; off by default; the
    loss is unchanged, see ``margin_kernels.grad_filter_stats()``). ``check_values=False`` skips the checks
    that need a device sync (finite features, labels in range); they are skipped under torch.compile as well.
    """
    check_arguments(features, weight, labels, margin, backend=backend, reduction=reduction,
                    ignore_index=ignore_index, chunk_size=chunk_size, class_index=class_index,
                    grad_filter=grad_filter, check_values=check_values)
    return checked_margin_cross_entropy(features, weight, labels, margin, backend=backend, reduction=reduction,
                                        ignore_index=ignore_index, chunk_size=chunk_size,
                                        class_index=class_index, grad_filter=grad_filter)


def checked_margin_cross_entropy(features, weight, labels, margin: MarginLoss, *, backend: str, reduction: str,
                                 ignore_index: int, chunk_size: Optional[int], class_index: Optional[torch.Tensor],
                                 grad_filter: float, optimizer_slot: int = -1) -> torch.Tensor:
    """``margin_cross_entropy`` on arguments its caller has already checked (``validation.check_arguments``)."""
    if backend == "reference":
        return reference.margin_cross_entropy(features, weight, labels, margin, reduction=reduction,
                                              ignore_index=ignore_index, class_index=class_index)
    if features.shape[0] == 0:
        return empty_batch_loss(features, weight, reduction)
    backend = resolve_backend(backend, features.device)
    valid = labels != ignore_index
    columns = column_labels(labels, ignore_index)
    if class_index is not None:
        class_index = class_index.long()

    prepared = prepare_rows(features, margin)
    cos0, wnorm0 = initial_target_pairs(prepared.x_eff, weight, columns, class_index, margin, prepared.acc)
    row_params = start_call(margin, RowInputs(cos0, prepared.feature_norm, wnorm0, valid), prepared.acc)
    lse_neg, cos, weight_norm = negative_lse(prepared.x_eff, weight, columns, row_params, class_index, cos0,
                                             wnorm0, margin, backend, chunk_size, grad_filter,
                                             optimizer_slot=optimizer_slot)
    return finish_loss(margin, lse_neg, RowInputs(cos, prepared.feature_norm, weight_norm, valid), reduction)
