"""Every ```python block of README.md runs as written on this machine (CPU), each in a fresh interpreter.

A block that is not meant to run is marked on the line before its fence with
``<!-- readme-test: skip <reason> -->``; the test skips it and prints the reason (today no block is marked).
Blocks that start a process group also run under torchrun with 2 gloo ranks (slow).
A block writes nothing into its working directory (a reader runs it from the repository root, where a file
left behind shows up in ``git status``): output goes to a temporary folder.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- readme-test: skip (.*?) -->\s*$")


def python_blocks() -> list:
    """(line number, code, skip reason or None) of every python block."""
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append((line, match.group(1), skip.group(1) if skip else None))
    return blocks


BLOCKS = python_blocks()


def _run(command, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README.md lost its python examples (or the fence pattern no longer matches them)"


@pytest.mark.parametrize("line,code,skip", BLOCKS, ids=[f"line{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, skip, tmp_path):
    if skip:
        pytest.skip(f"README.md line {line} is marked not to run: {skip}")
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code)
    out = _run([sys.executable, str(script)], tmp_path)
    assert out.returncode == 0, f"README.md block at line {line} failed:\n{out.stderr[-3000:]}"
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p != script)
    assert not left, f"README.md block at line {line} wrote into its working directory: {left}"


DISTRIBUTED = [(line, code) for line, code, skip in BLOCKS if "init_process_group" in code and not skip]


#: what a gloo rank prints when it aborts at interpreter exit (std::terminate of a still-joinable thread)
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.mark.slow
@pytest.mark.parametrize("line,code", DISTRIBUTED, ids=[f"line{line}" for line, _ in DISTRIBUTED])
def test_readme_distributed_block_runs_on_two_ranks(line, code, tmp_path):
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    out = _run(command, tmp_path)
    if out.returncode != 0 and GLOO_TEARDOWN_ABORT in out.stderr:
        # torch 2.13 + gloo: a rank now and then aborts in interpreter finalisation after the block finished
        # (its destroy_process_group included; seen in this project's fresh-clone CI, root cause unknown, and
        # not this package's: no thread of ours). That one signature gets one more run; any other failure, or
        # the same twice, fails
        out = _run(command, tmp_path)
    assert out.returncode == 0, f"README.md block at line {line} failed on 2 ranks:\n{out.stderr[-3000:]}"
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p != script)
    assert not left, f"README.md block at line {line} wrote into its working directory: {left}"
