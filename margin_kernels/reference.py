"""The ground truth: builds all B x C logits in plain PyTorch (any dtype, float64 included) and lets autograd
differentiate everything. Short on purpose; every fused backend is tested against it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .losses.base import MarginLoss, RowInputs
from .norms import floored
from .losses.negatives import negative_logits
from .reduction import accumulation_dtype, empty_batch_loss, reduce_rows
from .validation import NON_FINITE_WEIGHT, check_arguments, check_no_bad_rows, value_check_mode


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
    is_target = F.one_hot(target_col.squeeze(1), cos.shape[1]).bool() & valid.unsqueeze(1)
    logits = torch.where(is_target, margin.target_logit(rows).unsqueeze(1), negatives)
    return logits, valid, margin.regularizer(rows)


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
    per_row = torch.logsumexp(logits, dim=1) - logits.gather(1, target_col.unsqueeze(1)).squeeze(1)
    # features were checked finite, so a NaN row here comes from a weight row (negatives.py flags them)
    check_no_bad_rows(valid & torch.isnan(per_row.detach()), NON_FINITE_WEIGHT,
                      value_check_mode(check_values, features.device))
    if regularizer is not None:
        per_row = per_row + regularizer
    return reduce_rows(per_row, valid, reduction)
