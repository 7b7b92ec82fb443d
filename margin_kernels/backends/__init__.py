"""The backend registry: one entry per backend, as data.

Every backend module implements the same two calls over the same loss description (``contract.py``):

    lse_forward(inputs: OpInputs, config: OpConfig, state: CallState) -> lse (B,)
    lse_backward(inputs: OpInputs, config: OpConfig, grads: RowGrads, state: CallState) -> (dx, dweight, dshift)

and ``unavailable_reason() -> Optional[str]`` (None when it can run in this process). ``lse`` is the per-row
log-sum-exp over the *negative* logits (target column excluded); ``inputs.labels`` are column indices into
``weight`` (or into ``class_index`` when given), -1 for rows without a target. ``config.grad_filter > 0``
allows skipping the dx/dW products of tiles whose |dL/dcos| are all below it (counted in ``filter_stats``).
``config.spec.reduction`` SOFTPLUS_SUM (the binary family, ``losses/reductions.py``) makes ``lse`` the row's
sum of softplus(clamp(z + shift)) instead; ``state.shift`` is a (1,) tensor (None: 0) and ``dshift`` (1,) its
gradient, summed in a fixed order (zeros for LSE). ``config.product`` is how fp32 operands are multiplied
(``margin_kernels.precision``: "ieee", "tf32", "bf16", "fp16"; "storage" for other dtypes); a backend that
cannot choose documents what it does instead. ``config.sub_centers`` = K > 1: ``weight`` has K adjacent rows
per class (``class_index`` and ``labels`` still count classes) and a class's cosine is the max over its rows
(``margin_kernels.subcenters``). ``state.store`` (``kept_tiles.KeptTiles``, from the op; None when a test calls
a backend directly): the forward writes the inverse weight norms and the tiles of the columns the store has
room for (after ``store.use_chunk(chunk)``), the backward reads them instead of recomputing (``store.tile``
decides, per chunk). The store counts weight rows (K per class with sub-centers). ``state.sink``
(``sinks.ChunkSink``: a fused optimizer's update, or an in-place add into an existing ``weight.grad``) receives
each chunk's finished dW rows (K per class) from a chunk-sized buffer instead of a dense dW, and ``dweight``
comes back None (dx and dshift as without it).

A backend's module is imported at most once per process, and whether it can run here is probed once and
remembered: resolving ``backend="auto"`` is then a dictionary lookup, and under ``torch.compile`` the
resolution is a constant of the trace (``torch.compiler.assume_constant_result``), so dynamo never steps into
an import. ``docs/adding-a-backend.md`` lists what a new entry needs.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch


@dataclass(frozen=True)
class BackendEntry:
    """What the package knows about a backend without importing it."""

    name: str
    #: device types its kernels compute on ("any": every device torch supports)
    devices: tuple
    #: the module implementing the contract above (None: "reference", the full-logit ground truth)
    module: Optional[str]
    #: one line for tables and ``--list``
    summary: str


BACKENDS = (
    BackendEntry("reference", ("any",), None,
                 "full B x C logits in plain PyTorch, autograd backward: the ground truth"),
    BackendEntry("torch", ("any",), "margin_kernels.backends.torch_backend",
                 "class chunks, online log-sum-exp, recompute in backward; PyTorch GEMMs and elementwise ops"),
    BackendEntry("cpu", ("cpu",), "margin_kernels.backends.cpu_backend",
                 "the chunk loop with MKL GEMMs and fused C++ epilogues (csrc/margin_cpu.cpp, OpenMP)"),
    BackendEntry("triton", ("cuda",), "margin_kernels.backends.triton_backend",
                 "GEMMs with the whole loss in their epilogues (Triton; CPU only under TRITON_INTERPRET=1)"),
    BackendEntry("cuda", ("cuda",), "margin_kernels.backends.cuda_backend",
                 "the chunk loop with cuBLAS GEMMs and fused CUDA epilogues (csrc/margin_cuda.cu)"),
)
REGISTRY = {entry.name: entry for entry in BACKENDS}
#: what ``backend="auto"`` tries, in order, per device type; the portable "torch" backend ends every list
AUTO_PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
#: every name a user may pass as ``backend=``
BACKEND_NAMES = ("auto",) + tuple(REGISTRY)

_lock = threading.RLock()
_modules: dict = {}
_reasons: dict = {}
_warned: set = set()


def load_module(name: str) -> ModuleType:
    """The implementing module of a registered backend (imported once)."""
    module = _modules.get(name)
    if module is None:
        with _lock:
            module = _modules.get(name)
            if module is None:
                module = _modules[name] = importlib.import_module(REGISTRY[name].module)
    return module


def get_backend(name: str) -> ModuleType:
    return load_module(name)


def keeps_tiles(name: str, sub_centers: int) -> bool:
    """Whether backend ``name`` reads a kept-tile store for a loss with ``sub_centers`` rows per class (a
    backend module says ``KEEPS_SUB_CENTER_TILES = False`` when it recomputes those): the op then allocates
    no tiles for it."""
    return sub_centers == 1 or getattr(get_backend(name), "KEEPS_SUB_CENTER_TILES", True)


def stores_norms(name: str, normalize_weight: bool, keep_cols: int) -> bool:
    """Whether the op's kept-tile store holds the C inverse weight norms for backend ``name``: the chunk loop
    writes them on every normalised call (its backward reads them instead of recomputing them per chunk); a
    backend module that says ``NORMS_ONLY_WITH_TILES = True`` (Triton: its recomputing backward forms them from
    the W tile it loads anyway) only when the budget keeps tiles (``keep_cols`` > 0)."""
    if not normalize_weight:
        return False
    return keep_cols > 0 or not getattr(get_backend(name), "NORMS_ONLY_WITH_TILES", False)


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend ``name`` can run in this process, else why not (probed once, then remembered)."""
    if name not in REGISTRY:
        return f"there is no backend named {name!r} (known: {', '.join(BACKEND_NAMES)})"
    if REGISTRY[name].module is None:
        return None
    with _lock:
        if name not in _reasons:
            try:
                _reasons[name] = load_module(name).unavailable_reason()
            except ImportError as exc:  # an optional dependency (triton, the compiled extension) is missing
                _reasons[name] = f"the {name!r} backend cannot be imported: {exc}"
        return _reasons[name]


def forget_availability() -> None:
    """Probe again on the next call (tests that change what is importable use it)."""
    with _lock:
        _reasons.clear()
        _warned.clear()


def available_backends() -> dict:
    """name -> None if usable here, else the reason it is not."""
    return {name: unavailable_reason(name) for name in REGISTRY}


def check_backend_name(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str) -> str:
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(reason)
        return name
    for candidate in AUTO_PREFERENCE.get(device_type, ()):
        reason = unavailable_reason(candidate)
        if reason is None:
            return candidate
        if candidate not in _warned:
            _warned.add(candidate)
            warnings.warn(f"margin_kernels: backend='auto' skips {candidate!r} ({reason}); falling back",
                          RuntimeWarning, stacklevel=4)
    return "torch"


def resolve_backend(name: str, device) -> str:
    """Turn "auto" into a concrete backend for ``device`` (a torch.device or a device type); check that an
    explicit choice can run here (RuntimeError with the reason if not)."""
    check_backend_name(name)
    device_type = device if isinstance(device, str) else device.type
    return _resolve(name, device_type)
