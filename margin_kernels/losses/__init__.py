"""One description per loss of docs/losses.md; every backend consumes these and none restates a formula."""
from .adacos import AdaCos
from .adaface import AdaFace
from .additive import ArcFace, CombinedMargin, CosFace
from .base import MarginLoss, RowInputs
from .binary import SphereFace2, UniFace
from .circle import CircleLoss
from .curricular import CurricularFace
from .elastic import ElasticArcFace, ElasticCosFace
from .magface import MagFace
from .multiplicative import LSoftmax, SphereFace
from .mv_softmax import MVSoftmax
from .negatives import NegativeKind, NegativeSpec
from .npcface import NPCFace
from .reductions import ReductionKind
from .plain import L2Softmax, NormFace, Softmax
from .subcenter import SubCenterArcFace

__all__ = [
    "AdaCos", "ElasticArcFace", "ElasticCosFace", "NPCFace",
    "AdaFace", "ArcFace", "CircleLoss", "CombinedMargin", "CosFace", "CurricularFace", "L2Softmax", "LSoftmax",
    "MVSoftmax", "MagFace", "MarginLoss", "NegativeKind", "NegativeSpec", "NormFace", "RowInputs", "Softmax",
    "SphereFace", "SphereFace2", "SubCenterArcFace", "UniFace", "ReductionKind",
]
