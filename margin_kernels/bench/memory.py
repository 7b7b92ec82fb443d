"""Peak extra memory of one run, the memory limit, and what counts as out-of-memory.

"Extra" is above the inputs: the baseline is taken right before the measured run, after the inputs exist and
after a tiny warm-up has loaded libraries and thread pools. The peak includes the gradients dx, dW the run
returns (and so does the limit); the report subtracts their size to show the workspace alone.

* CUDA: the caching allocator's own counters (``max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus ``memory_allocated`` at the baseline). A forced limit is ``set_per_process_memory_fraction`` set to
  baseline + limit, so the allocator itself refuses and raises ``torch.OutOfMemoryError``.
* CPU: the process's resident set. Linux keeps its high-water mark (VmHWM) and lets a process reset it to the
  current RSS (``/proc/self/clear_refs`` <- 5), so peak extra = VmHWM after the run - VmRSS at the baseline.
  This sees every allocation that is touched (PyTorch's, oneDNN/MKL scratch, Python objects), not only the
  PyTorch allocator's; its resolution is about a MiB (the kernel batches RSS counter updates per thread).
  It needs freed memory to leave the RSS: for the memory run glibc is set to a fixed 128 KiB mmap threshold
  (``precise_allocator``) so large blocks are mmapped and returned on free (its default dynamic threshold
  keeps freed blocks in the heap, where a run could reuse them unseen). That setting would make every
  128 KiB+ temporary a fresh mmap with page faults, which a warmed-up process never pays, so before the
  warm-up and timed runs glibc is set to what its dynamic threshold settles at (``timing_allocator``).
  The limit is on address space (``RLIMIT_AS`` = current size + limit): address space is never smaller than
  resident memory, so the limit can only trip early, never late, and an allocation past it fails cleanly with
  an exception instead of waking the kernel's OOM killer (which could kill another process on a shared
  machine). Without ``--mem-limit-gb`` the CPU limit is 90% of MemAvailable for that reason.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import resource
from typing import Optional

import torch

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
SAFETY_FRACTION = 0.9


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_PROC_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text
                                              or "Cannot allocate memory" in text)


class CpuMemory:
    """Peak RSS above a baseline, with an address-space limit above the same baseline."""

    def __init__(self):
        self._baseline: Optional[int] = None
        self._saved_limit = resource.getrlimit(resource.RLIMIT_AS)
        self.method = "VmHWM reset (/proc/self/clear_refs)"

    def begin(self) -> None:
        gc.collect()
        precise_allocator()
        self._baseline = _status_kib("VmRSS")  # None without Linux's /proc: no memory column then
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError:
            # older kernels or no /proc: ru_maxrss is the lifetime peak, which may hide this run's peak
            self.method = "ru_maxrss (lifetime peak; a lower bound when earlier work peaked higher)"

    def peak_extra(self) -> Optional[int]:
        if self._baseline is None:
            return None
        peak = _status_kib("VmHWM")
        if peak is None or self.method.startswith("ru_maxrss"):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return peak - self._baseline

    def limit(self, extra_bytes: Optional[int]) -> tuple[Optional[int], str]:
        """Cap address space at its current size + ``extra_bytes`` (default: 90% of MemAvailable)."""
        source = "--mem-limit-gb"
        if extra_bytes is None:
            available = mem_available_bytes()
            if available is None:
                return None, "none"
            extra_bytes, source = int(available * SAFETY_FRACTION), "90% of MemAvailable"
        size = _status_kib("VmSize")
        if size is None:
            return None, "none"
        hard = self._saved_limit[1]
        soft = size + extra_bytes if hard == resource.RLIM_INFINITY else min(size + extra_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return extra_bytes, source

    def unlimit(self) -> None:
        resource.setrlimit(resource.RLIMIT_AS, self._saved_limit)


class CudaMemory:
    """Allocator counters; a forced limit through the allocator's per-process fraction."""

    method = "torch.cuda.max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device
        self._baseline = 0

    def begin(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self._baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_extra(self) -> Optional[int]:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self._baseline

    def limit(self, extra_bytes: Optional[int]) -> tuple[Optional[int], str]:
        if extra_bytes is None:  # the allocator raises OutOfMemoryError by itself at the device's size
            return None, "device memory"
        total = torch.cuda.get_device_properties(self.device).total_memory
        allowed = torch.cuda.memory_allocated(self.device) + extra_bytes
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), self.device)
        return extra_bytes, "--mem-limit-gb"

    def unlimit(self) -> None:
        torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        torch.cuda.empty_cache()


def memory_probe(device: torch.device):
    return CudaMemory(device) if device.type == "cuda" else CpuMemory()


# glibc mallopt parameters and the value its dynamic mmap threshold grows to on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_PRECISE_MMAP_THRESHOLD = 128 << 10
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def precise_allocator() -> bool:
    """Blocks of 128 KiB and more are mmapped and returned on free; free heap pages go back now, so the
    RSS baseline holds no reusable memory. False where the C library is not glibc (no effect then)."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _PRECISE_MMAP_THRESHOLD)
    libc.malloc_trim(0)
    return bool(ok)


def timing_allocator() -> bool:
    """Let glibc keep freed blocks up to 32 MiB for reuse, as a warmed-up process does (False if not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
    return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX))
