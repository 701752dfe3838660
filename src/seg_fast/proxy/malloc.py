"""Big answer buffers go back to the operating system when freed.

glibc serves a large allocation with its own mmap, but raises that threshold each
time such a block is freed (up to 32 MB): after the first few transformed answers,
multi-megabyte buffers come from the heap, and a burst of them (slow readers, a
worker's limits.max_unsent_bytes) leaves the worker's RSS high long after they are
gone. A fixed threshold keeps every buffer of 1 MB or more in its own mapping, so
freeing it returns the memory at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
THRESHOLD = 1 << 20


def return_big_buffers() -> bool:
    """Fix glibc's mmap threshold (and trim threshold) at 1 MB; False off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
