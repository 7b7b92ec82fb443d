"""Backend registry: every backend implements the same two calls over the same loss description.

    lse_forward(x, weight, labels, row_params, class_index, spec, normalize_weight, chunk_size) -> lse (B,)
    lse_backward(x, weight, labels, row_params, class_index, spec, normalize_weight, lse, g_lse,
                 g_cos_target, chunk_size, grad_filter) -> (dx, dweight)

``lse`` is the per-row log-sum-exp over the *negative* logits (target column excluded); ``labels`` are column
indices into ``weight`` (or into ``class_index`` when given), -1 for rows without a target. ``grad_filter > 0``
allows skipping the dx/dW products of tiles whose |dL/dcos| are all below it (count them in ``filter_stats``).
"""
from __future__ import annotations

import importlib
import warnings

import torch

#: every name a user may pass as ``backend=``; "reference" is the full-logit ground truth (margin_kernels.reference)
BACKEND_NAMES = ("auto", "reference", "torch", "cpu", "triton", "cuda")

_MODULES = {
    "torch": "margin_kernels.backends.torch_chunked",
    "cpu": "margin_kernels.backends.cpu_native",
    "triton": "margin_kernels.backends.triton_backend",
    "cuda": "margin_kernels.backends.cuda_native",
}
_warned: set = set()


def available_backends() -> dict:
    """name -> None if usable here, else the reason it is not."""
    out = {"reference": None, "torch": None}
    for name in ("cpu", "triton", "cuda"):
        out[name] = unavailable_reason(name)
    return out


def unavailable_reason(name: str):
    if name in ("reference", "torch"):
        return None
    if name not in _MODULES:
        return f"the {name!r} backend is not part of this build yet"
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # an optional dependency (triton, the compiled extension) is missing
        return f"the {name!r} backend cannot be imported: {exc}"
    reason = getattr(module, "unavailable_reason", lambda: None)()
    return reason


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for ``device``; check an explicit choice is usable."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(reason)
        return name
    preferred = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for candidate in preferred:
        reason = unavailable_reason(candidate)
        if reason is None:
            return candidate
        if candidate not in _warned:
            _warned.add(candidate)
            warnings.warn(f"margin_kernels: backend='auto' skips {candidate!r} ({reason}); falling back",
                          RuntimeWarning, stacklevel=3)
    return "torch"


def get_backend(name: str):
    return importlib.import_module(_MODULES[name])
