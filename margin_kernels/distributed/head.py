"""``DistributedMarginHead``: the margin loss with its classes sharded over the ranks of a process group.

Per step (B = global batch, d = embedding size, R = ranks, each holding a contiguous class shard):

1. exchange sizes and validity flags (one tiny all-gather: a bad input raises on every rank, never hangs);
2. each rank normalises its own rows (``functional.prepare_rows``), then all-gathers them (B x d, gradient
   back by reduce-scatter) and the labels with the feature norms (B x 2, replicated consumers);
3. the target pairs: the rank owning a row's class computes its cosine and ||w_y||, the others 0 (the op's
   convention for "no local target"), so one all-reduce of 2 x B values gives every rank the global ones,
   without gradient, to feed the loss's state update and row params (identical on every rank, so the
   stateful margins stay in step);
4. the fused op over the local shard (optionally a Partial FC class subset) gives each row's log-sum-exp over
   the shard's negatives and the target pair again, now with gradient. An all-reduce MAX of B values gives a
   shift; one all-reduce SUM of 3 x B values (identity backward) carries the target pair and the shifted
   exp(lse - shift) of every shard: the owner's op backward receives d/dcos and writes the target row of
   its dW, and every shard's lse gets its softmax share of the gradient;
5. the single-process tail (``functional.finish_loss``): every rank returns the same loss.

Traffic per step: O(B d) (the feature gather and its reduce-scatter) plus O(B) scalars; W never moves.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..backends import resolve_backend
from ..functional import (column_labels, finish_loss, initial_target_pairs, negative_lse, prepare_rows,
                          start_call)
from ..losses.base import MarginLoss, RowInputs
from ..reduction import empty_batch_loss
from ..validation import FLOAT_DTYPES
from .comm import (RowLayout, all_gather_objects, all_reduce_replicated, all_reduce_sum_, gather_rows,
                   group_rank_and_size, lse_from_shifted_sum, max_shift, scale_gradient)
from .sampling import INIT_STREAM, PartialFCSampler, check_sample_rate, derived_seed
from .sharding import shard_range
from .validation import check_and_layout, run_collectively

INIT_STD = 0.01          # insightface's PartialFC initialisation: N(0, 0.01^2)
INIT_BLOCK_ROWS = 4096   # classes per independently seeded block of the initial weight
CHECKPOINT_FORMAT = 1


class DistributedMarginHead(nn.Module):
    """Model-parallel margin head: ``loss = head(local_features, local_labels)`` on every rank.

    ``num_classes`` are split into contiguous shards (sizes differ by at most one); this rank's rows are
    ``head.weight`` and their classes ``head.shard_range = (start, stop)``. ``local_labels`` are global class ids
    in [0, num_classes) or ``ignore_index``. Every rank returns the same loss, equal to the single-process
    ``margin_cross_entropy`` over the concatenated batch (rows in rank order); only "mean" and "sum"
    reductions exist, because backward must start from the same gradient on every rank.

    * ``sample_rate < 1``: Partial FC in training mode (see ``sampling.py``); in eval mode every class is used.
      ``head.sampled_classes`` holds the last step's global class ids on this rank (None without sampling).
    * dtypes: the weight's dtype is the compute dtype. Features are cast to it (under AMP autocast a bf16/fp16
      backbone output meets an fp32 weight: the B x d features are cast up, the C x d weight is never copied;
      store the weight in bf16 with ``dtype=`` for bf16 kernels). Autocast is disabled inside the head; the
      kernels accumulate in fp32 and the loss is fp32 (fp64 for an fp64 weight). The features' gradient
      comes back in their own dtype.
    * ``ddp_backbone=True``: the gradient returned to the features is multiplied by the world size, because
      DDP averages the backbone's gradients over ranks while this loss is already the global mean (what
      insightface's AllGather backward does). The head itself must not be wrapped in DDP.
    * the initial weight is N(0, 0.01^2) drawn in fixed seeded blocks of classes, so a given ``seed`` gives the
      same full weight at every world size.
    * gloo (CPU) is tested; NCCL runs the same code (tensors on the current CUDA device) but is untested here.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: MarginLoss, *, sample_rate: float = 1.0,
                 process_group=None, backend: str = "auto", dtype: Optional[torch.dtype] = None, device=None,
                 reduction: str = "mean", ignore_index: int = -1, chunk_size: Optional[int] = None, seed: int = 0,
                 ddp_backbone: bool = False):
        super().__init__()
        self.process_group = process_group
        rank, world = group_rank_and_size(process_group)
        # a rank failing here alone must not leave the others waiting in the configuration check
        run_collectively(lambda: self._build(num_classes, embedding_dim, margin, sample_rate, backend, dtype, device,
                                             reduction, ignore_index, chunk_size, seed, ddp_backbone, rank, world),
                         process_group, "DistributedMarginHead construction")
        self._check_same_configuration()

    def _build(self, num_classes, embedding_dim, margin, sample_rate, backend, dtype, device, reduction,
               ignore_index, chunk_size, seed, ddp_backbone, rank, world) -> None:
        if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if not isinstance(margin, MarginLoss):
            raise TypeError(f"margin must be a margin_kernels loss, got {type(margin).__name__}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum' for the distributed head, got {reduction!r}")
        if backend == "reference":
            raise ValueError("backend='reference' builds full logits on one device; use it with "
                             "margin_cross_entropy on the gathered problem instead")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES} or None, got {dtype!r}")
        check_sample_rate(sample_rate)
        self.shard_range = shard_range(num_classes, world, rank)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index must be an int outside [0, num_classes), got {ignore_index!r}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.margin = margin
        self.backend, self.reduction, self.ignore_index = backend, reduction, ignore_index
        self.chunk_size, self.seed, self.ddp_backbone = chunk_size, int(seed), bool(ddp_backbone)
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim, dtype=dtype, device=device))
        self.resolved_backend = resolve_backend(backend, self.weight.device)
        self.sampler = PartialFCSampler(self.num_local, sample_rate, seed=self.seed, shard_start=self.shard_range[0],
                                        device=self.weight.device)
        self.sampled_classes: Optional[torch.Tensor] = None
        self.reset_parameters()

    @property
    def num_local(self) -> int:
        return self.shard_range[1] - self.shard_range[0]

    @property
    def world_size(self) -> int:
        return group_rank_and_size(self.process_group)[1]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            fill_rows_normal(self.weight, self.shard_range[0], self.seed, INIT_STD)

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, local_features: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        weight, margin, group = self.weight, self.margin, self.process_group
        with torch.autocast(device_type=weight.device.type, enabled=False):
            layout = check_and_layout(local_features, local_labels, num_classes=self.num_classes,
                                      embedding_dim=self.embedding_dim, ignore_index=self.ignore_index,
                                      device=weight.device, group=group)
            features = local_features.to(weight.dtype)
            if layout.total == 0:
                return empty_batch_loss(features, weight, self.reduction)
            if self.ddp_backbone:
                features = scale_gradient(features, float(layout.world))
            prepared = prepare_rows(features, margin)
            acc = prepared.acc
            x_all = gather_rows(prepared.x_eff, layout, sum_grads=True)
            labels, feature_norm = self._gather_labels_and_norms(local_labels, prepared.feature_norm, layout)
            valid = labels >= 0
            columns, class_index = self._local_columns(labels)

            cos0, wnorm0 = initial_target_pairs(x_all, weight, columns, class_index, margin, acc)
            with torch.no_grad():
                cos0, wnorm0 = self._sum_from_owners(cos0, wnorm0, columns, valid, differentiable=False)
            row_params = start_call(margin, RowInputs(cos0, feature_norm, wnorm0, valid), acc)

            lse_local, cos, weight_norm = negative_lse(x_all, weight, columns, row_params, class_index, margin,
                                                       self.resolved_backend, self.chunk_size, 0.0)
            shift = max_shift(lse_local, group)
            cos, weight_norm, sum_exp = self._sum_from_owners(cos, weight_norm, columns, valid,
                                                              torch.exp(lse_local - shift), differentiable=True)
            lse = lse_from_shifted_sum(shift, sum_exp)
            return finish_loss(margin, lse, RowInputs(cos, feature_norm, weight_norm, valid), self.reduction)

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
        columns = torch.where(inside, labels - start, torch.full_like(labels, -1))
        if not (self.training and self.sampler.active):
            self.sampled_classes = None
            return columns, None
        index = self.sampler.sample(columns[inside])
        self.sampled_classes = index + start
        return self.sampler.remap(index, columns), index

    def _sum_from_owners(self, cos, weight_norm, columns, valid, *per_rank, differentiable: bool):
        """Global (cos, ||w_y||) of each row's target pair, and the sum over ranks of any ``per_rank`` B-vectors,
        in one all-reduce. The owner of a row's class contributes its cos and norm, every other rank 0, so the
        sum is exact; rows without a target get cos 0 and norm 1, as in the single-process op."""
        has_target = columns >= 0
        packed = torch.stack([torch.where(has_target, cos, torch.zeros_like(cos)),
                              torch.where(has_target, weight_norm, torch.zeros_like(weight_norm)), *per_rank])
        if differentiable:
            packed = all_reduce_replicated(packed, self.process_group)
        else:
            packed = all_reduce_sum_(packed, self.process_group)
        return (packed[0], torch.where(valid, packed[1], torch.ones_like(packed[1])), *packed[2:])

    # ---- checkpoints: see checkpoint.py for saving and resharding ----------------------------------------
    def get_extra_state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "num_classes": self.num_classes, "embedding_dim": self.embedding_dim,
                "shard_range": list(self.shard_range), "sampler_state": self.sampler.get_state()}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a DistributedMarginHead checkpoint (missing or unknown format)")
        if (state["num_classes"], state["embedding_dim"]) != (self.num_classes, self.embedding_dim):
            raise ValueError(f"checkpoint is for {state['num_classes']} classes x {state['embedding_dim']}, "
                             f"this head has {self.num_classes} x {self.embedding_dim}")
        if tuple(state["shard_range"]) != tuple(self.shard_range):
            raise ValueError(f"checkpoint shard holds classes {tuple(state['shard_range'])}, this rank owns "
                             f"{self.shard_range}: load with margin_kernels.distributed.load_sharded to reshard")
        if state.get("sampler_state") is not None:
            self.sampler.set_state(state["sampler_state"])

    # ---- consistency across ranks ------------------------------------------------------------------------
    def _configuration(self) -> tuple:
        return (self.num_classes, self.embedding_dim, type(self.margin).__name__, repr(self.margin),
                self.sampler.sample_rate, str(self.weight.dtype), self.reduction, self.ignore_index, self.seed,
                self.ddp_backbone)

    def _check_same_configuration(self) -> None:
        configs = all_gather_objects(self._configuration(), self.process_group)
        differing = [r for r, c in enumerate(configs) if c != configs[0]]
        if differing:
            raise ValueError(f"DistributedMarginHead must be built with the same arguments on every rank; ranks "
                             f"{differing} differ from rank 0: {configs[differing[0]]} vs {configs[0]}")

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, shard_range={self.shard_range}, "
                f"sample_rate={self.sampler.sample_rate}, backend={self.backend!r}, dtype={self.weight.dtype}")


def fill_rows_normal(weight: torch.Tensor, start: int, seed: int, std: float) -> None:
    """Fill ``weight`` with rows [start, start + len) of one virtual N(0, std^2) class matrix. Rows are drawn
    in blocks of INIT_BLOCK_ROWS classes, each block from its own generator, so the full matrix does not depend
    on how it is sharded (on one device type)."""
    stop = start + weight.shape[0]
    draw_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    generator = torch.Generator(device=weight.device)
    for block in range(start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS + 1):
        first = block * INIT_BLOCK_ROWS
        generator.manual_seed(derived_seed(seed, INIT_STREAM, first))
        rows = torch.randn(INIT_BLOCK_ROWS, weight.shape[1], generator=generator, dtype=draw_dtype,
                           device=weight.device).mul_(std)
        lo, hi = max(start, first), min(stop, first + INIT_BLOCK_ROWS)
        weight[lo - start:hi - start].copy_(rows[lo - first:hi - first])
