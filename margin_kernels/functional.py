"""``margin_cross_entropy``: the one driver every fused backend runs behind.

Per call: check the arguments, normalise the features (B x d, autograd), compute the B target pairs, let the
loss update its state and produce per-row inputs, run the backend's class-tiled log-sum-exp over the negatives
(a custom op with a hand-written backward), then combine with the target logits on B-vectors:

    L_i = logaddexp(lse_neg_i, z_iy) - z_iy  (+ the loss's per-row regulariser)
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops, reference
from .backends import resolve_backend
from .losses.base import MarginLoss, RowInputs
from .reduction import accumulation_dtype, empty_batch_loss, reduce_rows
from .validation import check_arguments


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
    loss is unchanged, see ``margin_kernels.grad_filter_stats()``). ``check_values=False`` skips the checks that need a device sync
    (finite features, labels in range); they are skipped under torch.compile as well.
    """
    check_arguments(features, weight, labels, margin, backend=backend, reduction=reduction,
                    ignore_index=ignore_index, chunk_size=chunk_size, class_index=class_index,
                    grad_filter=grad_filter, check_values=check_values)
    if backend == "reference":
        return reference.margin_cross_entropy(features, weight, labels, margin, reduction=reduction,
                                              ignore_index=ignore_index, class_index=class_index)
    if features.shape[0] == 0:
        return empty_batch_loss(features, weight, reduction)
    backend = resolve_backend(backend, features.device)
    acc = accumulation_dtype(features.dtype)
    valid = labels != ignore_index
    local = torch.where(valid, labels, torch.full_like(labels, -1)).long()
    if class_index is not None:
        class_index = class_index.long()

    x_eff, feature_norm = margin.prepare_features(features, acc)
    with torch.no_grad():
        cos0, wnorm0 = ops.target_pairs(x_eff, weight, local, class_index, margin.normalize_weight, acc)
    row_params = margin.begin_call(RowInputs(cos0, feature_norm, wnorm0, valid)).to(acc).contiguous()

    spec = margin.negative_spec()
    lse_neg, cos, weight_norm = torch.ops.margin_kernels.margin_lse(
        x_eff.contiguous(), weight, local, row_params, class_index, margin.normalize_weight, int(spec.kind),
        spec.scale, spec.a, spec.b, backend, chunk_size or 0, float(grad_filter))
    rows = RowInputs(cos, feature_norm, weight_norm, valid)
    target = margin.target_logit(rows)
    per_row = torch.logaddexp(lse_neg, target) - target
    regularizer = margin.regularizer(rows)
    if regularizer is not None:
        per_row = per_row + regularizer
    return reduce_rows(per_row, valid, reduction)
