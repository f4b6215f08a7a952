"""Process settings for running the model on the CPU.

glibc's malloc hands out each allocation above its mmap threshold (128 KiB at first, adjusted as
blocks are freed) as fresh pages from the kernel and returns them on free, so every large activation
of a step (16 MB for 2048 tokens x 2048 floats) is page-faulted in again, step after step: 20-30% of a
prefill on a small machine. Raising the threshold to its maximum (32 MiB on 64-bit) and keeping freed
memory (trim threshold 1 GiB) lets the heap reuse those blocks. The env vars MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_, when set, win (this does nothing then); so does a preloaded tcmalloc or jemalloc,
whose mallopt is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done = False


def configure_cpu_allocator() -> bool:
    """Tune glibc malloc for large, short-lived tensors (once per process); True if applied."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return False
    _done = True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # 32 MiB: glibc's largest accepted mmap threshold on 64-bit (larger values misbehave when set at run time).
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
