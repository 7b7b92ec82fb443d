"""What the native extensions are built from and with, in one place for both builds: ``setup.py`` (ahead of
time, loads this file by path because torch may not be importable yet) and ``_native.py`` (JIT at first use).

No -march flag: the hot CPU loops are compiled in AVX-512 / AVX2 / baseline clones chosen at load time
(``MK_ISA_CLONES`` in csrc/margin_cpu.cpp), so a wheel built here runs on any x86-64 CPU.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

#: margin_kernels._C: the CPU epilogues (always built)
CPU_MODULE = "_C"
#: margin_kernels._C_cuda: the same bindings compiled with MK_WITH_CUDA, plus the CUDA kernels
CUDA_MODULE = "_C_cuda"

CPU_SOURCES = ("bindings.cpp", "margin_cpu.cpp")
CUDA_SOURCES = CPU_SOURCES + ("margin_cuda.cu",)

#: where setup.py keeps each built extension, in a folder named by ``build_key`` (relative to the checkout;
#: ``MARGIN_KERNELS_BUILD_CACHE=DIR`` moves it, ``=0`` turns it off)
BUILD_CACHE = Path("build") / "native-cache"


def csrc_dir() -> Path:
    """csrc/ of a source checkout (this file is margin_kernels/native_build.py)."""
    return Path(__file__).resolve().parent.parent / "csrc"


def sources(with_cuda: bool) -> list[Path]:
    return [csrc_dir() / name for name in (CUDA_SOURCES if with_cuda else CPU_SOURCES)]


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
