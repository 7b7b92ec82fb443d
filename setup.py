"""Build script: the pure-Python package plus the native epilogues of csrc/.

* margin_kernels._C (CPU epilogues, OpenMP) whenever torch is importable at build time, which is why the
  install command is ``pip install --no-build-isolation -e .`` (pyproject deliberately lists no torch: an
  isolated build would download a multi-GB CUDA torch);
* margin_kernels._C_cuda (the same plus the CUDA kernels) when torch is a CUDA build and nvcc is found; with
  the epilogue-fused CUTLASS GEMMs of csrc/cutlass/ (sm_90a) when CUTLASS's headers are found (the installed
  ``nvidia-cutlass`` of the ``cuda`` extra, or MARGIN_KERNELS_CUTLASS_DIR) and sm_90a is among the targets
  (TORCH_CUDA_ARCH_LIST names 9.0a, or it is unset and an sm_90 GPU is visible); otherwise the cuBLAS path
  alone, with the reason printed.

Both are optional: if one fails to compile the install goes on with a warning and ``backend="auto"`` falls
back to the pure-torch backend (a run-time JIT build of csrc/ is opt-in: ``MARGIN_KERNELS_JIT=1``).
``MARGIN_KERNELS_REQUIRE_NATIVE=1`` makes a failed build fatal (CI), ``MARGIN_KERNELS_NO_NATIVE=1`` skips the
extensions, ``MARGIN_KERNELS_NO_CUDA=1`` the CUDA one.

A built extension is kept in ``build/native-cache/<key>/`` (``native_build.build_key``: every file of csrc/,
the flags, the compiler, torch and the Python ABI), and a later build with the same key copies it instead of
compiling: the second ``pip install -e .`` (another extra, a Python-only change) compiles nothing.
``MARGIN_KERNELS_BUILD_CACHE=DIR`` keeps the cache elsewhere, ``=0`` turns it off.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _native_build():
    """margin_kernels/native_build.py, loaded by path: importing the package would need its dependencies."""
    spec = importlib.util.spec_from_file_location("_margin_kernels_native_build",
                                                  ROOT / "margin_kernels" / "native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_skip_reason(torch, cpp_extension):
    """None when margin_kernels._C_cuda is built, else why not (printed, so a CPU-only wheel says so)."""
    if _flag("MARGIN_KERNELS_NO_CUDA"):
        return "MARGIN_KERNELS_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (CUDA_HOME unset)"
    return None


def _cutlass_plan(build, torch):
    """(include dirs, extra nvcc flags, None) when the CUTLASS translation unit is compiled, else
    (None, None, why not)."""
    capabilities = []
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        try:
            capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 - no driver on a build machine: no visible GPU
            capabilities = []
    dirs, flags, where = build.cutlass_plan(os.environ.get("TORCH_CUDA_ARCH_LIST"), capabilities)
    if dirs is None:
        return None, None, where
    print(f"margin_kernels: CUTLASS headers from {where}", flush=True)
    return dirs, flags, None


def _describe(ext) -> str:
    """One line of what an extension is compiled from and with: the build log (pip -v, python -m build) then
    says which native paths a wheel carries."""
    flags = ext.extra_compile_args if isinstance(ext.extra_compile_args, dict) else {"cxx": ext.extra_compile_args}
    return (f"margin_kernels: compiling {ext.name} from {', '.join(ext.sources)} ("
            + "; ".join(f"{tool}: {' '.join(args)}" for tool, args in flags.items()) + ")"
            + ("" if getattr(ext, "optional", False) else ", a failure is fatal (MARGIN_KERNELS_REQUIRE_NATIVE)"))


#: cached builds kept (each is one .so of ~20 MB; the oldest go first)
CACHE_ENTRIES = 4


def _cache_root():
    """The build cache folder, or None when MARGIN_KERNELS_BUILD_CACHE=0."""
    setting = os.environ.get("MARGIN_KERNELS_BUILD_CACHE", "")
    if setting.lower() in ("0", "false", "no", "off"):
        return None
    return Path(setting) if setting else ROOT / _native_build().BUILD_CACHE


def _tool_version(command: str) -> str:
    """First line of ``command --version``: a compiler upgrade is another cache key."""
    try:
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else f"rc {out.returncode}"
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return f"unavailable ({type(exc).__name__})"


def _toolchain(ext, torch, cpp_extension) -> dict:
    """Everything besides csrc/ that the built extension depends on (the cache key's second half). Called in
    build_extension, after torch's BuildExtension added its own flags to ext."""
    cxx = cpp_extension.get_cxx_compiler() if hasattr(cpp_extension, "get_cxx_compiler") \
        else os.environ.get("CXX", "c++")
    is_cuda = any(str(source).endswith(".cu") for source in ext.sources)
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if is_cuda and cpp_extension.CUDA_HOME else None
    return {
        "extension": ext.name, "sources": list(ext.sources), "include_dirs": list(ext.include_dirs),
        "define_macros": [list(m) for m in ext.define_macros], "extra_compile_args": ext.extra_compile_args,
        "extra_link_args": ext.extra_link_args, "libraries": ext.libraries, "library_dirs": ext.library_dirs,
        "compiler": [cxx, _tool_version(cxx)], "nvcc": nvcc and [nvcc, _tool_version(nvcc)],
        "environment": {name: os.environ.get(name) for name in
                        ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "TORCH_CUDA_ARCH_LIST")},
        "torch": [torch.__version__, torch.version.git_version, torch.version.cuda],
        # the CUTLASS headers are compiled in too (their folder is in the flags; an upgrade in place is not)
        "cutlass": _native_build().cutlass_include_dirs()[1] if is_cuda else None,
        "python": [sysconfig.get_config_var("EXT_SUFFIX"), sys.implementation.cache_tag, sysconfig.get_platform()],
    }


def _store(built: Path, entry: Path) -> None:
    """Copy a fresh build into the cache (atomically: a half-copied file is never found), prune old entries."""
    entry.mkdir(parents=True, exist_ok=True)
    partial = entry / (built.name + ".partial")
    shutil.copy2(built, partial)
    os.replace(partial, entry / built.name)
    entries = sorted((p for p in entry.parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in entries[:-CACHE_ENTRIES]:
        shutil.rmtree(old, ignore_errors=True)


def _extensions():
    if _flag("MARGIN_KERNELS_NO_NATIVE"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("margin_kernels: torch is not importable at build time, so no native extension is built "
              "(install with --no-build-isolation to build it)")
        return [], {}
    build = _native_build()

    def rel(paths):  # setuptools wants paths relative to setup.py
        return [str(path.relative_to(ROOT)) for path in paths]

    include = [str(build.csrc_dir().relative_to(ROOT))]
    optional = not _flag("MARGIN_KERNELS_REQUIRE_NATIVE")
    extensions = [cpp_extension.CppExtension(
        f"margin_kernels.{build.CPU_MODULE}", rel(build.sources(False)), include_dirs=include,
        extra_compile_args=build.cxx_flags(), extra_link_args=build.ld_flags(), optional=optional)]
    cuda_skipped = _cuda_skip_reason(torch, cpp_extension)
    cutlass_skipped = None
    if cuda_skipped is None:
        cutlass_dirs, cutlass_flags, cutlass_skipped = _cutlass_plan(build, torch)
        with_cutlass = cutlass_dirs is not None
        extensions.append(cpp_extension.CUDAExtension(
            f"margin_kernels.{build.CUDA_MODULE}", rel(build.sources(True, with_cutlass)), include_dirs=include,
            extra_compile_args={"cxx": build.cxx_flags(True) + (["-DMK_WITH_CUTLASS"] if with_cutlass else []),
                                "nvcc": build.nvcc_flags() + (cutlass_flags or [])},
            extra_link_args=build.ld_flags(), optional=optional))

    class BuildExt(cpp_extension.BuildExtension):
        """torch's builder (ninja, parallel), except that an optional extension that fails only warns:
        torch raises RuntimeError for compiler errors, which setuptools' own `optional` does not catch."""

        def run(self):
            print(f"margin_kernels: building against torch {torch.__version__}"
                  + ("" if cuda_skipped is None else f"; not compiling margin_kernels.{build.CUDA_MODULE}: "
                     f"{cuda_skipped}")
                  + ("" if cutlass_skipped is None else "; the cuda backend's CUTLASS sm_90a path is not compiled "
                     f"(the cuBLAS path alone): {cutlass_skipped}"), flush=True)
            super().run()

        def build_extension(self, ext):
            target = Path(self.get_ext_fullpath(ext.name))
            cache = _cache_root()
            entry = None if cache is None else \
                cache / build.build_key(build.csrc_dir(), _toolchain(ext, torch, cpp_extension))
            if entry is not None and (entry / target.name).is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(entry / target.name, target)
                os.utime(entry)  # recently used: pruned last
                print(f"margin_kernels: reused the build of {ext.name} from {entry} (the same csrc/, flags, "
                      "compiler, torch and Python): nothing compiled", flush=True)
                return
            print(_describe(ext), flush=True)
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any build failure of an optional extension
                if not getattr(ext, "optional", False):
                    raise
                self.warn(f"margin_kernels: building {ext.name} failed ({type(exc).__name__}: {exc}); the package "
                          "still works (backend='torch')")
                return
            if entry is not None:
                try:
                    _store(target, entry)
                    print(f"margin_kernels: kept the build of {ext.name} in {entry} for the next install",
                          flush=True)
                except OSError as exc:  # a read-only checkout still installs; it only compiles again next time
                    self.warn(f"margin_kernels: could not keep the build in {entry} ({exc})")

    return extensions, {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
