"""Partial FC (An et al. 2022, insightface's PartialFC_V2): per step, each shard uses only a subset of its classes
(a shard is a rank's classes in ``DistributedMarginHead``, every class in ``MarginHead``).

The subset always holds every class of the shard that appears in the *global* batch (the positives), and is
topped up with negatives drawn uniformly without replacement until it has ``num_sampled`` classes. It is
handed to the kernels as a sorted class index (``class_index``), so no row of W is copied; labels are remapped
into positions of that index. Same semantics as insightface: ``int(sample_rate * num_local)`` classes, all
positives kept even when they alone exceed that number, random scores from one generator per rank seeded from
the user's seed (reproducible run to run).
"""
from __future__ import annotations

import warnings

import torch

from .validation import check_positive_int, check_sample_rate


def num_sampled(num_local: int, sample_rate: float) -> int:
    """Classes kept per step on a shard of ``num_local`` classes (before adding positives beyond it)."""
    check_positive_int("num_local", num_local)
    sample_rate = check_sample_rate(sample_rate)
    return max(1, min(num_local, int(sample_rate * num_local)))


SAMPLER_STREAM, INIT_STREAM = 1, 2

#: why a head cannot be traced while it samples (raised while dynamo traces ``sample``, before any shape
#: depends on the data, so torch.compile(fullgraph=True) reports this instead of a graph break deep inside)
COMPILE_REFUSAL = (
    "Partial FC (sample_rate < 1, training mode) cannot run inside torch.compile(fullgraph=True): the sampled "
    "class index keeps every positive class of the batch, so its size depends on the labels, and it is drawn "
    "from the sampler's own torch.Generator, which dynamo does not trace. Compile the backbone and call the "
    "head eagerly (torch.compile(backbone); loss = head(features, labels)), or compile without fullgraph (the "
    "sampler then runs eagerly between graphs), or use sample_rate=1.0 for a fully compiled head")


def derived_seed(seed: int, stream: int, offset: int) -> int:
    """A generator seed per (use, class offset), so every shard and every weight block draws its own stream
    from the single user seed."""
    return ((int(seed) * 0x9E3779B97F4A7C15 + int(stream)) * 0xBF58476D1CE4E5B9 + int(offset)) % (1 << 63)


class PartialFCSampler:
    """Draws the class index of one shard per step. ``num_local`` classes, ``sample_rate`` in (0, 1]."""

    def __init__(self, num_local: int, sample_rate: float, *, seed: int = 0, shard_start: int = 0, device=None):
        self.num_local = check_positive_int("num_local", num_local)
        self.sample_rate = check_sample_rate(sample_rate)
        self.num_sampled = num_sampled(self.num_local, self.sample_rate)
        self.generator = torch.Generator(device=device or "cpu")
        self.generator.manual_seed(derived_seed(seed, SAMPLER_STREAM, shard_start))

    @property
    def active(self) -> bool:
        """False when the rate keeps every class: then the kernels run on the full shard, no index at all."""
        return self.num_sampled < self.num_local

    def sample(self, local_positives: torch.Tensor) -> torch.Tensor:
        """Sorted int64 class index (local ids) holding every id >= 0 of ``local_positives`` (any order,
        repeats allowed; -1 = a row without a local target, skipped) plus uniformly drawn others,
        ``max(num_sampled, #unique positives)`` ids in all."""
        if torch.compiler.is_compiling():
            raise RuntimeError(COMPILE_REFUSAL)
        device = self.generator.device
        local_positives = local_positives[local_positives >= 0]
        positives = torch.unique(local_positives.to(device=device, dtype=torch.long))
        if positives.numel() > self.num_sampled:
            return positives  # torch.unique sorts
        # insightface's draw (also when the positives fill the sample exactly, as its `>= 0` test does):
        # uniform scores, positives forced to the top, keep the num_sampled best
        scores = self.scores().to(device)
        scores[positives] = 2.0
        return scores.topk(self.num_sampled, sorted=False).indices.sort().values

    def scores(self) -> torch.Tensor:
        """One uniform score per local class, from this sampler's generator."""
        return torch.rand(self.num_local, generator=self.generator, device=self.generator.device)

    @staticmethod
    def remap(index: torch.Tensor, local_columns: torch.Tensor) -> torch.Tensor:
        """Local class ids (-1 = no local target) -> positions in ``index`` (-1 kept)."""
        positions = torch.searchsorted(index, local_columns.clamp_min(0))
        return torch.where(local_columns >= 0, positions, torch.full_like(positions, -1))

    # the generator state travels with the head's checkpoint (restored when the shard range is unchanged)
    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """A state saved from a generator of another device type (a head built on a GPU, loaded into one built
        on the CPU, e.g. for evaluation) does not fit: the sampler keeps its own state and says so."""
        if not isinstance(state, torch.Tensor) or state.shape != self.get_state().shape:
            warnings.warn(f"the checkpoint's Partial FC generator state does not fit this head's "
                          f"{self.generator.device.type} generator (saved by a head built on another device "
                          f"type): the sampler continues from its own state, so later draws differ from the "
                          f"saved run's", stacklevel=3)
            return
        self.generator.set_state(state.cpu())
