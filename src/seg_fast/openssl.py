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
import ssl


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


_ctx_fns: list = []           # SSL_CTX_get_options, SSL_CTX_ctrl of _ssl's libssl (bound once)


def ssl_ctx_of(context: ssl.SSLContext) -> int:
    """``context``'s SSL_CTX address, read from CPython's object (the layout
    sim/tlssession.py reads) and proven against what the context itself reports, its options
    and minimum protocol version: 0 when not proven, and then never used. The one proof for
    every module that hands the pointer to OpenSSL (proxy/tickets.py, proxy/tls13.py)."""
    from seg_fast.sim.tlssession import _CTX_AT, _word      # (here: tlssession imports this module)
    if type(context) is not ssl.SSLContext:
        return 0
    if not _ctx_fns:
        lib = libssl()
        if lib is None:
            return 0
        options, ctrl = lib.SSL_CTX_get_options, lib.SSL_CTX_ctrl
        options.restype, options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
        ctrl.restype, ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        _ctx_fns[:] = [options, ctrl]
    options, ctrl = _ctx_fns
    ptr = _word(context, _CTX_AT)
    if not ptr or options(ptr) != int(context.options):
        return 0
    minimum = ctrl(ptr, 130, 0, None)        # SSL_CTRL_GET_MIN_PROTO_VERSION
    return ptr if minimum == max(context.minimum_version.value, 0) else 0
