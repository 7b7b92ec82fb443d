"""The ground truth: builds all B x C logits in plain PyTorch (any dtype, float64 included) and lets autograd
differentiate everything. Short on purpose; every fused backend is tested against it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .losses.base import MarginLoss, RowInputs
from .norms import floored
from .losses.negatives import negative_logits
from .losses.reductions import ReductionKind, softplus_terms
from .reduction import accumulation_dtype, empty_batch_loss, reduce_rows
from .validation import check_arguments


def margin_logits(features, weight, labels, margin: MarginLoss, *, ignore_index: int = -1,
                  class_index: Optional[torch.Tensor] = None):
    """(logits B x C, valid mask, per-row regulariser or None); advances the loss's state like any backend."""
    acc = accumulation_dtype(features.dtype)
    x, feature_norm = margin.prepare_features(features, acc)
    x = x.to(acc)
    w = weight.to(acc) if class_index is None else weight.to(acc)[class_index.long()]
    weight_norms = w.norm(dim=1)
    cos = x @ w.t()
    if margin.normalize_weight:
        cos = cos / floored(weight_norms)
    valid = labels != ignore_index
    target_col = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(1)
    rows = RowInputs(
        cos=torch.where(valid, cos.gather(1, target_col).squeeze(1), torch.zeros((), dtype=acc)),
        feature_norm=feature_norm,
        weight_norm=torch.where(valid, weight_norms[target_col.squeeze(1)], torch.ones((), dtype=acc)),
        valid=valid,
    )
    row_params = margin.begin_call(rows).to(acc)
    negatives = negative_logits(cos, margin.negative_spec(), row_params)
    shift = margin.logit_shift()
    if shift is not None:  # the binary family's learnable bias, in every negative logit
        negatives = negatives + shift.to(acc)
    is_target = F.one_hot(target_col.squeeze(1), cos.shape[1]).bool() & valid.unsqueeze(1)
    logits = torch.where(is_target, margin.target_logit(rows).unsqueeze(1), negatives)
    return logits, valid, margin.regularizer(rows)


def margin_cross_entropy(features, weight, labels, margin: MarginLoss, *, reduction: str = "mean",
                         ignore_index: int = -1, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_arguments(features, weight, labels, margin, backend="reference", reduction=reduction,
                    ignore_index=ignore_index, chunk_size=None, class_index=class_index)
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
    if regularizer is not None:
        per_row = per_row + regularizer
    return reduce_rows(per_row, valid, reduction)
