"""What is measured: our backends and the GEMM floor (``peers`` adds other libraries, ``catalog`` names them all).

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
from margin_kernels.backends import BACKEND_NAMES, REGISTRY, resolve_backend
from margin_kernels.backends.chunk_loop import default_chunk_size

from .config import Problem, make_loss
from .regularized import regularized_loss
from .problem import Inputs

@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "backend" | "peer" | "floor"
    description: str
    unavailable: Callable[[Problem], Optional[str]]
    build: Callable[[Problem, Inputs], "AutogradRun | GemmFloorRun"]
    #: its loss and gradients are comparable with margin_kernels' reference of the problem's loss
    checkable: bool = True
    #: None when everything it needs is installed, else why not ("not installed: ..."), for ``--list``
    not_installed: Callable[[], Optional[str]] = lambda: None


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
    """One timing variant of the GEMM floor (see ``GEMM_FLOOR``): forward x W^T, and in backward the recompute
    x W^T, dx = G W and dW = G^T x, over class tiles of ``width`` columns (``width = C``: full size). The
    product tile itself stands in for G = dL/dlogits (its values do not change a GEMM's speed). Every output
    is allocated once here: the floor is the products alone, while the methods pay for their fresh dW."""

    def __init__(self, inputs: Inputs, width: int):
        # detached: with --interleave the methods' runs share these tensors as autograd leaves
        self.x, self.w = inputs.features.detach(), inputs.weight.detach()
        self.width = min(width, self.w.shape[0])
        self.tile = torch.empty(self.x.shape[0], self.width, dtype=self.x.dtype, device=self.x.device)
        self.dx, self.dw = torch.empty_like(self.x), torch.empty_like(self.w)
        self.loss = None

    def _tiles(self):
        for col0 in range(0, self.w.shape[0], self.width):
            w = self.w[col0:col0 + self.width]
            yield col0, w, self.tile[:, :w.shape[0]]

    def forward(self) -> None:
        for _, w, tile in self._tiles():
            torch.mm(self.x, w.t(), out=tile)

    def backward(self) -> None:
        self.dx.zero_()
        for col0, w, tile in self._tiles():
            torch.mm(self.x, w.t(), out=tile)
            self.dx.addmm_(tile, w)
            torch.mm(tile.t(), self.x, out=self.dw[col0:col0 + w.shape[0]])

    def grads(self):
        return self.dx, self.dw

    def reset(self) -> None:
        pass  # the outputs are the floor's preallocated buffers, reused by the next run


def floor_chunk(problem: Problem) -> int:
    """The tile of the chunked floor, in weight rows: the fused backends' own (``--chunk-size`` classes or their
    default) times the loss's K sub-centers per class (each class's K rows are all multiplied: K x the GEMM
    work of a one-row-per-class head, so the floor scales with K)."""
    k = make_loss(problem.loss).sub_centers
    return k * (problem.chunk_size or default_chunk_size(problem.batch, problem.device, k))


def floor_ms(variant_ms: dict) -> tuple[str, float]:
    """THE GEMM floor, the one yardstick of every "x floor" ratio of margin-bench.

    Every exact method does four GEMMs of B x C x d per step (B x C K x d with K sub-centers per class): the forward logits x W^T, their recompute in
    backward, dx = G W and dW = G^T x. The floor is the time of those four alone, in the storage dtype, timed
    in the same run as the methods two ways: full size (one B x C product each) and in class chunks at the
    fused backends' tile (``floor_chunk``: chunks can run faster, the tile staying in cache, or slower, at
    small B); the floor is the minimum of the two medians, so no method is flattered by a slow variant.
    ``variant_ms``: variant name -> median ms (None where the variant did not run, e.g. the full-size B x C
    tile out of memory). Returns (the variant that wins, its ms)."""
    timed = {name: ms for name, ms in variant_ms.items() if ms is not None}
    if not timed:
        raise ValueError("no floor variant ran")
    best = min(timed, key=timed.get)
    return best, timed[best]


def floor_variants(problem: Problem) -> dict:
    """The two timings whose minimum is the floor: name -> builder of a ``GemmFloorRun`` on the inputs."""
    return {"full": lambda inputs: GemmFloorRun(inputs, inputs.weight.shape[0]),
            "chunked": lambda inputs: GemmFloorRun(inputs, floor_chunk(problem))}


def _device_rule(name: str, problem: Problem) -> Optional[str]:
    """Whether the registry entry computes on the problem's device (Triton's CPU interpreter is a test tool,
    not something to benchmark)."""
    devices = REGISTRY[name].devices
    if "any" in devices or problem.device in devices:
        return None
    return f"the {name!r} backend computes on {'/'.join(devices)} tensors (benchmarking on {problem.device})"


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


def _backend_builder(name: str, memory_budget=None):
    def build(problem: Problem, inputs: Inputs) -> AutogradRun:
        margin = make_loss(problem.loss)
        chunk = problem.chunk_size if name != "reference" else None
        backend = resolved_auto(problem.device) if name == "auto" else name

        if problem.regularizers:
            return AutogradRun(regularized_loss(margin, problem.regularizers, problem.classes, problem.dim,
                                                inputs.weight.dtype, inputs.weight.device, backend=backend,
                                                chunk_size=chunk, check_values=False), inputs)

        # check_values=False: the value checks (finite features, labels in range) sync the device; the inputs
        # are known good and the bench times the computation, as a training loop that turns them off would
        def fn(x, w, labels):
            return mk.margin_cross_entropy(x, w, labels, margin, backend=backend, chunk_size=chunk,
                                           check_values=False, memory_budget=memory_budget)
        return AutogradRun(fn, inputs)
    return build


def _description(name: str) -> str:
    if name == "auto":
        return "margin_kernels backend='auto'"
    return f"margin_kernels {name!r}: {REGISTRY[name].summary}"


BACKENDS = {name: Method(name, "backend", _description(name), _backend_unavailable(name), _backend_builder(name))
            for name in BACKEND_NAMES}

GEMM_FLOOR = Method(
    "gemm-floor", "floor", "the 4 GEMMs of B x C x d alone, best of full-size and class-chunked",
    lambda problem: None, lambda problem, inputs: GemmFloorRun(inputs, floor_chunk(problem)), checkable=False)


#: "<backend>@<budget>": a backend with ``memory_budget=`` (margin_kernels.memory_budget); the budget is
#: "auto", "all" (every tile kept) or a size: 64M, 1.5G, 100000 (bytes)
BUDGET_SEPARATOR = "@"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
KEEP_ALL = 1 << 62  # bytes: more than any problem's tiles


def parse_budget(text: str):
    """The ``memory_budget=`` value a budgeted method name asks for."""
    text = text.strip().lower()
    if text in ("auto", "all"):
        return "auto" if text == "auto" else KEEP_ALL
    unit = text[-1] if text[-1:] in _UNITS else ""
    try:
        value = float(text[:-1] if unit else text) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"memory budget {text!r}: use auto, all, or a size such as 64M, 1G, 100000") from None
    if value < 0:
        raise ValueError(f"memory budget {text!r} must be >= 0")
    return int(value)


def budgeted_method(name: str) -> Optional[Method]:
    """The Method of a "<backend>@<budget>" name, or None if ``name`` is not of that form."""
    backend, sep, budget = name.partition(BUDGET_SEPARATOR)
    if not sep or backend not in BACKENDS or backend == "reference":
        return None
    value = parse_budget(budget)
    return Method(name, "backend", f"{_description(backend)}, memory_budget={budget}",
                  _backend_unavailable(backend), _backend_builder(backend, value))
