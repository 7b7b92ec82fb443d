"""Packaging: what a user's `pip install` pulls, and that the sdist, the wheel and a non-editable install work.

The fast test reads pyproject.toml (Triton is an extra, not a dependency). The slow ones build from a copy of
the checkout's files (what a fresh clone holds): ``python -m build --no-isolation`` (an sdist, then a wheel
built from that sdist, so a file missing from the sdist fails the wheel), and ``pip install --no-deps
--no-build-isolation --target DIR .`` (non-editable); each install is imported from outside the checkout.
Nothing installs into the running environment and nothing can pull torch: ``--no-deps``, no isolation.
The build cache: a second ``pip install -e .`` of a scratch copy, into a scratch venv, compiles nothing.
"""
import os
import shutil
import site
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from tests.tolerances import FP32_SMOKE

ROOT = Path(__file__).resolve().parent.parent
BUILD_ENV = dict(os.environ, MARGIN_KERNELS_REQUIRE_NATIVE="1")  # a wheel without its extension is a failure
CSRC = ("bindings.cpp", "margin_cpu.cpp", "margin_cpu.h", "margin_cuda.cu", "margin_cuda.h", "margin_math.h")

# run from outside the checkout: the installed copy, not the worktree, must be what imports
CHECK_INSTALLED = r"""
import sys, torch, margin_kernels as mk
target = sys.argv[1]
assert mk.__file__.startswith(target), (mk.__file__, target)
assert mk.available_backends()["cpu"] is None, mk.available_backends()  # the compiled extension came along
torch.manual_seed(0)
x, w, y = torch.randn(6, 16), torch.randn(50, 16), torch.randint(0, 50, (6,))
got = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpu")
ref = mk.margin_cross_entropy(x.double(), w.double(), y, mk.ArcFace(), backend="reference")
assert abs(got.item() - ref.item()) < FP32_SMOKE * abs(ref.item()), (got, ref)
print("installed ok")
""".replace("FP32_SMOKE", repr(FP32_SMOKE))  # the bound, from tests/tolerances.py


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_triton_is_an_extra_that_the_test_extra_pulls():
    project = _pyproject()["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("triton")], project["dependencies"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("triton") for d in extras["triton"])
    assert any(d.startswith("margin_kernels[") and "triton" in d for d in extras["test"]), extras["test"]
    assert "build" in extras["test"]  # the slow packaging tests below need it


def _checkout_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked plus untracked-but-not-ignored ones): no build outputs, no .so."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip(f"needs a git checkout to know which files a clone holds ({listed.stderr.decode().strip()})")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _check_installed(target: Path, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", CHECK_INSTALLED, str(target)], cwd=cwd, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "installed ok" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_build_makes_an_sdist_with_csrc_and_a_wheel_with_the_extension(tmp_path):
    pytest.importorskip("build", reason="python -m build needs the `build` package (in the test extra)")
    src = _checkout_copy(tmp_path / "src")
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, env=BUILD_ENV)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    # the build says what it compiles, from which sources
    assert "margin_kernels: compiling margin_kernels._C from csrc/bindings.cpp, csrc/margin_cpu.cpp" in out.stdout

    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {f"csrc/{name}" for name in CSRC} <= names, sorted(names)
    assert {"setup.py", "pyproject.toml", "margin_kernels/native_build.py", "examples/train_arcface.py",
            "LICENSE"} <= names

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.startswith("margin_kernels/_C.") and n.endswith((".so", ".pyd")) for n in names), names
    assert "margin_kernels/bench/cli.py" in names
    # the developer tools stay in the checkout: neither the top-level bench/ nor a tool inside the package
    assert not [n for n in names if n.split("/")[0] == "bench"], sorted(names)
    tools = ("chunks", "kernels", "ceilings", "memory_model", "optimizer_step", "throughput")
    assert not [n for n in names if n.rsplit("/", 1)[-1] in {f"{t}.py" for t in tools}], sorted(names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: triton")]
    assert requires and all('extra == "triton"' in line for line in requires), requires
    # the licence: named by its SPDX expression and carried in the wheel (PEP 639)
    assert "License-Expression: Apache-2.0" in metadata.splitlines(), metadata[:2000]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names

    target = tmp_path / "from_wheel"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                          str(wheel)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    _check_installed(target, tmp_path)


@pytest.mark.slow
def test_non_editable_pip_install(tmp_path):
    src = _checkout_copy(tmp_path / "src")
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(target), str(src)], capture_output=True, text=True, env=BUILD_ENV)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    _check_installed(target, tmp_path)


@pytest.mark.slow
def test_second_editable_install_reuses_the_build(tmp_path):
    """The README's two install commands (and any reinstall without a C++ change) compile margin_kernels._C
    once: setup.py keeps the build in build/native-cache/<key> and the second install copies it."""
    src = _checkout_copy(tmp_path / "src")
    cache = ROOT / "build" / "native-cache"
    if cache.is_dir():  # the checkout's own install already built it (CI's first step): the first install here
        shutil.copytree(cache, src / "build" / "native-cache")  # reuses it too, as a second clone would not
    # a scratch venv that sees this interpreter's packages (torch, setuptools, pip), so the editable install
    # goes into the venv and never re-points the running environment's margin_kernels
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    # when this interpreter is itself a venv, --system-site-packages reaches only the base interpreter's
    (Path(venv_site) / "parent_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [str(python), "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index",
               "-e", str(src)]
    first = subprocess.run(install, capture_output=True, text=True, env=BUILD_ENV, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    started = time.perf_counter()
    second = subprocess.run(install, capture_output=True, text=True, env=BUILD_ENV, cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    log = second.stdout + second.stderr  # pip -v relays the build's output on stderr
    assert "margin_kernels: reused the build of margin_kernels._C from" in log, log[-4000:]
    assert "margin_kernels: compiling margin_kernels._C from" not in log, log[-4000:]
    # a compile takes minutes (2.5 min on 2 cores); the copy and pip's own work take ~15 s on a loaded machine
    assert seconds < 60, seconds
    check = subprocess.run([str(python), "-c", "import margin_kernels as mk; print(mk.__file__); "
                            "print(mk.available_backends()['cpu'])"], capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    path, cpu = check.stdout.split("\n")[:2]
    assert path.startswith(str(src)) and cpu == "None", check.stdout  # the scratch copy, its extension loads
