"""Keep freed CPU memory in the process for the CPU benchmarks: glibc malloc tuned like a caching allocator.

A training step allocates and frees the same multi-MB tensors every step. glibc serves blocks above its mmap threshold
(128 KiB at start, adapting up to 32 MiB) with fresh mmap'ed pages and trims freed heap tops back to the OS, so a step
can take thousands of page faults (measured here: ~7,000 minor faults and 15-19 ms of system time in a 55 ms bf16
block step), varying from run to run with the heap's history. That noise hits every variant but not alike. PyTorch's
CPU performance guidance is a caching allocator (jemalloc, tcmalloc); the same effect with glibc is two mallopt calls:
M_MMAP_THRESHOLD = 32 MiB (its maximum) and M_TRIM_THRESHOLD = 1 GiB. Applied to the whole benchmark process, so all
variants (torch's and ours) run with it; a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Tune glibc malloc as described above; True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def describe(applied: bool) -> str:
    return "glibc malloc keeps freed memory (bench/malloc_tuning.py)" if applied else "default malloc"
