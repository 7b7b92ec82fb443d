"""The ground truth: builds all B x C logits in plain PyTorch (any dtype, float64 included) and lets autograd
differentiate everything. Short on purpose; every fused backend is tested against it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .losses.base import MarginLoss, RowInputs
from .norms import floored, row_norms
from .losses.negatives import negative_logits
from . import row_statistics
from .losses.reductions import ReductionKind, softplus_terms
from .subcenters import class_rows, max_over_sub_centers
from .batch_reduction import accumulation_dtype, empty_batch_loss, reduce_rows
from .validation import NON_FINITE_WEIGHT, check_arguments, check_no_bad_rows, value_check_mode


def margin_logits(features, weight, labels, margin: MarginLoss, *, ignore_index: int = -1,
                  class_index: Optional[torch.Tensor] = None):
    """(logits B x C, valid mask, per-row regulariser or None); advances the loss's state like any backend."""
    acc = accumulation_dtype(features.dtype)
    x, feature_norm = margin.prepare_features(features, acc)
    x = x.to(acc)
    k = margin.sub_centers
    w = weight.to(acc) if class_index is None else weight.to(acc)[class_rows(class_index.long(), k)]
    weight_norms = row_norms(w, acc)
    cos = x @ w.t()
    if margin.normalize_weight:
        cos = cos / floored(weight_norms)
    if k > 1:  # each class's best sub-center (autograd routes the gradient to it); norms of the winners
        cos, winner = max_over_sub_centers(cos, k)
        weight_norms = weight_norms.view(-1, k).expand(cos.shape[0], -1, -1).gather(2, winner.unsqueeze(2))
        weight_norms = weight_norms.squeeze(2)
    labels = labels.long()  # compared as int64: a uint8 255 is not ignore_index -1
    valid = labels != ignore_index
    logits, regularizer = logits_from_cosines(cos, labels, valid, margin, feature_norm, weight_norms,
                                              num_classes=weight.shape[0] // k)
    return logits, valid, regularizer


def logits_from_cosines(cos, labels, valid, margin: MarginLoss, feature_norm=None, weight_norms=None,
                        num_classes=None):
    """(logits B x C, per-row regulariser or None) from the B x C cosines the loss's kernels would see: the
    negative function on every column, the target formula at each valid row's label. Norms default to 1 (for
    callers that only have cosines, e.g. insightface's margin modules); ``num_classes`` (the whole problem's, for
    losses whose state depends on it) defaults to the columns. Advances the loss's state."""
    ones = torch.ones((), dtype=cos.dtype, device=cos.device)
    target_col = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(1)
    rows = RowInputs(
        cos=torch.where(valid, cos.gather(1, target_col).squeeze(1), torch.zeros((), dtype=cos.dtype)),
        feature_norm=ones.expand(cos.shape[0]) if feature_norm is None else feature_norm,
        weight_norm=ones.expand(cos.shape[0]) if weight_norms is None else
        torch.where(valid, _target_norms(weight_norms, target_col), ones),
        valid=valid,
    )
    is_target = F.one_hot(target_col.squeeze(1), cos.shape[1]).bool() & valid.unsqueeze(1)
    request = margin.statistics_request(rows.detach(), num_classes or cos.shape[1])
    if request is not None:
        margin.receive_statistics(rows.detach(), row_statistics.from_cosines(cos, is_target, request))
    row_params = margin.begin_call(rows).to(cos.dtype)
    negatives = negative_logits(cos, margin.negative_spec(), row_params)
    shift = margin.logit_shift()
    if shift is not None:  # the binary family's learnable bias, in every negative logit
        negatives = negatives + shift.to(cos.dtype)
    logits = torch.where(is_target, margin.target_logit(rows).unsqueeze(1), negatives)
    if margin.training and margin.observes_negative_lse:  # after the target: it uses this call's state
        with torch.no_grad():
            margin.end_call(rows.detach(), torch.logsumexp(negatives.detach().masked_fill(is_target, float("-inf")),
                                                           dim=1))
    return logits, margin.regularizer(rows)


def _target_norms(weight_norms: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
    """||w|| of each row's target column: a (C,) vector, or (B, C) with sub-centers (the row's winner)."""
    if weight_norms.dim() == 1:
        return weight_norms[target_col.squeeze(1)]
    return weight_norms.gather(1, target_col).squeeze(1)


def margin_cross_entropy(features, weight, labels, margin: MarginLoss, *, reduction: str = "mean",
                         ignore_index: int = -1, class_index: Optional[torch.Tensor] = None,
                         check_values: bool = True) -> torch.Tensor:
    """The ground truth. With ``check_values`` a NaN/Inf weight row it reads raises as in every backend; the
    reference is not meant to run on unchecked bad labels or class ids (it indexes with them)."""
    check_arguments(features, weight, labels, margin, backend="reference", reduction=reduction,
                    ignore_index=ignore_index, chunk_size=None, class_index=class_index,
                    check_values=check_values)
    if features.shape[0] == 0:
        return empty_batch_loss(features, weight, reduction)
    logits, valid, regularizer = margin_logits(features, weight, labels, margin, ignore_index=ignore_index,
                                               class_index=class_index)
    target_col = torch.where(valid, labels, torch.zeros_like(labels)).long()
    target = logits.gather(1, target_col.unsqueeze(1)).squeeze(1)
    if margin.reduction_kind == ReductionKind.SOFTPLUS_SUM:
        is_target = F.one_hot(target_col, logits.shape[1]).bool() & valid.unsqueeze(1)
        terms = softplus_terms(logits, margin.negative_spec().clamp)
        per_row = margin.row_loss(target, torch.where(is_target, torch.zeros_like(terms), terms).sum(dim=1))
    else:
        per_row = torch.logsumexp(logits, dim=1) - target
    # features were checked finite, so a NaN row here comes from a weight row (negatives.py flags them)
    check_no_bad_rows(valid & torch.isnan(per_row.detach()), NON_FINITE_WEIGHT,
                      value_check_mode(check_values, features.device))
    if regularizer is not None:
        per_row = per_row + regularizer
    return reduce_rows(per_row, valid, reduction)
