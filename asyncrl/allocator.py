"""Keep freed memory for reuse rather than handing it back to the operating system.

glibc's malloc serves blocks above a (moving) threshold with fresh mmap()s and returns freed heap
tops with trims, so a process that receives, holds and drops megabyte-sized arrays, as every
asyncrl process does with trajectory groups and weight buckets, keeps faulting in new pages. A
page fault is cheap on bare metal and expensive in a virtual machine (about 2 ms per MiB on the
machine this was measured on, against 0.06 ms to copy the MiB). Fixed thresholds keep those blocks
in the heap and the heap's free pages in the process, up to `trim_bytes`, so memory stays bounded.

`asyncrl` calls `keep_freed_memory()` once at start-up, for every command. It changes nothing
where malloc is not glibc's, or where the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
environment variables already say what the user wants.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20
"""Blocks below this come from the heap (glibc's largest allowed threshold on 64-bit)."""
TRIM_BYTES = 256 << 20
"""At most this much free heap is kept before it is returned to the system."""


def keep_freed_memory(mmap_bytes: int = MMAP_BYTES, trim_bytes: int = TRIM_BYTES) -> bool:
    """Set glibc's thresholds; True if they were set."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, for one, has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))
