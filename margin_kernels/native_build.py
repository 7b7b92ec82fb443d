"""What the native extensions are built from and with, in one place for both builds: ``setup.py`` (ahead of
time, loads this file by path because torch may not be importable yet) and ``_native.py`` (JIT at first use).

No -march flag: the hot CPU loops are compiled in AVX-512 / AVX2 / baseline clones chosen at load time
(``MK_ISA_CLONES`` in csrc/margin_cpu.cpp), so a wheel built here runs on any x86-64 CPU.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

#: margin_kernels._C: the CPU epilogues (always built)
CPU_MODULE = "_C"
#: margin_kernels._C_cuda: the same bindings compiled with MK_WITH_CUDA, plus the CUDA kernels
CUDA_MODULE = "_C_cuda"

CPU_SOURCES = ("bindings.cpp", "margin_cpu.cpp")
CUDA_SOURCES = CPU_SOURCES + ("margin_cuda.cu",)
#: the epilogue-fused sm_90a GEMMs (CUTLASS 3.x, csrc/cutlass/), compiled into _C_cuda only when
#: ``cutlass_include_dirs`` finds the headers and ``sm90a_targets`` says sm_90a is built (setup.py)
CUTLASS_SOURCES = ("cutlass/margin_sm90.cu",)
#: the headers' package (pure headers and Python, BSD-3-Clause): the `cuda` extra of pyproject.toml, never a
#: dependency of a CPU install. Its major version is pinned: CUTLASS 3.x's collective/EVT API (which 4.x
#: ships unchanged for sm90) is what csrc/cutlass/ is written against
CUTLASS_REQUIREMENT = "nvidia-cutlass>=4,<5"
CUTLASS_MAJOR = 4
#: a CUTLASS source tree (or the wheel's cutlass_library/source) to use instead of the installed package
CUTLASS_DIR_ENV = "MARGIN_KERNELS_CUTLASS_DIR"

#: where setup.py keeps each built extension, in a folder named by ``build_key`` (relative to the checkout;
#: ``MARGIN_KERNELS_BUILD_CACHE=DIR`` moves it, ``=0`` turns it off)
BUILD_CACHE = Path("build") / "native-cache"


def csrc_dir() -> Path:
    """csrc/ of a source checkout (this file is margin_kernels/native_build.py)."""
    return Path(__file__).resolve().parent.parent / "csrc"


def sources(with_cuda: bool, with_cutlass: bool = False) -> list[Path]:
    names = (CUDA_SOURCES + (CUTLASS_SOURCES if with_cutlass else ())) if with_cuda else CPU_SOURCES
    return [csrc_dir() / name for name in names]


def _cutlass_tree(root: Path) -> Optional[list[Path]]:
    """The include dirs of a CUTLASS tree laid out as the repository (include/, tools/util/include/), which is
    also the layout of the wheel's cutlass_library/source; None when cutlass/cutlass.h is not there."""
    include, util = root / "include", root / "tools" / "util" / "include"
    if not (include / "cutlass" / "cutlass.h").is_file() or not (include / "cute" / "tensor.hpp").is_file():
        return None
    return [include] + ([util] if (util / "cutlass" / "util" / "packed_stride.hpp").is_file() else [])


def cutlass_include_dirs() -> tuple[Optional[list[Path]], str]:
    """(include dirs, where they come from) of CUTLASS's C++ headers, or (None, why not).

    ``MARGIN_KERNELS_CUTLASS_DIR`` (a CUTLASS checkout, or a cutlass_library/source folder) wins; else the
    installed ``nvidia-cutlass`` package, found without importing it (importlib finds cutlass_library's folder;
    importing it would run its Python), of major version ``CUTLASS_MAJOR``."""
    override = os.environ.get(CUTLASS_DIR_ENV)
    if override:
        root = Path(override)
        dirs = _cutlass_tree(root) or _cutlass_tree(root / "source")
        if dirs is None:
            return None, f"{CUTLASS_DIR_ENV}={override} holds no include/cutlass/cutlass.h (a CUTLASS tree)"
        return dirs, f"{CUTLASS_DIR_ENV}={override}"
    try:
        version = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        return None, (f"nvidia-cutlass is not installed (pip install '{CUTLASS_REQUIREMENT}', the `cuda` extra, or "
                      f"set {CUTLASS_DIR_ENV})")
    if version.split(".")[0] != str(CUTLASS_MAJOR):
        return None, f"nvidia-cutlass {version} is installed; csrc/cutlass/ needs {CUTLASS_REQUIREMENT}"
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None, f"nvidia-cutlass {version} is installed but its cutlass_library package is not found"
    root = Path(list(spec.submodule_search_locations)[0]) / "source"
    dirs = _cutlass_tree(root)
    if dirs is None:
        return None, f"nvidia-cutlass {version} has no C++ headers under {root}"
    return dirs, f"nvidia-cutlass {version} ({root})"


def sm90a_targets(arch_list: Optional[str], device_capabilities=()) -> tuple[list[str], Optional[str]]:
    """Whether the CUDA extension is built for sm_90a, which the CUTLASS kernels need (wgmma and
    setmaxnreg exist only on the arch-specific target; for any other target their bodies are empty):
    ([extra nvcc flags], None) when it is, else ([], why not).

    ``arch_list`` is TORCH_CUDA_ARCH_LIST: sm_90a is built when it names 9.0a. Unset, torch builds for the
    visible GPUs' own capabilities (9.0 on an H100, never 9.0a): then a visible compute capability 9.0 adds the
    sm_90a target itself (``device_capabilities``: (major, minor) pairs)."""
    if arch_list:
        entries = [entry.split("+")[0].strip() for entry in arch_list.replace(";", " ").split()]
        if "9.0a" in entries:
            return [], None
        return [], f"TORCH_CUDA_ARCH_LIST={arch_list!r} does not name 9.0a (the CUTLASS kernels are sm_90a only)"
    if (9, 0) in [tuple(cap) for cap in device_capabilities]:
        return ["-gencode=arch=compute_90a,code=sm_90a"], None
    return [], "no sm_90 GPU is visible and TORCH_CUDA_ARCH_LIST is unset (set it to include 9.0a to build them)"


def cutlass_plan(arch_list: Optional[str], device_capabilities=()) -> tuple[Optional[list[Path]], list[str], str]:
    """Whether the CUDA extension compiles the CUTLASS translation unit, for setup.py and the JIT build alike:
    (include dirs, extra nvcc flags, where the headers come from) when CUTLASS's headers are found
    (``cutlass_include_dirs``) and sm_90a is targeted (``sm90a_targets``), else (None, [], why not)."""
    dirs, where = cutlass_include_dirs()
    if dirs is None:
        return None, [], where
    gencode, why_not = sm90a_targets(arch_list, device_capabilities)
    if why_not is not None:
        return None, [], why_not
    return dirs, gencode + cutlass_nvcc_flags(dirs), where


def cutlass_nvcc_flags(include_dirs: list[Path]) -> list[str]:
    """nvcc flags added for the CUTLASS translation unit: its headers as system includes (their warnings are
    not ours), C++17 with relaxed constexpr (cute), and -DNDEBUG: a device assert in the mainloop makes ptxas
    serialize the wgmma pipeline across the call (warning C7510); MK_WITH_CUTLASS tells bindings.cpp."""
    flags = []
    for path in include_dirs:
        flags += ["-isystem", str(path)]
    # torch's CUDAExtension defines __CUDA_NO_HALF_OPERATORS__ and the like; CUTLASS's half/bf16 types use those
    # operators (as flash-attention's build, undefined again after torch's flags)
    flags += ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_HALF2_OPERATORS__"]
    return flags + ["-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG", "-DMK_WITH_CUTLASS"]


def build_key(csrc: Path, toolchain: dict) -> str:
    """The name of a built extension in the build cache: a hash of every file under ``csrc`` (name and bytes,
    so a header counts too) and of ``toolchain`` (JSON values: the extension's sources, flags, include dirs,
    the compiler, the torch version and the Python ABI, as setup.py gathers them). Any change of one of them
    is another key, so a cached build is only ever reused for the same inputs. Paths are hashed relative to
    ``csrc``: two copies of the checkout share their builds."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(csrc).rglob("*") if p.is_file()):
        name = path.relative_to(csrc).as_posix().encode()
        data = path.read_bytes()
        digest.update(b"%d:%s%d:" % (len(name), name, len(data)) + data)  # lengths: no two inputs hash alike
    digest.update(json.dumps(toolchain, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def cxx_flags(with_cuda: bool = False) -> list[str]:
    if sys.platform == "win32":
        flags = ["/O2", "/openmp"]
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: the kernels run single-threaded there
        flags = ["-O3"]
    else:
        flags = ["-O3", "-fopenmp"]
    if sys.platform != "win32":
        # no fused multiply-add across statements: the logit z the forward's lse sums must be the z the
        # backward exponentiates (csrc/margin_math.h, mul_rn), and the CPU ISA clones then agree bit for bit
        flags.append("-ffp-contract=off")
        # the kernels never read floating-point exception flags (no <cfenv>): without this, GCC may not evaluate
        # a select's floating-point arms unconditionally, so a loop with a select in its math (margin_math.h's
        # log, log1p and pow: the binary losses' softplus, SphereFace2's power) stays scalar. Values do not
        # change: no reassociation, no contraction, NaN and signed zeros kept
        flags.append("-fno-trapping-math")
    return flags + (["-DMK_WITH_CUDA"] if with_cuda else [])


def ld_flags() -> list[str]:
    # links the libgomp torch already loaded (same soname): one OpenMP runtime, one thread pool
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def nvcc_flags() -> list[str]:
    return ["-O3", "-DMK_WITH_CUDA"]
