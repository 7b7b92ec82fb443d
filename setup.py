"""Build script: the pure-Python package plus the native epilogues of csrc/.

* margin_kernels._C (CPU epilogues, OpenMP) whenever torch is importable at build time, which is why the
  install command is ``pip install --no-build-isolation -e .`` (pyproject deliberately lists no torch: an
  isolated build would download a multi-GB CUDA torch);
* margin_kernels._C_cuda (the same plus the CUDA kernels) when torch is a CUDA build and nvcc is found.

Both are optional: if one fails to compile the install goes on with a warning and ``backend="auto"`` falls
back to the pure-torch backend (a run-time JIT build of csrc/ is opt-in: ``MARGIN_KERNELS_JIT=1``).
``MARGIN_KERNELS_REQUIRE_NATIVE=1`` makes a failed build fatal (CI), ``MARGIN_KERNELS_NO_NATIVE=1`` skips the
extensions, ``MARGIN_KERNELS_NO_CUDA=1`` the CUDA one.
"""
import importlib.util
import os
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


def _describe(ext) -> str:
    """One line of what an extension is compiled from and with: the build log (pip -v, python -m build) then
    says which native paths a wheel carries."""
    flags = ext.extra_compile_args if isinstance(ext.extra_compile_args, dict) else {"cxx": ext.extra_compile_args}
    return (f"margin_kernels: compiling {ext.name} from {', '.join(ext.sources)} ("
            + "; ".join(f"{tool}: {' '.join(args)}" for tool, args in flags.items()) + ")"
            + ("" if getattr(ext, "optional", False) else ", a failure is fatal (MARGIN_KERNELS_REQUIRE_NATIVE)"))


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
    if cuda_skipped is None:
        extensions.append(cpp_extension.CUDAExtension(
            f"margin_kernels.{build.CUDA_MODULE}", rel(build.sources(True)), include_dirs=include,
            extra_compile_args={"cxx": build.cxx_flags(True), "nvcc": build.nvcc_flags()},
            extra_link_args=build.ld_flags(), optional=optional))

    class BuildExt(cpp_extension.BuildExtension):
        """torch's builder (ninja, parallel), except that an optional extension that fails only warns:
        torch raises RuntimeError for compiler errors, which setuptools' own `optional` does not catch."""

        def run(self):
            print(f"margin_kernels: building against torch {torch.__version__}"
                  + ("" if cuda_skipped is None else f"; not compiling margin_kernels.{build.CUDA_MODULE}: "
                     f"{cuda_skipped}"), flush=True)
            super().run()

        def build_extension(self, ext):
            print(_describe(ext), flush=True)
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any build failure of an optional extension
                if not getattr(ext, "optional", False):
                    raise
                self.warn(f"margin_kernels: building {ext.name} failed ({type(exc).__name__}: {exc}); the package "
                          "still works (backend='torch')")

    return extensions, {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
