# cython: language_level=3
"""TLS 1.3's record layer after the handshake (compiled): what a device connection, or a
connection to an https:// mail server, keeps once OpenSSL has made its keys.

OpenSSL 3.0's connection costs ~14 KiB for as long as it lives (the ``SSL`` object alone
7.4 KiB, fixed by its layout; benchmarks/README.md, "Where a worker's memory goes"): at
100,000 parked Pings per core that is ~1.3 GiB of the 2 GiB the sizing table allows. After
a TLS 1.3 handshake everything the connection still needs is two traffic secrets, the keys
and IVs made from them and two record counters (RFC 8446 §5, §7): ``Records`` holds those
(~300 bytes), OpenSSL's object is freed (proxy/tls13.py hands over; tlsio.TLSStream uses
a ``Records`` as it used OpenSSL's C object: the same read/write/shutdown/pending calls and
the same exceptions). Records are sealed and opened with libcrypto's AEAD through one
cipher context per suite and direction for the whole worker (the key is set per record:
a worker is one thread, and these calls keep the GIL).

What the peer may send after the handshake and what happens (RFC 8446):
- application data: returned (empty records skipped; a read passes over at most
  SKIP_PER_READ records without data, then yields as if the socket were empty);
- close_notify: EOF (SSLZeroReturnError); any other alert: SSLError, the stream is over;
- KeyUpdate (a whole message): the read key moves on; asked for, our own KeyUpdate goes
  out before the next data and the write key moves on too;
- to a client (``client=True``, the mail-server leg), NewSessionTicket messages: passed
  over (the gateway keeps its connections to a mail server open, it does not resume them);
- anything else (another handshake message, one split across records, a
  change_cipher_spec, an unknown type, a record too long or too short, a tag that does
  not verify): a fatal alert sent (best effort) and SSLError.

Nothing is linked at build time: ``init`` takes the libcrypto addresses (proxy/tls13.py
finds them in the library ``_ssl`` already loaded), as _tickets.pyx and _tlsrecords.pyx do.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint64_t, uintptr_t
from libc.string cimport memcpy, memset
from posix.unistd cimport read, write

import hmac
import os
import ssl

ctypedef void* (*ptr0_fn)() noexcept nogil
ctypedef int (*init_fn)(void* ctx, const void* cipher, void* impl, const unsigned char* key,
                        const unsigned char* iv, int enc) noexcept nogil
ctypedef int (*update_fn)(void* ctx, unsigned char* out, int* outl, const unsigned char* inp,
                          int inl) noexcept nogil
ctypedef int (*final_fn)(void* ctx, unsigned char* out, int* outl) noexcept nogil
ctypedef int (*ctrl_fn)(void* ctx, int type, int arg, void* ptr) noexcept nogil
ctypedef void (*keylog_fn)(const void* ssl, const char* line) noexcept nogil
ctypedef void (*set_keylog_fn)(void* ctx, keylog_fn cb) noexcept nogil

cdef enum:
    HEAD = 5                          # type, legacy version, length
    TAG = 16
    RECORD = 16384                    # the most plaintext one record holds
    MAX_BODY = RECORD + 256           # the longest protected record (RFC 8446 5.2)
    MAX_WIRE = HEAD + MAX_BODY
    GATHER_MAX = 256 * 1024           # the most one gather returns
    CT_CCS = 20
    CT_ALERT = 21
    CT_HANDSHAKE = 22
    CT_APP = 23
    HS_NEW_SESSION_TICKET = 4
    HS_KEY_UPDATE = 24
    CTRL_GET_TAG = 0x10
    CTRL_SET_TAG = 0x11
    # alerts we send
    A_CLOSE_NOTIFY = 0
    A_UNEXPECTED = 10
    A_BAD_MAC = 20
    A_OVERFLOW = 22
    A_DECODE = 50
    # records without data (empty ones, tickets, KeyUpdates) one read passes over before it
    # yields (SSLWantReadError, the socket still readable): a peer sending nothing else cannot
    # keep a worker in one step
    SKIP_PER_READ = 64

# the suites: TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256
SUITES = {"TLS_AES_128_GCM_SHA256": 0, "TLS_AES_256_GCM_SHA384": 1, "TLS_CHACHA20_POLY1305_SHA256": 2}
_HASH = ("sha256", "sha384", "sha256")

cdef init_fn _init = NULL
cdef update_fn _update = NULL
cdef final_fn _final = NULL
cdef ctrl_fn _ctrl = NULL
cdef set_keylog_fn _set_keylog = NULL
cdef void* _ctx[3][2]                 # per suite: [open, seal]
cdef unsigned char _scratch[MAX_WIRE + HEAD]  # the record being read, and the next header
cdef unsigned char _plainbuf[MAX_BODY]
cdef unsigned char _gatherbuf[GATHER_MAX + MAX_BODY]   # a gather's plaintext (and room for a whole record)

_secrets = {}                         # SSL * -> [client, server] traffic secrets (keylog lines)
KEPT = 65536                          # handshakes whose secrets wait at most (abandoned ones)


def init(tuple crypto):
    """libcrypto addresses: (EVP_CIPHER_CTX_new, EVP_CipherInit_ex, EVP_CipherUpdate,
    EVP_CipherFinal_ex, EVP_CIPHER_CTX_ctrl, EVP_aes_128_gcm, EVP_aes_256_gcm,
    EVP_chacha20_poly1305) and libssl's SSL_CTX_set_keylog_callback last. True when ready."""
    global _init, _update, _final, _ctrl, _set_keylog
    cdef void* c
    cdef const void* cipher
    cdef int suite, enc
    if len(crypto) != 9 or not all(crypto):
        return False
    if _set_keylog != NULL:
        return True
    _init = <init_fn><uintptr_t>crypto[1]
    _update = <update_fn><uintptr_t>crypto[2]
    _final = <final_fn><uintptr_t>crypto[3]
    _ctrl = <ctrl_fn><uintptr_t>crypto[4]
    for suite in range(3):
        cipher = (<ptr0_fn><uintptr_t>crypto[5 + suite])()
        for enc in range(2):
            c = (<ptr0_fn><uintptr_t>crypto[0])()
            if c == NULL or cipher == NULL or _init(c, cipher, NULL, NULL, NULL, enc) != 1:
                return False
            _ctx[suite][enc] = c
    _set_keylog = <set_keylog_fn><uintptr_t>crypto[8]
    return True


cdef void _keylog(const void* s, const char* line) noexcept nogil:
    # OpenSSL's keylog callback: the handshake's traffic secrets, by SSL *
    with gil:
        try:
            _note(<uintptr_t>s, line)
        except BaseException:
            pass                      # a connection without its secrets keeps OpenSSL's object


cdef _note(uintptr_t s, const char* line):
    text = <bytes>line
    if text.startswith(b"CLIENT_TRAFFIC_SECRET_0 "):
        at = 0
    elif text.startswith(b"SERVER_TRAFFIC_SECRET_0 "):
        at = 1
    else:
        return
    if len(_secrets) >= KEPT and s not in _secrets:
        _secrets.clear()              # abandoned handshakes: drop them all rather than grow
    pair = _secrets.setdefault(s, [None, None])
    pair[at] = bytes.fromhex(text.split()[2].decode())


def watch(uintptr_t ssl_ctx):
    """Have OpenSSL report the traffic secrets of every handshake on this SSL_CTX."""
    if _set_keylog == NULL or not ssl_ctx:
        raise ValueError("TLS 1.3 records are not set up")
    _set_keylog(<void*>ssl_ctx, _keylog)


def take(uintptr_t ssl_ptr):
    """(client, server) traffic secrets of the handshake on ``ssl_ptr``, forgotten here; None."""
    pair = _secrets.pop(ssl_ptr, None)
    if pair is None or pair[0] is None or pair[1] is None:
        return None
    return pair[0], pair[1]


def forget(uintptr_t ssl_ptr):
    _secrets.pop(ssl_ptr, None)


def expand_label(bytes secret, bytes label, int length, str digest):
    """HKDF-Expand-Label (RFC 8446 7.1) with an empty context; ``length`` <= the hash's."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return hmac.new(secret, info + b"\x01", digest).digest()[:length]


cdef struct Dir:
    unsigned char key[32]
    unsigned char iv[12]
    unsigned char secret[48]
    uint64_t seq


cdef inline void _nonce(Dir* d, unsigned char* nonce) noexcept nogil:
    cdef int i
    memcpy(nonce, d.iv, 12)
    for i in range(8):
        nonce[11 - i] ^= <unsigned char>((d.seq >> (8 * i)) & 0xFF)


cdef int _seal(int suite, Dir* d, int ctype, const unsigned char* data, Py_ssize_t n,
               unsigned char* out) noexcept nogil:
    """One record of ``n`` <= RECORD bytes of ``ctype`` into ``out`` (HEAD + n + 1 + TAG)."""
    cdef unsigned char nonce[12]
    cdef unsigned char kind = <unsigned char>ctype
    cdef int outl = 0
    cdef int body = <int>n + 1 + TAG
    cdef void* c = _ctx[suite][1]
    out[0] = CT_APP
    out[1] = 3
    out[2] = 3
    out[3] = <unsigned char>(body >> 8)
    out[4] = <unsigned char>(body & 0xFF)
    _nonce(d, nonce)
    if _init(c, NULL, NULL, d.key, nonce, 1) != 1:
        return -1
    if _update(c, NULL, &outl, out, HEAD) != 1:
        return -1
    if n and _update(c, out + HEAD, &outl, data, <int>n) != 1:
        return -1
    if _update(c, out + HEAD + n, &outl, &kind, 1) != 1:
        return -1
    if _final(c, out + HEAD + n + 1, &outl) != 1:
        return -1
    if _ctrl(c, CTRL_GET_TAG, TAG, out + HEAD + n + 1) != 1:
        return -1
    d.seq += 1
    return 0


cdef Py_ssize_t _open(int suite, Dir* d, const unsigned char* rec, Py_ssize_t body,
                      unsigned char* out) noexcept nogil:
    """The plaintext (with its type byte and padding) of the record at ``rec`` (HEAD + body
    bytes) into ``out``: its length, or -1 if the tag does not verify."""
    cdef unsigned char nonce[12]
    cdef unsigned char tag[TAG]
    cdef int outl = 0
    cdef Py_ssize_t n = body - TAG
    cdef void* c = _ctx[suite][0]
    _nonce(d, nonce)
    memcpy(tag, rec + HEAD + n, TAG)
    if _init(c, NULL, NULL, d.key, nonce, 0) != 1:
        return -1
    if _update(c, NULL, &outl, rec, HEAD) != 1:
        return -1
    if n and _update(c, out, &outl, rec + HEAD, <int>n) != 1:
        return -1
    if _ctrl(c, CTRL_SET_TAG, TAG, tag) != 1:
        return -1
    if _final(c, out + n, &outl) != 1:
        return -1
    d.seq += 1
    return n


cdef class Records:
    """One connection's TLS 1.3 records on descriptor ``fd`` (non-blocking), with the calls
    and exceptions of CPython's ``_ssl._SSLSocket`` that tlsio uses: ``read`` raises
    SSLWantReadError while no whole record is there, ``write`` raises SSLWantWriteError while
    the socket does not take all of its records (then must be called again with the same
    bytes, OpenSSL's rule), SSLZeroReturnError after close_notify, SSLEOFError at the TCP EOF
    without it, SSLError for anything fatal."""

    cdef readonly int fd
    cdef readonly bint client         # the mail-server leg: we wrote the ClientHello
    cdef int suite
    cdef Dir rd, wr
    cdef object _in                   # part of a record, read before the rest came (None: none)
    cdef object _plain                # plaintext not yet returned
    cdef Py_ssize_t _plain_at
    cdef object _out                  # records made that the socket has not taken yet
    cdef Py_ssize_t _owed             # the plaintext those records stand for (a write's retry)
    cdef bint _eof
    cdef bint _failed

    def __cinit__(self, int fd, int suite, bytes client_secret, bytes server_secret,
                  uint64_t write_seq=0, bytes out=b"", bint client=False):
        if suite < 0 or suite > 2:
            raise ValueError("unknown TLS 1.3 suite")
        self.fd = fd
        self.client = client
        self.suite = suite
        _keys(&self.rd, server_secret if client else client_secret, suite)
        _keys(&self.wr, client_secret if client else server_secret, suite)
        self.wr.seq = write_seq
        self._out = memoryview(out) if out else None

    # -- what tlsio calls ---------------------------------------------------------------

    def pending(self):
        return 0 if self._plain is None else PyBytes_GET_SIZE(self._plain) - self._plain_at

    def read(self, Py_ssize_t size):
        """Plaintext, at most ``size`` bytes of one record."""
        cdef Py_ssize_t plen, got
        cdef int budget = SKIP_PER_READ
        if self._failed:
            raise ssl.SSLError(1, "TLS stream failed")
        if self._plain is not None:
            return self._take(size)
        if self._eof:
            raise ssl.SSLZeroReturnError("TLS/SSL connection has been closed (EOF)")
        if self._out is not None:
            self._flush()             # a KeyUpdate of ours waits for the socket
        plen = self._app(_plainbuf, &budget)    # raises SSLWantReadError / EOF / SSLError
        got = plen if plen < size else size
        data = PyBytes_FromStringAndSize(<char*>_plainbuf, got)
        if got < plen:
            self._keep(_plainbuf + got, plen - got)
        return data

    def gather(self, bytes data, Py_ssize_t size, int records):
        """``data`` (what a read just gave) and the plaintext of the records already whole
        after it, up to ``size`` bytes in all (the rest of the last record kept for the next
        read) and ``records`` more records, without waiting: one call, each record opened
        straight into the bytes returned. Whatever ends it (nothing more whole, the EOF, a
        failure) is said by the next read, as the stream's state keeps it."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), start = PyBytes_GET_SIZE(data), plen
        cdef int budget = records
        if size > GATHER_MAX:
            size = GATHER_MAX
        if n >= size or records <= 0 or self._failed or self._eof or self._plain is not None \
                or self._out is not None:
            return data
        memcpy(_gatherbuf, PyBytes_AS_STRING(data), n)
        try:
            while n < size and budget > 0:
                budget -= 1
                plen = self._app(_gatherbuf + n, &budget)
                if n + plen > size:
                    self._keep(_gatherbuf + size, n + plen - size)
                    plen = size - n
                n += plen
        except OSError:               # (the SSL errors too) _eof / _failed make the next read say it
            pass
        if n == start:
            return data
        return PyBytes_FromStringAndSize(<char*>_gatherbuf, n)

    cdef int _keep(self, const unsigned char* p, Py_ssize_t n) except -1:
        # the part of a record a short read did not take, returned by the next read
        self._plain = PyBytes_FromStringAndSize(<char*>p, n)
        self._plain_at = 0
        return 0

    cdef Py_ssize_t _app(self, unsigned char* out, int* budget) except -1:
        """The next record of application data opened into ``out`` (room for MAX_BODY): its
        length. Records without data (empty ones, handshake messages) are passed over while
        ``budget`` lasts, each taking one from it; then SSLWantReadError as if the socket were
        empty."""
        cdef Py_ssize_t plen
        cdef int ctype
        while True:
            plen = self._record(out)  # raises SSLWantReadError / EOF / SSLError
            ctype = 0
            while plen > 0:
                plen -= 1
                if out[plen]:
                    ctype = out[plen]
                    break
            if ctype == CT_APP:
                if plen > RECORD:
                    self._fatal(A_OVERFLOW, "a record longer than 16 KiB")
                if plen:
                    return plen       # (an empty record: allowed, nothing to hand on)
            elif ctype == CT_ALERT:
                self._alert(out, plen)
            elif ctype == CT_HANDSHAKE:
                self._handshake(out, plen)
            else:
                self._fatal(A_UNEXPECTED, f"record of content type {ctype}")
            budget[0] -= 1
            if budget[0] <= 0:
                raise ssl.SSLWantReadError("The operation did not complete (read)")

    def write(self, data):
        """Seal ``data`` and write its records; SSLWantWriteError if the socket did not take
        them all (call again with the same bytes: they were counted as written)."""
        cdef Py_buffer v
        cdef Py_ssize_t n, owed
        if self._failed:
            raise ssl.SSLError(1, "TLS stream failed")
        if self._out is not None and not self._flush():
            raise ssl.SSLWantWriteError("The operation did not complete (write)")
        owed = self._owed
        if owed:
            self._owed = 0
            return owed               # the retry of the write those records were (a read may have flushed them)
        PyObject_GetBuffer(data, &v, PyBUF_SIMPLE)
        try:
            n = v.len
            if n == 0:
                return 0
            sealed = self._seal_buf(<const unsigned char*>v.buf, n)
        finally:
            PyBuffer_Release(&v)
        self._out = memoryview(sealed)
        if self._flush():
            return n
        self._owed = n
        raise ssl.SSLWantWriteError("The operation did not complete (write)")

    def seal(self, int fd, list parts):
        """The records of ``parts`` (buffers, in order), counted as written: the caller must
        write every byte, in order, before anything else (tlsio's batched writes). Records
        made earlier and not yet taken by the socket (a KeyUpdate) come first."""
        cdef Py_buffer v
        if fd != self.fd:
            raise ValueError("not this connection's socket")
        if self._failed:
            raise ssl.SSLError(1, "TLS stream failed")
        if self._owed:
            raise ValueError("a write waits to be retried")
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        PyObject_GetBuffer(joined, &v, PyBUF_SIMPLE)
        try:
            sealed = self._seal_buf(<const unsigned char*>v.buf, v.len)
        finally:
            PyBuffer_Release(&v)
        if self._out is not None:
            sealed = bytes(self._out) + sealed
            self._out = None
        return sealed

    def shutdown(self):
        """close_notify, if the socket takes it now (never waits)."""
        cdef unsigned char alert[2]
        if self._failed:
            return
        if self._out is not None and not self._flush():
            return
        alert[0] = 1
        alert[1] = A_CLOSE_NOTIFY
        self._send_now(CT_ALERT, alert, 2)

    def do_handshake(self):
        return None                   # done before these keys existed

    def key_update(self, bint request=False):
        """Send a KeyUpdate (``request``: ask the device for its own) and move the write key
        on; the tests' way to reach the device's side of it."""
        self._key_update(request)
        self._flush()

    # -- inside ---------------------------------------------------------------------------

    cdef object _take(self, Py_ssize_t size):
        cdef Py_ssize_t left = PyBytes_GET_SIZE(self._plain) - self._plain_at
        if size >= left:
            data = self._plain[self._plain_at:] if self._plain_at else self._plain
            self._plain = None
            return data
        data = self._plain[self._plain_at:self._plain_at + size]
        self._plain_at += size
        return data

    cdef Py_ssize_t _record(self, unsigned char* out) except -1:
        """Read one whole record into _scratch and open it into ``out``: the plaintext's
        length (type byte and padding included). Its body is read together with the next
        record's header (one read(2) per record of a stream, where OpenSSL makes two), kept in
        _in; never more: a header alone is never a whole record (the shortest, an unprotected
        alert, has 2 bytes of body), so a socket that shows nothing readable still holds
        nothing here but part of a record."""
        cdef Py_ssize_t have = 0, body = 0, want, n
        cdef int outer
        if self._in is not None:
            have = PyBytes_GET_SIZE(self._in)
            memcpy(_scratch, PyBytes_AS_STRING(self._in), have)
            self._in = None
        while True:
            if have >= HEAD:
                outer = _scratch[0]
                body = (_scratch[3] << 8) | _scratch[4]
                if outer != CT_APP and outer != CT_ALERT:
                    self._fatal(A_UNEXPECTED, f"an unprotected record of type {outer} after the handshake")
                if body > MAX_BODY:
                    self._fatal(A_OVERFLOW, "a record longer than the protocol allows")
                if outer == CT_APP and body < TAG + 1:
                    self._fatal(A_DECODE, "a record too short to be protected")
                if have >= HEAD + body:
                    if have > HEAD + body:      # the next record's header (or part of it)
                        self._in = PyBytes_FromStringAndSize(<char*>_scratch + HEAD + body, have - HEAD - body)
                    if outer == CT_ALERT:
                        self._alert(_scratch + HEAD, body)      # unprotected: a peer without our keys
                    n = _open(self.suite, &self.rd, _scratch, body, out)
                    if n < 0:
                        self._fatal(A_BAD_MAC, "a record that does not verify (bad_record_mac)")
                    return n
                want = HEAD + body - have + HEAD    # and the next header
            else:
                want = HEAD - have
            n = read(self.fd, _scratch + have, want)
            if n > 0:
                have += n
                continue
            if n == 0:
                self._eof = True
                raise ssl.SSLEOFError("EOF occurred in violation of protocol")
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                if have:
                    self._in = PyBytes_FromStringAndSize(<char*>_scratch, have)
                raise ssl.SSLWantReadError("The operation did not complete (read)")
            self._failed = True       # (a reset: the next read says so too)
            raise OSError(errno, os.strerror(errno))

    cdef int _alert(self, const unsigned char* p, Py_ssize_t n) except -1:
        if n != 2:
            self._fatal(A_DECODE, "a malformed alert")
        if p[1] == A_CLOSE_NOTIFY:
            self._eof = True
            raise ssl.SSLZeroReturnError("TLS/SSL connection has been closed (EOF)")
        self._failed = True
        raise ssl.SSLError(1, f"the {'mail server' if self.client else 'device'} sent TLS alert {p[1]}")

    cdef int _handshake(self, const unsigned char* p, Py_ssize_t n) except -1:
        # After the handshake: a KeyUpdate, whole and last in its record; to a client, also
        # NewSessionTickets (a server may put several in one record), each whole.
        cdef Py_ssize_t at = 0, length
        cdef int kind
        while at < n:
            if n - at < 4:
                self._fatal(A_UNEXPECTED, "a handshake message split across records")
            kind = p[at]
            length = (p[at + 1] << 16) | (p[at + 2] << 8) | p[at + 3]
            if kind == HS_NEW_SESSION_TICKET and self.client:
                if at + 4 + length > n:
                    self._fatal(A_UNEXPECTED, "a handshake message split across records")
                at += 4 + length
                continue
            if kind != HS_KEY_UPDATE:
                self._fatal(A_UNEXPECTED, f"handshake message {kind} after the handshake")
            if length != 1 or n - at != 5 or p[at + 4] > 1:
                self._fatal(A_DECODE, "a malformed KeyUpdate")
            _next(&self.rd, self.suite)
            if p[at + 4] == 1:
                self._key_update(False)
            return 0
        return 0

    cdef int _key_update(self, bint request) except -1:
        cdef unsigned char msg[5]
        msg[0] = HS_KEY_UPDATE
        msg[1] = 0
        msg[2] = 0
        msg[3] = 1
        msg[4] = 1 if request else 0
        rec = PyBytes_FromStringAndSize(NULL, HEAD + 5 + 1 + TAG)
        if _seal(self.suite, &self.wr, CT_HANDSHAKE, msg, 5, <unsigned char*>PyBytes_AS_STRING(rec)) != 0:
            self._failed = True
            raise ssl.SSLError(1, "TLS record could not be sealed")
        _next(&self.wr, self.suite)
        self._out = memoryview(rec if self._out is None else bytes(self._out) + rec)
        return 0

    cdef object _seal_buf(self, const unsigned char* p, Py_ssize_t n):
        cdef Py_ssize_t records = (n + RECORD - 1) // RECORD
        cdef Py_ssize_t off = 0, at = 0, take
        cdef int err = 0
        out = PyBytes_FromStringAndSize(NULL, n + records * (HEAD + 1 + TAG))
        cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
        with nogil:
            while off < n:
                take = n - off if n - off < RECORD else RECORD
                if _seal(self.suite, &self.wr, CT_APP, p + off, take, o + at) != 0:
                    err = 1
                    break
                off += take
                at += HEAD + take + 1 + TAG
        if err:
            self._failed = True
            raise ssl.SSLError(1, "TLS record could not be sealed")
        return out

    cdef bint _flush(self) except -1:
        """Write what waits in _out; True once it all went."""
        cdef Py_buffer v
        cdef Py_ssize_t n
        PyObject_GetBuffer(self._out, &v, PyBUF_SIMPLE)
        try:
            while True:
                n = write(self.fd, v.buf, v.len)
                if n >= 0 or errno != EINTR:
                    break
            err = errno
        finally:
            PyBuffer_Release(&v)
        if n < 0:
            if err == EAGAIN:
                return False
            raise OSError(err, os.strerror(err))
        if n == len(self._out):
            self._out = None
            return True
        self._out = self._out[n:]
        return False

    cdef int _send_now(self, int ctype, const unsigned char* p, Py_ssize_t n) except -1:
        # one record, written if the socket takes it (an alert: never waited for)
        cdef unsigned char rec[HEAD + 8 + 1 + TAG]
        if n > 8 or _seal(self.suite, &self.wr, ctype, p, n, rec) != 0:
            return 0
        write(self.fd, rec, HEAD + n + 1 + TAG)
        return 0

    cdef int _fatal(self, int alert, str why) except -1:
        cdef unsigned char a[2]
        a[0] = 2
        a[1] = <unsigned char>alert
        if not self._failed:
            self._failed = True
            if self._out is None:
                self._send_now(CT_ALERT, a, 2)
        raise ssl.SSLError(1, why)


cdef int _keys(Dir* d, bytes secret, int suite) except -1:
    cdef int klen = 16 if suite == 0 else 32
    if len(secret) > 48 or len(secret) < 32:
        raise ValueError("not a traffic secret")
    memset(d, 0, sizeof(Dir))
    memcpy(d.secret, PyBytes_AS_STRING(secret), len(secret))
    key = expand_label(secret, b"key", klen, _HASH[suite])
    iv = expand_label(secret, b"iv", 12, _HASH[suite])
    memcpy(d.key, PyBytes_AS_STRING(key), klen)
    memcpy(d.iv, PyBytes_AS_STRING(iv), 12)
    return 0


cdef int _next(Dir* d, int suite) except -1:
    """The next generation of a direction's traffic secret (RFC 8446 7.2), its counter at 0."""
    cdef int hlen = 48 if suite == 1 else 32
    secret = PyBytes_FromStringAndSize(<char*>d.secret, hlen)
    return _keys(d, expand_label(secret, b"traffic upd", hlen, _HASH[suite]), suite)
