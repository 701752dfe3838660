"""The OpenSSL libraries this process already loaded, and the addresses of their functions.

Compiled modules here call a few OpenSSL functions that Python's ssl and hashlib do not
expose (content/_gcm.pyx: AES-GCM without the GIL; proxy/_tickets.pyx: the session ticket
key callback). Nothing is linked at build time: the library is the one ``_ssl`` or
``_hashlib`` is linked against, found in /proc/self/maps, so the functions are those of the
very OpenSSL that made Python's objects. A fresh ``ctypes.CDLL`` per call (dlopen of a
loaded library returns that library): a caller's ``argtypes`` stay its own.
"""
from __future__ import annotations

import ctypes


def loaded(name: str) -> str | None:
    """The path of the first mapping whose path holds ``name`` (e.g. "/libssl.so"), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if name in line:
                    return line.split(None, 5)[5].strip()
    except (OSError, IndexError):
        pass
    return None


def _open(name: str) -> ctypes.CDLL | None:
    path = loaded(name)
    if path is None:
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def libssl() -> ctypes.CDLL | None:
    """The libssl ``_ssl`` is linked against (None where it cannot be found)."""
    import _ssl  # noqa: F401  (loads it)
    return _open("/libssl.so")


def libcrypto() -> ctypes.CDLL | None:
    """The libcrypto ``_hashlib`` is linked against (None where it cannot be found)."""
    import _hashlib  # noqa: F401  (loads it)
    return _open("/libcrypto.so")


def address(lib: ctypes.CDLL, name: str) -> int:
    """The address of function ``name`` in ``lib``; 0 where that OpenSSL has no such function."""
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
    except AttributeError:
        return 0


def addresses(lib: ctypes.CDLL, names) -> list[int]:
    return [address(lib, name) for name in names]
