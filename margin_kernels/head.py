"""``MarginHead``: the drop-in for the FC + cross-entropy bottleneck (insightface's margin loss + PartialFC call
shape: ``loss = head(embeddings, labels)``), the single-process case of ``DistributedMarginHead``."""
from __future__ import annotations

from typing import Optional

import torch

from .functional import columns_cross_entropy, num_label_columns, safe_columns
from .head_base import HeadBase
from .losses.base import MarginLoss
from .batch_reduction import reduce_rows
from .regularizers import regularizer_rows, single_process_rows
from .validation import check_arguments


class MarginHead(HeadBase):
    """Holds the class weight (num_classes, embedding_dim) and the loss description; forward returns the loss.
    With a sub-center loss (``margin.sub_centers`` = K) the weight is (num_classes * K, embedding_dim).

    Takes the same arguments as ``DistributedMarginHead`` (less the process group): the weight is initialised
    as insightface's PartialFC, N(0, 0.01^2), drawn from ``seed`` in blocks of classes, so it equals the
    concatenated shards of a ``DistributedMarginHead`` with the same seed at any world size.
    ``sample_rate < 1`` is Partial FC in training mode: every class of the batch plus uniformly drawn others,
    ``int(sample_rate * num_classes)`` in all, reproducible from ``seed`` (``head.sampled_classes`` holds the
    last draw); in eval mode every class is used. Stateful losses keep their state in the ``margin`` submodule's
    buffers, so it is in ``state_dict`` and follows ``train()``/``eval()``. The head's extra state
    (``_extra_state`` in ``state_dict``: sizes, class range, the Partial FC generator's state) is the distributed
    head's: a reloaded checkpoint continues the same draws, and ``distributed.reshard_state_dicts`` cuts a
    MarginHead's state_dict into any rank's shard of a ``DistributedMarginHead`` (or rejoins the shards into
    one). A checkpoint without it (weight and loss state only, saved before it was kept) still loads.

    The weight's dtype is the compute dtype: features of another floating dtype (bf16/fp16 from a backbone
    under AMP autocast) are cast to it (B x d, never the C x d weight); store the weight in bf16
    (``dtype=torch.bfloat16``) for bf16 kernels. Accumulation is fp32 either way. ``check_values`` as in
    ``margin_cross_entropy`` (device-side on a GPU, no host sync); with False a bad label gives a NaN loss.
    ``regularizers`` (a list of ``CenterLoss``/``RingLoss``) add their per-row terms to the per-row loss
    before the reduction. ``memory_budget`` (bytes, ``"auto"``, None = recompute) lets the op keep forward
    tiles for backward (``margin_kernels.memory_budget``).
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: MarginLoss, *, sample_rate: float = 1.0,
                 seed: int = 0, backend: str = "auto", reduction: str = "mean", ignore_index: int = -1,
                 chunk_size: Optional[int] = None, grad_filter: float = 0.0, check_values: bool = True,
                 dtype: Optional[torch.dtype] = None, device=None, regularizers=None, memory_budget=None,
                 optimizer=None):
        super().__init__(num_classes, embedding_dim, margin, shard_range=(0, num_classes), sample_rate=sample_rate,
                         seed=seed, backend=backend, reduction=reduction, ignore_index=ignore_index,
                         chunk_size=chunk_size, grad_filter=grad_filter, check_values=check_values, dtype=dtype,
                         device=device, regularizers=regularizers, memory_budget=memory_budget,
                         optimizer=optimizer)

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``class_index`` (Partial FC chosen by the caller) replaces the head's own sampling for this call."""
        weight = self.weight
        if isinstance(features, torch.Tensor) and features.is_floating_point() and features.dtype != weight.dtype:
            features = features.to(weight.dtype)
        options = dict(backend=self.resolved_backend, reduction=self.reduction, chunk_size=self.chunk_size,
                       grad_filter=self.grad_filter, memory_budget=self.memory_budget)
        check_arguments(features, weight, labels, self.margin, ignore_index=self.ignore_index,
                        class_index=class_index, check_values=self.check_values, **options)
        # the labels made safe once (column ids, -1 for none; bad ones marked for a NaN loss): every later step,
        # the sampler's gathers included, reads these
        safe = safe_columns(labels, self.ignore_index, num_label_columns(weight, class_index, self.margin),
                            class_index, self.num_classes)
        rows = single_process_rows(features, safe.columns, class_index) if len(self.regularizers) else None
        if class_index is None:
            columns, index = self.sample_columns(safe.columns)
            safe = safe._replace(columns=columns, class_index=index)
        options.update(check_values=self.check_values, sink_factory=self.gradient_sink())
        if rows is None:
            return columns_cross_entropy(features, weight, safe, self.margin, **options)
        options["reduction"] = "none"
        per_row = columns_cross_entropy(features, weight, safe, self.margin, **options)
        # a poisoned row (bad label, check_values=False) keeps its NaN: it counts as a row, as in the driver
        return reduce_rows(per_row + regularizer_rows(self.regularizers, rows), rows.valid | safe.poisoned,
                           self.reduction)

    # ---- checkpoints: HeadBase's extra state (sizes, class range, the Partial FC generator) ----------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # an older checkpoint (weight and loss state only) still loads strictly
