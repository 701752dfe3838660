# cython: language_level=3
"""A big write's TLS records made in one call, for one write(2) (compiled).

The device leg's SSL object reads and writes its socket itself (proxy/tlsio.py: OpenSSL's
socket BIO), and OpenSSL writes each record of at most 16 KiB with a write(2) of its own:
about 850 for a sealed 10 MiB fetch (14 MB of base64), each a loopback segment that wakes
the reader, each a Python-level call. py-spy put the device leg's writes at ~47% of a
worker's busy time in such a fetch, the write(2)s ~21% (benchmarks/big_fetch_tail.py
--security on). ``seal`` instead points the SSL object's write side at a memory BIO for
one batch of plaintext (tlsbatch.BATCH), lets OpenSSL make the batch's records there
(SSL_write_ex: the same records, sequence numbers and keys as written one by one), takes
them out as one bytes object and puts the socket BIO back: the caller writes the
ciphertext as a plain socket's bytes, one write(2) for up to 16 records. The read side is
untouched. OpenSSL then counts those records as written: the caller must write every byte
of them, in order, before anything else goes to the socket (tlsio does: the stream is
broken otherwise).

Nothing is linked at build time: ``init`` takes the addresses of the few libssl/libcrypto
functions (proxy/tlsbatch.py finds them in the libraries ``_ssl`` already loaded), as
_tickets.pyx does.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uintptr_t
from libc.string cimport memcpy

import ssl

ctypedef void* (*ptr0_fn)() noexcept nogil
ctypedef void* (*new_fn)(void* method) noexcept nogil
ctypedef int (*int_ptr_fn)(void* p) noexcept nogil
ctypedef void* (*get_wbio_fn)(void* s) noexcept nogil
ctypedef void (*set0_wbio_fn)(void* s, void* b) noexcept nogil
ctypedef int (*write_ex_fn)(void* s, const void* buf, size_t num, size_t* written) noexcept nogil
ctypedef int (*get_error_fn)(void* s, int ret) noexcept nogil
ctypedef long (*bio_ctrl_fn)(void* b, int cmd, long larg, void* parg) noexcept nogil
ctypedef int (*bio_read_fn)(void* b, void* data, int dlen) noexcept nogil
ctypedef void (*void0_fn)() noexcept nogil

cdef enum:
    RECORD = 16384                    # the most plaintext one TLS record holds
    BIO_CTRL_RESET = 1
    BIO_CTRL_PENDING = 10

cdef get_wbio_fn _get_wbio = NULL
cdef set0_wbio_fn _set0_wbio = NULL
cdef write_ex_fn _write_ex = NULL
cdef get_error_fn _get_error = NULL
cdef int_ptr_fn _get_fd = NULL
cdef int_ptr_fn _bio_up_ref = NULL
cdef bio_ctrl_fn _bio_ctrl = NULL
cdef bio_read_fn _bio_read = NULL
cdef void0_fn _err_clear = NULL
cdef void* _mem = NULL                # the process's memory BIO (the event loop's thread only)


def init(tuple libssl_funcs, tuple libcrypto_funcs):
    """Addresses: (SSL_get_wbio, SSL_set0_wbio, SSL_write_ex, SSL_get_error, SSL_get_fd),
    (BIO_s_mem, BIO_new, BIO_up_ref, BIO_ctrl, BIO_read, ERR_clear_error). True when ready."""
    global _get_wbio, _set0_wbio, _write_ex, _get_error, _get_fd
    global _bio_up_ref, _bio_ctrl, _bio_read, _err_clear, _mem
    if len(libssl_funcs) != 5 or len(libcrypto_funcs) != 6 or not all(libssl_funcs + libcrypto_funcs):
        return False
    _get_wbio = <get_wbio_fn><uintptr_t>libssl_funcs[0]
    _set0_wbio = <set0_wbio_fn><uintptr_t>libssl_funcs[1]
    _write_ex = <write_ex_fn><uintptr_t>libssl_funcs[2]
    _get_error = <get_error_fn><uintptr_t>libssl_funcs[3]
    _get_fd = <int_ptr_fn><uintptr_t>libssl_funcs[4]
    _bio_up_ref = <int_ptr_fn><uintptr_t>libcrypto_funcs[2]
    _bio_ctrl = <bio_ctrl_fn><uintptr_t>libcrypto_funcs[3]
    _bio_read = <bio_read_fn><uintptr_t>libcrypto_funcs[4]
    _err_clear = <void0_fn><uintptr_t>libcrypto_funcs[5]
    if _mem == NULL:
        _mem = (<new_fn><uintptr_t>libcrypto_funcs[1])((<ptr0_fn><uintptr_t>libcrypto_funcs[0])())
    return _mem != NULL


ctypedef int (*ssl_fn)(void* s) noexcept nogil
cdef ssl_fn _new_ticket = NULL
cdef ssl_fn _do_handshake = NULL


def init_tickets(uintptr_t new_session_ticket, uintptr_t do_handshake):
    """Addresses of SSL_new_session_ticket (OpenSSL 3) and SSL_do_handshake."""
    global _new_ticket, _do_handshake
    if not new_session_ticket or not do_handshake:
        return False
    _new_ticket = <ssl_fn>new_session_ticket
    _do_handshake = <ssl_fn>do_handshake
    return True


def tickets(uintptr_t ssl_ptr, int fd, int count):
    """``count`` TLS 1.3 session tickets made now, after the handshake, and returned as their
    records (OpenSSL counts them as written: the caller writes every byte, in order, before
    anything else; proxy/tls13.py counts them, and the records after them go on from there)."""
    cdef void* s = <void*>ssl_ptr
    cdef void* sock
    cdef int i, ok = 1
    if _mem == NULL or _new_ticket == NULL or not ssl_ptr:
        raise ValueError("TLS tickets are not set up")
    sock = _to_memory(s, fd)
    with nogil:
        for i in range(count):
            if _new_ticket(s) != 1:
                ok = 0
        if ok and _do_handshake(s) != 1:
            ok = 0
    _set0_wbio(s, sock)
    if not ok:
        _err_clear()
        _bio_ctrl(_mem, BIO_CTRL_RESET, 0, NULL)
        raise ssl.SSLError("TLS session tickets could not be made")
    return _made()


cdef void* _to_memory(void* s, int fd) except NULL:
    """Point the SSL object's write side at the memory BIO; its socket BIO is returned (with
    a reference of ours, which SSL_set0_wbio takes back on the swap back)."""
    cdef void* sock
    if _get_fd(s) != fd or fd < 0:
        raise ValueError("not this socket's SSL object")
    sock = _get_wbio(s)
    if sock == NULL or _bio_up_ref(sock) != 1:
        raise ValueError("no socket BIO")
    _bio_up_ref(_mem)                 # SSL_set0_wbio takes a reference, and frees it on the swap back
    _set0_wbio(s, _mem)
    return sock


cdef bytes _made():
    """What OpenSSL wrote into the memory BIO, taken out as one bytes object."""
    cdef long pending = _bio_ctrl(_mem, BIO_CTRL_PENDING, 0, NULL)
    out = PyBytes_FromStringAndSize(NULL, pending)
    if pending and _bio_read(_mem, PyBytes_AS_STRING(out), <int>pending) != pending:
        _bio_ctrl(_mem, BIO_CTRL_RESET, 0, NULL)
        raise ssl.SSLError("TLS records could not be read back")
    return out


def ready():
    return _mem != NULL and _write_ex != NULL


def fd_of(uintptr_t ssl_ptr):
    """The descriptor the SSL object's socket BIO writes (proving a pointer read from
    CPython's object: tlsbatch.py)."""
    if _get_fd == NULL or not ssl_ptr:
        return -1
    return _get_fd(<void*>ssl_ptr)


cdef int _write(void* s, const char* data, Py_ssize_t n) noexcept nogil:
    """SSL_write_ex of ``n`` bytes (records of at most 16 KiB); 0 on success, else SSL_get_error."""
    cdef size_t written = 0
    if _write_ex(s, data, <size_t>n, &written) == 1 and written == <size_t>n:
        return 0
    return _get_error(s, 0) or -1


def seal(uintptr_t ssl_ptr, int fd, list parts):
    """The TLS records of ``parts`` (buffers, in order) as one bytes object: records of
    16 KiB, small parts joined into one as tlsio.records does. ``fd`` must be the SSL
    object's socket (else ValueError, nothing written). ssl.SSLError if OpenSSL fails:
    the stream is then unusable."""
    cdef void* s = <void*>ssl_ptr
    cdef void* sock
    cdef int err = 0
    if _mem == NULL or not ssl_ptr:
        raise ValueError("TLS record batching is not set up")
    sock = _to_memory(s, fd)
    try:
        _records(s, parts, &err)
    except BaseException:
        err = -1                      # a part that is not a buffer: what was made is dropped
        raise
    finally:
        _set0_wbio(s, sock)           # the socket BIO back (our reference); the memory BIO's dropped
        if err:
            _err_clear()
            _bio_ctrl(_mem, BIO_CTRL_RESET, 0, NULL)
    if err:
        raise ssl.SSLError(f"TLS write failed (SSL_get_error {err})")
    return _made()


cdef int _records(void* s, list parts, int* err) except -1:
    """SSL_write_ex of each part's bytes, small ones joined into records of 16 KiB."""
    cdef Py_buffer v
    cdef char held[RECORD]
    cdef Py_ssize_t fill = 0, off, take, whole
    cdef const char* p
    for part in parts:
        PyObject_GetBuffer(part, &v, PyBUF_SIMPLE)
        try:
            p = <const char*>v.buf
            off = 0
            while off < v.len and not err[0]:
                if fill or v.len - off < RECORD:
                    take = min(RECORD - fill, v.len - off)
                    memcpy(held + fill, p + off, take)
                    fill += take
                    off += take
                    if fill == RECORD:
                        with nogil:
                            err[0] = _write(s, held, fill)
                        fill = 0
                else:
                    whole = (v.len - off) // RECORD * RECORD
                    with nogil:
                        err[0] = _write(s, p + off, whole)
                    off += whole
        finally:
            PyBuffer_Release(&v)
        if err[0]:
            return 0
    if fill:
        with nogil:
            err[0] = _write(s, held, fill)
    return 0
