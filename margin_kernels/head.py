"""``MarginHead``: the drop-in for the FC + cross-entropy bottleneck (insightface's margin loss + PartialFC call
shape: ``loss = head(embeddings, labels)``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import margin_cross_entropy
from .losses.base import MarginLoss


class MarginHead(nn.Module):
    """Holds the class weight (num_classes, embedding_dim) and the loss description; forward returns the loss.

    The weight is initialised as insightface's PartialFC: normal with std 0.01. Stateful losses keep their
    state in the ``margin`` submodule's buffers, so it is in ``state_dict`` and follows ``train()``/``eval()``.
    The weight's dtype is the compute dtype: features of another floating dtype (bf16/fp16 from a backbone
    under AMP autocast) are cast to it (B x d, never the C x d weight), as ``DistributedMarginHead`` does; store
    the weight in bf16 (``dtype=torch.bfloat16``) for bf16 kernels. Accumulation is fp32 either way.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: MarginLoss, *, backend: str = "auto",
                 reduction: str = "mean", ignore_index: int = -1, chunk_size: Optional[int] = None,
                 check_values: bool = True, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(embedding_dim, int) or embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if not isinstance(margin, MarginLoss):
            raise TypeError(f"margin must be a margin_kernels loss, got {type(margin).__name__}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.margin = margin
        self.backend, self.reduction, self.ignore_index, self.chunk_size = backend, reduction, ignore_index, chunk_size
        # the value checks (finite features, labels in range) cost a device sync per step on GPU
        self.check_values = check_values
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, 0.01)

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(features, torch.Tensor) and features.is_floating_point() and features.dtype != self.weight.dtype:
            features = features.to(self.weight.dtype)
        return margin_cross_entropy(features, self.weight, labels, self.margin, backend=self.backend,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    chunk_size=self.chunk_size, class_index=class_index,
                                    check_values=self.check_values)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, backend={self.backend!r}, "
                f"dtype={self.weight.dtype}")
