"""The build cache's key (margin_kernels/native_build.py ``build_key``, used by setup.py): a cached
margin_kernels._C is reused only for the same csrc/ bytes, flags, compiler, torch and Python ABI.

The reuse itself (a second ``pip install -e .`` that compiles nothing) is tests/test_packaging.py's slow
``test_second_editable_install_reuses_the_build``.
"""
import shutil

import pytest

from margin_kernels import native_build

# what setup.py's _toolchain gathers, in the same shape (the values only need to differ)
TOOLCHAIN = {
    "extension": "margin_kernels._C", "sources": ["csrc/bindings.cpp", "csrc/margin_cpu.cpp"],
    "include_dirs": ["csrc", "/site-packages/torch/include"], "define_macros": [],
    "extra_compile_args": native_build.cxx_flags() + ["-DTORCH_EXTENSION_NAME=_C"],
    "extra_link_args": native_build.ld_flags(), "libraries": ["c10", "torch"], "library_dirs": [],
    "compiler": ["c++", "c++ (GCC) 13.2.0"], "nvcc": None, "environment": {"CXXFLAGS": None},
    "torch": ["2.13.0+cpu", "cf30153c", None], "python": [".cpython-311-x86_64-linux-gnu.so", "cpython-311", "linux"],
}


@pytest.fixture
def csrc(tmp_path):
    return shutil.copytree(native_build.csrc_dir(), tmp_path / "csrc")


def test_same_inputs_same_key_at_any_location(csrc, tmp_path):
    key = native_build.build_key(csrc, TOOLCHAIN)
    assert key == native_build.build_key(csrc, dict(TOOLCHAIN))
    # another copy of the checkout (a scratch copy, a second clone) shares the cache entry
    other = shutil.copytree(csrc, tmp_path / "elsewhere" / "csrc")
    assert native_build.build_key(other, TOOLCHAIN) == key
    assert len(key) == 24 and int(key, 16) >= 0  # a folder name


@pytest.mark.parametrize("name", [p.name for p in sorted(native_build.csrc_dir().iterdir()) if p.is_file()])
def test_one_changed_byte_of_any_csrc_file_changes_the_key(csrc, name):
    key = native_build.build_key(csrc, TOOLCHAIN)
    path = csrc / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # a header counts as much as a .cpp: it is compiled into both
    path.write_bytes(bytes(data))
    assert native_build.build_key(csrc, TOOLCHAIN) != key


def test_added_or_renamed_files_change_the_key(csrc):
    key = native_build.build_key(csrc, TOOLCHAIN)
    (csrc / "new.h").write_text("")
    added = native_build.build_key(csrc, TOOLCHAIN)
    assert added != key
    (csrc / "new.h").rename(csrc / "other.h")
    assert native_build.build_key(csrc, TOOLCHAIN) not in (key, added)


@pytest.mark.parametrize("field,value", [
    ("extra_compile_args", native_build.cxx_flags() + ["-DTORCH_EXTENSION_NAME=_C", "-g"]),  # a flag
    ("extra_compile_args", [f for f in native_build.cxx_flags() if f != "-ffp-contract=off"]),
    ("extra_link_args", []),
    ("sources", ["csrc/bindings.cpp"]),
    ("compiler", ["c++", "c++ (GCC) 14.1.0"]),  # a compiler upgrade
    ("environment", {"CXXFLAGS": "-march=native"}),
    ("torch", ["2.12.0+cpu", "cf30153c", None]),  # another torch: another ABI of its headers
    ("torch", ["2.13.0+cpu", "cf30153c", "12.8"]),
    ("python", [".cpython-312-x86_64-linux-gnu.so", "cpython-312", "linux"]),  # another Python ABI
])
def test_flags_compiler_torch_and_python_change_the_key(csrc, field, value):
    assert native_build.build_key(csrc, {**TOOLCHAIN, field: value}) != native_build.build_key(csrc, TOOLCHAIN)


def test_the_key_is_not_fooled_by_moving_bytes_between_files(csrc):
    # lengths are hashed with the bytes: "ab" + "c" and "a" + "bc" are different csrc/ trees
    for path in list(csrc.iterdir()):  # csrc/cutlass/ is a folder
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (csrc / "a.h").write_bytes(b"ab")
    (csrc / "b.h").write_bytes(b"c")
    key = native_build.build_key(csrc, TOOLCHAIN)
    (csrc / "a.h").write_bytes(b"a")
    (csrc / "b.h").write_bytes(b"bc")
    assert native_build.build_key(csrc, TOOLCHAIN) != key
