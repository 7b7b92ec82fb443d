"""What is measured: our backends, the GEMM floor, and (from ``peers.py``) other libraries.

A ``Method`` says whether it can run a problem here (``unavailable`` returns the reason it cannot) and builds a
``Run`` (``timing.Run``) on the problem's inputs. Runs use the input tensors themselves as autograd leaves:
no copy of W is made, so the memory probe sees only what the method allocates.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import margin_kernels as mk
from margin_kernels.backends import BACKEND_NAMES, resolve_backend

from .config import Problem, make_loss
from .problem import Inputs

#: column width of the GEMM floor's tiles: large enough for full GEMM efficiency, small enough to never be
#: the thing that runs out of memory (B x 65536 elements)
FLOOR_CHUNK = 1 << 16


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "backend" | "peer" | "floor"
    description: str
    unavailable: Callable[[Problem], Optional[str]]
    build: Callable[[Problem, Inputs], "AutogradRun | GemmFloorRun"]
    #: its loss and gradients are comparable with margin_kernels' reference of the problem's loss
    checkable: bool = True


class AutogradRun:
    """loss = fn(features, weight, labels); backward through autograd into .grad of the inputs."""

    def __init__(self, fn, inputs: Inputs):
        self.fn = fn
        self.x = inputs.features.requires_grad_(True)
        self.w = inputs.weight.requires_grad_(True)
        self.labels = inputs.labels
        self.loss: Optional[torch.Tensor] = None

    def forward(self) -> None:
        self.loss = self.fn(self.x, self.w, self.labels)

    def backward(self) -> None:
        self.loss.backward()

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.grad, self.w.grad

    def reset(self) -> None:
        self.loss = None
        self.x.grad = None
        self.w.grad = None


class GemmFloorRun:
    """The four GEMMs of B x C x d alone, in the storage dtype: forward (x W^T), and in backward the
    recompute (x W^T), dx (G W) and dW (G^T x) with a fixed random G standing for dL/dlogits. Tiled over
    classes (``FLOOR_CHUNK``) so the floor never materialises B x C itself."""

    def __init__(self, inputs: Inputs):
        self.x, self.w = inputs.features, inputs.weight
        width = min(FLOOR_CHUNK, self.w.shape[0])
        gen = torch.Generator(device=self.x.device).manual_seed(1)
        self.g = torch.randn(self.x.shape[0], width, generator=gen, device=self.x.device).to(self.x.dtype)
        self.dx: Optional[torch.Tensor] = None
        self.dw: Optional[torch.Tensor] = None
        self.loss = None

    def _tiles(self):
        for col0 in range(0, self.w.shape[0], self.g.shape[1]):
            w = self.w[col0:col0 + self.g.shape[1]]
            yield col0, w, self.g[:, :w.shape[0]]

    def forward(self) -> None:
        for _, w, _ in self._tiles():
            torch.mm(self.x, w.t())

    def backward(self) -> None:
        self.dx = torch.zeros_like(self.x)
        self.dw = torch.empty_like(self.w)
        for col0, w, g in self._tiles():
            torch.mm(self.x, w.t())
            self.dx.addmm_(g, w)
            torch.mm(g.t(), self.x, out=self.dw[col0:col0 + w.shape[0]])

    def grads(self):
        return self.dx, self.dw

    def reset(self) -> None:
        self.dx = self.dw = None


def _device_rule(name: str, problem: Problem) -> Optional[str]:
    if name in ("triton", "cuda") and problem.device != "cuda":
        return f"the {name!r} backend needs a CUDA device (benchmarking on {problem.device})"
    if name == "cpu" and problem.device != "cpu":
        return "the 'cpu' backend runs on CPU tensors only"
    return None


def _backend_unavailable(name: str) -> Callable[[Problem], Optional[str]]:
    def reason(problem: Problem) -> Optional[str]:
        if name == "auto":
            return None
        return _device_rule(name, problem) or mk.available_backends().get(name, f"unknown backend {name!r}")
    return reason


def resolved_auto(device: str) -> str:
    """The backend "auto" picks on ``device`` (quietly: the bench notes it in the row instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_backend("auto", torch.device(device))


def _backend_builder(name: str):
    def build(problem: Problem, inputs: Inputs) -> AutogradRun:
        margin = make_loss(problem.loss)
        chunk = problem.chunk_size if name != "reference" else None
        backend = resolved_auto(problem.device) if name == "auto" else name

        # check_values=False: the value checks (finite features, labels in range) sync the device; the inputs
        # are known good and the bench times the computation, as a training loop that turns them off would
        def fn(x, w, labels):
            return mk.margin_cross_entropy(x, w, labels, margin, backend=backend, chunk_size=chunk,
                                           check_values=False)
        return AutogradRun(fn, inputs)
    return build


_DESCRIPTIONS = {
    "reference": "margin_kernels reference: full B x C logits, autograd",
    "torch": "margin_kernels 'torch': class-chunked, online LSE, recompute in backward",
    "cpu": "margin_kernels 'cpu': native CPU kernels",
    "triton": "margin_kernels 'triton': fused Triton kernels",
    "cuda": "margin_kernels 'cuda': fused CUDA kernels",
    "auto": "margin_kernels backend='auto'",
}

BACKENDS = {name: Method(name, "backend", _DESCRIPTIONS[name], _backend_unavailable(name), _backend_builder(name))
            for name in BACKEND_NAMES}

GEMM_FLOOR = Method("gemm-floor", "floor", "the 4 GEMMs of B x C x d alone (fwd, recompute, dx, dW)",
                    lambda problem: None, lambda problem, inputs: GemmFloorRun(inputs), checkable=False)


def all_methods() -> dict:
    from .peers import PEERS  # peers import optional third-party packages lazily; keep this module light
    return {**BACKENDS, **PEERS, GEMM_FLOOR.name: GEMM_FLOOR}
