"""Whether the CUDA extension compiles the CUTLASS sm_90a kernels: setup.py and the run-time JIT build
(margin_kernels/_native.py, MARGIN_KERNELS_JIT) decide it by one function, native_build.cutlass_plan
(CUTLASS's headers found and sm_90a targeted). Checked on the CPU with the header lookup replaced."""
from __future__ import annotations

from pathlib import Path

import pytest

from margin_kernels import _native, native_build

CUTLASS_TU = native_build.csrc_dir() / native_build.CUTLASS_SOURCES[0]
FAKE_DIRS = [Path("/opt/cutlass/include"), Path("/opt/cutlass/tools/util/include")]


@pytest.fixture
def headers(monkeypatch):
    """native_build.cutlass_include_dirs answering as if nvidia-cutlass were (or were not) installed."""
    def found(present: bool):
        answer = (FAKE_DIRS, "nvidia-cutlass 4.2.0 (test)") if present else (None, "nvidia-cutlass is not installed")
        monkeypatch.setattr(native_build, "cutlass_include_dirs", lambda: answer)
    return found


@pytest.mark.parametrize("arch_list, capabilities", [("8.0;9.0a", ()), ("9.0a+PTX", ()), (None, [(9, 0)])])
def test_jit_build_includes_cutlass_when_headers_and_sm90a(headers, arch_list, capabilities):
    headers(True)
    args = _native.jit_build_args(True, arch_list, capabilities)
    assert CUTLASS_TU in args["sources"] and args["cutlass"] is None
    assert "-DMK_WITH_CUTLASS" in args["extra_cflags"]  # bindings.cpp exposes the fused kernels
    flags = args["extra_cuda_cflags"]
    assert "-DNDEBUG" in flags and "-DMK_WITH_CUTLASS" in flags and str(FAKE_DIRS[0]) in flags
    # unset TORCH_CUDA_ARCH_LIST: torch builds sm_90 for an H100, the plan adds sm_90a itself
    assert ("-gencode=arch=compute_90a,code=sm_90a" in flags) == (arch_list is None)
    # the same decision as setup.py's
    dirs, setup_flags, _ = native_build.cutlass_plan(arch_list, capabilities)
    assert dirs == FAKE_DIRS and set(setup_flags) <= set(flags)


@pytest.mark.parametrize("present, arch_list, capabilities, why", [
    (False, "9.0a", (), "not installed"),
    (True, "8.0;9.0", (), "does not name 9.0a"),
    (True, None, [(8, 0)], "no sm_90 GPU"),
])
def test_jit_build_leaves_cutlass_out_otherwise(headers, present, arch_list, capabilities, why):
    headers(present)
    args = _native.jit_build_args(True, arch_list, capabilities)
    assert CUTLASS_TU not in args["sources"] and why in args["cutlass"]
    assert "-DMK_WITH_CUTLASS" not in args["extra_cflags"] + args["extra_cuda_cflags"]
    assert native_build.cutlass_plan(arch_list, capabilities)[0] is None


def test_cpu_jit_build_has_no_cuda_sources(headers):
    headers(True)
    args = _native.jit_build_args(False, "9.0a", ())
    assert all(path.suffix != ".cu" for path in args["sources"])
    assert "-DMK_WITH_CUTLASS" not in args["extra_cflags"]
