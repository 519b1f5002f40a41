"""Host memory: let glibc's malloc keep freed tensor memory for reuse.

A CPU training step allocates and frees the same activation-sized tensors every step. glibc's
malloc serves blocks above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MiB by default) with fresh
``mmap`` pages and returns freed heap memory above ``M_TRIM_THRESHOLD`` to the kernel, so every step
page-faults its tensors in again, the kernel zeroing each page first. Measured on WRN-16-1, batch
128, 2 cores (``python -m benchmarks.host_memory``, ``benchmarks/RESULTS.md``): 2,600-4,700 page
faults and 7-12 ms of kernel time per step by default, about 100 faults and 0.5 ms with both
thresholds raised.

:func:`reuse_freed_memory` raises both thresholds once per process (``[run] host_memory = "reuse"``,
the default). The cost: the process keeps its peak heap instead of shrinking between steps, which a
training process reaches again on the next step anyway. ``host_memory = "system"`` leaves malloc
alone. It is a no-op where the C library is not glibc (musl, macOS, Windows) or where malloc has
been replaced (jemalloc, tcmalloc through ``LD_PRELOAD`` keep their own policies).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "reuse_freed_memory"]

#: blocks up to this size come from the reusable heap instead of fresh mmap pages
MMAP_THRESHOLD = 1 << 30
#: free memory at the top of the heap kept instead of given back to the kernel
TRIM_THRESHOLD = 1 << 31
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: str | None = None


def reuse_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds (once per process); returns what was done, for logs."""
    global _applied
    if _applied is not None:
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = "unchanged (not glibc)"
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _applied = "unchanged (no mallopt)"
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # both or neither: a raised trim threshold alone freezes the mmap threshold at its 128 KiB start
    # value (measured: 17x more page faults); older glibc caps the mmap threshold at 32 MiB
    mmap = next((size for size in (MMAP_THRESHOLD, 32 << 20) if mallopt(_M_MMAP_THRESHOLD, size) == 1), None)
    if mmap is None:
        _applied = "unchanged (mallopt refused)"
        return _applied
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _applied = f"reuse (glibc mmap threshold {mmap >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB)"
    return _applied


def applied() -> str | None:
    """What :func:`reuse_freed_memory` did in this process, or None if it has not run."""
    return _applied
