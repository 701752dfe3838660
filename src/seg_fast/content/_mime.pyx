# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""MIME structure walker over one buffer (compiled).

``walk(data)`` returns the message's parts in document order as ``Part`` objects
holding offsets into ``data`` (headers, body, end) and the few header values the
content pipeline needs; bodies are never copied. Boundaries are found with memmem
at line starts, so a 10 MB base64 attachment costs one pass of a fast search.
Lenient like mail clients (a missing close delimiter ends the part at its parent's
end), bounded (depth, part count), and precise when it gives up (MIMEError).
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyObject_GetBuffer, PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdlib cimport free, malloc
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

from seg_fast.errors import MIMEError

cdef extern from "string.h" nogil:
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)

cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject** obj, Py_ssize_t size) except -1

MAX_DEPTH = 32
MAX_PARTS = 2000

# Header names the walker always reads (lower case).
_CONTENT_HEADERS = (b"content-type", b"content-transfer-encoding", b"content-disposition",
                    b"content-id")


cdef class Part:
    """One MIME entity: ``data[start:body_start]`` its headers (with the blank line),
    ``data[body_start:end]`` its body (without the line break before the next delimiter)."""

    cdef readonly Py_ssize_t start, header_end, body_start, end
    cdef readonly int depth, parent, index
    cdef readonly str content_type, cte, disposition
    cdef readonly dict params, disposition_params, headers
    cdef readonly bint multipart
    cdef public list children

    @property
    def filename(self):
        """The attachment's name (Content-Disposition filename, else Content-Type name)."""
        return self.disposition_params.get("filename") or self.params.get("name") or ""

    @property
    def is_attachment(self):
        if self.multipart or self.content_type == "message/rfc822":
            return False
        if self.disposition == "attachment":
            return True
        if self.content_type in ("text/plain", "text/html") and not self.filename:
            return False
        return True

    def __repr__(self):
        return (f"Part({self.index} {self.content_type} depth={self.depth} "
                f"[{self.start}:{self.body_start}:{self.end}] cte={self.cte!r} name={self.filename!r})")


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef Py_ssize_t _line_end(const unsigned char* b, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    """Offset just past the LF ending the line at i (or end)."""
    while i < end and b[i] != 10:
        i += 1
    return i + 1 if i < end else end


cdef class _Walker:
    cdef const unsigned char* b
    cdef Py_ssize_t n
    cdef list parts
    cdef tuple extra
    cdef int max_parts, max_depth
    cdef bint headers_only

    cdef Py_ssize_t _headers(self, Py_ssize_t start, Py_ssize_t end, dict out) except -2:
        """Read the header block at ``start``; returns where the body starts."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t i = start, line_start, colon, nxt, vend, k
        cdef bytes name
        while i < end:
            line_start = i
            # The blank line ends the headers.
            if b[i] == 10:
                return i + 1
            if b[i] == 13 and i + 1 < end and b[i + 1] == 10:
                return i + 2
            nxt = _line_end(b, i, end)
            # Folded continuation lines belong to this header.
            while nxt < end and (b[nxt] == 32 or b[nxt] == 9):
                nxt = _line_end(b, nxt, end)
            colon = line_start
            while colon < nxt and b[colon] != 58 and b[colon] != 10:
                colon += 1
            if colon < nxt and b[colon] == 58 and colon > line_start:
                name = PyBytes_FromStringAndSize(<const char*>b + line_start, colon - line_start)
                name = name.strip().lower()
                if name in _CONTENT_HEADERS or name in self.extra:
                    vend = nxt
                    if name not in out:
                        out[name] = _unfold(b, colon + 1, vend)
            else:
                # Not a header line: the body starts here (lenient, like the email
                # package, which notes a missing blank line and does the same).
                return line_start
            i = nxt
        return end

    cdef int walk(self, Py_ssize_t start, Py_ssize_t end, int depth, int parent,
                  str default_type) except -1:
        cdef dict raw = {}
        cdef Part p
        cdef Py_ssize_t body_start, body_end
        if len(self.parts) >= self.max_parts:
            raise MIMEError(f"more than {self.max_parts} MIME parts")
        if depth > self.max_depth:
            raise MIMEError(f"MIME nesting deeper than {self.max_depth}")
        body_start = self._headers(start, end, raw)
        p = Part.__new__(Part)
        p.start = start
        p.body_start = body_start
        p.header_end = body_start
        p.end = end
        p.depth = depth
        p.parent = parent
        p.index = len(self.parts)
        p.children = []
        ctype, p.params = parse_header_value(raw.get(b"content-type", ""))
        if not ctype or "/" not in ctype:
            ctype = default_type
        p.content_type = ctype
        p.cte = raw.get(b"content-transfer-encoding", "").strip().lower() or "7bit"
        p.disposition, p.disposition_params = parse_header_value(raw.get(b"content-disposition", ""))
        p.headers = {k.decode("ascii", "replace"): v for k, v in raw.items()}
        p.multipart = ctype.startswith("multipart/") and bool(p.params.get("boundary"))
        self.parts.append(p)
        if parent >= 0:
            (<Part>self.parts[parent]).children.append(p.index)
        if self.headers_only:
            return 0
        if p.multipart:
            self._multipart(p, depth)
        elif ctype == "message/rfc822" and p.cte in ("7bit", "8bit", "binary") and body_start < end:
            self.walk(body_start, end, depth + 1, p.index, "text/plain")
        return 0

    cdef int _multipart(self, Part p, int depth) except -1:
        cdef bytes delim = b"--" + p.params["boundary"].encode("utf-8", "surrogateescape")
        cdef const unsigned char* b = self.b
        cdef const char* d = PyBytes_AS_STRING(delim)
        cdef Py_ssize_t dl = len(delim), pos = p.body_start, end = p.end, hit, after, line_end
        cdef Py_ssize_t part_start = -1, part_end
        cdef bint closing
        cdef const unsigned char* found
        cdef str child_default = "message/rfc822" if p.content_type == "multipart/digest" else "text/plain"
        while pos < end:
            # A base64 body is megabytes: searched without the GIL (the loop's, when the
            # transform runs in a worker thread).
            with nogil:
                found = _find(b + pos, end - pos, d, dl)
            if found == NULL:
                break
            hit = found - b
            pos = hit + 1
            if hit != p.body_start and b[hit - 1] != 10:
                continue
            after = hit + dl
            closing = after + 1 < end and b[after] == 45 and b[after + 1] == 45
            if closing:
                after += 2
            # Only spaces may follow a delimiter on its line.
            line_end = after
            while line_end < end and (b[line_end] == 32 or b[line_end] == 9):
                line_end += 1
            if line_end < end and b[line_end] != 13 and b[line_end] != 10:
                continue
            if line_end < end and b[line_end] == 13:
                line_end += 1
            if line_end < end and b[line_end] == 10:
                line_end += 1
            if part_start >= 0:
                # The line break before the delimiter belongs to the delimiter.
                part_end = hit
                if part_end > part_start and b[part_end - 1] == 10:
                    part_end -= 1
                    if part_end > part_start and b[part_end - 1] == 13:
                        part_end -= 1
                self.walk(part_start, part_end, depth + 1, p.index, child_default)
            if closing:
                part_start = -1
                break
            part_start = line_end
            pos = line_end
        if part_start >= 0:
            # No close delimiter: the last part runs to the parent's end.
            self.walk(part_start, end, depth + 1, p.index, child_default)
        return 0


cdef const unsigned char* _find(const unsigned char* h, Py_ssize_t n, const char* d,
                                Py_ssize_t dl) noexcept nogil:
    """memmem(h, n, d, dl), faster where d[0] is rare: a delimiter starts with "-", which
    base64 text (most of a large message) never holds, so memchr's stride finds the next
    candidate; after many false candidates (text full of dashes) memmem takes over."""
    cdef const unsigned char* p = h
    cdef const unsigned char* e = h + n
    cdef int misses = 0
    while e - p >= dl:
        p = <const unsigned char*>memchr(p, d[0], (e - p) - dl + 1)
        if p == NULL:
            return NULL
        if memcmp(p, d, dl) == 0:
            return p
        misses += 1
        p += 1
        if misses > 32:
            return <const unsigned char*>memmem(p, e - p, d, dl)
    return NULL


cdef str _unfold(const unsigned char* b, Py_ssize_t i, Py_ssize_t end):
    # Header values are ASCII (RFC 2047/2231 encode the rest); latin-1 keeps any byte.
    cdef bytes raw = PyBytes_FromStringAndSize(<const char*>b + i, end - i)
    return raw.replace(b"\r\n", b"").replace(b"\n", b"").decode("latin-1").strip()


def walk(data, extra_headers=(), int max_parts=MAX_PARTS, int max_depth=MAX_DEPTH, bint headers_only=False):
    """Parts of the message in ``data`` (bytes-like), in document order; part 0 is the
    message. ``extra_headers``: more header names (any case) to read into ``Part.headers``.
    ``headers_only``: the message's own part only (its children are not walked)."""
    cdef Py_buffer view
    cdef _Walker w = _Walker.__new__(_Walker)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        w.b = <const unsigned char*>view.buf
        w.n = view.len
        w.parts = []
        w.extra = tuple(h.lower().encode("ascii") if isinstance(h, str) else h.lower() for h in extra_headers)
        w.max_parts = max_parts
        w.max_depth = max_depth
        w.headers_only = headers_only
        w.walk(0, view.len, 0, -1, "text/plain")
        return w.parts
    finally:
        PyBuffer_Release(&view)


def parse_header_value(str value):
    """("type/subtype" or "attachment", {param: value}) from a structured header value.

    Quoted strings with escapes, RFC 2231 continuations and charsets
    (``filename*0*=utf-8''%E2%82%AC``), RFC 2047 encoded words in names.
    """
    cdef Py_ssize_t i = 0, n = len(value), j
    cdef dict params = {}
    cdef dict pieces = {}
    cdef str key, val
    cdef list buf
    j = value.find(";")
    head = (value if j < 0 else value[:j]).strip().lower()
    if j < 0:
        return head, params
    i = j + 1
    while i < n:
        while i < n and value[i] in " \t;":
            i += 1
        j = i
        while j < n and value[j] not in "=;":
            j += 1
        key = value[i:j].strip().lower()
        if j >= n or value[j] == ";":
            i = j + 1
            continue
        i = j + 1
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            buf = []
            i += 1
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(value[i])
                i += 1
            i += 1
            val = "".join(buf)
        else:
            j = i
            while j < n and value[j] != ";":
                j += 1
            val = value[i:j].strip()
            i = j
        if not key:
            continue
        if "*" in key:
            pieces[key] = val
        elif key not in params:
            params[key] = val
    if pieces:
        _rfc2231(pieces, params)
    for key in ("name", "filename"):
        if key in params and "=?" in params[key]:
            params[key] = _rfc2047(params[key])
    return head, params


cdef _rfc2231(dict pieces, dict params):
    from urllib.parse import unquote_to_bytes
    cdef dict grouped = {}
    for key, val in pieces.items():
        base, _, rest = key.partition("*")
        encoded = key.endswith("*")
        num = rest.rstrip("*")
        idx = int(num) if num.isdigit() else 0
        grouped.setdefault(base, []).append((idx, encoded, val))
    for base, items in grouped.items():
        items.sort()
        charset = "utf-8"
        out = bytearray()
        for k, (idx, encoded, val) in enumerate(items):
            if encoded:
                if k == 0 and val.count("'") >= 2:
                    charset, _, val = val.split("'", 2)
                    charset = charset or "utf-8"
                out += unquote_to_bytes(val)
            else:
                out += val.encode("latin-1", "replace")
        try:
            params[base] = out.decode(charset, "replace")
        except LookupError:
            params[base] = out.decode("utf-8", "replace")


cdef str _rfc2047(str text):
    from email.header import decode_header, make_header
    try:
        return str(make_header(decode_header(text)))
    except Exception:  # malformed encoded words: keep the text as it came
        return text


def wrap_lines(data, Py_ssize_t width=76, bytes eol=b"\r\n"):
    """``data`` (base64 text, no line breaks) cut into lines of ``width`` joined by ``eol``."""
    cdef Py_buffer view
    cdef Py_ssize_t n, lines, size, i, w = 0, take
    cdef char* out
    cdef const char* src
    cdef const char* e = PyBytes_AS_STRING(eol)
    cdef Py_ssize_t el = len(eol)
    if width <= 0:
        raise ValueError("width must be positive")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        src = <const char*>view.buf
        lines = (n + width - 1) // width
        size = n + (lines - 1) * el if lines > 0 else 0
        result = PyBytes_FromStringAndSize(NULL, size)
        out = PyBytes_AS_STRING(result)
        i = 0
        # Megabytes of a sealed attachment: without the GIL, so a transform in a worker
        # thread (proxy/exchange.py) leaves the event loop free meanwhile.
        with nogil:
            while i < n:
                take = width if n - i > width else n - i
                memcpy(out + w, src + i, take)
                w += take
                i += take
                if i < n:
                    memcpy(out + w, e, el)
                    w += el
        return result
    finally:
        PyBuffer_Release(&view)


def line_ending(data, Py_ssize_t limit=4096):
    """b"\\r\\n" when the first line break in ``data`` is CRLF (or none), else b"\\n"."""
    cdef Py_buffer view
    cdef const unsigned char* b
    cdef Py_ssize_t i, n
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        b = <const unsigned char*>view.buf
        n = view.len if view.len < limit else limit
        for i in range(n):
            if b[i] == 10:
                return b"\r\n" if i > 0 and b[i - 1] == 13 else b"\n"
        return b"\r\n"
    finally:
        PyBuffer_Release(&view)


cdef const char* _HEX = b"0123456789ABCDEF"
# Bytes quoted-printable writes as they are (printable ASCII but '=').
cdef unsigned char QP_SAFE[256]


cdef void _init_qp():
    cdef int c
    for c in range(256):
        QP_SAFE[c] = 1 if (33 <= c <= 126 and c != 61) else 0


_init_qp()


def qp_encode(data, bytes eol=b"\r\n", Py_ssize_t width=76):
    """Quoted-printable (RFC 2045) of text ``data``: its CRLF/LF line breaks become
    ``eol``; lines are cut with soft breaks to at most ``width`` characters; spaces and
    tabs before a line break, '=' and every byte outside 33..126 are =XX-encoded."""
    cdef Py_buffer view
    cdef const unsigned char* b
    cdef Py_ssize_t n, i, w = 0, col = 0, cap, el = len(eol), need, limit = width - 1
    cdef unsigned char c
    cdef bint enc
    cdef char* out
    cdef const char* e = PyBytes_AS_STRING(eol)
    if width < 8:
        raise ValueError("width must be at least 8")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        b = <const unsigned char*>view.buf
        n = view.len
        # Worst case: every byte =XX plus a soft break per (width-1)/3 encoded bytes.
        cap = 3 * n + (3 * n // (width - 4) + 2) * (el + 1) + 16
        result = PyBytes_FromStringAndSize(NULL, cap)
        out = PyBytes_AS_STRING(result)
        i = 0
        while i < n:
            c = b[i]
            if QP_SAFE[c] and col < limit:
                # The common case: a printable byte on a line with room.
                out[w] = c
                w += 1
                col += 1
                i += 1
                continue
            if c == 10 or (c == 13 and i + 1 < n and b[i + 1] == 10):
                memcpy(out + w, e, el)
                w += el
                col = 0
                i += 2 if c == 13 else 1
                continue
            if c == 32 or c == 9:
                # Whitespace at the end of a line (or of the text) must be encoded.
                enc = i + 1 >= n or b[i + 1] == 10 or (b[i + 1] == 13 and i + 2 < n and b[i + 2] == 10)
            else:
                enc = not QP_SAFE[c]
            need = 3 if enc else 1
            # Room for this character and a possible soft break "=" on the line.
            if col + need > limit:
                out[w] = 61
                w += 1
                memcpy(out + w, e, el)
                w += el
                col = 0
            if enc:
                out[w] = 61
                out[w + 1] = _HEX[c >> 4]
                out[w + 2] = _HEX[c & 15]
                w += 3
            else:
                out[w] = c
                w += 1
            col += need
            i += 1
        return result[:w]
    finally:
        PyBuffer_Release(&view)


cdef inline Py_ssize_t _next_line(const unsigned char* b, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* width,
                                  Py_ssize_t* k) noexcept nogil:
    """The line of base64 text starting at ``i``: returns where it ends (its LF, or ``n``),
    sets ``k`` to the end of its text (a CR before the LF left out) and ``width`` (< 0:
    not known yet) to the first line's length."""
    cdef Py_ssize_t j
    cdef const unsigned char* nl
    # Lines of one width ending in CRLF are the rule: check there first.
    if width[0] > 0 and i + width[0] + 1 < n and b[i + width[0]] == 13 and b[i + width[0] + 1] == 10:
        j = i + width[0] + 1
    else:
        nl = <const unsigned char*>memchr(b + i, 10, n - i)
        j = (nl - b) if nl != NULL else n
    k[0] = j
    if j > i and b[j - 1] == 13:
        k[0] = j - 1
    if width[0] < 0:
        width[0] = k[0] - i
    return j


def strip_breaks(data):
    """``data`` without its line breaks (base64 bodies, before a strict decode: any
    other stray byte makes that decode fail, and the caller falls back)."""
    cdef Py_buffer view
    cdef const unsigned char* b
    cdef Py_ssize_t n, i = 0, w = 0, j, k, width = -1
    cdef char* out
    cdef PyObject* obj
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        b = <const unsigned char*>view.buf
        n = view.len
        result = PyBytes_FromStringAndSize(NULL, n)
        out = PyBytes_AS_STRING(result)
        with nogil:                   # as wrap_lines: megabytes, the loop free meanwhile
            while i < n:
                j = _next_line(b, i, n, &width, &k)
                memcpy(out + w, b + i, k - i)
                w += k - i
                i = j + 1
        if w == n:
            return result
        # Shrunk in place (the only reference is ours): no second copy of the body.
        obj = <PyObject*>result
        Py_INCREF(result)
        result = None                 # the raw reference is now the only one
        _PyBytes_Resize(&obj, w)      # frees it and sets NULL on failure (and raises)
        result = <object>obj
        Py_DECREF(result)             # the raw reference's, now result's
        return result
    finally:
        PyBuffer_Release(&view)


cdef inline int _hexval(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef inline Py_ssize_t _soft_break(const unsigned char* b, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Length of the soft line break ("=", optional spaces or tabs, CRLF or LF) at i, or 0."""
    cdef Py_ssize_t j = i + 1
    while j < n and (b[j] == 32 or b[j] == 9):
        j += 1
    if j < n and b[j] == 10:
        return j + 1 - i
    if j + 1 < n and b[j] == 13 and b[j + 1] == 10:
        return j + 2 - i
    if j == n:
        return n - i  # "=" at the very end: a soft break with nothing after it
    return 0


def qp_decode(data):
    """Quoted-printable text decoded (lenient: a stray "=" stays as it is)."""
    cdef Py_buffer view
    cdef const unsigned char* b
    cdef const unsigned char* eq
    cdef Py_ssize_t n, i = 0, w = 0, k
    cdef int hi, lo
    cdef char* out
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        b = <const unsigned char*>view.buf
        n = view.len
        result = PyBytes_FromStringAndSize(NULL, n)
        out = PyBytes_AS_STRING(result)
        while i < n:
            if b[i] != 61:
                # Copy the run up to the next "=" in one go.
                eq = <const unsigned char*>memchr(b + i, 61, n - i)
                k = (eq - b) if eq != NULL else n
                memcpy(out + w, b + i, k - i)
                w += k - i
                i = k
                continue
            k = _soft_break(b, i, n)
            if k:
                i += k
                continue
            hi = _hexval(b[i + 1]) if i + 1 < n else -1
            lo = _hexval(b[i + 2]) if i + 2 < n else -1
            if hi >= 0 and lo >= 0:
                out[w] = <char>(hi * 16 + lo)
                w += 1
                i += 3
            else:
                out[w] = 61
                w += 1
                i += 1
        return result[:w]
    finally:
        PyBuffer_Release(&view)


def qp_locate(data, list offsets):
    """For each decoded offset (ascending), the (start, end) of its encoding in the
    quoted-printable ``data`` (as ``qp_decode`` reads it); (-1, -1) past the end."""
    cdef Py_buffer view
    cdef const unsigned char* b
    cdef const unsigned char* eq
    cdef Py_ssize_t n, i = 0, d = 0, k, t = 0, nt = len(offsets), target, step, e, pos
    cdef list out = []
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        b = <const unsigned char*>view.buf
        n = view.len
        target = offsets[0] if nt else -1
        while i < n and t < nt:
            # Up to the next "=" every byte stands for itself: jump there at once.
            eq = <const unsigned char*>memchr(b + i, 61, n - i)
            e = (eq - b) if eq != NULL else n
            while t < nt and target < d + (e - i):
                pos = i + (target - d)
                out.append((pos, pos + 1))
                t += 1
                target = offsets[t] if t < nt else -1
            d += e - i
            i = e
            if i >= n or t >= nt:
                break
            k = _soft_break(b, i, n)
            if k:
                i += k
                continue
            step = 3 if (i + 2 < n and _hexval(b[i + 1]) >= 0 and _hexval(b[i + 2]) >= 0) else 1
            while t < nt and target == d:
                out.append((i, i + step))
                t += 1
                target = offsets[t] if t < nt else -1
            d += 1
            i += step
        while t < nt:
            out.append((-1, -1))
            t += 1
        return out
    finally:
        PyBuffer_Release(&view)


# -- big copies without the GIL -------------------------------------------------------
# A large answer is transformed in a worker thread (proxy/exchange.py); its copies of
# megabytes (a sealed attachment's envelope, the rebuilt message) run without the GIL so
# the event loop is not held behind them.

def join(chunks):
    """``b"".join(chunks)`` (bytes-like chunks), copied without the GIL."""
    cdef list items = list(chunks)
    cdef Py_ssize_t k, count = len(items), total = 0, w = 0
    cdef Py_buffer* views = <Py_buffer*>malloc(sizeof(Py_buffer) * (count if count else 1))
    cdef Py_ssize_t held = 0
    cdef char* out
    if views == NULL:
        raise MemoryError()
    try:
        for k in range(count):
            PyObject_GetBuffer(items[k], &views[k], PyBUF_SIMPLE)
            held += 1
            total += views[k].len
        result = PyBytes_FromStringAndSize(NULL, total)
        out = PyBytes_AS_STRING(result)
        with nogil:
            for k in range(count):
                memcpy(out + w, views[k].buf, views[k].len)
                w += views[k].len
        return result
    finally:
        for k in range(held):
            PyBuffer_Release(&views[k])
        free(views)


cdef bint _utf8_run(const unsigned char* p, Py_ssize_t n, int* need, unsigned char* lo,
                    unsigned char* hi) noexcept nogil:
    """Validate p[:n] as the continuation of a UTF-8 text whose last character still
    needs ``need`` bytes (the first in lo..hi, the rest 0x80..0xBF); the state is left
    for the next piece. Python's strict decoder's rules (no surrogates, nothing past
    U+10FFFF, no overlong forms), and no NUL."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    cdef uint64_t v, high = 0x8080808080808080ULL, ones = 0x0101010101010101ULL
    while i < n:
        if need[0]:
            c = p[i]
            if c < lo[0] or c > hi[0]:
                return False
            need[0] -= 1
            lo[0] = 0x80
            hi[0] = 0xBF
            i += 1
            continue
        # ASCII without NUL (base64 text: all of a sealed attachment) 8 bytes at a time.
        while i + 8 <= n:
            memcpy(&v, p + i, 8)
            if (v & high) or ((v - ones) & ~v & high):
                break
            i += 8
        if i >= n:
            break
        c = p[i]
        i += 1
        if c < 0x80:
            if c == 0:
                return False
            continue
        if c < 0xC2 or c > 0xF4:
            return False
        lo[0] = 0x80
        hi[0] = 0xBF
        if c < 0xE0:
            need[0] = 1
        elif c < 0xF0:
            need[0] = 2
            if c == 0xE0:
                lo[0] = 0xA0              # no overlong forms
            elif c == 0xED:
                hi[0] = 0x9F              # no surrogates
        else:
            need[0] = 3
            if c == 0xF0:
                lo[0] = 0x90
            elif c == 0xF4:
                hi[0] = 0x8F              # not past U+10FFFF
    return True


def utf8_text(data):
    """Whether ``data`` decodes as UTF-8 (Python's strict decoder: no surrogates, nothing
    past U+10FFFF, no overlong forms) and holds no NUL: what a WBXML inline string can
    carry. Checked without the GIL."""
    return utf8_text_parts((data,))


def utf8_text_parts(chunks):
    """utf8_text of the chunks joined (a character may span two), without joining them."""
    cdef Py_buffer view
    cdef bint ok = True
    cdef int need = 0
    cdef unsigned char lo = 0x80, hi = 0xBF
    for chunk in chunks:
        PyObject_GetBuffer(chunk, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                ok = _utf8_run(<const unsigned char*>view.buf, view.len, &need, &lo, &hi)
        finally:
            PyBuffer_Release(&view)
        if not ok:
            return False
    return need == 0


# -- base64 bodies in one pass, without the GIL ----------------------------------------
# A sealed attachment is base64-decoded from its MIME lines and its envelope base64-encoded
# into lines again: megabytes each. libbase64 (the SIMD codec pybase64 is built on, whose
# extension module exports it) does the arithmetic a cache-sized chunk at a time, the line
# breaks are stripped or written around it in the same pass, and the result is written
# once into the bytes returned: no intermediate copy of the body, and no GIL held
# (a transform runs in a worker thread beside the event loop).

ctypedef int (*_b64dec_t)(const char* src, size_t srclen, char* out, size_t* outlen, int flags) noexcept nogil
ctypedef void (*_b64enc_t)(const char* src, size_t srclen, char* out, size_t* outlen, int flags) noexcept nogil

cdef _b64dec_t _lib_decode = NULL
cdef _b64enc_t _lib_encode = NULL
# Characters of base64 text per libbase64 call: a multiple of 4 that stays in the L2 cache.
cdef Py_ssize_t _B64_CHUNK = 1 << 16


def libbase64_addresses():
    """(base64_decode, base64_encode): libbase64's one-shot functions in pybase64's
    extension, as addresses; (0, 0) for a pybase64 built without the symbols."""
    try:
        import ctypes
        import pybase64._pybase64 as ext
        lib = ctypes.CDLL(ext.__file__)
        dec = ctypes.cast(lib.base64_decode, ctypes.c_void_p).value or 0
        enc = ctypes.cast(lib.base64_encode, ctypes.c_void_p).value or 0
    except Exception:      # the slower path below
        return 0, 0
    return (dec, enc) if dec and enc else (0, 0)


cdef void _load_libbase64():
    global _lib_decode, _lib_encode
    cdef size_t dec, enc
    dec, enc = libbase64_addresses()
    if dec and enc:
        _lib_decode = <_b64dec_t>dec
        _lib_encode = <_b64enc_t>enc


_load_libbase64()
HAVE_LIBBASE64 = _lib_decode != NULL


def _use_libbase64(bint on):
    """Tests: run the pybase64 fallbacks (as without libbase64's symbols), or not."""
    global _lib_decode, _lib_encode
    if on:
        _load_libbase64()
    else:
        _lib_decode = NULL
        _lib_encode = NULL


def _set_b64_chunk(Py_ssize_t chars):
    """Tests: a small chunk so its edges fall everywhere (a multiple of 4)."""
    global _B64_CHUNK
    if chars <= 0 or chars % 4:
        raise ValueError("chunk must be a positive multiple of 4")
    _B64_CHUNK = chars


cdef int _decode_lines(const unsigned char* b, Py_ssize_t n, char* out, Py_ssize_t* written,
                       char* scratch, Py_ssize_t chunk) noexcept nogil:
    """Strip the line breaks (LF, and a CR just before one) of base64 text ``b`` a chunk
    at a time into ``scratch`` and decode each chunk into ``out``; 0 when the text is
    not exactly what a strict decode of the stripped whole accepts."""
    cdef Py_ssize_t i = 0, j, k, fill = 0, take, w = 0, width = -1, line
    cdef size_t got
    cdef bint padded = False
    while i < n:
        j = _next_line(b, i, n, &width, &k)
        line = k - i
        if line and padded:
            return 0                       # text after the padding
        if fill == 0 and line >= chunk:
            # A long line (base64 without breaks: an ItemOperations Data string) is
            # decoded where it lies, all but its last few characters.
            take = line // 4 * 4 - 4
            got = 0
            if not _lib_decode(<const char*>b + i, take, out + w, &got, 0):
                return 0
            w += got
            if take and b[i + take - 1] == 61:
                return 0                   # padding, and text after it
            i += take
            line -= take
        elif line == 76 and chunk - fill >= 76:
            memcpy(scratch + fill, b + i, 76)  # the usual MIME line, a fixed-size copy
            fill += 76
            i += 76
            line = 0
            if fill == chunk:
                got = 0
                if not _lib_decode(scratch, fill, out + w, &got, 0):
                    return 0
                w += got
                padded = scratch[fill - 1] == 61
                fill = 0
        while line:
            take = chunk - fill
            if take > line:
                take = line
            memcpy(scratch + fill, b + i, take)
            fill += take
            i += take
            line -= take
            if fill == chunk:
                got = 0
                if not _lib_decode(scratch, fill, out + w, &got, 0):
                    return 0
                w += got
                padded = scratch[fill - 1] == 61
                fill = 0
                if line and padded:
                    return 0
        i = j + 1
    if fill:
        if padded:
            return 0
        got = 0
        if not _lib_decode(scratch, fill, out + w, &got, 0):
            return 0
        w += got
    written[0] = w
    return 1


def b64decode_lines_into(data, out):
    """b64decode_lines(data) written into the writable buffer ``out`` (at least
    ``decoded_room(len(data))`` bytes); returns how many bytes it wrote."""
    cdef Py_buffer view, dst
    cdef Py_ssize_t w = 0, chunk = _B64_CHUNK
    cdef char* scratch
    cdef int ok
    if _lib_decode == NULL:
        plain = b64decode_lines(data)
        memoryview(out)[:len(plain)] = plain
        return len(plain)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &dst, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if dst.len < view.len // 4 * 3 + 3:
                raise ValueError("output buffer too small")
            scratch = <char*>malloc(chunk)
            if scratch == NULL:
                raise MemoryError()
            with nogil:
                ok = _decode_lines(<const unsigned char*>view.buf, view.len, <char*>dst.buf, &w, scratch, chunk)
            free(scratch)
            if not ok:
                raise ValueError("not strict base64 text")
            return w
        finally:
            PyBuffer_Release(&dst)
    finally:
        PyBuffer_Release(&view)


def decoded_room(Py_ssize_t n):
    """Bytes b64decode_lines_into needs for ``n`` bytes of base64 text."""
    return n // 4 * 3 + 3


def b64decode_lines(data):
    """The bytes base64 text with line breaks decodes to: exactly
    ``pybase64.b64decode(strip_breaks(data), validate=True)`` (ValueError where that
    raises binascii.Error), in one pass without the GIL."""
    cdef Py_buffer view
    cdef Py_ssize_t n, w = 0, chunk = _B64_CHUNK
    cdef char* scratch
    cdef char* out
    cdef int ok
    cdef PyObject* obj
    if _lib_decode == NULL:
        import binascii
        import pybase64
        try:
            return pybase64.b64decode(strip_breaks(data), validate=True)
        except binascii.Error as e:
            raise ValueError(str(e)) from None
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        result = PyBytes_FromStringAndSize(NULL, n // 4 * 3 + 3)
        out = PyBytes_AS_STRING(result)
        scratch = <char*>malloc(chunk)
        if scratch == NULL:
            raise MemoryError()
        with nogil:
            ok = _decode_lines(<const unsigned char*>view.buf, n, out, &w, scratch, chunk)
        free(scratch)
        if not ok:
            raise ValueError("not strict base64 text")
        # Shrunk in place (the only reference is ours), as strip_breaks does.
        obj = <PyObject*>result
        Py_INCREF(result)
        result = None
        _PyBytes_Resize(&obj, w)
        result = <object>obj
        Py_DECREF(result)
        return result
    finally:
        PyBuffer_Release(&view)


def b64encode_lines(data, Py_ssize_t width=76, bytes eol=b"\r\n"):
    """``wrap_lines(pybase64.b64encode(data), width, eol)`` in one pass without the GIL:
    a chunk of whole lines encoded into a cache-sized scratch buffer, then its lines
    copied to their place with the line breaks between them. ``width`` 0: one line,
    ``pybase64.b64encode(data)`` (encoded where it ends up)."""
    cdef Py_buffer view
    cdef Py_ssize_t n, total, lines, size, lines_per, in_chunk, at = 0, w = 0, take, i
    cdef size_t got
    cdef char* scratch
    cdef char* out
    cdef const char* src
    cdef const char* e = PyBytes_AS_STRING(eol)
    cdef Py_ssize_t el = len(eol)
    if width < 0:
        raise ValueError("width must not be negative")
    if _lib_encode == NULL:
        import pybase64
        return wrap_lines(pybase64.b64encode(data), width, eol) if width else pybase64.b64encode(data)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        src = <const char*>view.buf
        total = (n + 2) // 3 * 4
        if width == 0:
            result = PyBytes_FromStringAndSize(NULL, total)
            out = PyBytes_AS_STRING(result)
            got = 0
            with nogil:
                _lib_encode(src, n, out, &got, 0)
            return result
        lines = (total + width - 1) // width
        size = total + (lines - 1) * el if lines > 0 else 0
        result = PyBytes_FromStringAndSize(NULL, size)
        out = PyBytes_AS_STRING(result)
        # Whole lines per chunk, and whole 4-character groups: 3 input bytes each.
        lines_per = _B64_CHUNK // (4 * width)
        if lines_per < 1:
            lines_per = 1
        in_chunk = lines_per * width * 3
        scratch = <char*>malloc(lines_per * width * 4)
        if scratch == NULL:
            raise MemoryError()
        with nogil:
            while at < n:
                take = in_chunk if n - at > in_chunk else n - at
                got = 0
                _lib_encode(src + at, take, scratch, &got, 0)
                at += take
                i = 0
                if width == 76 and el == 2:
                    # MIME's lines and CRLF: fixed-size copies the compiler inlines
                    while <Py_ssize_t>got - i >= 76:
                        if w:
                            memcpy(out + w, e, 2)
                            w += 2
                        memcpy(out + w, scratch + i, 76)
                        w += 76
                        i += 76
                while i < <Py_ssize_t>got:
                    if w:
                        memcpy(out + w, e, el)
                        w += el
                    take = width if <Py_ssize_t>got - i > width else <Py_ssize_t>got - i
                    memcpy(out + w, scratch + i, take)
                    w += take
                    i += take
        free(scratch)
        return result
    finally:
        PyBuffer_Release(&view)


cdef class _Unwritten:
    """A writable buffer over a bytes object not yet handed to anyone (writable_bytes)."""
    cdef bytes data

    def __getbuffer__(self, Py_buffer* buf, int flags):
        PyBuffer_FillInfo(buf, self, PyBytes_AS_STRING(self.data), len(self.data), 0, flags)

    def __releasebuffer__(self, Py_buffer* buf):
        pass


def writable_bytes(Py_ssize_t size):
    """(bytes of ``size`` unset bytes, a writable memoryview of them): for a producer that
    writes into a buffer (AES-GCM's update_into) to fill the bytes it returns, with no
    copy after. Write them all, drop the view, and only then hand the bytes on."""
    cdef _Unwritten holder = _Unwritten.__new__(_Unwritten)
    holder.data = PyBytes_FromStringAndSize(NULL, size)
    return holder.data, memoryview(holder)
