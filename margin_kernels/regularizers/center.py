"""Center loss (Wen et al., ECCV 2016) with the optional Center-invariant term (Wu et al., ACM MM workshops 2017).

Per row, with c_j the class centers (C x d, stored like the head's weight: its dtype, device and class shard):

    center term     (lambda / 2) ||x_i - c_{y_i}||^2
    invariant term  (lambda_I / 4) (||c_{y_i}||^2 - R)^2,   R = (1/C) sum_j ||c_j||^2

and the head's "mean" averages them over the non-ignored rows: lambda / (2B) sum_i ||x_i - c_{y_i}||^2 is the
paper's and caffe-face's layer (loss_weight lambda); KaiyangZhou/pytorch-center-loss returns
(1/B) sum_i ||x_i - c_{y_i}||^2, i.e. lambda = 2 times its weight_cent. The invariant term is Wu et al.'s layer
(the sum over the batch divided by 4 B); R is recomputed every call from all centers and held constant in the
gradient except for the row's own class, whose share of R gives the (1 - 1/C) factor of the authors' gradient,
so the gradient reaches only the B centers of the batch.

Two update rules for the centers:

* ``update="alpha"`` (the paper, caffe-face): the centers are not trained by the optimizer; each training
  call (after its loss used the current centers) moves every class j of the batch by
  c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j), n_j its rows in the batch. The features get
  the center term's gradient lambda (x_i - c_{y_i}) (/ B under "mean").
* ``update="gradient"``: the centers are a trainable parameter (``head.regularizers[k].centers``) and the
  optimizer updates them from the gradients of both terms (the invariant one as defined above); give them
  their own parameter group (the PyTorch ports use a separate SGD with lr 0.5 on gradients divided by lambda).

Only the B rows of the batch are read and written per call: the owning rank gathers them, one all-reduce of
B x d values hands every rank its rows' centers, the owner alone updates them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..initialization import fill_rows_normal
from .base import BatchRows, Regularizer, check_nonnegative, class_totals, owned_rows

UPDATES = ("alpha", "gradient")
#: rows of the centers reduced at a time for R (bounds the temporary of a low-precision cast to chunk x d)
NORM_CHUNK_ROWS = 65536
#: the seed stream of the centers' initial values (distinct from the weight's and the sampler's)
CENTER_STREAM = 3


class CenterLoss(Regularizer):
    """``CenterLoss(weight=0.003, update="alpha", alpha=0.5, invariant_weight=0.0, init_std=0.0)``.

    ``weight`` is lambda, ``invariant_weight`` lambda_I (0: plain Center loss; > 0 needs ``update="gradient"``,
    since the invariant term acts on the centers through their gradient). ``init_std`` > 0 draws the initial
    centers N(0, init_std^2) from the head's seed in blocks of classes (the same full matrix at every world
    size, like the weight); 0 starts from zero centers (the default of the TensorFlow ports)."""

    needs_features = True
    class_rows = ("centers",)

    def __init__(self, weight: float = 0.003, *, update: str = "alpha", alpha: float = 0.5,
                 invariant_weight: float = 0.0, init_std: float = 0.0):
        super().__init__()
        check_nonnegative("weight", weight)
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        check_nonnegative("alpha", alpha)
        check_nonnegative("invariant_weight", invariant_weight)
        check_nonnegative("init_std", init_std)
        if invariant_weight > 0 and update != "gradient":
            raise ValueError("invariant_weight > 0 needs update='gradient': the Center-invariant term moves the "
                             "centers through their gradient, which the alpha rule does not apply")
        self.weight, self.update, self.alpha = float(weight), update, float(alpha)
        self.invariant_weight, self.init_std = float(invariant_weight), float(init_std)
        self.num_classes, self.shard_range, self.seed = None, (0, 0), 0

    def bind(self, *, num_classes, embedding_dim, shard_range, seed, dtype, device):
        super().bind()
        self.num_classes, self.shard_range, self.seed = num_classes, tuple(shard_range), seed
        rows = shard_range[1] - shard_range[0]
        self.centers = nn.Parameter(torch.zeros(rows, embedding_dim, dtype=dtype, device=device),
                                    requires_grad=self.update == "gradient")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init_std > 0:
                fill_rows_normal(self.centers, self.shard_range[0], self.seed * 1000003 + CENTER_STREAM,
                                 self.init_std)
            else:
                self.centers.zero_()

    # ---- the per-row terms ------------------------------------------------------------------------------
    def per_row(self, rows: BatchRows) -> torch.Tensor:
        start = self.shard_range[0]
        local = rows.labels - start
        owned = rows.valid & (local >= 0) & (local < self.centers.shape[0])
        # every row's center from its owner: zeros elsewhere, so the sum over ranks is exact in any dtype
        centers = rows.sum_replicated(owned_rows(self.centers, local, owned, rows.acc)).to(rows.acc)
        x = rows.features.to(rows.acc)
        diff = x - centers
        term = (0.5 * self.weight) * (diff * diff).sum(dim=1)
        if self.invariant_weight > 0:
            term = term + self._invariant_term(centers, rows)
        if self.training and self.update == "alpha" and self.alpha > 0:
            self._alpha_step(x.detach(), centers.detach(), local, owned)
        return term

    def _invariant_term(self, centers: torch.Tensor, rows: BatchRows) -> torch.Tensor:
        square_norm = (centers * centers).sum(dim=1)
        mean_square = self.mean_square_norm(rows)
        # value ||c_y||^2 - R; gradient (1 - 1/C) d||c_y||^2: the own class's share of R, the rest held constant
        gap = square_norm - mean_square - (square_norm - square_norm.detach()) / self.num_classes
        return (0.25 * self.invariant_weight) * gap * gap

    @torch.no_grad()
    def mean_square_norm(self, rows: BatchRows) -> torch.Tensor:
        """R = (1/C) sum_j ||c_j||^2 over every class (every shard: one all-reduce of one value), in chunks of
        rows so no temporary is C x d."""
        acc = rows.acc
        total = torch.zeros((), dtype=acc, device=self.centers.device)
        for first in range(0, self.centers.shape[0], NORM_CHUNK_ROWS):
            block = self.centers[first:first + NORM_CHUNK_ROWS]
            total += torch.linalg.vector_norm(block, dim=1, dtype=acc).square().sum()
        return rows.sum_values_(total) / self.num_classes

    @torch.no_grad()
    def _alpha_step(self, x: torch.Tensor, centers: torch.Tensor, local: torch.Tensor, owned: torch.Tensor):
        """c_j -= alpha * sum_{y_i = j} (c_j - x_i) / (1 + n_j) on the classes this shard owns (every row of a
        class is owned by the same rank, so n_j is counted here). Static shapes: every row writes, duplicates
        of a class the same value; rows not owned write row 0 with the value row 0 ends with."""
        totals, counts = class_totals(centers - x, local, owned)
        moved = centers - self.alpha * totals / (1.0 + counts).unsqueeze(1)
        first = self.centers[0].to(moved.dtype)
        updates_first = owned & (local == 0)
        first = torch.where(updates_first.any(), torch.where(updates_first.unsqueeze(1), moved,
                                                             torch.full_like(moved, -math.inf)).amax(dim=0), first)
        values = torch.where(owned.unsqueeze(1), moved, first.unsqueeze(0))
        self.centers.index_put_((torch.where(owned, local, torch.zeros_like(local)),), values.to(self.centers.dtype))

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, update={self.update!r}, alpha={self.alpha}, "
                f"invariant_weight={self.invariant_weight}, init_std={self.init_std}")
