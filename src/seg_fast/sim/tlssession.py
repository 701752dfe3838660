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


# -- read-ahead ----------------------------------------------------------------------
# Without read-ahead OpenSSL's socket BIO reads each TLS record with two read()s (its
# 5-byte header, then the rest): a 2 MB fetch answer is ~260 system calls on the
# device's side and as many on the simulator's for a request body. With read-ahead it
# reads what the socket holds, up to READ_AHEAD_BUFFER, and decrypts the records
# from there. Nothing on the wire changes (the same records, sent as before); only how
# this process reads them. CPython sets SSL_MODE_RELEASE_BUFFERS on its contexts, so
# an idle connection (a parked Ping) still holds no read buffer.
# Measured (benchmarks/tls_read_ahead.py, 2026-11-30): read()s per answer ~4x fewer,
# CPU not lower -- each buffer read ahead is a malloc/free at the heap's top (a brk
# pair per drained connection), which cost more than the reads saved (300 KB answers
# 720 -> 1,060+ us); with glibc's trimming held off the two were even. So the fleet
# uses it only when asked (fleet.READ_AHEAD, SEG_FAST_FLEET_READ_AHEAD=1).
# The catch: records read ahead sit in the SSL object, where neither the socket's
# readiness nor SSLObject.pending() (the current record's rest only) shows them;
# ``has_pending`` (SSL_has_pending) does, and a reader that stops before OpenSSL says
# "want read" asks it (wire.read_tls, HttpConn.buffered).
READ_AHEAD_BUFFER = 65536
_SSL_CTRL_GET_READ_AHEAD, _SSL_CTRL_SET_READ_AHEAD = 40, 41


def _read_ahead_lib():
    lib = _state.get("ra_lib")
    if lib is None and "ra_lib" not in _state:
        lib = None
        if setter() is not None:
            lib = _state["lib"]
            try:
                lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
                lib.SSL_CTX_ctrl.restype = ctypes.c_long
                lib.SSL_CTX_set_default_read_buffer_len.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                lib.SSL_CTX_set_default_read_buffer_len.restype = None
                lib.SSL_has_pending.argtypes = [ctypes.c_void_p]
                lib.SSL_has_pending.restype = ctypes.c_int
            except AttributeError:
                lib = None
        _state["ra_lib"] = lib
    return lib


def read_ahead(context: ssl.SSLContext, buffer: int = READ_AHEAD_BUFFER) -> bool:
    """Turn on read-ahead (and a read buffer of ``buffer`` bytes) for the SSL objects
    ``context`` makes from now on; True when done. The context's pointer is proven
    first (an SSL object of it must name it as its SSL_CTX) and read-ahead read back;
    anything that does not hold leaves the context as it was (False)."""
    lib = _read_ahead_lib()
    if lib is None:
        return False
    ctx_ptr = _word(context, _CTX_AT)
    server = context.protocol == ssl.PROTOCOL_TLS_SERVER
    probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=server,
                             server_hostname=None if server else "probe.invalid")
    ssl_ptr = _word(probe._sslobj, _SSL_AT)
    if not ctx_ptr or not ssl_ptr or lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
        return False
    lib.SSL_CTX_ctrl(ctx_ptr, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    if lib.SSL_CTX_ctrl(ctx_ptr, _SSL_CTRL_GET_READ_AHEAD, 0, None) != 1:
        return False
    lib.SSL_CTX_set_default_read_buffer_len(ctx_ptr, buffer)
    if "has_pending" not in _state:
        has = lib.SSL_has_pending
        from_address = ctypes.c_void_p.from_address

        def has_pending(obj) -> bool:
            """Bytes read from the socket and not yet handed out (a record read ahead)."""
            return has(from_address(id(obj) + _SSL_AT).value) == 1
        _state["has_pending"] = has_pending
    return True


def has_pending():
    """``has_pending(sslobj) -> bool`` once a context of this process reads ahead, else None."""
    return _state.get("has_pending")
