"""The property-based fuzz suite (cases and oracle: tests/fuzz_cases.py), derandomized so every run checks the
same examples. The default run checks a few dozen in-process; the slow runs (CI) check FUZZ_EXAMPLES in all,
each backend in its own subprocess with a timeout, so a crash in native code or a hang fails its test instead
of taking pytest down."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from margin_kernels.backends import available_backends

from . import fuzz_cases

#: examples per backend in the slow (CI) runs: 2,100 in all; Triton's interpreter is ~10x slower per case
FUZZ_EXAMPLES = {"torch": 800, "cpu": 800, "triton": 300, "reference": 200}
#: seconds per backend's subprocess (observed on the 2-core CI machine: ~40 s per 800 torch/cpu cases,
#: ~2 min for 300 Triton ones)
FUZZ_TIMEOUT_S = 900
SMOKE_EXAMPLES = {"torch": 25, "cpu": 25, "triton": 6, "reference": 10}


def _runnable(backend):
    reason = available_backends()[backend]
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", list(SMOKE_EXAMPLES))
def test_fuzz_smoke(backend):
    _runnable(backend)
    assert fuzz_cases.run(backend, SMOKE_EXAMPLES[backend]) == SMOKE_EXAMPLES[backend]


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(FUZZ_EXAMPLES))
def test_fuzz_in_a_subprocess(backend):
    _runnable(backend)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in sys.path if p]))
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz_cases", backend, str(FUZZ_EXAMPLES[backend])],
                          cwd=root, env=env, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert f"examples: {FUZZ_EXAMPLES[backend]}" in proc.stdout


def test_fuzz_ci_count_is_at_least_2000():
    assert sum(FUZZ_EXAMPLES.values()) >= 2000
