"""Device TLS streams whose big writes go out a batch of records at a time (_tlsrecords.pyx).

``ssl_of`` reads the stream's ``SSL *`` from CPython's ``_ssl._SSLSocket`` (the layout
sim/tlssession.py reads) and proves it for that stream: OpenSSL must say the pointer's
socket is the stream's own descriptor. Where the libraries, the functions or the proof
are missing, a stream writes its records one by one as before (tlsio._write_records).
"""
from __future__ import annotations

import _ssl
import sys

from seg_fast import openssl
from seg_fast.proxy import _tlsrecords
from seg_fast.sim.tlssession import _SSL_AT, _word

# Plaintext per batch: 16 records, one write(2); what a full socket leaves unsent waits in
# Python (counted against the worker's unsent bytes) instead of one record in OpenSSL.
BATCH = 256 * 1024
_state: dict = {}


def available() -> bool:
    """The functions were found (once per process)."""
    if "on" not in _state:
        _state["on"] = _init()
    return _state["on"]


def _init() -> bool:
    if sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
        return False                  # the object layout read is a CPython release build's
    libssl, libcrypto = openssl.libssl(), openssl.libcrypto()
    if libssl is None or libcrypto is None:
        return False
    return bool(_tlsrecords.init(
        tuple(openssl.addresses(libssl, ("SSL_get_wbio", "SSL_set0_wbio", "SSL_write_ex", "SSL_get_error",
                                         "SSL_get_fd"))),
        tuple(openssl.addresses(libcrypto, ("BIO_s_mem", "BIO_new", "BIO_up_ref", "BIO_ctrl", "BIO_read",
                                            "ERR_clear_error")))))


def ssl_of(sslobj, fd: int) -> int:
    """The ``SSL *`` of the ``_ssl._SSLSocket`` ``sslobj`` on descriptor ``fd``; 0 if unproven
    (anything but that very type is never read: its memory could be anything)."""
    if fd < 0 or type(sslobj) is not _ssl._SSLSocket or not available():
        return 0
    ptr = _word(sslobj, _SSL_AT)
    return ptr if ptr and _tlsrecords.fd_of(ptr) == fd else 0


def batches(parts):
    """(buffers, bytes) of at most BATCH bytes each: ``parts`` in order, big ones sliced uncopied."""
    batch: list = []
    size = 0
    for part in parts:
        n = len(part)
        if size + n <= BATCH:
            batch.append(part)
            size += n
        else:
            view = memoryview(part)
            off = 0
            while off < n:
                take = min(BATCH - size, n - off)
                batch.append(view[off:off + take])
                size += take
                off += take
                if size == BATCH:
                    yield batch, size
                    batch, size = [], 0
            continue
        if size == BATCH:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size
