# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Hyperlink scanner and rewriter over bytes (HTML or plain text, any ASCII-compatible
charset).

Only the scheme of a link changes (``http://`` -> ``awb://``), so entities, character
references, quoting and every byte outside the scheme stay as they were. Links are
found from their ``://`` (memchr on ':' is far rarer than letters), the scheme is read
backwards, the link's end forwards (matching quote, or the first space or markup
character for bare links) so a link nested in another's query is not rewritten twice.

Only hyperlinks are rewritten by default: a link in the text, or the value of an
attribute in ``attributes`` (``href``). A link in another attribute (``<img src>``,
``background``, ``srcset``) or a CSS ``url(...)`` (counted as ``style``) loads
something rather than opens it, and a scheme the page cannot load would break it:
it is left unless its attribute is listed too.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy

cdef extern from "string.h" nogil:
    void* memrchr(const void* s, int c, size_t n)

cdef enum:
    MAX_SCHEMES = 8
    MAX_SCHEME_LEN = 32
    MAX_ATTRS = 16
    MAX_ATTR_LEN = 32
    # How far back a link's tag is looked for (a longer tag: the link counts as text).
    TAG_LOOKBACK = 4096
    MODE_ALL = 0
    MODE_INCLUDE = 1
    MODE_EXCLUDE = 2

# Byte classes: 1 = scheme character, 2 = ends a bare link, 4 = ends the authority,
# 8 = letter (a scheme starts with one), 16 = host name character.
cdef unsigned char CLS[256]


cdef void _init_classes():
    cdef int c
    for c in range(256):
        CLS[c] = 0
        if (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c in (43, 45, 46):
            CLS[c] |= 1
        if c <= 32 or c == 127 or c in (34, 39, 60, 62, 96):  # " ' < > `
            CLS[c] |= 2 | 4
        if c in (47, 63, 35, 92):  # / ? # backslash
            CLS[c] |= 4
        if (65 <= c <= 90) or (97 <= c <= 122):
            CLS[c] |= 8
        if (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c in (45, 46, 95):
            CLS[c] |= 16


_init_classes()


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    if 65 <= c <= 90:
        return c + 32
    return c


cdef inline uint64_t _hash_lower(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= _lower(p[i])
        h *= 1099511628211ULL
    return h


cdef inline int _hexdigit(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef inline bint _named(const unsigned char* b, Py_ssize_t i, Py_ssize_t n, const char* name,
                        Py_ssize_t ln) noexcept nogil:
    cdef Py_ssize_t k
    if i + ln > n:
        return False
    for k in range(ln):
        if b[i + k] != <unsigned char>name[k]:
            return False
    return True


cdef int _ref_char(const unsigned char* b, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* nxt,
                   bint* was_ref) noexcept nogil:
    """The character at i, an HTML character reference read as the character it stands
    for (numeric, ``&colon;``, ``&sol;``, ``&period;``); 256 for a non-ASCII one."""
    cdef Py_ssize_t j
    cdef long v = 0
    cdef int digits = 0, h
    was_ref[0] = False
    nxt[0] = i + 1
    if b[i] != 38 or i + 1 >= n:
        return b[i]
    if b[i + 1] == 35:
        j = i + 2
        if j < n and (b[j] == 120 or b[j] == 88):
            j += 1
            while j < n and digits < 8:
                h = _hexdigit(b[j])
                if h < 0:
                    break
                v = v * 16 + h
                j += 1
                digits += 1
        else:
            while j < n and digits < 8 and 48 <= b[j] <= 57:
                v = v * 10 + (b[j] - 48)
                j += 1
                digits += 1
        if digits == 0:
            return 38
        if j < n and b[j] == 59:
            j += 1
        nxt[0] = j
        was_ref[0] = True
        return <int>v if v < 128 else 256
    if _named(b, i, n, b"&colon;", 7):
        nxt[0] = i + 7
        was_ref[0] = True
        return 58
    if _named(b, i, n, b"&sol;", 5):
        nxt[0] = i + 5
        was_ref[0] = True
        return 47
    if _named(b, i, n, b"&period;", 8):
        nxt[0] = i + 8
        was_ref[0] = True
        return 46
    return 38


cdef bint _has_refs(const unsigned char* b, Py_ssize_t n) noexcept nogil:
    """Whether the text holds a character reference a link could be written with."""
    cdef const unsigned char* amp
    cdef Py_ssize_t i = 0
    while i < n:
        amp = <const unsigned char*>memchr(b + i, 38, n - i)
        if amp == NULL:
            return False
        i = amp - b
        if (i + 1 < n and b[i + 1] == 35) or _named(b, i, n, b"&colon;", 7) or _named(b, i, n, b"&sol;", 5):
            return True
        i += 1
    return False


cdef struct Rep:
    Py_ssize_t start    # offset of the scheme
    Py_ssize_t length   # bytes of the scheme replaced
    int target          # index into the scheme table


cdef struct Ctx:
    Py_ssize_t upto     # bytes before this were searched for '<' and '>'
    Py_ssize_t lt, gt   # the last '<' and '>' found there (-1: none)
    Py_ssize_t tag      # the '<' whose attributes were read up to ``pos``
    Py_ssize_t pos


cdef inline void _ctx_init(Ctx* ctx) noexcept nogil:
    ctx.upto = 0
    ctx.lt = ctx.gt = ctx.tag = -1
    ctx.pos = 0


cdef Py_ssize_t _push_rep(Rep** reps, Py_ssize_t* cap, Py_ssize_t count, Py_ssize_t start,
                          Py_ssize_t length, Py_ssize_t target) except -1:
    """Append one replacement to the growable array; return the new count."""
    cdef Rep* grown
    if count == cap[0]:
        cap[0] = cap[0] * 2 if cap[0] else 64
        grown = <Rep*>realloc(reps[0], cap[0] * sizeof(Rep))
        if grown == NULL:
            raise MemoryError()
        reps[0] = grown
    reps[0][count].start = start
    reps[0][count].length = length
    reps[0][count].target = target
    return count + 1


cdef class LinkRewriter:
    """Rewrites link schemes per the scheme map, subject to the domain mode.

    ``LinkRewriter({"http": "awb", "https": "awbs"}, "include", ["example.com"])``
    """

    cdef int mode
    cdef int nschemes
    cdef list _keep        # the bytes objects src/dst point into
    cdef list _dst
    cdef const unsigned char* src[MAX_SCHEMES]
    cdef Py_ssize_t srclen[MAX_SCHEMES]
    cdef const unsigned char* dst[MAX_SCHEMES]
    cdef Py_ssize_t dstlen[MAX_SCHEMES]
    # Open-addressed set of lower-cased domains (offsets into _blob).
    cdef bytes _blob
    cdef const unsigned char* blob
    cdef uint64_t* dhash
    cdef Py_ssize_t* doff
    cdef Py_ssize_t* dlen
    cdef Py_ssize_t dmask
    cdef readonly int ndomains
    # Attribute names (lower case) whose links are rewritten.
    cdef int nattrs
    cdef const unsigned char* attr[MAX_ATTRS]
    cdef Py_ssize_t attrlen[MAX_ATTRS]
    cdef readonly tuple attributes

    def __cinit__(self):
        self.dhash = NULL
        self.doff = NULL
        self.dlen = NULL

    def __dealloc__(self):
        free(self.dhash)
        free(self.doff)
        free(self.dlen)

    def __init__(self, scheme_map, str mode="all", domains=(), attributes=("href",)):
        cdef int i = 0
        self._keep = []
        self._dst = []
        names = tuple(sorted({a.strip().lower() for a in attributes if a.strip()}))
        if len(names) > MAX_ATTRS:
            raise ValueError(f"at most {MAX_ATTRS} link attributes")
        for a in names:
            ab = a.encode("ascii")
            if len(ab) > MAX_ATTR_LEN:
                raise ValueError(f"bad attribute name {a!r}")
            self._keep.append(ab)
            self.attr[i] = <const unsigned char*>PyBytes_AS_STRING(ab)
            self.attrlen[i] = len(ab)
            i += 1
        self.nattrs = i
        self.attributes = names
        i = 0
        if len(scheme_map) > MAX_SCHEMES:
            raise ValueError("at most 8 schemes")
        for k, v in scheme_map.items():
            kb = k.lower().encode("ascii")
            vb = v.encode("ascii")
            if not (0 < len(kb) <= MAX_SCHEME_LEN) or not vb:
                raise ValueError(f"bad scheme {k!r} -> {v!r}")
            self._keep += [kb, vb]
            self._dst.append(vb)
            self.src[i] = <const unsigned char*>PyBytes_AS_STRING(kb)
            self.srclen[i] = len(kb)
            self.dst[i] = <const unsigned char*>PyBytes_AS_STRING(vb)
            self.dstlen[i] = len(vb)
            i += 1
        self.nschemes = i
        if mode == "all":
            self.mode = MODE_ALL
        elif mode == "include":
            self.mode = MODE_INCLUDE
        elif mode == "exclude":
            self.mode = MODE_EXCLUDE
        else:
            raise ValueError(f"bad mode {mode!r}")
        self._set_domains(domains)

    cdef _set_domains(self, domains):
        # "*.example.com" (as lists from CSV often say) means the domain and its subdomains.
        cdef list uniq = sorted({d.strip().lower().lstrip("*").strip(".").encode("idna")
                                 for d in domains if d.strip("*. ")})
        cdef Py_ssize_t size = 8, i, off = 0, slot
        cdef uint64_t h
        while size < 2 * len(uniq) + 2:
            size *= 2
        self._blob = b"".join(uniq)
        self.dhash = <uint64_t*>malloc(size * sizeof(uint64_t))
        self.doff = <Py_ssize_t*>malloc(size * sizeof(Py_ssize_t))
        self.dlen = <Py_ssize_t*>malloc(size * sizeof(Py_ssize_t))
        if self.dhash == NULL or self.doff == NULL or self.dlen == NULL:
            raise MemoryError()
        for i in range(size):
            self.dlen[i] = -1
        self.dmask = size - 1
        self.blob = <const unsigned char*>PyBytes_AS_STRING(self._blob)
        for d in uniq:
            h = _hash_lower(self.blob + off, len(d))
            slot = <Py_ssize_t>(h & <uint64_t>self.dmask)
            while self.dlen[slot] >= 0:
                slot = (slot + 1) & self.dmask
            self.dhash[slot] = h
            self.doff[slot] = off
            self.dlen[slot] = len(d)
            off += len(d)
        self.ndomains = len(uniq)

    cdef bint _has_domain(self, const unsigned char* p, Py_ssize_t n) noexcept nogil:
        cdef uint64_t h = _hash_lower(p, n)
        cdef Py_ssize_t slot = <Py_ssize_t>(h & <uint64_t>self.dmask), k
        cdef const unsigned char* d
        while self.dlen[slot] >= 0:
            if self.dhash[slot] == h and self.dlen[slot] == n:
                d = self.blob + self.doff[slot]
                for k in range(n):
                    if _lower(p[k]) != d[k]:
                        break
                else:
                    return True
            slot = (slot + 1) & self.dmask
        return False

    cdef bint _host_listed(self, const unsigned char* host, Py_ssize_t n) noexcept nogil:
        # The host or any parent domain: "a.b.example.com" matches "example.com".
        cdef Py_ssize_t i
        while n > 0 and host[n - 1] == 46:  # trailing dot
            n -= 1
        if n == 0:
            return False
        if self._has_domain(host, n):
            return True
        for i in range(n):
            if host[i] == 46 and i + 1 < n and self._has_domain(host + i + 1, n - i - 1):
                return True
        return False

    cdef bint _wanted(self, const unsigned char* buf, Py_ssize_t a, Py_ssize_t e) noexcept nogil:
        # a: first byte after "://", e: end of the link.
        cdef Py_ssize_t j = a, hs, he
        if self.mode == MODE_ALL:
            return True
        while j < e and not (CLS[buf[j]] & 4):
            j += 1
        # userinfo: the host follows the last '@' of the authority.
        hs = a
        for he in range(a, j):
            if buf[he] == 64:
                hs = he + 1
        he = hs
        if he < j and buf[he] == 91:  # [IPv6]
            while he < j and buf[he] != 93:
                he += 1
            he = he + 1 if he < j else he
        else:
            # A host name is letters, digits, '.', '-' and '_': anything else (a port,
            # ")" of a CSS url(), "&" of an entity, ",") ends it.
            while he < j and (CLS[buf[he]] & 16):
                he += 1
        if self._host_listed(buf + hs, he - hs):
            return self.mode == MODE_INCLUDE
        return self.mode == MODE_EXCLUDE

    cdef bint _listed_attr(self, const unsigned char* p, Py_ssize_t n) noexcept nogil:
        cdef int a
        cdef Py_ssize_t k
        for a in range(self.nattrs):
            if self.attrlen[a] != n:
                continue
            for k in range(n):
                if _lower(p[k]) != self.attr[a][k]:
                    break
            else:
                return True
        return False

    cdef bint _hyperlink(self, const unsigned char* buf, Py_ssize_t start, Ctx* ctx) noexcept nogil:
        """Whether the link at ``start`` is one to rewrite: in the text, or in the value
        of a listed attribute (a CSS ``url(`` counts as ``style``). ``ctx`` carries what
        the previous call of this pass learnt, so a pass costs O(text) however many links
        a hostile body holds: each byte is searched for '<' and '>' once, and a tag's
        attributes are read once up to the link (the last link's attribute on)."""
        cdef Py_ssize_t lo, p, ns, ne
        cdef const unsigned char* hit
        cdef unsigned char q
        # CSS url(...) (a style attribute or a <style> block): loads an image or a font.
        p = start
        if p > 0 and (buf[p - 1] == 34 or buf[p - 1] == 39):
            p -= 1
        while p > 0 and start - p < 8 and (buf[p - 1] == 32 or buf[p - 1] == 9):
            p -= 1
        if p >= 4 and buf[p - 1] == 40 and _lower(buf[p - 2]) == 108 and _lower(buf[p - 3]) == 114 \
                and _lower(buf[p - 4]) == 117:
            return self._listed_attr(<const unsigned char*>b"style", 5)
        # The last '<' and '>' before the link (searched from where the last call stopped).
        if start < ctx.upto:
            _ctx_init(ctx)
        lo = ctx.upto if start - ctx.upto <= TAG_LOOKBACK else start - TAG_LOOKBACK
        if start > lo:
            hit = <const unsigned char*>memrchr(buf + lo, 60, start - lo)
            if hit != NULL:
                ctx.lt = hit - buf
            hit = <const unsigned char*>memrchr(buf + lo, 62, start - lo)
            if hit != NULL:
                ctx.gt = hit - buf
        ctx.upto = start
        if ctx.lt < 0 or ctx.gt > ctx.lt or start - ctx.lt > TAG_LOOKBACK:
            return True                     # text (or a tag too long to read: rewrite)
        # Read the tag's attributes up to the link: whose value holds it?
        if ctx.tag == ctx.lt and ctx.pos <= start:
            p = ctx.pos                     # the same tag as the last link: go on from there
        else:
            ctx.tag = ctx.lt
            p = ctx.lt + 1
            while p < start and not (buf[p] <= 32 or buf[p] == 47 or buf[p] == 62):
                p += 1
        while p < start:
            while p < start and (buf[p] <= 32 or buf[p] == 47):
                p += 1
            ctx.pos = p
            ns = p
            while p < start and not (buf[p] <= 32 or buf[p] == 61 or buf[p] == 62 or buf[p] == 47):
                p += 1
            ne = p
            while p < start and buf[p] <= 32:
                p += 1
            if p >= start or buf[p] != 61:
                continue                    # a name without a value (or the link itself)
            p += 1
            while p < start and buf[p] <= 32:
                p += 1
            if p >= start:
                return ne > ns and self._listed_attr(buf + ns, ne - ns)     # unquoted value
            q = buf[p]
            if q == 34 or q == 39:
                hit = <const unsigned char*>memchr(buf + p + 1, q, start - p - 1)
                if hit == NULL:
                    return ne > ns and self._listed_attr(buf + ns, ne - ns)
                p = (hit - buf) + 1
            else:
                while p < start and not (buf[p] <= 32 or buf[p] == 62):
                    p += 1
                if p >= start:
                    return ne > ns and self._listed_attr(buf + ns, ne - ns)
        ctx.pos = p
        return True                         # not in an attribute value: "<https://...>" in text

    cdef int _scheme_at(self, const unsigned char* buf, Py_ssize_t colon, Py_ssize_t* start) noexcept nogil:
        """Index of the mapped scheme ending at ``colon``; -2 another scheme, -1 none."""
        cdef Py_ssize_t j = colon, k
        cdef int s
        while j > 0 and colon - j <= MAX_SCHEME_LEN and (CLS[buf[j - 1]] & 1):
            j -= 1
        if colon - j > MAX_SCHEME_LEN or j == colon or not (CLS[buf[j]] & 8):
            return -1
        start[0] = j
        for s in range(self.nschemes):
            if self.srclen[s] != colon - j:
                continue
            for k in range(colon - j):
                if _lower(buf[j + k]) != self.src[s][k]:
                    break
            else:
                return s
        return -2

    cdef Py_ssize_t _scan(self, const unsigned char* buf, Py_ssize_t n, bint truncated,
                          Rep** reps, Py_ssize_t* cap) except -1:
        cdef Py_ssize_t count = 0, i = 0, start = 0, e
        cdef Ctx ctx
        _ctx_init(&ctx)
        cdef const unsigned char* c
        cdef unsigned char quote
        cdef int s
        while i < n:
            c = <const unsigned char*>memchr(buf + i, 58, n - i)
            if c == NULL:
                break
            i = c - buf
            if i + 2 >= n or buf[i + 1] != 47 or buf[i + 2] != 47:
                i += 1
                continue
            s = self._scheme_at(buf, i, &start)
            if s == -1:
                i += 3
                continue
            # Other schemes' links are skipped whole too, so a link nested in a
            # rewritten link's query stays as it is on a second pass (idempotence).
            # The link's end: its opening quote, else the first space or markup byte.
            quote = buf[start - 1] if start > 0 else 0
            if quote == 34 or quote == 39:
                # Quoted (an attribute): spaces may be inside; a stray quote in
                # plain text must not swallow the rest, so a line or tag ends it too.
                e = i + 3
                while e < n and buf[e] != quote and buf[e] != 10 and buf[e] != 13 \
                        and buf[e] != 60 and buf[e] != 62:
                    e += 1
            else:
                e = i + 3
                while e < n and not (CLS[buf[e]] & 2):
                    e += 1
            # A link running into the end of a truncated body may be cut: leave it.
            if s >= 0 and not (truncated and e == n) and e > i + 3 and self._wanted(buf, i + 3, e) \
                    and self._hyperlink(buf, start, &ctx):
                count = _push_rep(reps, cap, count, start, i - start, s)
            i = e if e > i + 3 else i + 3
        return count

    cdef Py_ssize_t _scan_refs(self, const unsigned char* buf, Py_ssize_t n, bint truncated,
                               Rep** reps, Py_ssize_t* cap, Py_ssize_t count) except -1:
        """Links whose scheme or "://" is written with character references
        (``&#104;ttp&#58;//``: a browser opens them like any other): their scheme bytes
        are replaced too. Runs only when the body holds such references at all."""
        cdef Py_ssize_t r = 0, s, j, nx, last = -1, k, hlen, h, scheme_end
        cdef Ctx ctx
        _ctx_init(&ctx)
        cdef const unsigned char* amp
        cdef int ch, idx, m
        cdef bint wr, any_ref
        cdef unsigned char scheme[40]
        cdef unsigned char host[256]
        cdef const char* sep = b"://"
        while r < n:
            amp = <const unsigned char*>memchr(buf + r, 38, n - r)
            if amp == NULL:
                break
            r = amp - buf
            ch = _ref_char(buf, r, n, &nx, &wr)
            if not wr or ch >= 128 or not ((CLS[ch] & 1) or ch == 58 or ch == 47):
                r += 1
                continue
            # The candidate link starts after the nearest delimiter before it.
            s = r
            while s > 0 and r - s < 96 and not (buf[s - 1] <= 32 or buf[s - 1] in b"\"'=<>()`"):
                s -= 1
            r += 1
            if s == last or (s > 0 and r - s >= 96):
                continue
            last = s
            j = s
            k = 0
            any_ref = False
            while j < n and k < 33:
                ch = _ref_char(buf, j, n, &nx, &wr)
                if ch >= 128 or not (CLS[ch] & 1):
                    break
                scheme[k] = _lower(<unsigned char>ch)
                k += 1
                any_ref = any_ref or wr
                j = nx
            scheme_end = j
            if k == 0 or k > 32 or not (CLS[scheme[0]] & 8):
                continue
            for m in range(3):
                if j >= n:
                    break
                ch = _ref_char(buf, j, n, &nx, &wr)
                if ch != sep[m]:
                    break
                any_ref = any_ref or wr
                j = nx
            else:
                m = 3
            if m != 3 or not any_ref:
                continue  # not a link, or a plain one the main scan has seen
            idx = -1
            for m in range(self.nschemes):
                if self.srclen[m] == k:
                    for h in range(k):
                        if scheme[h] != self.src[m][h]:
                            break
                    else:
                        idx = m
                        break
            if idx < 0:
                continue
            # The authority, read through references too; the host follows its last '@'.
            hlen = 0
            while j < n and hlen < 255:
                ch = _ref_char(buf, j, n, &nx, &wr)
                if ch >= 128 or ch <= 32 or ch in b"/?#\\\"'<>`":
                    break
                if ch == 64:
                    hlen = 0
                else:
                    host[hlen] = <unsigned char>ch
                    hlen += 1
                j = nx
            if truncated and j >= n:
                continue  # may be cut
            h = 0
            while h < hlen and (CLS[host[h]] & 16):
                h += 1
            if h == 0:
                continue
            if self.mode != MODE_ALL and self._host_listed(host, h) != (self.mode == MODE_INCLUDE):
                continue
            if not self._hyperlink(buf, s, &ctx):
                continue
            count = _push_rep(reps, cap, count, s, scheme_end - s, idx)
        return count

    cdef Py_ssize_t _scan_all(self, const unsigned char* buf, Py_ssize_t n, bint truncated,
                              Rep** reps, Py_ssize_t* cap) except -1:
        cdef Py_ssize_t count = self._scan(buf, n, truncated, reps, cap), plain = count, a, b, w
        cdef Rep tmp
        if not _has_refs(buf, n):
            return count
        count = self._scan_refs(buf, n, truncated, reps, cap, count)
        if count == plain:
            return count
        # Both scans' replacements in order, none overlapping another.
        for a in range(1, count):
            tmp = reps[0][a]
            b = a
            while b > 0 and reps[0][b - 1].start > tmp.start:
                reps[0][b] = reps[0][b - 1]
                b -= 1
            reps[0][b] = tmp
        w = 0
        for a in range(count):
            if w and reps[0][a].start < reps[0][w - 1].start + reps[0][w - 1].length:
                continue
            reps[0][w] = reps[0][a]
            w += 1
        return w

    def rewrite(self, data, bint truncated=False):
        """(new bytes, number of links rewritten); the input object itself when none."""
        cdef Py_buffer view
        cdef Rep* reps = NULL
        cdef Py_ssize_t cap = 0, count, k, size, pos, w
        cdef char* out
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            count = self._scan_all(<const unsigned char*>view.buf, view.len, truncated, &reps, &cap)
            if count == 0:
                return (data if isinstance(data, bytes) else bytes(data)), 0
            size = view.len
            for k in range(count):
                size += self.dstlen[reps[k].target] - reps[k].length
            result = PyBytes_FromStringAndSize(NULL, size)
            out = PyBytes_AS_STRING(result)
            pos = 0
            w = 0
            for k in range(count):
                memcpy(out + w, <const char*>view.buf + pos, reps[k].start - pos)
                w += reps[k].start - pos
                memcpy(out + w, self.dst[reps[k].target], self.dstlen[reps[k].target])
                w += self.dstlen[reps[k].target]
                pos = reps[k].start + reps[k].length
            memcpy(out + w, <const char*>view.buf + pos, view.len - pos)
            return result, count
        finally:
            free(reps)
            PyBuffer_Release(&view)

    def find(self, data, bint truncated=False):
        """[(offset, scheme length, replacement bytes)] of the links ``rewrite`` changes."""
        cdef Py_buffer view
        cdef Rep* reps = NULL
        cdef Py_ssize_t cap = 0, count, k
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            count = self._scan_all(<const unsigned char*>view.buf, view.len, truncated, &reps, &cap)
            return [(reps[k].start, reps[k].length, self._dst[reps[k].target]) for k in range(count)]
        finally:
            free(reps)
            PyBuffer_Release(&view)
