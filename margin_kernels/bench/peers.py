"""Other implementations, each optional: skipped with the reason when not importable or not runnable here.

* ``torch-lce`` / ``torch-lce-chunked``: PyTorch's ``F.linear_cross_entropy`` (torch >= 2.13), plain and with
  ``options=torch.nn.LinearCrossEntropyOptions()`` (its chunked path; it chunks rows, not classes);
* ``cce``: Apple's Cut Cross-Entropy ``linear_cross_entropy`` (Triton kernels, CUDA only);
* ``liger``: Liger-Kernel's fused linear cross-entropy (Triton kernels, CUDA only);
  these three compute plain Softmax cross-entropy, so they run only for ``--loss softmax``;
* ``naive-arcface``: an ArcFace head as users write it (the widely copied ArcMarginProduct: normalise,
  linear, margin on the target column through a one-hot mask, scale, ``F.cross_entropy``); ``--loss arcface``.
  It restates ArcFace on purpose: it is the user's code we are compared with, not our description.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import Problem, make_loss
from .methods import AutogradRun, Method


def _softmax_only(problem: Problem) -> Optional[str]:
    if problem.loss != "softmax":
        return "computes plain Softmax cross-entropy only (compare with --loss softmax)"
    return None


@functools.lru_cache(maxsize=None)
def _missing_module(module: str, package: str) -> Optional[str]:
    """None if ``module`` imports, else "not installed ..." (checked before whether the peer applies, so that
    ``--list`` and the "not run" lines say what to install rather than which loss it needs)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        return f"not installed (pip install {package})"
    except Exception as exc:  # installed, but it fails at import on this machine
        return f"{package} is installed but does not import here ({type(exc).__name__}: {exc})"
    return None


def _needs_cuda(problem: Problem, what: str) -> Optional[str]:
    if problem.device != "cuda":
        return f"{what}'s kernels are Triton GPU kernels: they need a CUDA device"
    return None


# ---- PyTorch's own linear_cross_entropy ----------------------------------------------------------------------

def _torch_lce_unavailable(chunked: bool):
    def reason(problem: Problem) -> Optional[str]:
        if not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (torch >= 2.13)"
        if chunked and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions"
        return _softmax_only(problem)
    return reason


def _torch_lce_builder(chunked: bool):
    def build(problem: Problem, inputs):
        # the default options resolve chunk sizes per (device, dtype); unsupported configurations fall back
        # to the unchunked path with a warning, which the worker records in the row's note
        options = torch.nn.LinearCrossEntropyOptions() if chunked else None
        return AutogradRun(lambda x, w, labels: F.linear_cross_entropy(x, w, labels, options=options), inputs)
    return build


# ---- Cut Cross-Entropy and Liger-Kernel ---------------------------------------------------------------------
_CCE = ("cut_cross_entropy", "cut-cross-entropy")  # (module, pip package)
_LIGER = ("liger_kernel.transformers", "liger-kernel")


def _cce_unavailable(problem: Problem) -> Optional[str]:
    return (_missing_module(*_CCE) or _softmax_only(problem) or _needs_cuda(problem, "Cut Cross-Entropy"))


def _cce_build(problem: Problem, inputs):
    from cut_cross_entropy import linear_cross_entropy
    return AutogradRun(lambda x, w, labels: linear_cross_entropy(x, w, labels), inputs)


def _liger_unavailable(problem: Problem) -> Optional[str]:
    return (_missing_module(*_LIGER) or _softmax_only(problem) or _needs_cuda(problem, "Liger-Kernel"))


def _liger_build(problem: Problem, inputs):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fused
    except ImportError:  # older releases only have the module form: forward(lin_weight, input, target)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        module = LigerFusedLinearCrossEntropyLoss()

        def fused(x, w, labels):
            return module(w, x, labels)

    def fn(x, w, labels):
        out = fused(x, w, labels)
        return out[0] if isinstance(out, tuple) else out
    return AutogradRun(fn, inputs)


# ---- naive ArcFace head -------------------------------------------------------------------------------------

def _naive_arcface_unavailable(problem: Problem) -> Optional[str]:
    if problem.loss != "arcface":
        return "an ArcFace head: compare with --loss arcface"
    return None


def naive_arcface(s: float, m: float, easy_margin: bool):
    """The head as commonly written (full B x C cosine, phi and one-hot masks, exact gradient)."""
    cos_m, sin_m = math.cos(m), math.sin(m)
    th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def fn(x, w, labels):
        cosine = F.linear(F.normalize(x), F.normalize(w))
        sine = torch.sqrt((1.0 - cosine * cosine).clamp(0, 1))
        phi = cosine * cos_m - sine * sin_m
        phi = torch.where(cosine > 0, phi, cosine) if easy_margin else torch.where(cosine > th, phi, cosine - mm)
        one_hot = torch.zeros_like(cosine).scatter_(1, labels.view(-1, 1), 1.0)
        logits = (one_hot * phi + (1.0 - one_hot) * cosine) * s
        return F.cross_entropy(logits, labels)
    return fn


def _naive_arcface_build(problem: Problem, inputs, compiled: bool = False):
    arc = make_loss("arcface")  # same s, m, easy_margin as the rows it is compared with
    fn = naive_arcface(arc.s, arc.m, arc.easy_margin)
    # the same head under torch.compile (inductor fuses the elementwise B x C work, the logits stay)
    return AutogradRun(torch.compile(fn) if compiled else fn, inputs)


PEERS = {
    "torch-lce": Method("torch-lce", "peer", "torch.nn.functional.linear_cross_entropy (unchunked)",
                        _torch_lce_unavailable(False), _torch_lce_builder(False)),
    "torch-lce-chunked": Method("torch-lce-chunked", "peer",
                                "F.linear_cross_entropy with LinearCrossEntropyOptions() (row-chunked)",
                                _torch_lce_unavailable(True), _torch_lce_builder(True)),
    "cce": Method("cce", "peer", "cut_cross_entropy.linear_cross_entropy", _cce_unavailable, _cce_build,
                  not_installed=functools.partial(_missing_module, *_CCE)),
    "liger": Method("liger", "peer", "Liger-Kernel fused linear cross-entropy", _liger_unavailable, _liger_build,
                    not_installed=functools.partial(_missing_module, *_LIGER)),
    "naive-arcface": Method("naive-arcface", "peer", "ArcFace head as users write it (normalize, linear, "
                            "one-hot margin, scale, F.cross_entropy)", _naive_arcface_unavailable,
                            _naive_arcface_build),
    "naive-arcface-compiled": Method("naive-arcface-compiled", "peer", "the naive ArcFace head under "
                                     "torch.compile (inductor)", _naive_arcface_unavailable,
                                     functools.partial(_naive_arcface_build, compiled=True)),
}
