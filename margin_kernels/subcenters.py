"""Sub-centers (K weight rows per class, ``MarginLoss.sub_centers``): the row layout and the per-tile max, written
once for the PyTorch paths (the reference, the target pairs, the chunk loop of the torch/cpu/cuda backends);
the Triton kernels take the same max in registers (``triton_tiles.max_cosine_tile``).

Layout: class j owns weight rows [j K, (j + 1) K) (pytorch-metric-learning's and insightface's: both view their
B x C K cosines as B x C x K). A class's cosine is the max over its K rows; its gradient goes to the winning
row only. Ties go to the lowest sub-center index (the first maximum, as ``torch.max`` and ``argmax`` return it,
and as every kernel's strict ``>`` scan over k = 0 .. K-1 keeps it), so every backend picks the same row.
Only a (B, n K) tile of one chunk exists at a time: never B x C x K.
"""
from __future__ import annotations

from typing import Optional

import torch

from .norms import floored, normalized, row_norms


def class_rows(classes: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """The weight rows of ``classes`` (int64, any shape (n,)), K per class in order: (n K,)."""
    if sub_centers == 1:
        return classes
    offsets = torch.arange(sub_centers, device=classes.device, dtype=classes.dtype)
    return (classes.unsqueeze(1) * sub_centers + offsets).reshape(-1)


def num_classes_of(weight: torch.Tensor, sub_centers: int) -> int:
    return weight.shape[0] // sub_centers


def max_over_sub_centers(cos: torch.Tensor, sub_centers: int):
    """(values, winner) of a (B, n K) tile of cosines: (B, n) maxima over each class's K columns and the
    sub-center index (0 .. K-1) of each; ties to the lowest index."""
    values, winner = cos.view(cos.shape[0], -1, sub_centers).max(dim=2)
    return values, winner


def scatter_to_winners(values: torch.Tensor, winner: torch.Tensor, sub_centers: int,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (B, n K) tile that holds ``values`` (B, n) at each class's winning row and 0 elsewhere (written into
    ``out`` when given, e.g. the chunk's GEMM buffer)."""
    batch, n = values.shape
    if out is None:
        out = values.new_zeros(batch, n * sub_centers)
    else:
        out.zero_()
    out.view(batch, n, sub_centers).scatter_(2, winner.unsqueeze(2), values.unsqueeze(2))
    return out


def target_pairs(x: torch.Tensor, weight: torch.Tensor, target_classes: torch.Tensor, normalize_weight: bool,
                 sub_centers: int, acc_dtype: torch.dtype):
    """(dot or cos, ||w||, winning weight row) of each row's target class: the best of its K rows (B K dot
    products, never more). With raw weights the max is over the raw dots, as the kernels take it."""
    rows = class_rows(target_classes, sub_centers)
    w = weight.index_select(0, rows).to(acc_dtype).view(x.shape[0], sub_centers, -1)
    dots = torch.einsum("bd,bkd->bk", x.to(acc_dtype), w)
    norms = row_norms(w, acc_dtype)
    scores = dots / floored(norms) if normalize_weight else dots
    best, winner = scores.max(dim=1)
    norm = norms.gather(1, winner.unsqueeze(1)).squeeze(1)
    return best, norm, target_classes * sub_centers + winner


@torch.no_grad()
def dominant_sub_centers(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, sub_centers: int,
                         threshold: float = 75.0):
    """pytorch-metric-learning's ``SubCenterArcFaceLoss.get_outliers`` on this package's layout, a host-side
    utility over W and data (the paper's step of dropping noisy samples and non-dominant sub-centers).

    For every class present in ``labels``: the dominant sub-center is the one that wins (max cosine) for most
    of the class's samples (ties: the lowest index, as ``argmax`` of PML's ``bincount``); a sample whose cosine
    to it is below cos(``threshold`` degrees) is an outlier. Returns (outlier row indices into ``features``
    (int64, ascending by class, then by row), the dominant rows (C, d): the dominant sub-center of each present
    class and zeros for absent classes, where PML leaves ``torch.Tensor``'s uninitialised memory)."""
    num_classes = num_classes_of(weight, sub_centers)
    x = normalized(features, weight.dtype)[0]
    w = normalized(weight, weight.dtype)[0].view(num_classes, sub_centers, -1)
    cos_threshold = torch.cos(torch.deg2rad(torch.tensor(float(threshold), dtype=torch.float64))).item()
    dominant = weight.new_zeros(num_classes, weight.shape[1])
    outliers = []
    for label in torch.unique(labels[(labels >= 0) & (labels < num_classes)]).tolist():
        members = (labels == label).nonzero().squeeze(1)
        cos = x[members] @ w[label].t()                      # (n, K)
        best = torch.bincount(cos.argmax(dim=1), minlength=sub_centers).argmax()
        dominant[label] = weight[label * sub_centers + best]
        outliers.append(members[cos[:, best] < cos_threshold])
    found = torch.cat(outliers) if outliers else labels.new_zeros(0, dtype=torch.long)
    return found, dominant
