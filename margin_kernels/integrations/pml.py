"""pytorch-metric-learning's classification losses with the fused kernels underneath.

``from margin_kernels.integrations.pml import ArcFaceLoss`` in place of ``from pytorch_metric_learning.losses
import ArcFaceLoss``: the same constructor (``num_classes, embedding_size, margin, scale``; ``temperature``
for NormalizedSoftmaxLoss), the same parameter ``W`` of shape (embedding_size, num_classes) initialised by
``weight_init_func`` (pml's default ``torch.nn.init.normal_``), the same ``state_dict`` keys (``W``), the same
call ``loss = loss_func(embeddings, labels)`` and the same value: pml's default reducer, the mean of the per-row
losses. The B x num_classes logits are never built (``get_logits`` builds them, for evaluation, as pml's does).

| class | margin_kernels loss | pml's target / logits |
|---|---|---|
| ``ArcFaceLoss(margin=28.6, scale=64)`` | ``ArcFace(s=scale, m=radians(margin))`` | cos(θ + m); past π − m, cos θ − m·sin m (= th/mm) |
| ``CosFaceLoss(margin=0.35, scale=64)`` | ``CosFace(s=scale, m=margin)`` | c − m |
| ``LargeMarginSoftmaxLoss(margin=4, scale=1)`` | ``LSoftmax(m=margin, λ = 0, s=scale)`` | ‖w‖‖x‖ψ_m(θ); negatives x·w_j |
| ``SphereFaceLoss(margin=4, scale=1)`` | ``SphereFace(m=margin, λ = 0, s=scale)`` | ‖x‖ψ_m(θ); negatives ‖x‖c_ij |
| ``NormalizedSoftmaxLoss(temperature=0.05)`` | ``NormFace(s=1 / temperature)`` | c / temperature |
| ``SubCenterArcFaceLoss(margin=28.6, scale=64, sub_centers=3)`` | ``SubCenterArcFace(s, m=radians(margin), K, mode="pml")`` | cos(θ + m) of the best of K sub-centers; ``W`` is (embedding_size, num_classes · K) |

Not supported (a ValueError naming the argument): miners' ``indices_tuple``, ``ref_emb`` / ``ref_labels``,
regularizers, reducers other than pml's ``MeanReducer``, distances other than the default. Differences,
none of them numerical with fp32 inputs: pml converts ``W`` itself to the embeddings' dtype and device on
every call (``cast_types``); here ``W`` keeps its dtype (fp32 master weights) and embeddings of another dtype
(bf16/fp16 under autocast) are cast to it, B x d, never W. Needs neither pytorch-metric-learning nor Triton.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from ..functional import margin_cross_entropy
from ..losses.additive import ArcFace, CosFace
from ..losses.base import MarginLoss
from ..losses.multiplicative import LSoftmax, SphereFace
from ..losses.plain import NormFace
from ..losses.subcenter import SubCenterArcFace
from ..norms import floored, normalized, row_norms
from ..subcenters import dominant_sub_centers
from ..reference import logits_from_cosines
from ..validation import check_chunk_size, check_positive_int
from .settings import SettingsModule

_UNSUPPORTED = ("embedding_regularizer", "weight_regularizer", "distance", "collect_stats")


class _PmlClassificationLoss(SettingsModule):
    """pml's weight-holding classification loss: ``W`` (embedding_size, num_classes), mean reduction.

    As pml's losses, an assigned ``margin`` / ``scale`` / ``temperature`` takes effect from the next call (the
    description is rebuilt, and a value it rejects raises and is undone); the sizes that shape ``W``
    (``num_classes``, ``embedding_size``, ``sub_centers``) are fixed: assigning one raises an AttributeError."""

    fixed = ("num_classes", "embedding_size", "sub_centers")
    settings = ("margin", "scale")

    def __init__(self, num_classes: int, embedding_size: int, *, weight_init_func: Optional[Callable] = None,
                 reducer=None, backend: str = "auto", chunk_size: Optional[int] = None, **kwargs):
        super().__init__()
        for name in _UNSUPPORTED:
            if kwargs.pop(name, None) not in (None, False):
                raise ValueError(f"{name} is not supported by margin_kernels.integrations.pml (use pml's own loss)")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        check_positive_int("num_classes", num_classes)
        check_positive_int("embedding_size", embedding_size)
        check_positive_int("sub_centers", self.weight_columns_per_class())
        check_chunk_size(chunk_size)
        if reducer is not None and type(reducer).__name__ != "MeanReducer":
            raise ValueError(f"reducer must be pml's MeanReducer (the default), got {type(reducer).__name__}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.backend, self.chunk_size = backend, chunk_size
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes * self.weight_columns_per_class()))
        (weight_init_func or nn.init.normal_)(self.W)
        # the description is not a submodule: pml's state dict holds W only (L-Softmax's iteration counter is
        # unused with lambda = 0)
        self.__dict__["_description"] = self.description()
        self.settings_ready()

    def apply_settings(self) -> None:
        self.__dict__["_description"] = self.description()

    def description(self) -> MarginLoss:
        raise NotImplementedError

    def weight_columns_per_class(self) -> int:
        return 1

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, indices_tuple=None,
                ref_emb=None, ref_labels=None) -> torch.Tensor:
        if labels is None:
            raise ValueError("labels are required (pml: labels_required)")
        if indices_tuple is not None:
            raise ValueError("indices_tuple (miners) is not supported by margin_kernels.integrations.pml")
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb / ref_labels are not supported (pml does not support them for this loss)")
        weight = self.W.t()  # (num_classes, embedding_size): a view, never a copy
        if embeddings.is_floating_point() and embeddings.dtype != weight.dtype:
            embeddings = embeddings.to(weight.dtype)
        return margin_cross_entropy(embeddings, weight, labels.to(embeddings.device), self._description,
                                    backend=self.backend, chunk_size=self.chunk_size)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """pml's ``get_logits``: the (B, num_classes) logits without margin (every class as a negative)."""
        margin = self._description
        weight = self.W.t().to(embeddings.dtype)
        x, feature_norm = margin.prepare_features(embeddings, embeddings.dtype)
        cos = x @ weight.t()
        if margin.normalize_weight:
            cos = cos / floored(row_norms(weight, weight.dtype))
        no_target = torch.zeros(cos.shape[0], dtype=torch.bool, device=cos.device)
        return logits_from_cosines(cos, torch.zeros(cos.shape[0], dtype=torch.long, device=cos.device), no_target,
                                   margin, feature_norm)[0]


class ArcFaceLoss(_PmlClassificationLoss):
    """pml's ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)``; ``margin`` in degrees."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, **kwargs):
        self.margin, self.scale = margin, scale
        super().__init__(num_classes, embedding_size, **kwargs)

    def description(self):
        return ArcFace(s=float(self.scale), m=math.radians(self.margin))


class CosFaceLoss(_PmlClassificationLoss):
    """pml's ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)``."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64, **kwargs):
        self.margin, self.scale = margin, scale
        super().__init__(num_classes, embedding_size, **kwargs)

    def description(self):
        return CosFace(s=float(self.scale), m=float(self.margin))


class LargeMarginSoftmaxLoss(_PmlClassificationLoss):
    """pml's ``LargeMarginSoftmaxLoss(num_classes, embedding_size, margin=4, scale=1)``: L-Softmax without the
    paper's lambda annealing; ``margin`` is cast to int as pml does."""

    multiplicative = LSoftmax

    def __init__(self, num_classes: int, embedding_size: int, margin: int = 4, scale: float = 1, **kwargs):
        self.margin, self.scale = int(margin), scale
        super().__init__(num_classes, embedding_size, **kwargs)

    def description(self):
        return self.multiplicative(m=self.margin, lambda_base=0.0, lambda_gamma=0.0, lambda_min=0.0,
                                   s=float(self.scale))


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """pml's ``SphereFaceLoss(num_classes, embedding_size, margin=4, scale=1)``: weights normalised, the
    embedding norm kept."""

    multiplicative = SphereFace


class NormalizedSoftmaxLoss(_PmlClassificationLoss):
    """pml's ``NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=0.05)``."""

    settings = ("temperature",)

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, **kwargs):
        self.temperature = temperature
        super().__init__(num_classes, embedding_size, **kwargs)

    def description(self):
        return NormFace(s=1.0 / float(self.temperature))


class SubCenterArcFaceLoss(ArcFaceLoss):
    """pml's ``SubCenterArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64, sub_centers=3)``: ``W`` is
    (embedding_size, num_classes * sub_centers), class j's sub-centers in columns j K .. j K + K - 1; each
    class's cosine is its best sub-center's, the max taken inside the kernels' tiles."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 sub_centers: int = 3, **kwargs):
        self.sub_centers = sub_centers
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **kwargs)

    def weight_columns_per_class(self) -> int:
        return self.sub_centers

    def description(self):
        return SubCenterArcFace(s=float(self.scale), m=math.radians(self.margin), sub_centers=self.sub_centers,
                                mode="pml")

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """pml's logits without margin: the best sub-center's cosine of every class, times the scale."""
        cos = normalized(embeddings, embeddings.dtype)[0] @ normalized(self.W.t(), self.W.dtype)[0].t()
        return cos.view(cos.shape[0], self.num_classes, self.sub_centers).amax(dim=2) * self.scale

    @torch.no_grad()
    def get_outliers(self, embeddings: torch.Tensor, labels: torch.Tensor, threshold: float = 75,
                     return_dominant_centers: bool = True):
        """pml's ``get_outliers``: (outlier sample indices, dominant centers (embedding_size, num_classes)),
        from ``subcenters.dominant_sub_centers`` (classes absent from ``labels`` get zero centers, where pml
        leaves uninitialised memory)."""
        outliers, dominant = dominant_sub_centers(embeddings, self.W.t(), labels, self.sub_centers, threshold)
        return (outliers, dominant.t()) if return_dominant_centers else outliers
