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
ABI_VERSION = 9

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


def jit_build_args(with_cuda: bool, arch_list: Optional[str], device_capabilities=()) -> dict:
    """The JIT build's sources and flags: the CUDA extension includes the CUTLASS sm_90a kernels under
    setup.py's conditions (native_build.cutlass_plan: headers found, sm_90a targeted), with ``cutlass``
    saying why not when it does not."""
    plan_dirs, plan_flags, where = (native_build.cutlass_plan(arch_list, device_capabilities) if with_cuda
                                    else (None, [], "the CPU extension has no CUDA code"))
    with_cutlass = plan_dirs is not None
    return {"sources": native_build.sources(with_cuda, with_cutlass),
            "extra_cflags": native_build.cxx_flags(with_cuda) + (["-DMK_WITH_CUTLASS"] if with_cutlass else []),
            "extra_cuda_cflags": native_build.nvcc_flags() + plan_flags,
            "cutlass": None if with_cutlass else where}


def _visible_capabilities(torch) -> list:
    try:
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no driver: no visible GPU
        return []


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
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    args = jit_build_args(with_cuda, arch_list, () if arch_list or not with_cuda else _visible_capabilities(torch))
    skipped = ("" if args["cutlass"] is None or not with_cuda
               else f"; without the CUTLASS sm_90a kernels: {args['cutlass']}")
    warnings.warn(f"margin_kernels: compiling the native {'CUDA' if with_cuda else 'CPU'} extension from csrc/ "
                  f"(first use only; the build is cached){skipped}", RuntimeWarning, stacklevel=4)
    try:
        module = cpp_extension.load(
            name=f"margin_kernels{native_build.CUDA_MODULE if with_cuda else native_build.CPU_MODULE}",
            sources=[str(path) for path in args["sources"]],
            extra_include_paths=[str(native_build.csrc_dir())],
            extra_cflags=args["extra_cflags"],
            extra_cuda_cflags=args["extra_cuda_cflags"],
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
