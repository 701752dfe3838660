# cython: language_level=3
"""pymalloc's arenas on transparent huge pages.

A worker sleeps between events, and each wake-up walks objects spread over a heap of a
few hundred megabytes (its connections' state) after the other workers on the core and
the kernel have had the caches and the TLB. With 4 KiB pages nearly every object touched
is a TLB miss, and in a virtual machine a miss walks two page tables. Here pymalloc's
arenas (1 MiB each, where every object of 512 bytes or less lives) are carved from one
reserved region the kernel is asked to back with 2 MiB pages (MADV_HUGEPAGE; honoured
when /sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise").

A forked child (every worker) starts its own arenas on the next 2 MiB boundary and leaves the
parent's free ones alone: the pages it shares with its parent are copied 4 KiB at a time on
the first write, the huge page split, so an arena placed there would never sit on a huge page.

An arena pymalloc frees is kept for reuse; once every arena of its 2 MiB page is free, the
page goes back to the kernel whole (MADV_DONTNEED on one arena would split the huge page,
and the kernel would back that range with small pages from then on). Arenas allocated
before ``install`` and any beyond the region go through the allocator that was there before.
"""
import os

from libc.stdint cimport uintptr_t
from libc.stdlib cimport calloc, malloc

cdef extern from "Python.h":
    ctypedef struct PyObjectArenaAllocator:
        void *ctx
        void *(*alloc)(void *ctx, size_t size) noexcept nogil
        void (*free)(void *ctx, void *ptr, size_t size) noexcept nogil
    void PyObject_GetArenaAllocator(PyObjectArenaAllocator *allocator)
    void PyObject_SetArenaAllocator(PyObjectArenaAllocator *allocator)

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    int PROT_READ
    int PROT_WRITE
    int MAP_PRIVATE
    int MAP_ANONYMOUS
    int MAP_NORESERVE
    int MADV_HUGEPAGE
    int MADV_DONTNEED
    void *MAP_FAILED

cdef enum:
    HUGE = 2 * 1024 * 1024

cdef PyObjectArenaAllocator _before      # the allocator install() replaced
cdef PyObjectArenaAllocator _ours
cdef char *_base = NULL                  # the region, HUGE-aligned
cdef size_t _size = 0
cdef size_t _used = 0                    # bytes handed out from the bottom, never given back
cdef size_t _arena = 0                   # pymalloc's arena size (the first request's)
cdef void **_free = NULL                 # arenas freed, for reuse (a stack)
cdef unsigned char *_is_free = NULL      # per arena of the region: 1 while on the stack
cdef size_t _nfree = 0
cdef size_t _from_region = 0             # arenas handed out from the region, ever
cdef size_t _declined = 0                # requests passed to _before (region full, other size)


cdef void *_alloc(void *ctx, size_t size) noexcept nogil:
    global _used, _arena, _nfree, _from_region, _declined
    if _arena == 0:
        _arena = size
    if size == _arena:
        if _nfree:
            _nfree -= 1
            _from_region += 1
            _is_free[(<char *>_free[_nfree] - _base) // size] = 0
            return _free[_nfree]
        if _used + size <= _size:
            _used += size
            _from_region += 1
            return _base + _used - size
    _declined += 1
    return _before.alloc(_before.ctx, size)


cdef void _release(void *ctx, void *ptr, size_t size) noexcept nogil:
    global _nfree
    cdef char *p = <char *>ptr
    cdef size_t i, first, per
    if _base <= p < _base + _size:
        _free[_nfree] = ptr
        _nfree += 1
        i = (p - _base) // size
        _is_free[i] = 1
        per = HUGE // size if size < HUGE else 1
        first = i - i % per
        for i in range(first, first + per):
            if not _is_free[i] or (i + 1) * size > _used:
                return
        madvise(_base + first * size, per * size, MADV_DONTNEED)
    else:
        _before.free(_before.ctx, ptr, size)


def _after_fork_in_child():
    global _used, _nfree
    cdef size_t i
    for i in range(_nfree):
        _is_free[(<char *>_free[i] - _base) // _arena] = 0
    _nfree = 0
    _used = (_used + HUGE - 1) & ~(<size_t>HUGE - 1)


def install(size_t reserve=8 << 30):
    """Serve pymalloc's arenas from ``reserve`` bytes of address space marked for huge pages
    (only what is used is backed); False if the region cannot be reserved or marked, in which
    case nothing changes. Once per process: a forked child inherits the region."""
    global _base, _size, _free, _is_free
    if _base != NULL:
        return True
    cdef void *raw = mmap(NULL, reserve + HUGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if raw == MAP_FAILED:
        return False
    cdef uintptr_t start = (<uintptr_t>raw + HUGE - 1) & ~(<uintptr_t>HUGE - 1)
    # the unaligned ends go back
    if start != <uintptr_t>raw:
        munmap(raw, start - <uintptr_t>raw)
    munmap(<void *>(start + reserve), <uintptr_t>raw + reserve + HUGE - (start + reserve))
    if madvise(<void *>start, reserve, MADV_HUGEPAGE) != 0:
        munmap(<void *>start, reserve)
        return False
    # at most one entry per 256 KiB arena (the smallest pymalloc has used)
    _free = <void **>malloc((reserve >> 18) * sizeof(void *))
    _is_free = <unsigned char *>calloc(reserve >> 18, 1)
    if _free == NULL or _is_free == NULL:
        munmap(<void *>start, reserve)
        return False
    _base, _size = <char *>start, reserve
    PyObject_GetArenaAllocator(&_before)
    _ours.ctx = NULL
    _ours.alloc = _alloc
    _ours.free = _release
    PyObject_SetArenaAllocator(&_ours)
    os.register_at_fork(after_in_child=_after_fork_in_child)
    return True


def stats():
    """Bytes reserved and touched, arenas given out from the region and now free, requests
    passed on to the previous allocator."""
    return {"reserved": _size, "used": _used, "arena": _arena, "from_region": _from_region,
            "free": _nfree, "declined": _declined}
