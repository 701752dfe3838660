# cython: language_level=3
"""The compiled HTTP/1.1 fast path: request and response heads, chunked bodies, heads out.

h11 is the reference (DESIGN.md, decisions for wave 2). Each parser walks one
acquired buffer with raw pointers and answers one of:

- ``NEED_MORE``: the head is not complete yet (h11 would say NEED_DATA);
- a ``RequestHead``/``ResponseHead``: exactly the event h11 would produce, with
  its body framing and keep-alive decision;
- ``DEFER``: something unusual (obs-fold, bare LF, ``Expect``, ``Upgrade``,
  HTTP/1.0, odd or repeated framing headers, ...): give the same bytes to h11;
- ``HTTPProtocolError`` (seg_fast.errors) with the status h11 would hint, only
  where h11 certainly rejects the same bytes.

Header triples are (name as sent, lower-case name, value), the shape
``proxy.headers.items()`` gives for an h11 event.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memchr, memcmp, memcpy

from seg_fast.errors import HTTPProtocolError


cdef class _Sentinel:
    cdef readonly str name

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


NEED_MORE = _Sentinel("NEED_MORE")
DEFER = _Sentinel("DEFER")

# Body framing of a parsed head.
FRAMING_NONE = 0        # no body (a request without framing headers, 204/304/HEAD, 1xx)
FRAMING_LENGTH = 1      # Content-Length: ``length`` bytes
FRAMING_CHUNKED = 2     # Transfer-Encoding: chunked
FRAMING_CLOSE = 3       # a response delimited by the server closing (no framing headers)

cdef enum:
    _OK = 0
    _NEED = 1
    _DEFER = 2
    _BAD = 3

# Character classes of h11's ABNF (h11/_abnf.py).
cdef unsigned char _TOKEN[256]      # tchar
cdef unsigned char _VCHAR[256]      # %x21-7E
cdef unsigned char _FVCHAR[256]     # [^\x00\s]: field-vchar / obs-text (h11 admits controls but NUL, \t\n\v\f\r, SP)
cdef unsigned char _HEX[256]        # hex digit value + 1 (0: not a hex digit)


cdef void _init_tables():
    cdef int c
    for c in range(256):
        _VCHAR[c] = 0x21 <= c <= 0x7e
        _FVCHAR[c] = not (c == 0 or c == 0x20 or 0x09 <= c <= 0x0d)
        _TOKEN[c] = (c >= 0x30 and c <= 0x39) or (c >= 0x41 and c <= 0x5a) or (c >= 0x61 and c <= 0x7a)
        _HEX[c] = 0
    for c in b"!#$%&'*+-.^_`|~":
        _TOKEN[c] = 1
    for c in range(10):
        _HEX[0x30 + c] = c + 1
    for c in range(6):
        _HEX[0x41 + c] = c + 11
        _HEX[0x61 + c] = c + 11


_init_tables()


cdef inline unsigned char _lower(unsigned char c):
    if 0x41 <= c <= 0x5a:
        return c + 0x20
    return c


cdef inline bint _ieq(const unsigned char* p, Py_ssize_t n, const char* lit, Py_ssize_t m):
    """p[:n] equals the lower-case literal ``lit`` ignoring ASCII case."""
    cdef Py_ssize_t i
    if n != m:
        return False
    for i in range(n):
        if _lower(p[i]) != <unsigned char>lit[i]:
            return False
    return True


cdef bytes _lowered(const unsigned char* p, Py_ssize_t n, bytes raw):
    """raw itself when it has no upper-case letter, else a lower-cased copy."""
    cdef Py_ssize_t i
    cdef bytes out
    cdef unsigned char* q
    for i in range(n):
        if 0x41 <= p[i] <= 0x5a:
            out = PyBytes_FromStringAndSize(NULL, n)
            q = <unsigned char*>PyBytes_AS_STRING(out)
            for i in range(n):
                q[i] = _lower(p[i])
            return out
    return raw


cdef Py_ssize_t _h11_head_end(const unsigned char* p, Py_ssize_t n):
    """Where h11 ends a head: after the first \\n\\r?\\n (or a leading \\r?\\n); -1 if none yet."""
    cdef Py_ssize_t i = 0
    cdef const unsigned char* q
    if n >= 1 and p[0] == 10:
        return 1
    if n >= 2 and p[0] == 13 and p[1] == 10:
        return 2
    while i < n:
        q = <const unsigned char*>memchr(p + i, 10, n - i)
        if q == NULL:
            return -1
        i = q - p + 1
        if i < n and p[i] == 10:
            return i + 1
        if i + 1 < n and p[i] == 13 and p[i + 1] == 10:
            return i + 2
    return -1


cdef struct _Facts:
    Py_ssize_t end           # bytes of the head, with its blank line
    int hosts                # Host headers seen
    int lengths              # Content-Length headers seen
    long long length         # its value
    bint chunked             # Transfer-Encoding: chunked (exactly one header)
    bint close               # Connection lists "close"
    bint odd                 # something h11 handles that the fast path does not


cdef bint _has_close(const unsigned char* p, Py_ssize_t n):
    """A Connection value lists the token "close" (h11's get_comma_header: split, strip, lower)."""
    cdef Py_ssize_t i = 0, a, b
    while i <= n:
        a = i
        while i < n and p[i] != 44:
            i += 1
        b = i
        while a < b and p[a] in (32, 9):
            a += 1
        while b > a and p[b - 1] in (32, 9):
            b -= 1
        if _ieq(p + a, b - a, "close", 5):
            return True
        i += 1
    return False


cdef int _fields(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n, list out, _Facts* f,
                 bint request) except -1:
    """Parse header lines from ``pos`` to the blank line into ``out``.

    Returns _OK (f.end set), _NEED, _DEFER or _BAD (a line h11's header regex rejects).
    """
    cdef const unsigned char* eolp
    cdef Py_ssize_t eol, le, i, j, k, nlen
    cdef unsigned char c
    cdef bytes raw, low, value
    cdef long long v
    while True:
        if pos >= n:
            return _NEED
        c = p[pos]
        if c == 13:
            if pos + 1 >= n:
                return _NEED
            if p[pos + 1] != 10:
                return _DEFER
            f.end = pos + 2
            return _OK
        if c == 10 or c == 32 or c == 9:       # bare LF, obs-fold: h11's business
            return _DEFER
        eolp = <const unsigned char*>memchr(p + pos, 10, n - pos)
        if eolp == NULL:
            return _NEED
        eol = eolp - p
        if p[eol - 1] != 13:
            return _DEFER
        le = eol - 1
        i = pos
        while i < le and _TOKEN[p[i]]:
            i += 1
        if i == pos or i == le or p[i] != 58:          # ':'
            return _BAD
        nlen = i - pos
        j = i + 1
        while j < le and (p[j] == 32 or p[j] == 9):
            j += 1
        k = le
        while k > j and (p[k - 1] == 32 or p[k - 1] == 9):
            k -= 1
        for i in range(j, k):
            c = p[i]
            if not _FVCHAR[c] and c != 32 and c != 9:
                if c == 13 or c == 10:
                    return _DEFER
                return _BAD
        raw = PyBytes_FromStringAndSize(<const char*>p + pos, nlen)
        low = _lowered(p + pos, nlen, raw)
        value = PyBytes_FromStringAndSize(<const char*>p + j, k - j)
        if nlen == 4 and _ieq(p + pos, 4, "host", 4):
            f.hosts += 1
        elif nlen == 14 and _ieq(p + pos, 14, "content-length", 14):
            f.lengths += 1
            if f.lengths > 1 or k - j == 0 or k - j > 18:
                f.odd = True
            else:
                v = 0
                for i in range(j, k):
                    c = p[i]
                    if c < 48 or c > 57:
                        f.odd = True
                        break
                    v = v * 10 + (c - 48)
                f.length = v
        elif nlen == 17 and _ieq(p + pos, 17, "transfer-encoding", 17):
            if f.chunked or not _ieq(p + j, k - j, "chunked", 7):
                f.odd = True
            f.chunked = True
            value = b"chunked"                         # h11 keeps it lower-cased
        elif nlen == 10 and _ieq(p + pos, 10, "connection", 10):
            if _has_close(p + j, k - j):
                f.close = True
        elif nlen == 7 and _ieq(p + pos, 7, "upgrade", 7):
            f.odd = True
        elif request and nlen == 6 and _ieq(p + pos, 6, "expect", 6):
            f.odd = True
        out.append((raw, low, value))
        pos = eol + 1


cdef inline bint _is_v11(const unsigned char* p):
    return p[0] == 72 and p[1] == 84 and p[2] == 84 and p[3] == 80 and p[4] == 47 \
        and p[5] == 49 and p[6] == 46 and p[7] == 49


cdef inline bint _is_version(const unsigned char* p):
    return p[0] == 72 and p[1] == 84 and p[2] == 84 and p[3] == 80 and p[4] == 47 \
        and 48 <= p[5] <= 57 and p[6] == 46 and 48 <= p[7] <= 57


cdef class RequestHead:
    """A request head the fast path parsed: the fields of h11's Request event, framing, keep-alive."""
    cdef readonly bytes method, target, http_version
    cdef readonly list headers
    cdef readonly Py_ssize_t head_len
    cdef readonly int framing
    cdef readonly long long length
    cdef readonly bint keep_alive

    def __repr__(self):
        return (f"RequestHead({self.method!r}, {self.target!r}, {len(self.headers)} headers, "
                f"head_len={self.head_len}, framing={self.framing}, length={self.length}, "
                f"keep_alive={self.keep_alive})")


cdef class ResponseHead:
    """A response head: h11's Response/InformationalResponse fields, framing, keep-alive."""
    cdef readonly int status_code
    cdef readonly bytes reason, http_version
    cdef readonly list headers
    cdef readonly Py_ssize_t head_len
    cdef readonly int framing
    cdef readonly long long length
    cdef readonly bint keep_alive
    cdef readonly bint informational

    def __repr__(self):
        return (f"ResponseHead({self.status_code}, {self.reason!r}, {len(self.headers)} headers, "
                f"head_len={self.head_len}, framing={self.framing}, length={self.length}, "
                f"keep_alive={self.keep_alive})")


cdef object _incomplete(const unsigned char* p, Py_ssize_t n, Py_ssize_t max_head):
    # h11's order: an obviously invalid first byte, then the buffer limit (431).
    if n > max_head:
        raise HTTPProtocolError("head too large", 431)
    return NEED_MORE


cdef object _bad(const unsigned char* p, Py_ssize_t n, Py_ssize_t max_head, str why):
    """A malformed line: h11 rejects it once its head is complete, waits before."""
    if _h11_head_end(p, n) < 0:
        return _incomplete(p, n, max_head)
    raise HTTPProtocolError(why, 400)


def parse_request(data, Py_ssize_t max_head=65536):
    """Parse the request head at the start of ``data`` (bytes, bytearray or memoryview)."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef const unsigned char* eolp
    cdef Py_ssize_t n, eol, le, i, m0, t0, t1
    cdef _Facts f
    cdef list headers
    cdef int rc
    cdef RequestHead head
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        n = view.len
        if n == 0:
            return NEED_MORE
        if p[0] < 0x21:
            raise HTTPProtocolError("illegal request line", 400)
        eolp = <const unsigned char*>memchr(p, 10, n)
        if eolp == NULL:
            return _incomplete(p, n, max_head)
        eol = eolp - p
        if p[eol - 1] != 13:
            return DEFER
        le = eol - 1
        # method SP target SP HTTP/d.d
        i = 0
        while i < le and _TOKEN[p[i]]:
            i += 1
        m0 = i
        if m0 == 0 or i == le or p[i] != 32:
            return _bad(p, n, max_head, "illegal request line")
        i += 1
        t0 = i
        while i < le and _VCHAR[p[i]]:
            i += 1
        t1 = i
        if t1 == t0 or le - t1 != 9 or p[t1] != 32 or not _is_version(p + t1 + 1):
            if memchr(p, 13, le) != NULL:
                return DEFER
            return _bad(p, n, max_head, "illegal request line")
        f.end = 0
        f.hosts = f.lengths = 0
        f.length = 0
        f.chunked = f.close = f.odd = False
        headers = []
        rc = _fields(p, eol + 1, n, headers, &f, True)
        if rc == _NEED:
            return _incomplete(p, n, max_head)
        if rc == _DEFER:
            return DEFER
        if rc == _BAD:
            return _bad(p, n, max_head, "illegal header line")
        # h11 validates framing headers (400/501) before it counts Host headers.
        if not _is_v11(p + t1 + 1) or f.odd or (f.chunked and f.lengths) or \
                (m0 == 7 and _ieq(p, 7, "connect", 7)):
            return DEFER
        if f.hosts != 1:
            raise HTTPProtocolError("missing Host header" if f.hosts == 0 else "multiple Host headers", 400)
        head = RequestHead.__new__(RequestHead)
        head.method = PyBytes_FromStringAndSize(<const char*>p, m0)
        head.target = PyBytes_FromStringAndSize(<const char*>p + t0, t1 - t0)
        head.http_version = b"1.1"
        head.headers = headers
        head.head_len = f.end
        if f.chunked:
            head.framing = FRAMING_CHUNKED
            head.length = -1
        elif f.lengths:
            head.framing = FRAMING_LENGTH
            head.length = f.length
        else:
            head.framing = FRAMING_NONE
            head.length = 0
        head.keep_alive = not f.close
        return head
    finally:
        PyBuffer_Release(&view)


def parse_response(data, bytes request_method=b"GET", Py_ssize_t max_head=65536):
    """Parse the response head at the start of ``data``; ``request_method`` decides HEAD's empty body."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef const unsigned char* eolp
    cdef Py_ssize_t n, eol, le, i
    cdef _Facts f
    cdef list headers
    cdef int rc, status
    cdef ResponseHead head
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        n = view.len
        if n == 0:
            return NEED_MORE
        if p[0] < 0x21:
            raise HTTPProtocolError("illegal status line", 400)
        eolp = <const unsigned char*>memchr(p, 10, n)
        if eolp == NULL:
            return _incomplete(p, n, max_head)
        eol = eolp - p
        if p[eol - 1] != 13:
            return DEFER
        le = eol - 1
        # HTTP/d.d SP 3DIGIT [SP reason]
        if le < 12 or not _is_version(p) or p[8] != 32 or not (48 <= p[9] <= 57 and 48 <= p[10] <= 57
                                                             and 48 <= p[11] <= 57) \
                or (le > 12 and p[12] != 32):
            if memchr(p, 13, le) != NULL:
                return DEFER
            return _bad(p, n, max_head, "illegal status line")
        for i in range(13, le):
            if not _FVCHAR[p[i]] and p[i] != 32 and p[i] != 9:
                if p[i] == 13:
                    return DEFER
                return _bad(p, n, max_head, "illegal status line")
        status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
        f.end = 0
        f.hosts = f.lengths = 0
        f.length = 0
        f.chunked = f.close = f.odd = False
        headers = []
        rc = _fields(p, eol + 1, n, headers, &f, False)
        if rc == _NEED:
            return _incomplete(p, n, max_head)
        if rc == _DEFER:
            return DEFER
        if rc == _BAD:
            return _bad(p, n, max_head, "illegal header line")
        if not _is_v11(p) or status < 100 or status == 101 or f.odd or (f.chunked and f.lengths) \
                or request_method == b"CONNECT":
            return DEFER
        head = ResponseHead.__new__(ResponseHead)
        head.status_code = status
        head.reason = PyBytes_FromStringAndSize(<const char*>p + 13, le - 13) if le > 12 else b""
        head.http_version = b"1.1"
        head.headers = headers
        head.head_len = f.end
        head.informational = status < 200
        head.keep_alive = not f.close
        head.length = 0
        if status < 200 or status == 204 or status == 304 or request_method == b"HEAD":
            head.framing = FRAMING_NONE
        elif f.chunked:
            head.framing = FRAMING_CHUNKED
            head.length = -1
        elif f.lengths:
            head.framing = FRAMING_LENGTH
            head.length = f.length
        else:
            head.framing = FRAMING_CLOSE
            head.keep_alive = False
        return head
    finally:
        PyBuffer_Release(&view)


# -- chunked bodies ---------------------------------------------------------------------------

cdef enum:
    _SIZE = 0           # expecting a chunk-size line
    _DATA = 1           # inside a chunk's data
    _CRLF = 2           # expecting the CRLF after a chunk's data
    _TRAILER = 3        # after the last chunk: trailer lines up to the blank line
    _DONE = 4


cdef class ChunkedDecoder:
    """Incremental chunked-body decoder (RFC 9112 7.1) with h11's ChunkedReader rules.

    ``decode(data)`` eats what it can from the start of ``data`` and returns
    ``(payload pieces, bytes consumed)``; bytes it did not consume (a partial
    chunk-size line, or what follows the body) stay with the caller, who passes
    them again with more. ``done`` says the terminating chunk and trailer were
    read; ``trailers`` holds any trailer fields as header triples.
    """
    cdef int _state
    cdef long long _left            # data bytes left in the current chunk
    cdef int _crlf                  # bytes of the chunk's CRLF already matched
    cdef Py_ssize_t max_line
    cdef readonly list trailers

    def __init__(self, Py_ssize_t max_line=65536):
        self._state = _SIZE
        self._left = 0
        self._crlf = 0
        self.max_line = max_line
        self.trailers = []

    @property
    def done(self):
        return self._state == _DONE

    def decode(self, data):
        cdef Py_buffer view
        cdef const unsigned char* p
        cdef const unsigned char* q
        cdef Py_ssize_t n, pos = 0, take, i, e, end
        cdef long long size
        cdef int digits
        cdef unsigned char c
        cdef list out = []
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const unsigned char*>view.buf
            n = view.len
            while pos < n and self._state != _DONE:
                if self._state == _DATA:
                    take = n - pos
                    if take > self._left:
                        take = <Py_ssize_t>self._left
                    out.append(PyBytes_FromStringAndSize(<const char*>p + pos, take))
                    pos += take
                    self._left -= take
                    if self._left == 0:
                        self._state = _CRLF
                        self._crlf = 0
                elif self._state == _CRLF:
                    c = p[pos]
                    if c != (13 if self._crlf == 0 else 10):
                        raise HTTPProtocolError("malformed chunk footer", 400)
                    pos += 1
                    self._crlf += 1
                    if self._crlf == 2:
                        self._state = _SIZE
                elif self._state == _SIZE:
                    # The line runs to the first CRLF: 1-20 hex digits, [";" ext], OWS.
                    e = pos
                    while True:
                        q = <const unsigned char*>memchr(p + e, 13, n - e)
                        if q == NULL or q - p + 1 >= n:
                            end = -1
                            break
                        e = q - p + 1
                        if p[e] == 10:
                            end = e - 1
                            break
                    if end < 0:
                        if n - pos > self.max_line:
                            raise HTTPProtocolError("chunk size line too long", 400)
                        break
                    size = 0
                    digits = 0
                    i = pos
                    while i < end and _HEX[p[i]]:
                        if size >> 58:           # h11 takes up to 20 digits; nobody sends 2**62 bytes
                            raise HTTPProtocolError("chunk too large", 400)
                        size = size * 16 + (_HEX[p[i]] - 1)
                        digits += 1
                        i += 1
                    if digits == 0 or digits > 20:
                        raise HTTPProtocolError("illegal chunk header", 400)
                    if i < end and p[i] == 59:                     # ';' extension: anything but LF
                        if memchr(p + i, 10, end - i) != NULL:
                            raise HTTPProtocolError("illegal chunk header", 400)
                    else:
                        while i < end and (p[i] == 32 or p[i] == 9):
                            i += 1
                        if i != end:
                            raise HTTPProtocolError("illegal chunk header", 400)
                    pos = end + 2
                    if size == 0:
                        self._state = _TRAILER
                    else:
                        self._state = _DATA
                        self._left = size
                else:                                              # _TRAILER
                    if p[pos] == 10:
                        pos += 1
                        self._state = _DONE
                    elif p[pos] == 13 and pos + 1 < n and p[pos + 1] == 10:
                        pos += 2
                        self._state = _DONE
                    elif p[pos] == 13 and pos + 1 == n:
                        break
                    else:
                        e = _h11_head_end(p + pos, n - pos)
                        if e < 0:
                            if n - pos > self.max_line:
                                raise HTTPProtocolError("trailer too large", 431)
                            break
                        self.trailers = _trailer_fields(PyBytes_FromStringAndSize(<const char*>p + pos, e))
                        pos += e
                        self._state = _DONE
            return out, pos
        finally:
            PyBuffer_Release(&view)


cdef list _trailer_fields(bytes block):
    # Rare (EAS clients send none): h11's own line decoder and validation, so trailers
    # follow its rules exactly, obs-fold included.
    from h11._headers import normalize_and_validate
    from h11._readers import _decode_header_lines
    import h11
    lines = block.split(b"\n")
    lines = [l[:-1] if l.endswith(b"\r") else l for l in lines][:-2]
    try:
        return list(normalize_and_validate(list(_decode_header_lines(lines)), _parsed=True)._full_items)
    except h11.ProtocolError as exc:
        raise HTTPProtocolError(f"illegal trailer: {exc}", 400) from None


# -- heads out --------------------------------------------------------------------------------

cdef struct _Writer:
    char* buf
    Py_ssize_t size
    Py_ssize_t pos
    char stack[1024]


cdef inline int _w_init(_Writer* w):
    w.buf = w.stack
    w.size = 1024
    w.pos = 0
    return 0


cdef int _w_grow(_Writer* w, Py_ssize_t need) except -1:
    cdef Py_ssize_t size = w.size * 2
    cdef char* buf
    while size < w.pos + need:
        size *= 2
    if w.buf == w.stack:
        buf = <char*>PyMem_Malloc(size)
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, w.buf, w.pos)
    else:
        buf = <char*>PyMem_Realloc(w.buf, size)
        if buf == NULL:
            raise MemoryError()
    w.buf = buf
    w.size = size
    return 0


cdef inline int _w_put(_Writer* w, const char* s, Py_ssize_t n) except -1:
    if w.pos + n > w.size:
        _w_grow(w, n)
    memcpy(w.buf + w.pos, s, n)
    w.pos += n
    return 0


cdef inline int _w_bytes(_Writer* w, bytes b) except -1:
    return _w_put(w, PyBytes_AS_STRING(b), len(b))


cdef inline void _w_free(_Writer* w):
    if w.buf != w.stack:
        PyMem_Free(w.buf)


cdef int _w_int(_Writer* w, long long v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    if v == 0:
        return _w_put(w, "0", 1)
    while v > 0:
        i -= 1
        tmp[i] = <char>(48 + v % 10)
        v //= 10
    return _w_put(w, tmp + i, 24 - i)


cdef int _check_field(bytes name, bytes value) except -1:
    """A header we send must parse back as itself: a token name and a trimmed field value."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = len(name), i
    if n == 0:
        raise HTTPProtocolError("empty header name", 500)
    for i in range(n):
        if not _TOKEN[p[i]]:
            raise HTTPProtocolError(f"illegal header name {name!r}", 500)
    p = <const unsigned char*>PyBytes_AS_STRING(value)
    n = len(value)
    if n and (not _FVCHAR[p[0]] or not _FVCHAR[p[n - 1]]):
        raise HTTPProtocolError(f"illegal value for header {name!r}", 500)
    for i in range(n):
        if not _FVCHAR[p[i]] and p[i] != 32 and p[i] != 9:
            raise HTTPProtocolError(f"illegal value for header {name!r}", 500)
    return 0


cdef int _check_status_line(int status, bytes reason) except -1:
    cdef const unsigned char* r = <const unsigned char*>PyBytes_AS_STRING(reason)
    cdef Py_ssize_t i
    if not 100 <= status <= 999:
        raise HTTPProtocolError(f"illegal status {status}", 500)
    for i in range(len(reason)):
        if r[i] == 0 or r[i] == 10 or r[i] == 13 or r[i] == 11 or r[i] == 12:
            raise HTTPProtocolError("illegal reason phrase", 500)
    return 0


cdef inline int _w_status_line(_Writer* w, int status, bytes reason) except -1:
    _w_put(w, "HTTP/1.1 ", 9)
    _w_int(w, status)
    _w_put(w, " ", 1)
    _w_bytes(w, reason)
    _w_put(w, "\r\n", 2)
    return 0


cdef int _check_request_line(bytes method, bytes target) except -1:
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(method)
    cdef Py_ssize_t i
    if not method or not target:
        raise HTTPProtocolError("empty method or target", 500)
    for i in range(len(method)):
        if not _TOKEN[s[i]]:
            raise HTTPProtocolError("illegal method", 500)
    s = <const unsigned char*>PyBytes_AS_STRING(target)
    for i in range(len(target)):
        if not _VCHAR[s[i]]:
            raise HTTPProtocolError("illegal target", 500)
    return 0


cdef inline int _w_request_line(_Writer* w, bytes method, bytes target) except -1:
    _w_bytes(w, method)
    _w_put(w, " ", 1)
    _w_bytes(w, target)
    _w_put(w, " HTTP/1.1\r\n", 11)
    return 0


cdef int _w_fields(_Writer* w, list headers, bint host_first) except -1:
    cdef tuple item
    cdef bytes name, low, value
    cdef int rounds = 2 if host_first else 1, r
    for r in range(rounds):
        for item in headers:
            name = item[0]
            low = item[1]
            value = item[2]
            if low == b"content-length" or low == b"transfer-encoding" or low == b"connection":
                continue                  # framing and Connection are the writer's own
            if host_first and (low == b"host") != (r == 0):
                continue
            _check_field(name, value)
            _w_bytes(w, name)
            _w_put(w, ": ", 2)
            _w_bytes(w, value)
            _w_put(w, "\r\n", 2)
    return 0


cdef int _w_framing(_Writer* w, int framing, long long length, bint keep_alive) except -1:
    if framing == FRAMING_LENGTH:
        if length < 0:
            raise HTTPProtocolError("negative Content-Length", 500)
        _w_put(w, "Content-Length: ", 16)
        _w_int(w, length)
        _w_put(w, "\r\n", 2)
    elif framing == FRAMING_CHUNKED:
        _w_put(w, "Transfer-Encoding: chunked\r\n", 28)
    if not keep_alive:
        _w_put(w, "Connection: close\r\n", 19)
    _w_put(w, "\r\n", 2)
    return 0


def write_response(int status, bytes reason, list headers, int framing=FRAMING_LENGTH,
                   long long length=0, bint keep_alive=True):
    """``HTTP/1.1 status reason``, the headers (triples; their framing headers are replaced
    by ``framing``), ``Connection: close`` unless ``keep_alive``, the blank line: one bytes."""
    cdef _Writer w
    _check_status_line(status, reason)
    _w_init(&w)
    try:
        _w_status_line(&w, status, reason)
        _w_fields(&w, headers, False)
        _w_framing(&w, framing, length, keep_alive)
        return PyBytes_FromStringAndSize(w.buf, w.pos)
    finally:
        _w_free(&w)


def write_request(bytes method, bytes target, list headers, int framing=FRAMING_NONE,
                  long long length=0, bint keep_alive=True):
    """The request line and headers (Host first, as h11 writes them), framing as in write_response."""
    cdef _Writer w
    _check_request_line(method, target)
    _w_init(&w)
    try:
        _w_request_line(&w, method, target)
        _w_fields(&w, headers, True)
        _w_framing(&w, framing, length, keep_alive)
        return PyBytes_FromStringAndSize(w.buf, w.pos)
    finally:
        _w_free(&w)


# -- reads that do not raise on EAGAIN ---------------------------------------------------------

cdef extern from "<unistd.h>" nogil:
    ssize_t c_read "read"(int fd, void* buf, size_t count)

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN          # EWOULDBLOCK is the same on Linux
        EINTR

DEF _READ_BUF = 65536
cdef char _read_buf[_READ_BUF]


def read_nb(int fd, Py_ssize_t size):
    """One read(2) of up to ``size`` bytes (at most 64 KiB) from a non-blocking descriptor:
    the bytes (b"" on EOF), or None if it would block. Unlike os.read, no exception is
    made for EAGAIN (the common answer of an optimistic read) and no ``size``-byte
    object is allocated and shrunk: the read goes to one reusable buffer and only what
    arrived is copied out. Other errors raise OSError, as os.read does."""
    cdef ssize_t n
    if size > _READ_BUF:
        size = _READ_BUF
    while True:
        n = c_read(fd, _read_buf, size)
        if n >= 0:
            return PyBytes_FromStringAndSize(_read_buf, n)
        if errno == EAGAIN:
            return None
        if errno != EINTR:
            raise OSError(errno, __import__("os").strerror(errno))


# -- EAS identification (the common case) ------------------------------------------------------

from binascii import a2b_base64 as _a2b_base64

from seg_fast.eas.credentials import CREDENTIAL as _CREDENTIAL, NONE as _NO_IDENTITY, same_user as _same_user
from seg_fast.eas.request import EasRequest as _EasRequest

cdef unsigned char _QSIMPLE[256]     # eas/request.py's _SIMPLE_QUERY_BYTES: no unquoting or checks needed


cdef void _init_query_table():
    cdef int c
    for c in range(256):
        _QSIMPLE[c] = (c >= 0x30 and c <= 0x39) or (c >= 0x41 and c <= 0x5a) or (c >= 0x61 and c <= 0x7a)
    for c in b"_.-:@\\=&":
        _QSIMPLE[c] = 1


_init_query_table()

cdef enum:
    _H_OTHER = 0
    _H_AGENT = 1
    _H_VERSION = 2
    _H_POLICYKEY = 3
    _H_MULTIPART = 4
    _H_AUTH = 5


cdef int _read_header(const unsigned char* p, Py_ssize_t n):
    if n == 10 and _ieq(p, 10, "user-agent", 10):
        return _H_AGENT
    if n == 20 and _ieq(p, 20, "ms-asprotocolversion", 20):
        return _H_VERSION
    if n == 14 and _ieq(p, 14, "x-ms-policykey", 14):
        return _H_POLICYKEY
    if n == 20 and _ieq(p, 20, "ms-asacceptmultipart", 20):
        return _H_MULTIPART
    if n == 13 and _ieq(p, 13, "authorization", 13):
        return _H_AUTH
    return _H_OTHER


cdef inline bint _ascii(const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] >= 0x80:
            return False
    return True


cdef inline str _latin1(bytes b):
    return b.decode("latin-1")


cdef inline str _ascii_str(const unsigned char* p, Py_ssize_t n):
    return PyBytes_FromStringAndSize(<const char*>p, n).decode("ascii")


# A parked Ping keeps its request for minutes: the values most devices send alike (the path,
# the command, the device type, the protocol version, the User-Agent) are kept once. Bounded:
# values a device makes up fill it (at most 4,096 of 128 characters) and are then not shared.
cdef dict _SHARED = {}
_SHARED_MAX = 4096
_SHARED_LONGEST = 128


cdef inline object _shared(object s):
    if s is None:
        return s
    kept = _SHARED.get(s)
    if kept is not None:
        return kept
    if len(_SHARED) < _SHARED_MAX and len(s) <= _SHARED_LONGEST:
        _SHARED[s] = s
    return s


def identify(str method, bytes target, list full, str client_ip):
    """eas/request.py's ``parse_request`` for the common request, in one pass: a plain query
    of token bytes (``&``-separated, nothing to unquote), no credential or Basic, header values
    without control characters, the peer not a trusted proxy (the caller's to know). Returns
    exactly the EasRequest ``parse_request(method, target, [(low, value) ...], client_ip)``
    returns, or None for anything else, refusals included: the caller then asks
    ``parse_request``, the reference, which decides (tests/test_request_compiled.py)."""
    cdef const unsigned char* t = <const unsigned char*>PyBytes_AS_STRING(target)
    cdef Py_ssize_t tn = len(target), qa, i, i2, a, b, eq, vlen
    cdef Py_UCS4 ch
    cdef const unsigned char* q
    cdef const unsigned char* p
    cdef Py_ssize_t n
    cdef tuple item
    cdef bytes value, low
    cdef bytes agent = None, version = None, policykey = None, multipart = None, auth = None
    cdef int kind
    cdef str command = None, user = None, device_id = None, device_type = None, name, text
    cdef str protocol_version = None, auth_scheme = "", identity = _NO_IDENTITY
    cdef bint accept_multipart = False, seen_cmd = False, seen_user = False, seen_id = False, seen_type = False
    cdef dict params = {}
    # The path (ASCII) and the query: token bytes with at least one '&' (no '&': maybe the base64 form).
    qa = tn
    for i in range(tn):
        if t[i] == 63:                 # '?'
            qa = i
            break
        if t[i] >= 0x80:
            return None
    if tn - qa - 1 > 4096:
        return None
    # Headers: the five read (the first of each), every value free of control characters.
    for item in full:
        low = item[1]
        value = item[2]
        if type(low) is not bytes or type(value) is not bytes:
            return None
        p = <const unsigned char*>PyBytes_AS_STRING(value)
        n = len(value)
        for i in range(n):
            if (p[i] < 0x20 and p[i] != 9) or p[i] == 0x7f:
                return None
        kind = _read_header(<const unsigned char*>PyBytes_AS_STRING(low), len(low))
        if kind == _H_OTHER:
            continue
        if kind == _H_AGENT:
            if agent is None:
                agent = value
        elif kind == _H_VERSION:
            if version is None:
                version = value
        elif kind == _H_POLICYKEY:
            if policykey is None:
                policykey = value
        elif kind == _H_MULTIPART:
            if multipart is None:
                multipart = value
        else:
            if auth is not None:
                return None            # two Authorization headers: refused by the reference
            auth = value
    if version is not None:
        # "\d{1,2}\.\d{1,2}" between blanks; anything else (non-ASCII blanks too) is the reference's.
        p = <const unsigned char*>PyBytes_AS_STRING(version)
        a, b = 0, len(version)
        while a < b and (p[a] == 32 or p[a] == 9):
            a += 1
        while b > a and (p[b - 1] == 32 or p[b - 1] == 9):
            b -= 1
        i = a
        while i < b and 48 <= p[i] <= 57:
            i += 1
        if i == a or i - a > 2 or i == b or p[i] != 46:
            return None
        eq = i + 1
        i = eq
        while i < b and 48 <= p[i] <= 57:
            i += 1
        if i != b or i == eq or i - eq > 2:
            return None
        protocol_version = _ascii_str(p + a, b - a)
    if multipart is not None:
        p = <const unsigned char*>PyBytes_AS_STRING(multipart)
        n = len(multipart)
        if not _ascii(p, n):
            return None
        a, b = 0, n
        while a < b and (p[a] == 32 or p[a] == 9):
            a += 1
        while b > a and (p[b - 1] == 32 or p[b - 1] == 9):
            b -= 1
        accept_multipart = b - a == 1 and (p[a] == 84 or p[a] == 116)
    if qa < tn - 1:
        q = t + qa + 1
        n = tn - qa - 1
        if memchr(q, 38, n) == NULL:
            return None
        for i in range(n):
            if not _QSIMPLE[q[i]]:
                return None
        i = 0
        while i <= n:
            a = i
            while i < n and q[i] != 38:
                i += 1
            b = i
            i += 1
            if a == b:
                continue
            eq = a
            while eq < b and q[eq] != 61:
                eq += 1
            if eq == a or eq == b:
                return None            # no name or no '='
            vlen = b - eq - 1
            if vlen > 1024:
                return None
            if eq - a == 3 and q[a] == 67 and q[a + 1] == 109 and q[a + 2] == 100:          # Cmd
                if seen_cmd or vlen == 0:
                    return None
                for i2 in range(eq + 1, b):
                    if not (48 <= q[i2] <= 57 or 65 <= q[i2] <= 90 or 97 <= q[i2] <= 122):
                        return None
                seen_cmd = True
                command = _ascii_str(q + eq + 1, vlen)
            elif eq - a == 4 and memcmp(q + a, b"User", 4) == 0:
                if seen_user:
                    return None
                seen_user = True
                user = _ascii_str(q + eq + 1, vlen)
            elif eq - a == 8 and memcmp(q + a, b"DeviceId", 8) == 0:
                if seen_id or memchr(q + eq + 1, 61, vlen) != NULL:
                    return None
                seen_id = True
                device_id = _ascii_str(q + eq + 1, vlen)
            elif eq - a == 10 and memcmp(q + a, b"DeviceType", 10) == 0:
                if seen_type or memchr(q + eq + 1, 61, vlen) != NULL:
                    return None
                seen_type = True
                device_type = _ascii_str(q + eq + 1, vlen)
            else:
                name = _ascii_str(q + a, eq - a)
                if name in params:
                    return None
                params[name] = _ascii_str(q + eq + 1, vlen)
    if auth is not None and len(auth):
        # Basic only ("Basic", blanks, the token): anything else is the reference's to read.
        p = <const unsigned char*>PyBytes_AS_STRING(auth)
        n = len(auth)
        if n < 6 or not _ascii(p, n) or not _ieq(p, 5, "basic", 5) or (p[5] != 32 and p[5] != 9):
            return None
        a, b = 6, n
        while a < b and (p[a] == 32 or p[a] == 9):
            a += 1
        while b > a and (p[b - 1] == 32 or p[b - 1] == 9):
            b -= 1
        try:
            text = _a2b_base64(PyBytes_FromStringAndSize(<const char*>p + a, b - a), strict_mode=True).decode("utf-8")
        except ValueError:             # binascii.Error and UnicodeDecodeError are ValueErrors
            return None
        i = text.find(":")
        if i < 0:
            return None
        text = text[:i]                # the user name; the password goes no further
        for ch in text:
            if ch < 0x20 or ch == 0x7f:
                return None
        if user and user != text and not _same_user(user, text):
            return None                # User= names someone else: refused by the reference
        user = text
        auth_scheme = "basic"
        identity = _CREDENTIAL
    return _EasRequest(method=method, path=_shared(_ascii_str(t, qa)), command=_shared(command), user=user,
                       device_id=device_id, device_type=_shared(device_type),
                       protocol_version=_shared(protocol_version),
                       policy_key=None if policykey is None else _latin1(policykey),
                       user_agent=None if agent is None else _shared(_latin1(agent)), params=params,
                       accept_multipart=accept_multipart, client_ip=client_ip, auth_scheme=auth_scheme,
                       identity=identity)


# -- heads out, rewritten on the way (proxy/headers.py's rules, in the writer) -----------------

cdef bint _hop_by_hop(const unsigned char* p, Py_ssize_t n):
    """headers.HOP_BY_HOP (a lower-case name)."""
    if n == 2:
        return memcmp(p, b"te", 2) == 0
    if n == 7:
        return memcmp(p, b"trailer", 7) == 0 or memcmp(p, b"upgrade", 7) == 0
    if n == 10:
        return memcmp(p, b"connection", 10) == 0 or memcmp(p, b"keep-alive", 10) == 0
    if n == 16:
        return memcmp(p, b"proxy-connection", 16) == 0
    if n == 17:
        return memcmp(p, b"transfer-encoding", 17) == 0
    if n == 18:
        return memcmp(p, b"proxy-authenticate", 18) == 0
    if n == 19:
        return memcmp(p, b"proxy-authorization", 19) == 0
    return False


cdef bint _request_drop(const unsigned char* p, Py_ssize_t n):
    """headers._REQUEST_DROP (hop-by-hop, the gateway's own, the forwarding ones) and the framing."""
    if _hop_by_hop(p, n):
        return True
    if n == 4:
        return memcmp(p, b"host", 4) == 0
    if n == 6:
        return memcmp(p, b"expect", 6) == 0
    if n == 9:
        return memcmp(p, b"forwarded", 9) == 0 or memcmp(p, b"x-real-ip", 9) == 0
    if n == 14:
        return memcmp(p, b"content-length", 14) == 0
    if n == 15:
        return memcmp(p, b"x-forwarded-for", 15) == 0
    if n == 16:
        return memcmp(p, b"x-forwarded-host", 16) == 0 or memcmp(p, b"x-forwarded-port", 16) == 0
    if n == 17:
        return memcmp(p, b"x-forwarded-proto", 17) == 0
    return False


cdef bint _names_headers(list full):
    """A Connection header lists header names (headers._connection_tokens is not empty, or
    might not be): the Python path, which drops them, writes that head."""
    cdef tuple item
    cdef bytes low, value
    for item in full:
        low = item[1]
        if len(low) == 10 and memcmp(PyBytes_AS_STRING(low), b"connection", 10) == 0:
            value = item[2].lower()
            if value != b"keep-alive" and value != b"close":
                return True
    return False


cdef int _w_field(_Writer* w, bytes name, bytes value) except -1:
    _check_field(name, value)
    _w_bytes(w, name)
    _w_put(w, ": ", 2)
    _w_bytes(w, value)
    _w_put(w, "\r\n", 2)
    return 0


def write_upstream(bytes method, bytes target, list full, bytes host, bytes client_ip, bytes proto,
                   long long length):
    """The request head for the mail server, rewritten as proxy/headers.py's
    ``upstream_request_headers`` does for a device that is not a trusted proxy and a body
    read whole, written as ``write_request`` writes it: Host first, the device's headers but
    hop-by-hop, forwarding and framing ones, X-Forwarded-For/-Proto, ``Content-Length:
    length`` (none if ``length`` < 0). None when a Connection header names other headers
    (the Python path drops those). tests/test_fastpath_writers.py checks it against both."""
    cdef _Writer w
    cdef tuple item
    cdef bytes low
    if _names_headers(full):
        return None
    _check_request_line(method, target)
    _w_init(&w)
    try:
        _w_request_line(&w, method, target)
        _w_field(&w, b"Host", host)
        for item in full:
            low = item[1]
            if _request_drop(<const unsigned char*>PyBytes_AS_STRING(low), len(low)):
                continue
            _w_field(&w, item[0], item[2])
        _w_field(&w, b"X-Forwarded-For", client_ip)
        _w_field(&w, b"X-Forwarded-Proto", proto)
        _w_framing(&w, FRAMING_LENGTH if length >= 0 else FRAMING_NONE, length, True)
        return PyBytes_FromStringAndSize(w.buf, w.pos)
    finally:
        _w_free(&w)


def write_answer(int status, bytes reason, list full, int framing, long long length, bint keep_alive):
    """``write_response(status, reason, answer_headers(full), ...)`` (proxy/headers.py) in one
    pass: the mail server's headers but hop-by-hop ones, the framing and ``Connection`` the
    writer's own. None when a Connection header names other headers (the Python path)."""
    cdef _Writer w
    cdef tuple item
    cdef bytes low
    if _names_headers(full):
        return None
    _check_status_line(status, reason)
    _w_init(&w)
    try:
        _w_status_line(&w, status, reason)
        for item in full:
            low = item[1]
            if _hop_by_hop(<const unsigned char*>PyBytes_AS_STRING(low), len(low)) or \
                    (len(low) == 14 and memcmp(PyBytes_AS_STRING(low), b"content-length", 14) == 0):
                continue
            _w_field(&w, item[0], item[2])
        _w_framing(&w, framing, length, keep_alive)
        return PyBytes_FromStringAndSize(w.buf, w.pos)
    finally:
        _w_free(&w)
