"""The inputs of a benchmark problem, rebuilt identically (same seed, same values) in every child process.

W is drawn like insightface initialises a head (normal, std 0.01) and the features are standard normal, so
the plain-Softmax logits are O(0.2) and the margin losses see spread-out cosines. W is filled in fixed-size
blocks drawn in fp32 and cast: no full-size fp32 temporary for low-precision storage, and the same values for
every dtype (the block schedule does not depend on it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DTYPES, Problem, make_loss

WEIGHT_STD = 0.01
_BLOCK_ROWS = 1 << 16


@dataclass
class Inputs:
    features: torch.Tensor  # (B, d) storage dtype
    weight: torch.Tensor    # (C K, d) storage dtype (K = the loss's sub_centers, 1 for most)
    labels: torch.Tensor    # (B,) int64 in [0, C)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.features, self.weight, self.labels))


def make_inputs(problem: Problem) -> Inputs:
    device = torch.device(problem.device)
    dtype = DTYPES[problem.dtype]
    gen = torch.Generator(device=device).manual_seed(problem.seed)
    features = torch.randn(problem.batch, problem.dim, generator=gen, device=device).to(dtype)
    labels = torch.randint(0, problem.classes, (problem.batch,), generator=gen, device=device)
    # a loss with K sub-centers per class (SubCenterArcFace) has K weight rows per class
    weight = torch.empty(problem.classes * make_loss(problem.loss).sub_centers, problem.dim, dtype=dtype,
                         device=device)
    for row0 in range(0, problem.classes, _BLOCK_ROWS):
        block = weight[row0:row0 + _BLOCK_ROWS]
        block.copy_(torch.randn(block.shape, generator=gen, device=device).mul_(WEIGHT_STD))
    return Inputs(features, weight, labels)
