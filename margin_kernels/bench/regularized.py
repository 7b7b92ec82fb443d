"""``--regularizers``: benchmark the loss with head regularisers on (Center loss, its invariant term, Ring loss).

The benchmarked call is what ``MarginHead`` runs, on the problem's own weight tensor (no head, so no second
C x d weight): the per-row margin loss of the backend plus the regularisers' per-row terms, reduced by "mean".
The centers start at zero (``init_std=0``) so the float64 truth, rebuilt in float64, starts from the same
ones; the alpha rule moves them on every timed call, as training would.
"""
from __future__ import annotations

import margin_kernels as mk
from margin_kernels.batch_reduction import reduce_rows
from margin_kernels.regularizers import regularizer_rows, single_process_rows

#: --regularizers names -> a fresh regulariser (the papers' usual weights)
REGULARIZERS = {
    "center": lambda: mk.CenterLoss(0.003),
    "center-gradient": lambda: mk.CenterLoss(0.003, update="gradient"),
    "center-invariant": lambda: mk.CenterLoss(0.003, update="gradient", invariant_weight=0.001),
    "ring": lambda: mk.RingLoss(0.01),
}


def bound_regularizers(names: str, classes: int, dim: int, dtype, device) -> list:
    out = []
    for name in filter(None, names.split(",")):
        regularizer = REGULARIZERS[name]()
        regularizer.bind(num_classes=classes, embedding_dim=dim, shard_range=(0, classes), seed=0, dtype=dtype,
                         device=device)
        out.append(regularizer)
    return out


def regularized_loss(margin: mk.MarginLoss, names: str, classes: int, dim: int, dtype, device, **options):
    """fn(x, w, labels): the margin loss with the named regularisers, as MarginHead computes it."""
    regularizers = bound_regularizers(names, classes, dim, dtype, device)

    def fn(x, w, labels):
        per_row = mk.margin_cross_entropy(x, w, labels, margin, reduction="none", **options)
        rows = single_process_rows(x, labels.long())
        return reduce_rows(per_row + regularizer_rows(regularizers, rows), rows.valid, "mean")
    return fn
