"""Compile checks of the native sources that need no GPU: every .cu file with plain nvcc for sm_80 and sm_90
with warnings as errors, the CUDA half of the bindings (MK_WITH_CUDA) against the installed torch headers, and
the shared header as plain C++. A syntax or type error in code that only a CUDA machine would run fails here."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from margin_kernels import native_build

CSRC = native_build.csrc_dir()
CU_SOURCES = sorted(CSRC.glob("*.cu"))
GENCODES = [flag for arch in ("80", "90") for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _cxx():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _run(cmd):
    done = subprocess.run([str(part) for part in cmd], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}"


def test_there_are_cuda_sources():
    assert {path.name for path in CU_SOURCES} >= {"margin_cuda.cu"}


@pytest.mark.slow  # nvcc for two architectures with -Werror: ~30 s
@pytest.mark.parametrize("source", CU_SOURCES, ids=[path.name for path in CU_SOURCES])
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, no CUDA_HOME/bin/nvcc): the CUDA sources cannot be compiled here")
    # with the flags torch's CUDAExtension adds (no implicit half/bf16 conversions), as setup.py builds it
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    _run([nvcc, "-std=c++17", *GENCODES, *COMMON_NVCC_FLAGS, *native_build.nvcc_flags(), "-I", CSRC,
          "-Werror", "all-warnings",
          "-Xcompiler", "-Wall,-Wextra,-Werror", "-c", source, "-o", tmp_path / "out.o"])


@pytest.mark.slow  # the bindings built with CUDA enabled: ~20 s
@pytest.mark.skipif(sys.platform != "linux", reason="the CUDA build is Linux-only")
def test_bindings_compile_with_cuda_enabled():
    # the CUDA branch of bindings.cpp includes no CUDA header, so the CPU torch here can check it (C++20:
    # recent torch headers need it, older ones accept it)
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/$CXX) found")
    from torch.utils import cpp_extension
    includes = [f"-I{path}" for path in cpp_extension.include_paths() + [sysconfig.get_paths()["include"], str(CSRC)]]
    # with and without the CUTLASS kernels' entry points (MK_WITH_CUTLASS: margin_sm90.h is plain C)
    for cutlass in ([], ["-DMK_WITH_CUTLASS"]):
        _run([cxx, "-std=c++20", "-fsyntax-only", "-DMK_WITH_CUDA", *cutlass, "-DTORCH_EXTENSION_NAME=_C_cuda",
              "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror", *includes, CSRC / "bindings.cpp"])


CUTLASS_SOURCES = [CSRC / name for name in native_build.CUTLASS_SOURCES]


def test_cutlass_sources_are_outside_the_plain_glob():
    # csrc/cutlass/*.cu need CUTLASS's headers: compiled by the case below, not by the sm_80/sm_90 one above
    assert all(path.is_file() and path not in CU_SOURCES for path in CUTLASS_SOURCES)


@pytest.mark.slow  # one full CUTLASS compile for sm_80 (empty bodies) and sm_90a with -Werror on our code: ~3 min
@pytest.mark.parametrize("source", CUTLASS_SOURCES, ids=[path.name for path in CUTLASS_SOURCES])
def test_cutlass_source_compiles_for_sm80_and_sm90a(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, no CUDA_HOME/bin/nvcc): the CUDA sources cannot be compiled here")
    dirs, why = native_build.cutlass_include_dirs()
    if dirs is None:
        pytest.skip(f"CUTLASS's headers not found: {why}")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    gencodes = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
    # the CUTLASS headers are system includes (their own warnings are not checked); ours are
    _run([nvcc, *gencodes, *COMMON_NVCC_FLAGS, *native_build.nvcc_flags(), *native_build.cutlass_nvcc_flags(dirs),
          "-I", CSRC, "-Xcompiler", "-Wall,-Wextra", "-c", source, "-o", tmp_path / "out.o"])


def test_shared_header_is_plain_cpp(tmp_path):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/$CXX) found")
    probe = tmp_path / "probe.cpp"
    probe.write_text('#include "margin_math.h"\n'
                     "float probe(float c) { return mk::negative_grad<mk::kCurricular>(c, 0.1f, 0.2f, "
                     "mk::NegativeConsts<float>{64.f, 0.f, 0.f}, 1.f, 1.f); }\n")
    _run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Wpedantic", "-Werror", f"-I{CSRC}", "-c", probe,
          "-o", tmp_path / "probe.o"])
