"""insightface arcface_torch's ``losses.py`` and ``partial_fc_v2.py`` with the fused kernels underneath.

In arcface_torch's ``train_v2.py``, replace

    from losses import CombinedMarginLoss
    from partial_fc_v2 import PartialFC_V2

by ``from margin_kernels.integrations.insightface import CombinedMarginLoss, PartialFC_V2``: the constructors,
``forward(local_embeddings, local_labels)``, the parameters the optimizer sees and the ``state_dict`` keys
(``weight``, this rank's (num_local, embedding_size) rows) are insightface's, so its checkpoints load both ways.
What insightface computes with B x C logits runs here as ``DistributedMarginHead`` (world size 1 without an
initialised process group), so the logits are never materialised:

* the margin: ``CombinedMarginLoss`` is ``margin_kernels.CombinedMargin`` in its insightface mode (arc branch
  with its no-grad margin, CosFace branch ignoring m1/m2, interclass filtering); ``ArcFace`` and ``CosFace``
  are arcface_torch's classes of the same names;
* the classes are split over ranks as insightface splits them, and the initial weight is drawn as
  insightface draws it, ``torch.normal(0, 0.01, (num_local, embedding_size))`` from the global generator, so
  after the same ``setup_seed`` both start from the same rows;
* ``sample_rate < 1``: every positive class of the global batch plus negatives from ``torch.rand`` on the
  global CPU generator, the positives forced to the top, ``int(sample_rate * num_local)`` classes in all per
  rank (all positives when they alone are more): insightface's rule and draw, step for step;
* ``DistCrossEntropy``: each row's probability is floored at 1e-30 as insightface's does, so the loss each row
  reports is at most -log(1e-30) = 69.08; like insightface's backward, the gradient ignores that floor;
* the gradient returned to the embeddings is multiplied by the world size (insightface's ``AllGather``
  backward: DDP then averages it);
* ``fp16=True``: the products run in fp16 under autocast with the fp32 weight cast in registers (Triton) as
  insightface's ``torch.cuda.amp.autocast(self.fp16)`` around its ``linear``; accumulation and the loss are
  fp32, so a ``GradScaler`` at s = 64 sees no fp16 logits to overflow.

Differences, none of them numerical: batch sizes may differ per rank and step (insightface asserts they do
not), ``local_labels`` is not squeezed in place, labels equal to -1 are ignored rows (insightface has none: it
would count them with loss 69.08), and a ``margin_kernels.MarginLoss`` may be passed as ``margin_loss``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..distributed.comm import all_reduce_sum_
from ..distributed.head import DistributedMarginHead
from ..losses.additive import ArcFace as _ArcFace, CombinedMargin, CosFace as _CosFace
from ..losses.base import MarginLoss
from ..reference import logits_from_cosines
from ..sampling import PartialFCSampler
from ..validation import check_positive_int
from .settings import SettingsModule

#: DistCrossEntropy's floor of each row's probability (``loss.clamp_min_(1e-30)``)
PROBABILITY_FLOOR = 1e-30
LOSS_CAP = -math.log(PROBABILITY_FLOOR)


class _InsightfaceMargin(SettingsModule):
    """An arcface_torch margin module: ``forward(logits, labels)`` maps clamped cosine logits (B, C) and
    labels (-1 = no target on this rank) to scaled margin logits, as its code does (the full-logit path, for
    code that calls the module directly). ``PartialFC_V2`` never calls it: it runs ``description``, the
    ``margin_kernels`` loss the fused kernels compute.

    Its settings may be assigned, as insightface's (which reads them on every call): the description is
    updated in place (``aliases``: setting -> the description's attribute), so a ``PartialFC_V2`` built on the
    module follows too; a value the description rejects raises and is undone."""

    description: MarginLoss
    #: setting -> the description's attribute it sets
    aliases: dict = {}

    @property
    def settings(self):  # type: ignore[override]
        return tuple(self.aliases)

    def apply_settings(self) -> None:
        for name, target in self.aliases.items():
            if getattr(self.description, target) != float(getattr(self, name)):
                setattr(self.description, target, float(getattr(self, name)))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1).long()
        valid = labels != -1
        return logits_from_cosines(logits, labels, valid, self.description)[0]


class CombinedMarginLoss(_InsightfaceMargin):
    """arcface_torch's ``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0)``; a setting its
    code rejects (m1 != 1 with m3 == 0) raises a ValueError here at construction."""

    aliases = {"s": "s", "m1": "m1", "m2": "m2", "m3": "m3",
               "interclass_filtering_threshold": "interclass_filtering_threshold"}

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.description = CombinedMargin(float(s), float(m1), float(m2), float(m3),
                                          float(interclass_filtering_threshold), mode="insightface")
        self.settings_ready()


class ArcFace(_InsightfaceMargin):
    """arcface_torch's ``ArcFace(s=64.0, margin=0.5)``: cos(theta + m) applied under no_grad, no th/mm rule."""

    aliases = {"s": "s", "margin": "m"}

    def __init__(self, s=64.0, margin=0.5):
        super().__init__()
        self.s, self.margin = s, margin
        self.description = _ArcFace(float(s), float(margin), mode="insightface")
        self.settings_ready()


class CosFace(_InsightfaceMargin):
    """arcface_torch's ``CosFace(s=64.0, m=0.40)``: c - m at the target, exact gradient."""

    aliases = {"s": "s", "m": "m"}

    def __init__(self, s=64.0, m=0.40):
        super().__init__()
        self.s, self.m = s, m
        self.description = _CosFace(float(s), float(m))
        self.settings_ready()


def _loss_description(margin_loss) -> MarginLoss:
    if isinstance(margin_loss, MarginLoss):
        return margin_loss
    if isinstance(margin_loss, _InsightfaceMargin):
        return margin_loss.description
    raise TypeError("margin_loss must be CombinedMarginLoss, ArcFace or CosFace from "
                    "margin_kernels.integrations.insightface, or a margin_kernels.MarginLoss; got "
                    f"{type(margin_loss).__name__} (the fused kernels need the margin as a description, not as a "
                    "function of full logits)")


class _GlobalGeneratorSampler(PartialFCSampler):
    """insightface's negatives: ``torch.rand(num_local)`` on the process's default CPU generator (the one
    ``setup_seed`` seeds), one draw per training step, nothing to checkpoint."""

    def scores(self) -> torch.Tensor:
        return torch.rand(self.num_local)


class PartialFC_V2(SettingsModule, DistributedMarginHead):  # noqa: N801 - insightface's name
    """arcface_torch's ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False)``
    on ``DistributedMarginHead``; ``loss = module(local_embeddings, local_labels)`` on every rank.

    Keyword-only extras: ``backend`` / ``chunk_size`` (as for ``margin_cross_entropy``), ``process_group``.
    The state dict holds ``weight`` only, as insightface's (no ``_extra_state``: the sampler draws from the
    global generator, which insightface does not checkpoint either). ``fp16`` may be assigned; the sizes, the
    rate and the margin module (the sampler and the description are built from them) are fixed: assigning one
    raises. Assign the margin module's own settings instead (``module.margin_softmax.s = 32``).
    """

    fixed = ("margin_softmax", "embedding_size", "num_classes", "sample_rate")

    _version = 2
    # the per-row losses are floored like DistCrossEntropy's and averaged here, identically on every rank
    reductions = ("none",)
    # insightface's state dict: ``weight`` and nothing else
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, margin_loss, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 fp16: bool = False, *, backend: str = "auto", chunk_size: Optional[int] = None,
                 process_group=None):
        margin = _loss_description(margin_loss)
        check_positive_int("embedding_size", embedding_size)  # insightface's name (the head says embedding_dim)
        super().__init__(num_classes, embedding_size, margin, sample_rate=sample_rate, backend=backend,
                         reduction="none", chunk_size=chunk_size, process_group=process_group, ddp_backbone=True)
        self.margin_softmax = margin_loss
        self.embedding_size, self.sample_rate, self.fp16 = embedding_size, float(sample_rate), bool(fp16)
        self.sampler = _GlobalGeneratorSampler(self.num_local, sample_rate, device=self.weight.device)
        self.settings_ready()

    def reset_parameters(self) -> None:
        # insightface: torch.nn.Parameter(torch.normal(0, 0.01, (num_local, embedding_size)))
        with torch.no_grad():
            self.weight.copy_(torch.normal(0, 0.01, tuple(self.weight.shape)))

    @property
    def class_start(self) -> int:
        return self.shard_range[0]

    @property
    def num_sample(self) -> int:
        return self.sampler.num_sampled

    @property
    def weight_index(self) -> Optional[torch.Tensor]:
        """The last step's sampled rows of ``weight`` (local ids; None without sampling)."""
        return None if self.sampled_classes is None else self.sampled_classes - self.class_start

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        local_labels = local_labels.reshape(-1).long()
        # insightface: torch.cuda.amp.autocast(self.fp16) around its products (off when fp16=False)
        with torch.autocast(self.weight.device.type, dtype=torch.float16, enabled=self.fp16):
            per_row = super().forward(local_embeddings, local_labels)
        # DistCrossEntropy: -log(clamp_min(p, 1e-30)), the floor in the value only (its backward ignores it)
        capped = per_row - (per_row - per_row.clamp_max(LOSS_CAP)).detach()
        valid = (local_labels != self.ignore_index).sum().reshape(1).to(self.weight.device)  # NCCL: on the device
        count = all_reduce_sum_(valid, self.process_group)
        return capped.sum() / count.clamp_min(1).to(capped.dtype).squeeze(0)
