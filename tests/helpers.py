"""Shared test fixtures: every loss variant (margin_kernels.losses.registry), random inputs, error norms."""
from __future__ import annotations

import copy

import torch

import margin_kernels as mk
from margin_kernels.losses.registry import VARIANTS

# every loss variant, from the package's one registry (each branch of docs/losses.md)
LOSS_FACTORIES = VARIANTS
LOSS_NAMES = list(LOSS_FACTORIES)


def make_loss(name: str) -> mk.MarginLoss:
    return LOSS_FACTORIES[name]()


def twin(margin: mk.MarginLoss) -> mk.MarginLoss:
    """An independent copy with the same state, for running two backends side by side."""
    return copy.deepcopy(margin)


def random_problem(batch, num_classes, dim, *, dtype=torch.float64, seed=0, ignore_rows=(), duplicate=False,
                   feature_scale=None, device="cpu"):
    """Random features, weights and labels. Feature norms are drawn in MagFace's useful range [10, 110]
    (other losses normalise them away) so that every branch of the norm-dependent losses is reached."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    norms = torch.empty(batch, dtype=torch.float64).uniform_(5.0, 120.0, generator=gen) if feature_scale is None \
        else torch.full((batch,), float(feature_scale), dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * norms.unsqueeze(1)
    w = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 0.05
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    if duplicate and batch > 1:
        labels[batch // 2:] = labels[0]
    for r in ignore_rows:
        labels[r] = -1
    # pull some features toward their class so targets span easy and hard pairs (all margin branches)
    with torch.no_grad():
        pull = torch.empty(batch, 1, dtype=torch.float64).uniform_(-3.0, 2.0, generator=gen)
        target_w = w[labels.clamp_min(0)]
        x = x + pull * target_w / target_w.norm(dim=1, keepdim=True) * norms.unsqueeze(1)
    return (x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), labels.to(device))


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / ||ref||; ``floor`` bounds the denominator below for cases whose exact value is ~0
    (then the error is absolute, measured against ``floor``)."""
    ref = ref.double()
    denom = max(ref.norm().item(), floor)
    return (out.double() - ref).norm().item() / (denom if denom > 0 else 1.0)


def loss_and_grads(fn, x, w, *extra_inputs):
    """Run fn(x, w) and return (loss, dx, dw) with fresh leaves (so two backends never share grads)."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, w)
    dx, dw = torch.autograd.grad(loss.sum(), [x, w])
    return loss.detach(), dx, dw
