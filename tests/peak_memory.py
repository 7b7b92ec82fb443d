"""Peak resident memory of one step in a fresh process, for the memory tests (test_memory.py,
test_memory_budget.py, test_memory_regularizers.py).

The process's lifetime peak (``ru_maxrss``) cannot see a step whose allocations fit under an earlier high-water
mark (building the model, a warm-up step, the allocator's freed pages): it reads 0 extra bytes, and a test that
bounds the extra memory from above then passes whatever the step allocated (seen once: the Center loss's
peak delta read 0). So the peak is reset right before the step (Linux: writing 5 to /proc/self/clear_refs
resets VmHWM to the current RSS) and read from VmHWM after it, and every run carries a control: the same
measurement around a known allocation (``control_numel`` fp32 elements, written), which must read at least
90% of its size, or the run's numbers say nothing and the test fails saying so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: fraction of the control allocation the measurement must see (the rest: pages the allocator already held)
CONTROL_SEEN = 0.9

#: the fresh process's environment: one thread (no per-thread arenas), and glibc's mmap threshold fixed at
#: 128 KiB (setting it turns off glibc's dynamic threshold, which after a large block is freed serves later large
#: blocks from the heap, where pages freed earlier stay resident and hide new allocations from the peak: the
#: control read 84% of its 12.8 MB after a memory-budget step without this)
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}

#: defines measure(fn) -> bytes (peak RSS above the RSS before fn, while fn runs) and report(extra, numel)
PRELUDE = r"""
import gc, json, torch

def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def measure(fn):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before

def report(extra, control_numel):
    control = measure(lambda: torch.ones(control_numel))  # written, so its pages are resident
    print(json.dumps({"extra_bytes": extra, "control_bytes": control, "control_expected": 4 * control_numel}))
"""


def skip_unless_measurable() -> None:
    """The reset needs Linux's /proc/self/clear_refs (kernel >= 4.0); elsewhere the peak cannot be measured."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("peak RSS cannot be reset here (no writable /proc/self/clear_refs): no fresh-process peak")


def peak_extra(script: str, *args) -> int:
    """Run PRELUDE + ``script`` (which ends with ``report(measure(step), control_numel)``) in a fresh process
    with ``args`` in sys.argv; the step's extra peak bytes, after checking the control."""
    skip_unless_measurable()
    out = subprocess.run([sys.executable, "-c", PRELUDE + script, *map(str, args)], capture_output=True, text=True,
                         check=True, env={**os.environ, **ENV})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["control_bytes"] >= CONTROL_SEEN * result["control_expected"], (
        "the peak measurement is blind: a known allocation of {control_expected} bytes read as "
        "{control_bytes}".format(**result))
    return result["extra_bytes"]
