"""Finding the compiled epilogues: the extension ``setup.py`` built ahead of time (``pip install
--no-build-isolation -e .``), else nothing and a reason why.

The package never needs them: without an extension the "cpu"/"cuda" backends report themselves unavailable,
``backend="auto"`` falls back to the pure-torch backend with a warning, and ``backend="torch"`` always works.

A run-time (JIT) compile of csrc/ with ``torch.utils.cpp_extension`` is opt-in, for source checkouts that
were not installed with the build step: ``MARGIN_KERNELS_JIT=1`` compiles it when no usable prebuilt
extension is found (cached under $TORCH_EXTENSIONS_DIR); ``MARGIN_KERNELS_JIT=force`` ignores a prebuilt
extension and uses (compiling if needed) the JIT build of the current sources. Unset or ``0``: never.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Optional

from . import native_build

#: must equal mk::kAbiVersion in csrc/margin_math.h; a prebuilt extension from older sources is not used
ABI_VERSION = 7

_lock = threading.Lock()
_loaded: dict = {}


def load(with_cuda: bool = False) -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) when the extension is usable, else (None, why not). Builds at most once per process."""
    key = "cuda" if with_cuda else "cpu"
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(with_cuda)
        return _loaded[key]


def _load(with_cuda: bool):
    name = native_build.CUDA_MODULE if with_cuda else native_build.CPU_MODULE
    jit_mode = os.environ.get("MARGIN_KERNELS_JIT", "0").lower()
    prebuilt_problem = None
    if jit_mode != "force":
        try:
            module = importlib.import_module(f"margin_kernels.{name}")
        except ImportError as exc:
            prebuilt_problem = f"no prebuilt margin_kernels.{name} ({exc})"
        else:
            if module.abi_version() == ABI_VERSION:
                return module, None
            prebuilt_problem = (f"margin_kernels.{name} was built from other sources (ABI {module.abi_version()}, "
                                f"expected {ABI_VERSION}); rebuild it with `pip install --no-build-isolation -e .`")
    if jit_mode not in ("1", "true", "yes", "on", "force"):
        return None, (f"{prebuilt_problem}; build it with `pip install --no-build-isolation -e .` (or set "
                      "MARGIN_KERNELS_JIT=1 to compile it at first use)")
    return _jit(with_cuda, prebuilt_problem)


def _jit(with_cuda: bool, prebuilt_problem: Optional[str]):
    why = f"{prebuilt_problem}; " if prebuilt_problem else ""
    sources = native_build.sources(with_cuda)
    if not all(path.is_file() for path in sources):
        return None, (f"{why}the csrc/ sources needed to compile it are not installed (install from a source "
                      "checkout with `pip install --no-build-isolation .`)")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return None, f"{why}torch.utils.cpp_extension is unavailable ({exc})"
    if with_cuda and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
        return None, f"{why}compiling the CUDA extension needs a CUDA build of torch and nvcc (CUDA_HOME)"
    warnings.warn(f"margin_kernels: compiling the native {'CUDA' if with_cuda else 'CPU'} extension from csrc/ "
                  "(first use only; the build is cached)", RuntimeWarning, stacklevel=4)
    try:
        module = cpp_extension.load(
            name=f"margin_kernels{native_build.CUDA_MODULE if with_cuda else native_build.CPU_MODULE}",
            sources=[str(path) for path in sources],
            extra_include_paths=[str(native_build.csrc_dir())],
            extra_cflags=native_build.cxx_flags(with_cuda),
            extra_cuda_cflags=native_build.nvcc_flags(),
            extra_ldflags=native_build.ld_flags(),
            with_cuda=with_cuda,
            verbose=False,
        )
    except Exception as exc:  # a compiler error, no compiler, no ninja: report it, never break the package
        detail = str(exc).strip().splitlines()
        return None, (f"{why}compiling it failed ({type(exc).__name__}: {detail[-1] if detail else ''}); "
                      "backend='torch' needs no compiled code")
    if module.abi_version() != ABI_VERSION:
        return None, (f"the JIT-built extension reports ABI {module.abi_version()} but margin_kernels expects "
                      f"{ABI_VERSION}: update margin_kernels/_native.py together with csrc/margin_math.h")
    return module, None
