"""Every loss by name, once: the families (default parameters; the CLI's ``--loss`` list) and the named
variants that reach each branch of a loss's formula (what the conformance tests run over every backend)."""
from __future__ import annotations

from functools import partial
from typing import Callable

from .adacos import AdaCos
from .adaface import AdaFace
from .additive import ArcFace, CombinedMargin, CosFace
from .base import MarginLoss
from .binary import SphereFace2, UniFace
from .circle import CircleLoss
from .curricular import CurricularFace
from .elastic import ElasticArcFace, ElasticCosFace
from .magface import MagFace
from .multiplicative import LSoftmax, SphereFace
from .mv_softmax import MVSoftmax
from .npcface import NPCFace
from .plain import L2Softmax, NormFace, Softmax
from .subcenter import SubCenterArcFace

#: family name -> loss class (constructed with its defaults; ElasticFace seeded, so that fresh copies, as the
#: CLI builds one per backend it compares, draw the same margins)
FAMILIES: dict = {
    "softmax": Softmax,
    "l2softmax": L2Softmax,
    "normface": NormFace,
    "lsoftmax": LSoftmax,
    "sphereface": SphereFace,
    "cosface": CosFace,
    "arcface": ArcFace,
    "combined": CombinedMargin,
    "curricularface": CurricularFace,
    "mvsoftmax": MVSoftmax,
    "magface": MagFace,
    "adaface": AdaFace,
    "circle": CircleLoss,
    "elasticarcface": partial(ElasticArcFace, seed=0),
    "elasticcosface": partial(ElasticCosFace, seed=0),
    "adacos": AdaCos,
    "npcface": NPCFace,
    "subcenter_arcface": SubCenterArcFace,
    "sphereface2": SphereFace2,
    "uniface": UniFace,
}

#: variant name -> factory; together they cover every branch of docs/losses.md (easy margin, straight-through,
#: the general combined margin, interclass filtering, MV-Softmax's AM and Arc forms ...)
VARIANTS: dict = {
    "softmax": lambda: Softmax(),
    "l2softmax": lambda: L2Softmax(s=16.0),
    "normface": lambda: NormFace(s=30.0),
    "lsoftmax": lambda: LSoftmax(m=3),
    "sphereface": lambda: SphereFace(m=4),
    "cosface": lambda: CosFace(),
    "arcface": lambda: ArcFace(),
    "arcface_easy": lambda: ArcFace(easy_margin=True),
    "arcface_st": lambda: ArcFace(straight_through=True),
    "arcface_insightface": lambda: ArcFace(mode="insightface"),
    "arcface_facexzoo": lambda: ArcFace(mode="facexzoo", margin_am=0.2),
    "combined": lambda: CombinedMargin(),
    "combined_cosface_branch": lambda: CombinedMargin(m1=1.2, m2=0.3, m3=0.2),
    "combined_general": lambda: CombinedMargin(m1=0.9, m2=0.4, m3=0.15, mode="paddle"),
    "combined_filter": lambda: CombinedMargin(interclass_filtering_threshold=0.1),
    "curricularface": lambda: CurricularFace(),
    "mv_am": lambda: MVSoftmax(variant="am"),
    "mv_arc": lambda: MVSoftmax(variant="arc"),
    "magface": lambda: MagFace(),
    "magface_facexzoo": lambda: MagFace(mode="facexzoo", margin_am=0.1),
    "adaface": lambda: AdaFace(),
    "circle": lambda: CircleLoss(),
    # seeded draws (a deep copy draws the same margins); std 0.1 so the rows' margins visibly differ
    "elastic_arc": lambda: ElasticArcFace(std=0.1, seed=0),
    "elastic_cos": lambda: ElasticCosFace(std=0.1, seed=0),
    "elastic_arc_plus": lambda: ElasticArcFace(std=0.1, plus=True, seed=0),
    "elastic_cos_plus": lambda: ElasticCosFace(std=0.1, plus=True, seed=0),
    "elastic_arc_plus_paper": lambda: ElasticArcFace(std=0.1, plus=True, plus_order="paper", seed=0),
    "adacos": lambda: AdaCos(),
    "adacos_lagged": lambda: AdaCos(update="lagged"),
    "adacos_fixed": lambda: AdaCos(dynamic=False),
    "npcface": lambda: NPCFace(),
    "subcenter_arcface": lambda: SubCenterArcFace(),
    "subcenter_arcface_insightface": lambda: SubCenterArcFace(sub_centers=2, mode="insightface"),
    # the binary family: biases from the authors' initialisations for 100 classes; uniface_clamp puts many
    # logits beyond UniFace's clamp at +-s (s = 16 with a large bias)
    "sphereface2": lambda: SphereFace2(num_class=100),
    "sphereface2_exact": lambda: SphereFace2(num_class=100, straight_through=False),
    "sphereface2_a": lambda: SphereFace2(magn_type="A", num_class=100),
    "sphereface2_m": lambda: SphereFace2(magn_type="M", m=1.5, num_class=100),
    "uniface": lambda: UniFace(out_features=100),
    "uniface_clamp": lambda: UniFace(s=16.0, bias=12.0),
}


def loss_names() -> list:
    """Every name ``make_loss`` accepts: the families, then the variants that are not family names."""
    return list(FAMILIES) + [name for name in VARIANTS if name not in FAMILIES]


def make_loss(name: str) -> MarginLoss:
    """A fresh loss for a family or variant name (ValueError naming the known ones otherwise)."""
    factory: Callable = VARIANTS.get(name) or FAMILIES.get(name)
    if factory is None:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(loss_names())}")
    return factory()
