"""Shared test fixtures: every loss variant (margin_kernels.losses.registry), random inputs, error norms."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import margin_kernels as mk
from margin_kernels.losses.negatives import NegativeKind, NegativeSpec
from margin_kernels.losses.registry import VARIANTS

# every loss variant, from the package's one registry (each branch of docs/losses.md)
LOSS_FACTORIES = VARIANTS
LOSS_NAMES = list(LOSS_FACTORIES)


#: a spec per kind whose constants put the kind's branch points inside the cosine range
SPECS = {
    NegativeKind.IDENTITY: NegativeSpec(NegativeKind.IDENTITY, 30.0),
    NegativeKind.CLAMP: NegativeSpec(NegativeKind.CLAMP, 16.0, -0.3, 0.5),
    NegativeKind.CURRICULAR: NegativeSpec(NegativeKind.CURRICULAR, 64.0),
    NegativeKind.MV: NegativeSpec(NegativeKind.MV, 32.0, 1.12),
    NegativeKind.CIRCLE: NegativeSpec(NegativeKind.CIRCLE, 64.0, 0.25),
    NegativeKind.FILTER: NegativeSpec(NegativeKind.FILTER, 64.0, 0.1),
    NegativeKind.ROW_SCALE: NegativeSpec(NegativeKind.ROW_SCALE, 1.0),
    NegativeKind.AFFINE: NegativeSpec(NegativeKind.AFFINE, 64.0, 1.1, 0.2),
    # SphereFace2's h(c) with t = 3 and the negatives' margin 0.4 (no branch point inside: the floor at c = -1)
    NegativeKind.POWER: NegativeSpec(NegativeKind.POWER, 40.0, 3.0, 0.4),
    NegativeKind.POWER_ST: NegativeSpec(NegativeKind.POWER_ST, 40.0, 3.0, 0.4),
}


def make_loss(name: str) -> mk.MarginLoss:
    return LOSS_FACTORIES[name]()


def twin(margin: mk.MarginLoss) -> mk.MarginLoss:
    """An independent copy with the same state, for running two backends side by side."""
    return copy.deepcopy(margin)


def random_problem(batch, num_classes, dim, *, dtype=torch.float64, seed=0, ignore_rows=(), duplicate=False,
                   feature_scale=None, device="cpu", sub_centers=1):
    """Random features, weights and labels. Feature norms are drawn in MagFace's useful range [10, 110]
    (other losses normalise them away) so that every branch of the norm-dependent losses is reached.
    ``sub_centers`` K: the weight has K rows per class, and each row is pulled toward a random one of its
    class's rows (so the winning sub-center varies)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    norms = torch.empty(batch, dtype=torch.float64).uniform_(5.0, 120.0, generator=gen) if feature_scale is None \
        else torch.full((batch,), float(feature_scale), dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * norms.unsqueeze(1)
    w = torch.randn(num_classes * sub_centers, dim, generator=gen, dtype=torch.float64) * 0.05
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    if duplicate and batch > 1:
        labels[batch // 2:] = labels[0]
    for r in ignore_rows:
        labels[r] = -1
    # pull some features toward their class so targets span easy and hard pairs (all margin branches)
    with torch.no_grad():
        pull = torch.empty(batch, 1, dtype=torch.float64).uniform_(-3.0, 2.0, generator=gen)
        pick = labels.clamp_min(0) * sub_centers
        if sub_centers > 1:
            pick = pick + torch.randint(0, sub_centers, (batch,), generator=gen)
        target_w = w[pick]
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


@dataclass(frozen=True)
class Errors:
    """How far a backend is from the float64 reference on one problem: ``loss`` is the max-abs error of the
    per-row losses relative to max(1, max |loss|); ``dx`` and ``dw`` are relative L2 errors (rel_err)."""

    loss: float
    dx: float
    dw: float

    def as_dict(self) -> dict:
        return {"loss": self.loss, "dx": self.dx, "dw": self.dw}


def class_subset(classes: int, labels: torch.Tensor, seed: int):
    """A Partial-FC class_index (half of the classes, shuffled) and the labels remapped into it."""
    gen = torch.Generator().manual_seed(seed + 1)
    index = torch.randperm(classes, generator=gen)[: max(1, classes // 2)]
    return index, torch.where(labels >= 0, labels % index.numel(), labels)


def compare_with_references(backend, name, dtype, *, device="cpu", batch=12, classes=83, dim=24, chunk_size=32,
                            ignore_rows=(3,), duplicate=False, class_index=False, transposed_weight=False, seed=0,
                            grad_floor=0.0, reference_dtypes=(torch.float64,), memory_budget=None) -> dict:
    """{reference dtype: Errors} of ``backend`` against backend="reference" on one random problem.

    The problem is drawn in ``dtype``; each reference (on CPU) runs on those very tensors cast to its dtype:
    float64 (the ground truth, from the same rounded inputs) and, for bf16/fp16, the storage dtype itself
    (then it computes in fp32 from the same rounded x/||x|| as every backend, so a cosine that rounding moved
    across a branch point moves in both). Per-row losses (reduction="none"), so a wrong row cannot hide in a
    mean. ``transposed_weight`` stores W column-major (a non-contiguous view); ``grad_floor`` bounds the
    gradient errors' denominators below (tiny problems can have an almost exactly zero gradient)."""
    margin = make_loss(name)
    x, w, labels = random_problem(batch, classes, dim, dtype=dtype, seed=seed, ignore_rows=ignore_rows,
                                  duplicate=duplicate, sub_centers=margin.sub_centers)
    index = None
    if class_index:
        index, labels = class_subset(classes, labels, seed)
    ref_margins = [twin(margin) for _ in reference_dtypes]  # each run sees the same initial state

    def run(which, loss, a, b, y, idx, **kwargs):
        return loss_and_grads(lambda p, q: mk.margin_cross_entropy(p, q, y, loss, backend=which,
                                                                   reduction="none", class_index=idx,
                                                                   **kwargs), a, b)

    to_dev = (lambda t: None if t is None else t.to(device))
    w_dev = w.to(device)
    if transposed_weight:
        w_dev = w_dev.t().contiguous().t()
        assert not w_dev.is_contiguous()
    out = run(backend, margin.to(device), x.to(device), w_dev, labels.to(device), to_dev(index),
              chunk_size=chunk_size, memory_budget=memory_budget)
    out = [t.detach().cpu() for t in out]
    assert out[1].dtype == dtype and out[2].dtype == dtype, "gradients come back in the storage dtype"
    assert all(torch.isfinite(t).all() for t in out), f"{backend} {name}: non-finite loss or gradient"
    errors = {}
    for ref_dtype, ref_margin in zip(reference_dtypes, ref_margins):
        ref = run("reference", ref_margin, x.to(ref_dtype), w.to(ref_dtype), labels, index)
        ref = [t.double() for t in ref]
        scale = max(1.0, ref[0].abs().max().item())
        loss_err = (out[0].double() - ref[0]).abs().max().item() / scale
        errors[ref_dtype] = Errors(loss_err, rel_err(out[1], ref[1], grad_floor), rel_err(out[2], ref[2], grad_floor))
    return errors


def compare_with_reference(backend, name, dtype, **kwargs) -> Errors:
    """Errors of ``backend`` against the float64 reference on the same (rounded) inputs."""
    return compare_with_references(backend, name, dtype, **kwargs)[torch.float64]


def head_eager_and_compiled(head, x, labels, compiler: str):
    """((loss, dx, dW) eager, the same under torch.compile(head, fullgraph=True, backend=compiler)) of one call
    of ``head`` on fresh copies of ``x``."""
    def run(module):
        features = x.clone().requires_grad_(True)
        head.weight.grad = None
        loss = module(features, labels)
        loss.backward()
        return loss.detach(), features.grad, head.weight.grad.clone()

    eager = run(head)
    return eager, run(torch.compile(head, fullgraph=True, backend=compiler))
