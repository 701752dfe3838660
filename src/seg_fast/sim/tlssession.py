"""Resuming a TLS session on a new fleet connection without CPython's copy of it.

CPython sets a session on a new SSL object through a copy (``i2d_SSL_SESSION`` then
``d2i_SSL_SESSION``: a workaround for an OpenSSL 1.1.0 bug), and decoding the copy
decodes the server's certificate again: ~390 µs per connection with OpenSSL 3.0,
against ~7 µs for the rest of making the SSL object. Every foreground request of a
fleet device is a new, resumed connection, so that copy was ~13% of the load side's
CPU on the gateway path. OpenSSL 1.1.1+ lets one session be set on many SSL objects
(TLS 1.3 copies a session before it changes it, as on a ticket), so here the session
is handed to ``SSL_set_session`` as it is. One thing the copy did: OpenSSL marks a
session not resumable when a connection that used it ends without close_notify or
with a fatal alert, and the copy (its flag is not encoded) resumed it anyway. A
session so marked is handed to CPython's copy as before, so a device resumes
exactly as often as it did.

The two C pointers are read from CPython's objects (``_ssl._SSLSocket`` holds its
``SSL *`` after the head and the socket's weak reference, ``SSLSession`` its
``SSL_SESSION *`` right after the head), which no API exposes. So the layout is
proven once per process before it is used — the SSL object's ``SSL_CTX`` must be
the context's own, the session's creation time, timeout and protocol must be the
Python object's, and the first session set must read back with its id — and
anything that does not hold (another Python, another libssl) leaves ``setter()``
None: the caller passes the session to CPython as before.
"""
from __future__ import annotations

import ctypes
import ssl
import struct
import sys

from seg_fast import openssl

_HEAD = struct.calcsize("nP")          # PyObject_HEAD: refcount, type (a release build)
_SSL_AT = _HEAD + struct.calcsize("P")  # PySSLSocket: head, Socket (weakref), ssl
_SESSION_AT = _HEAD                     # PySSLSession: head, session
_CTX_AT = _HEAD                         # PySSLContext: head, ctx
TLS1_3_VERSION = 0x0304

_state: dict = {}


def _libssl():
    """The libssl that ``_ssl`` is linked to (the one already in this process), typed
    for this module (``openssl.libssl()`` is a CDLL of its own per call)."""
    import _ssl
    if not hasattr(_ssl, "_SSLSocket"):
        return None
    lib = openssl.libssl()
    if lib is None:
        return None
    lib.SSL_set_session.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.SSL_set_session.restype = ctypes.c_int
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    lib.SSL_is_server.argtypes = [ctypes.c_void_p]
    lib.SSL_is_server.restype = ctypes.c_int
    lib.SSL_SESSION_get_time.argtypes = [ctypes.c_void_p]
    lib.SSL_SESSION_get_time.restype = ctypes.c_long
    lib.SSL_SESSION_get_timeout.argtypes = [ctypes.c_void_p]
    lib.SSL_SESSION_get_timeout.restype = ctypes.c_long
    lib.SSL_SESSION_get_protocol_version.argtypes = [ctypes.c_void_p]
    lib.SSL_SESSION_get_protocol_version.restype = ctypes.c_int
    lib.SSL_SESSION_is_resumable.argtypes = [ctypes.c_void_p]
    lib.SSL_SESSION_is_resumable.restype = ctypes.c_int
    lib.SSL_get1_session.argtypes = [ctypes.c_void_p]
    lib.SSL_get1_session.restype = ctypes.c_void_p
    lib.SSL_SESSION_free.argtypes = [ctypes.c_void_p]
    lib.SSL_SESSION_free.restype = None
    lib.SSL_SESSION_get_id.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
    lib.SSL_SESSION_get_id.restype = ctypes.c_void_p
    lib.i2d_SSL_SESSION.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.i2d_SSL_SESSION.restype = ctypes.c_int
    lib.d2i_SSL_SESSION.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_long]
    lib.d2i_SSL_SESSION.restype = ctypes.c_void_p
    return lib


class Session:
    """A client connection's ``SSL_SESSION *`` held by reference (``SSL_get1_session``),
    released with this object: what ``getter()`` returns instead of CPython's
    ``SSLObject.session``, which is a copy (``i2d``/``d2i``, the certificate decoded
    again: ~400 µs) made on every read. ``id`` as on ``ssl.SSLSession``."""
    __slots__ = ("ptr", "_free")

    def __init__(self, ptr: int, free) -> None:
        self.ptr = ptr
        self._free = free

    @property
    def id(self) -> bytes:
        return _session_id(_state["lib"], self.ptr)

    def __del__(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            self._free(ptr)


def _session_id(lib, ptr: int) -> bytes:
    n = ctypes.c_uint(0)
    at = lib.SSL_SESSION_get_id(ptr, ctypes.byref(n))
    return ctypes.string_at(at, n.value) if at else b""


def _copy(lib, ptr: int) -> int:
    """CPython's copy of a session (``_ssl_session_dup``: ``i2d`` then ``d2i``), whose
    not-resumable mark is not encoded: 0 when it fails."""
    n = lib.i2d_SSL_SESSION(ptr, None)
    if n <= 0:
        return 0
    buf = ctypes.create_string_buffer(n)
    p = ctypes.c_void_p(ctypes.addressof(buf))
    if lib.i2d_SSL_SESSION(ptr, ctypes.byref(p)) != n:
        return 0
    p = ctypes.c_void_p(ctypes.addressof(buf))
    return lib.d2i_SSL_SESSION(None, ctypes.byref(p), n) or 0


def _word(obj, offset: int) -> int:
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


def _proved(lib, context: ssl.SSLContext, sslobj, session) -> bool:
    """The layout holds for these three objects (read before anything is written)."""
    ssl_ptr, sess_ptr, ctx_ptr = _word(sslobj, _SSL_AT), _word(session, _SESSION_AT), _word(context, _CTX_AT)
    if not (ssl_ptr and sess_ptr and ctx_ptr):
        return False
    if lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr or lib.SSL_is_server(ssl_ptr) != 0:
        return False
    return (lib.SSL_SESSION_get_time(sess_ptr) == session.time
            and lib.SSL_SESSION_get_timeout(sess_ptr) == session.timeout
            and lib.SSL_SESSION_get_protocol_version(sess_ptr) == TLS1_3_VERSION)


def setter():
    """``set(context, sslobj, session) -> bool``, or None where this process cannot
    use it. ``sslobj``: a client ``_ssl._SSLSocket`` of ``context`` before its
    handshake; ``session``: an ``ssl.SSLSession`` a connection of ``context`` got, or
    a ``Session`` from ``getter()``. False: not set (the layout did not prove out for
    these objects; a ``Session`` is then to be left out, CPython cannot take it)."""
    if "set" in _state:
        return _state["set"]
    lib = None
    if sys.implementation.name == "cpython" and not hasattr(sys, "gettotalrefcount"):
        try:
            lib = _libssl()
        except (OSError, AttributeError):
            lib = None
    if lib is None:
        _state["set"] = None
        return None
    _state["lib"] = lib
    set_session = lib.SSL_set_session
    is_resumable = lib.SSL_SESSION_is_resumable
    free = lib.SSL_SESSION_free
    proven = []

    def set_raw(ssl_ptr: int, sess_ptr: int) -> bool:
        if is_resumable(sess_ptr):
            return set_session(ssl_ptr, sess_ptr) == 1
        # marked not resumable (a connection that used it ended badly): CPython's
        # copy, which resumed it anyway, so a device resumes as often as it did
        copy = _copy(lib, sess_ptr)
        if not copy:
            return False
        try:
            return set_session(ssl_ptr, copy) == 1
        finally:
            free(copy)              # SSL_set_session holds its own reference

    def set(context: ssl.SSLContext, sslobj, session) -> bool:
        raw = type(session) is Session
        if not proven:
            # the first time: every pointer checked, and the session read back
            if raw:
                ssl_ptr, ctx_ptr = _word(sslobj, _SSL_AT), _word(context, _CTX_AT)
                if (not ssl_ptr or not ctx_ptr or lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr
                        or lib.SSL_is_server(ssl_ptr) != 0 or not set_raw(ssl_ptr, session.ptr)):
                    return False
            else:
                if not _proved(lib, context, sslobj, session) or not is_resumable(_word(session, _SESSION_AT)):
                    return False
                if set_session(_word(sslobj, _SSL_AT), _word(session, _SESSION_AT)) != 1:
                    return False
            if sslobj.session is None or sslobj.session.id != session.id:
                raise RuntimeError("SSL_set_session on a fleet connection did not take")
            proven.append(True)
            return True
        ssl_ptr = _word(sslobj, _SSL_AT)
        if raw:
            return bool(ssl_ptr) and set_raw(ssl_ptr, session.ptr)
        sess_ptr = _word(session, _SESSION_AT)
        if not ssl_ptr or not sess_ptr or not is_resumable(sess_ptr):
            return False
        return set_session(ssl_ptr, sess_ptr) == 1

    _state["set"] = set
    return set


def getter():
    """``get(sslobj)``: the session of the client ``_ssl._SSLSocket`` ``sslobj`` (None
    when it has none) as a ``Session`` (a reference, no copy), or None where this
    process cannot use it (``sslobj.session`` then, CPython's copy). The first call
    proves the layout against CPython's own answer (same id, time and timeout); one
    that does not prove out gives CPython's session, and so does every later call."""
    if "get" in _state:
        return _state["get"]
    if setter() is None:
        _state["get"] = None
        return None
    lib = _state["lib"]
    get1, free = lib.SSL_get1_session, lib.SSL_SESSION_free
    proven: list[bool] = []

    def get(sslobj):
        ssl_ptr = _word(sslobj, _SSL_AT)
        if not proven:
            if (not ssl_ptr or lib.SSL_get_SSL_CTX(ssl_ptr) != _word(sslobj.context, _CTX_AT)
                    or lib.SSL_is_server(ssl_ptr) != 0):
                proven.append(False)
                return sslobj.session
            ptr = get1(ssl_ptr)
            if not ptr:
                return None
            mine, theirs = Session(ptr, free), sslobj.session
            ok = (theirs is not None and theirs.id == mine.id
                  and lib.SSL_SESSION_get_time(ptr) == theirs.time
                  and lib.SSL_SESSION_get_timeout(ptr) == theirs.timeout)
            proven.append(ok)
            return mine if ok else theirs
        if not proven[0]:
            return sslobj.session
        ptr = get1(ssl_ptr)
        return Session(ptr, free) if ptr else None

    _state["get"] = get
    return get
