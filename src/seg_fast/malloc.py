"""Freed memory goes back to the operating system: big answer buffers, a snapshot's rows.

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
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
THRESHOLD = 1 << 20


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_big_buffers() -> bool:
    """Fix glibc's mmap threshold (and trim threshold) at 1 MB; False off glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))


def give_back() -> bool:
    """Return the free pages inside glibc's heaps (malloc_trim): after a burst of small
    objects freed at once (a snapshot's 100,000 rows), most of them sit in pages below the
    heap's top that the trim threshold never reaches; False off glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def huge_arenas() -> bool:
    """pymalloc's arenas on transparent huge pages (``_hugearena``), once per process and
    before the bulk of its objects exist (a forked worker inherits it); False where the
    region cannot be reserved (the arenas stay where pymalloc puts them)."""
    from seg_fast import _hugearena

    return _hugearena.install()
