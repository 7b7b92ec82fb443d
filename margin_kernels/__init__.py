"""margin_kernels: margin-based softmax losses for large-identity classification without the B x C logits."""
from . import losses, ops, reference  # noqa: F401  (ops registers the custom ops)
from .backends import available_backends
from .backends.filter_stats import grad_filter_stats, reset_grad_filter_stats
from .functional import margin_cross_entropy
from .head import MarginHead
from .regularizers import CenterLoss, RingLoss
from .schedules import CosineScale, HeatedUp, LinearScale, ScaleSchedule, schedule_scale
from .losses import (AdaFace, ArcFace, CircleLoss, CombinedMargin, CosFace, CurricularFace, L2Softmax, LSoftmax,
                     MagFace, MarginLoss, MVSoftmax, NormFace, Softmax, SphereFace, SubCenterArcFace)
from .losses import AdaCos, ElasticArcFace, ElasticCosFace, NPCFace
from .losses import SphereFace2, UniFace

__version__ = "0.1.0"


def __getattr__(name):
    # the model-parallel head is imported on first use: plain users never import torch.distributed code
    if name == "DistributedMarginHead":
        from .distributed import DistributedMarginHead
        return DistributedMarginHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaCos", "ElasticArcFace", "ElasticCosFace", "NPCFace",
    "AdaFace", "ArcFace", "CircleLoss", "CombinedMargin", "CosFace", "CurricularFace", "DistributedMarginHead",
    "L2Softmax", "LSoftmax", "MVSoftmax", "MagFace", "MarginHead", "MarginLoss", "NormFace", "Softmax", "SphereFace",
    "SphereFace2", "UniFace", "SubCenterArcFace", "available_backends", "grad_filter_stats", "margin_cross_entropy",
    "reference", "reset_grad_filter_stats",
    "CenterLoss", "RingLoss", "CosineScale", "HeatedUp", "LinearScale", "ScaleSchedule", "schedule_scale",
]
