"""``DistributedMarginHead``: the margin loss with its classes sharded over the ranks of a process group.

Per step (B = global batch, d = embedding size, R = ranks, each holding a contiguous class shard):

1. exchange sizes and validity flags (one tiny all-gather: a bad input raises on every rank, never hangs);
2. each rank normalises its own rows (``functional.prepare_rows``), then all-gathers them (B x d, gradient
   back by reduce-scatter) and the labels with the feature norms (B x 2, replicated consumers);
3. the target pairs: the rank owning a row's class computes its cosine and ||w_y||, the others 0 (the op's
   convention for "no local target"), so one all-reduce of 2 x B values gives every rank the global ones,
   without gradient, to feed the loss's state update and row params (identical on every rank, so the
   stateful margins stay in step);
4. the fused op over the local shard (optionally a Partial FC class subset) takes that global pair and hands
   it back attached to its backward: the op's labels mark only this shard's targets, so only the owner's op
   applies d/dcos and d/d||w_y|| (writing the target row of its dW), with no collective for them. An
   all-reduce MAX of B values gives a shift; one all-reduce SUM of the B shifted exp(lse - shift) (identity
   backward) gives the log-sum-exp over every shard, and every shard's lse gets its softmax share of the
   gradient. The binary family (SphereFace2, UniFace) sums its per-shard softplus sums instead (one
   all-reduce SUM of B values, identity backward), and its logit shift's gradient, which each shard's op
   returns for its own classes, is summed over the ranks in backward (one scalar all-reduce);
5. the single-process tail (``functional.finish_loss``): every rank returns the same loss.

Traffic per step: O(B d) (the feature gather and its reduce-scatter) plus O(B) scalars; W never moves.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..functional import (check_weight_values, column_labels, finish_loss, initial_target_pairs, logit_shift,
                          negative_lse, negative_statistics, prepare_rows, safe_columns, start_call)
from ..row_statistics import NEGATIVE_LSE
from ..losses.base import MarginLoss, RowInputs
from ..losses.reductions import ReductionKind
from ..head_base import HeadBase
from ..precision import product_mode
from ..batch_reduction import empty_batch_loss, reduce_rows
from ..regularizers import BatchRows, regularizer_rows
from ..validation import check_flag, value_check_mode
from .comm import (GroupSums, RowLayout, all_gather_objects, all_reduce_replicated, all_reduce_sum_, gather_rows,
                   group_rank_and_size, lse_from_shifted_sum, max_shift, scale_gradient, sum_grads_across_ranks)
from .sharding import shard_range
from .validation import check_and_layout, run_collectively


class DistributedMarginHead(HeadBase):
    """Model-parallel margin head: ``loss = head(local_features, local_labels)`` on every rank.

    ``num_classes`` are split into contiguous shards (sizes differ by at most one); this rank's rows are
    ``head.weight`` and their classes ``head.shard_range = (start, stop)`` (with sub-centers, K rows per class:
    a class's rows are never split across ranks). ``local_labels`` are global class ids
    in [0, num_classes) or ``ignore_index``. Every rank returns the same loss, equal to the single-process
    ``margin_cross_entropy`` over the concatenated batch (rows in rank order); only "mean" and "sum"
    reductions exist, because backward must start from the same gradient on every rank.

    * ``sample_rate < 1``: Partial FC in training mode (see ``sampling.py``); in eval mode every class is used.
      ``head.sampled_classes`` holds the last step's global class ids on this rank (None without sampling).
    * dtypes: the weight's dtype is the compute dtype. Features are cast to it (under AMP autocast a bf16/fp16
      backbone output meets an fp32 weight: the B x d features are cast up, the C x d weight is never copied;
      store the weight in bf16 with ``dtype=`` for bf16 kernels). Autocast is disabled inside the head, but
      fp32 weights still multiply in the caller's autocast dtype (``precision.product_mode``, as in
      ``MarginHead``); the kernels accumulate in fp32 and the loss is fp32 (fp64 for an fp64 weight). The features' gradient
      comes back in their own dtype.
    * ``ddp_backbone=True``: the gradient returned to the features is multiplied by the world size, because
      DDP averages the backbone's gradients over ranks while this loss is already the global mean (what
      insightface's AllGather backward does). The head itself must not be wrapped in DDP.
    * the constructor takes ``MarginHead``'s arguments plus ``process_group`` and ``ddp_backbone``; the initial
      weight is N(0, 0.01^2) drawn in fixed seeded blocks of classes, so a given ``seed`` gives the same full
      weight at every world size and in a ``MarginHead``.
    * ``regularizers`` (``CenterLoss``, ``RingLoss``): computed on the global batch like the loss tail; the
      centers are sharded like the weight (this rank's rows in ``head.regularizers[k].centers``, classes
      ``shard_range``), only the batch's rows are fetched (one all-reduce of B x d values) and the owner alone
      updates them; ``save_sharded``/``load_sharded`` reshard them with the weight.
    * gloo (CPU) is tested; NCCL runs the same code (tensors on the current CUDA device) but is untested here.
    """

    reductions = ("mean", "sum")  # backward must start from the same gradient on every rank

    def __init__(self, num_classes: int, embedding_dim: int, margin: MarginLoss, *, sample_rate: float = 1.0,
                 seed: int = 0, backend: str = "auto", reduction: str = "mean", ignore_index: int = -1,
                 chunk_size: Optional[int] = None, grad_filter: float = 0.0, check_values: bool = True,
                 dtype: Optional[torch.dtype] = None, device=None, process_group=None, ddp_backbone: bool = False,
                 regularizers=None, memory_budget=None, optimizer=None):
        rank, world = group_rank_and_size(process_group)

        def build():
            if backend == "reference":
                raise ValueError("backend='reference' builds full logits on one device; use it with "
                                 "margin_cross_entropy on the gathered problem instead")
            check_flag("ddp_backbone", ddp_backbone)
            HeadBase.__init__(self, num_classes, embedding_dim, margin, shard_range=shard_range(num_classes, world, rank),
                              sample_rate=sample_rate, seed=seed, backend=backend, reduction=reduction,
                              ignore_index=ignore_index, chunk_size=chunk_size, grad_filter=grad_filter,
                              check_values=check_values, dtype=dtype, device=device, regularizers=regularizers,
                              memory_budget=memory_budget, optimizer=optimizer)

        # a rank failing here alone must not leave the others waiting in the configuration check
        run_collectively(build, process_group, "DistributedMarginHead construction")
        self.process_group, self.ddp_backbone = process_group, ddp_backbone
        self._check_same_configuration()

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, local_features: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        weight, margin, group = self.weight, self.margin, self.process_group
        # fp32 weights multiply in the autocast dtype (precision.py): decided before autocast is turned off
        product = product_mode(weight.dtype, weight.device.type)
        with torch.autocast(device_type=weight.device.type, enabled=False):
            layout = check_and_layout(local_features, local_labels, weight, num_classes=self.num_classes,
                                      ignore_index=self.ignore_index, check_values=self.check_values, group=group)
            features = local_features.to(weight.dtype)
            if layout.total == 0:
                return empty_batch_loss(features, weight if self.fused_optimizer is None else None, self.reduction)
            if self.ddp_backbone:
                features = scale_gradient(features, float(layout.world))
            prepared = prepare_rows(features, margin)
            acc = prepared.acc
            x_all = gather_rows(prepared.x_eff, layout, sum_grads=True)
            labels, feature_norm = self._gather_labels_and_norms(local_labels, prepared.feature_norm, layout)
            # the global labels made safe once, as in one process: unchecked labels out of range
            # (check_values=False) have no owner, so their rows are NaN (poisoned), never wrong
            safe = safe_columns(labels, -1, self.num_classes, None, self.num_classes)
            labels, valid, poisoned = safe.columns, safe.usable, safe.poisoned
            columns, class_index = self._local_columns(labels)

            targets = initial_target_pairs(x_all, weight, columns, class_index, margin, acc)
            targets = targets._replace(**self._sum_from_owners(targets.cos, targets.norm, columns, valid))
            rows0 = RowInputs(targets.cos, feature_norm, targets.norm, valid)
            request = margin.statistics_request(rows0.detach(), self.num_classes)
            if request is not None:
                margin.receive_statistics(rows0.detach(), self._global_statistics(request, x_all, weight, columns,
                                                                                  class_index))
            row_params = start_call(margin, rows0, acc)

            # the global pair goes through the local op: only the owner (columns >= 0) applies its gradient
            binary = margin.reduction_kind == ReductionKind.SOFTPLUS_SUM
            logits_shift = sum_grads_across_ranks(logit_shift(margin, row_params), group) if binary else None
            lse_local, cos, weight_norm = negative_lse(x_all, weight, columns, row_params, class_index, targets,
                                                       margin, self.resolved_backend, self.chunk_size,
                                                       self.grad_filter, product, shift=logits_shift,
                                                       memory_budget=self.memory_budget,
                                                       sink_factory=self.gradient_sink())
            if binary:  # a sum over classes: the shards' sums add up
                lse = all_reduce_replicated(lse_local, group)
            else:
                shift = max_shift(lse_local, group)
                lse = lse_from_shifted_sum(shift, all_reduce_replicated(torch.exp(lse_local - shift), group))
            rows = RowInputs(cos, feature_norm, weight_norm, valid)
            # lse and cos are global here (a NaN on any shard reaches every rank): all ranks raise together
            check_weight_values(lse, rows, value_check_mode(self.check_values, weight.device))
            if not len(self.regularizers):
                return finish_loss(margin, lse, rows, self.reduction, poisoned)
            per_row = finish_loss(margin, lse, rows, "none", poisoned)
            # a poisoned row keeps its NaN (it counts as a row), as without regularisers
            return reduce_rows(per_row + self._regularizer_rows(features, feature_norm, labels, valid, layout, acc),
                               valid | poisoned, self.reduction)

    def _regularizer_rows(self, features, feature_norm, labels, valid, layout: RowLayout, acc):
        """The regularisers' terms on the global batch, replicated on every rank: the raw features are gathered
        (B x d, each rank keeping its rows' gradient) only when a regulariser needs them."""
        raw = None
        if any(regularizer.needs_features for regularizer in self.regularizers):
            raw = gather_rows(features, layout, sum_grads=False)
        rows = BatchRows(raw, feature_norm, labels, valid, acc, collectives=GroupSums(self.process_group))
        return regularizer_rows(self.regularizers, rows)

    @torch.no_grad()
    def _global_statistics(self, request, x_all, weight, columns, class_index):
        """A loss's per-row statistic over every shard: log-sum-exp of the shards' lse, or the sum of their
        hard-negative sums and counts (row_statistics.py)."""
        local = negative_statistics(self.margin, request, x_all, weight, columns, class_index, self.resolved_backend,
                                    self.chunk_size)
        if request.kind == NEGATIVE_LSE:
            shift = max_shift(local, self.process_group)
            return lse_from_shifted_sum(shift, all_reduce_sum_(torch.exp(local - shift), self.process_group))
        return all_reduce_sum_(local.contiguous(), self.process_group)

    def _gather_labels_and_norms(self, local_labels, local_norms, layout: RowLayout):
        """One all-gather for both B-vectors: labels (-1 = ignored, so every value is exact in float64) ride in
        a float64 column next to the norms. The norms feed the replicated tail: no reduction in backward."""
        columns = column_labels(local_labels, self.ignore_index)
        packed = torch.stack([columns.to(torch.float64), local_norms.to(torch.float64)], dim=1)
        gathered = gather_rows(packed, layout, sum_grads=False)
        return gathered[:, 0].long(), gathered[:, 1].to(local_norms.dtype)

    def _local_columns(self, labels: torch.Tensor):
        """(column ids into this shard or its sampled index, -1 for rows whose class is elsewhere; the index)."""
        start, stop = self.shard_range
        inside = (labels >= start) & (labels < stop)
        return self.sample_columns(torch.where(inside, labels - start, torch.full_like(labels, -1)))

    @torch.no_grad()
    def _sum_from_owners(self, cos, weight_norm, columns, valid):
        """Global cos and ||w_y|| of each row's target pair (as ``TargetPairs`` fields) in one all-reduce of 2 x B values, no gradient. The
        owner of a row's class contributes its cos and norm, every other rank 0, so the sum is exact; rows
        without a target get cos 0 and norm 1, as in the single-process op."""
        has_target = columns >= 0
        packed = torch.stack([torch.where(has_target, cos, torch.zeros_like(cos)),
                              torch.where(has_target, weight_norm, torch.zeros_like(weight_norm))])
        packed = all_reduce_sum_(packed, self.process_group)
        return dict(cos=packed[0], norm=torch.where(valid, packed[1], torch.ones_like(packed[1])))

    # ---- consistency across ranks ------------------------------------------------------------------------
    def _configuration(self) -> tuple:
        return (self.num_classes, self.embedding_dim, type(self.margin).__name__, repr(self.margin),
                self.sampler.sample_rate, str(self.weight.dtype), self.reduction, self.ignore_index, self.seed,
                self.ddp_backbone, self.grad_filter, self.check_values, repr(self.regularizers))

    def _check_same_configuration(self) -> None:
        configs = all_gather_objects(self._configuration(), self.process_group)
        differing = [r for r, c in enumerate(configs) if c != configs[0]]
        if differing:
            raise ValueError(f"DistributedMarginHead must be built with the same arguments on every rank; ranks "
                             f"{differing} differ from rank 0: {configs[differing[0]]} vs {configs[0]}")

