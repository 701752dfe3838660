# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled WBXML codec: decoder, encoder, span scanner and splice writer.

One pass over one acquired buffer with raw pointers; tag names come from a
precomputed table indexed by (page << 6 | token); output goes through a growable
writer. Every malformed input raises ``WBXMLError`` with the byte offset.
The public face (and the documentation of the formats) is ``seg_fast.eas.wbxml``.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memchr, memcpy

import sys

from seg_fast.errors import SpanLimitError, WBXMLError
from seg_fast.eas import codepages

cimport cython

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    int _PyBytes_Resize(PyObject** obj, Py_ssize_t size) except -1
    # borrowed-pointer list access (no reference counting on the encoder's walk)
    Py_ssize_t _list_size "PyList_GET_SIZE"(PyObject* op)
    void* _type_of "Py_TYPE"(PyObject* op)
    PyObject* _list_item "PyList_GET_ITEM"(PyObject* op, Py_ssize_t i)
    char* _bytes_of "PyBytes_AS_STRING"(PyObject* op)     # borrowed: no reference counting
    int PyGC_Disable()
    int PyGC_Enable()

cdef extern from *:
    """
    /* One pass over an inline string: where its NUL is, and whether any byte before
       it is >= 0x80 (then the string needs a full UTF-8 check). memchr and an ASCII
       test read the bytes twice; body-heavy documents are all string bytes. */
    #include <stdint.h>
    #include <string.h>
    #if defined(__x86_64__) && defined(__GNUC__)
    #include <immintrin.h>
    __attribute__((target("avx2")))
    static const uint8_t* seg_nul_ascii_avx2(const uint8_t* p, const uint8_t* end, int* high) {
        const __m256i zero = _mm256_setzero_si256();
        __m256i acc = zero;
        while (end - p >= 64) {
            __m256i a = _mm256_loadu_si256((const __m256i*)p);
            __m256i b = _mm256_loadu_si256((const __m256i*)(p + 32));
            uint64_t z = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, zero))
                       | ((uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(b, zero)) << 32);
            if (z) {
                int idx = __builtin_ctzll(z);
                uint64_t hi = (uint32_t)_mm256_movemask_epi8(a)
                            | ((uint64_t)(uint32_t)_mm256_movemask_epi8(b) << 32);
                if (idx < 64 && (hi & ((1ULL << idx) - 1))) *high = 1;
                if (_mm256_movemask_epi8(acc)) *high = 1;
                return p + idx;
            }
            acc = _mm256_or_si256(acc, _mm256_or_si256(a, b));
            p += 64;
        }
        if (_mm256_movemask_epi8(acc)) *high = 1;
        for (; p < end; p++) {
            if (*p == 0) return p;
            if (*p & 0x80) *high = 1;
        }
        return NULL;
    }
    static int seg_have_avx2 = -1;
    #endif
    static const uint8_t* seg_nul_ascii(const uint8_t* p, const uint8_t* end, int* high) {
    #if defined(__x86_64__) && defined(__GNUC__)
        if (seg_have_avx2 < 0) seg_have_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
        if (seg_have_avx2) return seg_nul_ascii_avx2(p, end, high);
    #endif
        const uint8_t* nul = (const uint8_t*)memchr(p, 0, end - p);
        const uint8_t* stop = nul ? nul : end;
        for (; p < stop; p++) if (*p & 0x80) { *high = 1; break; }
        return nul;
    }
    """
    const uint8_t* seg_nul_ascii(const uint8_t* p, const uint8_t* end, int* high) nogil


DEFAULT_MAX_SIZE = 64 * 1024 * 1024   # bytes; a gateway bounds what it buffers
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ELEMENTS = 4_000_000   # elements + strings; each costs ~100 bytes
DEFAULT_MAX_SPANS = 1_000_000
# Gather output (encode_parts, splice_parts): a span this long or longer is passed as a
# memoryview of the bytes holding it, not copied. Below ~32 KB a copy costs less than
# one more part through the HTTP writer (h11 bookkeeping per part: a few microseconds).
DEFAULT_MIN_REF = 32 * 1024
# ... and at most this many such spans per document, so that the parts of an answer
# (2 per span + 1, with the HTTP head) fit one writev (sockio.send_parts: 64 buffers).
DEFAULT_MAX_REFS = 30
# the encoder recurses in C: keep the deepest allowed tree far from the stack's end
cdef enum:
    MAX_DEPTH_LIMIT = 4096

cdef enum:
    SWITCH_PAGE = 0x00
    END = 0x01
    ENTITY = 0x02
    STR_I = 0x03
    LITERAL = 0x04
    OPAQUE = 0xC3
    HAS_CONTENT = 0x40
    HAS_ATTRS = 0x80

cdef bytes CANONICAL_HEADER = b"\x03\x01\x6a\x00"   # WBXML 1.3, unknown public id, UTF-8, no string table

# Global tokens a tag position may hold, by name, for error messages.
cdef dict _GLOBAL_NAMES = {
    0x02: "ENTITY", 0x04: "LITERAL", 0x40: "EXT_I_0", 0x41: "EXT_I_1", 0x42: "EXT_I_2",
    0x43: "PI", 0x44: "LITERAL_C", 0x80: "EXT_T_0", 0x81: "EXT_T_1", 0x82: "EXT_T_2",
    0x83: "STR_T (string table reference)", 0x84: "LITERAL_A", 0xC0: "EXT_0",
    0xC1: "EXT_1", 0xC2: "EXT_2", 0xC4: "LITERAL_AC",
}

# (page << 6 | token) -> interned "Namespace:Name"; filled for the known pages,
# lazily for the rest (unknown tokens carry an Unknown0xTT name, see codepages).
cdef list _NAMES = [None] * (256 * 64)
# "Namespace:Name" -> page << 8 | token
cdef dict _TOKENS = {}


cdef _init_tables():
    cdef int page, tok
    for tag, (page, tok) in codepages.TOKENS.items():
        _TOKENS[sys.intern(tag)] = (page << 8) | tok
    for page in codepages.PAGES:
        for tok in range(5, 64):
            _NAMES[(page << 6) | tok] = sys.intern(codepages.tag_name(page, tok))

_init_tables()


cdef object _name_slow(int page, int tok):
    name = sys.intern(codepages.tag_name(page, tok))
    _NAMES[(page << 6) | tok] = name
    return name


cdef inline object _name(int page, int tok):
    cdef PyObject* name = PyList_GET_ITEM(_NAMES, (page << 6) | tok)
    if name == <PyObject*>None:
        return _name_slow(page, tok)
    return <object>name


cdef int _token_of(str tag) except -1:
    cdef object found = _TOKENS.get(tag)
    if found is not None:
        return <int>found
    pair = codepages.lookup(tag)
    if pair is None:
        raise WBXMLError(f"unknown tag {tag!r} (not in the MS-ASWBXML tables)")
    _TOKENS[tag] = (pair[0] << 8) | pair[1]
    return (pair[0] << 8) | pair[1]


def token_of(tag):
    """(page, token) of a qualified tag; WBXMLError if the tables lack it."""
    cdef int packed = _token_of(tag)
    return packed >> 8, packed & 0xFF


# ---------------------------------------------------------------- the tree

cdef struct Node:
    # One element of a decoded canonical document, in document order (a flat array):
    # the lazy tree builds an Element from it when its parent's children are first read.
    uint32_t end         # index one past this element's subtree (its next sibling)
    uint32_t nkids
    uint32_t tag_at      # offset of its tag token
    uint32_t end_at      # offset one past its END (past the tag when it has no content)
    uint32_t toff, tlen1 # text span (length + 1; 0: none)
    uint32_t ooff, olen1 # opaque span, the same way
    uint16_t id          # page << 6 | token
    uint8_t page_after   # the code page in force after its subtree


@cython.no_gc
@cython.final
cdef class _Doc:
    """The node array of one decoded document and the document itself (spans point into it)."""
    cdef Node* nodes
    cdef Py_ssize_t count
    cdef object src

    def __dealloc__(self):
        free(self.nodes)

    def __reduce__(self):       # copy/deepcopy/pickle of a lazy tree
        return _doc_from, (PyBytes_FromStringAndSize(<const char*>self.nodes, self.count * sizeof(Node)),
                           self.src)


def _doc_from(bytes nodes, src):
    cdef _Doc doc = _Doc.__new__(_Doc)
    doc.nodes = <Node*>malloc(max(len(nodes), 1))
    if doc.nodes == NULL:
        raise MemoryError()
    memcpy(doc.nodes, PyBytes_AS_STRING(nodes), len(nodes))
    doc.count = len(nodes) // sizeof(Node)
    doc.src = src
    return doc


@cython.no_gc
@cython.freelist(4096)    # decoding builds and drops many at once
@cython.final
cdef class Element:
    """One WBXML element: qualified tag, children, inline text or opaque bytes.

    ``_fmt`` records, for decoded documents only, how the bytes deviated from the
    canonical encoding (redundant SWITCH_PAGE, split strings, a content flag with
    no content, a non-default header) so that encode(decode(x)) == x. It is
    ignored as soon as it no longer matches the element's content.

    Elements do not take part in cyclic garbage collection (decoding large
    trees fast): an element must not contain itself.

    A decoded element holds its text and opaque content as spans of the decoded
    document (a ``bytes`` object it keeps alive): the ``str``/``bytes`` is built on
    first read, and encode copies the span as it is while the content is unchanged.
    Decode still checks every inline string is UTF-8.
    """
    cdef public str tag
    cdef list _children       # None until the first child: most elements are leaves
    cdef object _text         # the text once built or assigned
    cdef object _opaque
    cdef object _src          # the document the spans point into, or None
    cdef Py_ssize_t _toff, _tlen   # text span: _tlen is its length + 1, 0 if none (see _text)
    cdef Py_ssize_t _ooff, _olen   # opaque span, the same way
    cdef object _tok_tag      # the tag _tok was looked up for (identity)
    cdef int _tok             # page << 8 | token of _tok_tag
    cdef readonly object _fmt
    cdef _Doc _doc            # set while the children are not built yet (lazy): see _kids
    cdef Py_ssize_t _node     # this element's index in _doc.nodes

    def __init__(self, str tag, children=None, text=None, opaque=None):
        self.tag = tag
        self._children = None if children is None else list(children)
        self._text = text
        self._opaque = opaque
        self._tlen = 0
        self._olen = 0
        self._fmt = None
        self._doc = None

    @property
    def text(self):
        """The inline string content (str), or None."""
        return self._get_text()

    @text.setter
    def text(self, value):
        self._text = value
        self._tlen = 0

    @property
    def opaque(self):
        """The OPAQUE content (bytes for decoded documents), or None."""
        return self._get_opaque()

    @opaque.setter
    def opaque(self, value):
        self._opaque = value
        self._olen = 0

    cdef inline object _get_text(self):
        if self._tlen and self._text is None:
            # checked UTF-8 at decode
            self._text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(self._src) + self._toff, self._tlen - 1, NULL)
        return self._text

    cdef inline object _get_opaque(self):
        if self._olen and self._opaque is None:
            self._opaque = PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._src) + self._ooff, self._olen - 1)
        return self._opaque

    cdef inline bint _has_text(self):
        return self._tlen != 0 or self._text is not None

    cdef inline bint _has_opaque(self):
        return self._olen != 0 or self._opaque is not None

    @property
    def children(self):
        """The child elements (a list you may modify)."""
        if self._children is None:
            if self._doc is not None:
                return _kids(self)
            self._children = []
        return self._children

    @children.setter
    def children(self, value):
        self._children = value if type(value) is list else list(value)
        self._doc = None

    def find(self, str tag):
        """The first direct child with this tag, or None."""
        if _kids(self) is not None:
            for child in self._children:
                if isinstance(child, Element) and (<Element>child).tag == tag:
                    return child
        return None

    def findall(self, str tag):
        """Every direct child with this tag, in order."""
        if _kids(self) is None:
            return []
        return [child for child in self._children
                if isinstance(child, Element) and (<Element>child).tag == tag]

    def findtext(self, str tag, default=None):
        """The text of the first direct child with this tag (its opaque bytes
        decoded as UTF-8 if it has no text); ``default`` if there is none."""
        cdef Element child = self.find(tag)
        if child is None:
            return default
        if child._has_text():
            return child._get_text()
        if child._has_opaque():
            return bytes(child._get_opaque()).decode("utf-8", "replace")
        return default

    def iter(self, tag=None):
        """Depth-first, document order, self included; only ``tag`` if given."""
        cdef list out = []
        cdef list stack = [self]
        cdef Element el
        _build_subtree(self)      # everything is visited: build it all in document order
        while stack:
            el = stack.pop()
            if tag is None or el.tag == tag:
                out.append(el)
            if _kids(el):
                stack.extend(reversed(el._children))
        return iter(out)

    def __eq__(self, other):
        if not isinstance(other, Element):
            return NotImplemented
        # iterative: trees may be deeper than the Python recursion limit
        cdef list todo = [(self, other)]
        cdef Element a, b
        cdef list ac, bc
        while todo:
            x, y = todo.pop()
            if x is y:
                continue
            if not isinstance(x, Element) or not isinstance(y, Element):
                if x != y:
                    return False
                continue
            a, b = <Element>x, <Element>y
            if a.tag != b.tag or a._get_text() != b._get_text() or a._get_opaque() != b._get_opaque():
                return False
            ac = _kids(a) or []
            bc = _kids(b) or []
            if len(ac) != len(bc):
                return False
            todo.extend(zip(ac, bc))
        return True

    def __repr__(self):
        parts = [repr(self.tag)]
        if _kids(self):
            parts.append(f"[{len(self._children)} children]")
        if self.text is not None:
            t = self.text if len(self.text) <= 40 else self.text[:37] + "..."
            parts.append(f"text={t!r}")
        if self.opaque is not None:
            parts.append(f"opaque=<{len(self.opaque)} bytes>")
        return f"Element({', '.join(parts)})"

    __hash__ = None


cdef inline list _kids(Element el):
    """el's children list (None if it has none), built from the node array on first use."""
    if el._children is None and el._doc is not None:
        _build_kids(el)
    return el._children


cdef int _build_subtree(Element top) except -1:
    """Builds every Element under an unbuilt element at once, in document order (the
    order encode and iter visit them: neighbours in memory). Nothing below an unbuilt
    element can have been built, so nothing the caller changed is replaced."""
    if top._children is not None or top._doc is None:
        return 0
    cdef _Doc doc = top._doc
    cdef Py_ssize_t k = top._node, j, end = doc.nodes[top._node].end, sp = 0, cap = 16
    cdef PyObject** lists = <PyObject**>malloc(cap * sizeof(PyObject*))
    cdef Py_ssize_t* fill = <Py_ssize_t*>malloc(cap * sizeof(Py_ssize_t))
    cdef Py_ssize_t* want = <Py_ssize_t*>malloc(cap * sizeof(Py_ssize_t))
    cdef void* grown
    cdef Node* nd
    cdef Element child
    cdef list kids
    if lists == NULL or fill == NULL or want == NULL:
        free(lists); free(fill); free(want)
        raise MemoryError()
    try:
        kids = PyList_New(doc.nodes[k].nkids)
        top._children = kids
        top._doc = None
        lists[0] = <PyObject*>kids
        fill[0] = 0
        want[0] = doc.nodes[k].nkids
        sp = 1
        for j in range(k + 1, end):
            nd = &doc.nodes[j]
            child = _make(doc, j)
            Py_INCREF(child)
            PyList_SET_ITEM(<list>lists[sp - 1], fill[sp - 1], child)
            fill[sp - 1] += 1
            if nd.nkids:
                kids = PyList_New(nd.nkids)
                child._children = kids
                child._doc = None
                if sp == cap:
                    cap *= 2
                    grown = realloc(lists, cap * sizeof(PyObject*))
                    if grown == NULL:
                        raise MemoryError()
                    lists = <PyObject**>grown
                    grown = realloc(fill, cap * sizeof(Py_ssize_t))
                    if grown == NULL:
                        raise MemoryError()
                    fill = <Py_ssize_t*>grown
                    grown = realloc(want, cap * sizeof(Py_ssize_t))
                    if grown == NULL:
                        raise MemoryError()
                    want = <Py_ssize_t*>grown
                lists[sp] = <PyObject*>kids
                fill[sp] = 0
                want[sp] = nd.nkids
                sp += 1
            while sp and fill[sp - 1] == want[sp - 1]:
                sp -= 1
    finally:
        free(lists)
        free(fill)
        free(want)
    return 0


cdef Element _make(_Doc doc, Py_ssize_t k):
    cdef Node* nd = &doc.nodes[k]
    cdef Element el = Element.__new__(Element)
    cdef object name = _name(nd.id >> 6, nd.id & 0x3F)
    el.tag = name
    el._tok_tag = name
    el._tok = ((nd.id >> 6) << 8) | (nd.id & 0x3F)
    if nd.tlen1 or nd.olen1:
        el._src = doc.src
        el._toff = nd.toff
        el._tlen = nd.tlen1
        el._ooff = nd.ooff
        el._olen = nd.olen1
    if nd.nkids:
        el._doc = doc
        el._node = k
    return el


cdef int _build_kids(Element el) except -1:
    cdef _Doc doc = el._doc
    cdef Node* nd = &doc.nodes[el._node]
    cdef Py_ssize_t i, j = el._node + 1, n = nd.nkids
    cdef list kids = PyList_New(n)
    cdef Element child
    for i in range(n):
        child = _make(doc, j)
        Py_INCREF(child)
        PyList_SET_ITEM(kids, i, child)
        j = doc.nodes[j].end
    el._children = kids
    el._doc = None
    return 0


# ---------------------------------------------------------------- reading

cdef inline int _mb(const uint8_t* buf, Py_ssize_t end, Py_ssize_t* pos,
                    uint32_t* out) except -1:
    """mb_u_int32 at pos: at most 5 bytes, value < 2**32, no leading zero groups
    (which would not survive re-encoding)."""
    cdef Py_ssize_t start = pos[0], p = pos[0]
    cdef unsigned long long v = 0
    cdef uint8_t b
    if p < end and buf[p] == 0x80:
        raise WBXMLError("mb_u_int32 with a leading zero byte (non-minimal)", start)
    while True:
        if p >= end:
            raise WBXMLError("truncated mb_u_int32", start)
        b = buf[p]
        p += 1
        v = (v << 7) | (b & 0x7F)
        if not (b & 0x80):
            break
        if p - start >= 5:
            raise WBXMLError("mb_u_int32 longer than 5 bytes", start)
    if v > 0xFFFFFFFF:
        raise WBXMLError("mb_u_int32 overflows 32 bits", start)
    pos[0] = p
    out[0] = <uint32_t>v
    return 0


cdef Py_ssize_t _header(const uint8_t* buf, Py_ssize_t n) except -1:
    """Checks the WBXML header; returns the offset of the body."""
    cdef Py_ssize_t pos = 1
    cdef uint32_t publicid, charset, strtbl
    if n < 1:
        raise WBXMLError("empty document: expected the WBXML header", 0)
    if buf[0] > 0x03:
        raise WBXMLError(f"unsupported WBXML version 0x{buf[0]:02X} (expected 0x03)", 0)
    _mb(buf, n, &pos, &publicid)
    if publicid == 0:
        raise WBXMLError("public identifier given as a string-table reference", pos - 1)
    _mb(buf, n, &pos, &charset)
    if charset != 106:
        raise WBXMLError(f"unsupported charset MIBenum {charset} (expected 106, UTF-8)",
                         pos - 1)
    _mb(buf, n, &pos, &strtbl)
    if strtbl > <uint32_t>(n - pos):
        raise WBXMLError(f"string table of {strtbl} bytes runs past the end", pos)
    return pos + strtbl


cdef inline int _not_a_tag(uint8_t b, Py_ssize_t pos) except -1:
    if b & HAS_ATTRS and (b & 0x3F) >= 5:
        raise WBXMLError(f"attributes on tag 0x{b:02X} (EAS uses none)", pos)
    name = _GLOBAL_NAMES.get(b)
    if name is None:
        raise WBXMLError(f"unexpected token 0x{b:02X}", pos)
    raise WBXMLError(f"unsupported global token {name}", pos)


cdef inline object _utf8(const uint8_t* buf, Py_ssize_t start, Py_ssize_t length):
    try:
        return PyUnicode_DecodeUTF8(<const char*>buf + start, length, NULL)
    except UnicodeDecodeError as exc:
        raise WBXMLError("inline string is not valid UTF-8", start + exc.start) from None


cdef class _Buffer:
    """Holds one acquired read-only buffer for the length of a call."""
    cdef Py_buffer view
    cdef bint held

    def __cinit__(self, data):
        PyObject_GetBuffer(data, &self.view, PyBUF_SIMPLE)
        self.held = True

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)


cdef _check_limits(Py_ssize_t n, Py_ssize_t max_size, int max_depth):
    if n > max_size:
        raise WBXMLError(f"document of {n} bytes exceeds the limit of {max_size}", max_size)
    if max_depth < 1 or max_depth > MAX_DEPTH_LIMIT:
        raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH_LIMIT}")


cdef inline bint _is_ascii(const uint8_t* p, Py_ssize_t n) nogil:
    """Whether n bytes are all below 0x80 (8 bytes a step; the compiler vectorises it)."""
    cdef uint64_t acc = 0, w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        acc |= w
        i += 8
    while i < n:
        acc |= p[i]
        i += 1
    return (acc & <uint64_t>0x8080808080808080) == 0


cdef int _grow(PyObject*** kids, Py_ssize_t* cap) except -1:
    cdef Py_ssize_t ncap = cap[0] * 2 if cap[0] else 64
    cdef PyObject** nk = <PyObject**>realloc(kids[0], ncap * sizeof(PyObject*))
    if nk == NULL:
        raise MemoryError()
    kids[0] = nk
    cap[0] = ncap
    return 0


cdef inline int _mb_quiet(const uint8_t* buf, Py_ssize_t end, Py_ssize_t* pos, uint32_t* out):
    """mb_u_int32 as _mb reads it; -1 (no exception) where _mb would raise."""
    cdef Py_ssize_t start = pos[0], p = pos[0]
    cdef unsigned long long v = 0
    cdef uint8_t b
    if p < end and buf[p] == 0x80:
        return -1
    while True:
        if p >= end:
            return -1
        b = buf[p]
        p += 1
        v = (v << 7) | (b & 0x7F)
        if not (b & 0x80):
            break
        if p - start >= 5:
            return -1
    if v > 0xFFFFFFFF:
        return -1
    pos[0] = p
    out[0] = <uint32_t>v
    return 0


cdef Element _decode_lazy(object src, const uint8_t* buf, Py_ssize_t n, int max_depth,
                          Py_ssize_t max_elements):
    """The common case, fast: a well-formed canonical document (header 03 01 6A 00,
    SWITCH_PAGE only where the page changes, per element at most one string then at
    most one opaque then the children, no empty content flag). One pass fills the node
    array; only the root Element is built, the rest on first read. Returns None for
    anything else (malformed or irregular), which the full decoder then handles."""
    if n >= 0xFFFFFFF0 or n < 5 or buf[0] != 3 or buf[1] != 1 or buf[2] != 0x6A or buf[3] != 0:
        return None
    cdef Py_ssize_t pos = 4, count = 0, cap = 64 + n // 24, budget = max_elements, slen
    cdef Node* nodes = <Node*>malloc(cap * sizeof(Node))
    cdef Node* nd
    cdef Node* grown
    cdef uint32_t* opened = <uint32_t*>malloc((max_depth + 1) * sizeof(uint32_t))
    cdef uint8_t* state = <uint8_t*>malloc(max_depth + 1)
    cdef int page = 0, depth = 0, tok, high
    cdef bint sw = False, done = False
    cdef uint8_t b
    cdef uint32_t length
    cdef const uint8_t* nul
    cdef _Doc doc
    if nodes == NULL or opened == NULL or state == NULL:
        free(nodes); free(opened); free(state)
        raise MemoryError()
    try:
        while pos < n:
            b = buf[pos]
            if b == SWITCH_PAGE:
                if sw or pos + 1 >= n or buf[pos + 1] == page:
                    return None
                page = buf[pos + 1]
                pos += 2
                sw = True
                continue
            if sw:
                if (b & 0x3F) < 5:
                    return None
            elif b == END:
                if depth == 0:
                    return None
                depth -= 1
                if state[depth] == 0:        # content flag, no content
                    return None
                nd = &nodes[opened[depth]]
                nd.end = <uint32_t>count
                pos += 1
                nd.end_at = <uint32_t>pos
                nd.page_after = <uint8_t>page
                if depth == 0:
                    done = True
                    break
                continue
            elif b == STR_I:
                if depth == 0 or state[depth - 1] != 0:
                    return None
                high = 0
                nul = seg_nul_ascii(buf + pos + 1, buf + n, &high)
                if nul == NULL:
                    return None
                slen = nul - (buf + pos + 1)
                if high:
                    try:
                        PyUnicode_DecodeUTF8(<const char*>buf + pos + 1, slen, NULL)
                    except UnicodeDecodeError:
                        return None
                nd = &nodes[opened[depth - 1]]
                nd.toff = <uint32_t>(pos + 1)
                nd.tlen1 = <uint32_t>(slen + 1)
                state[depth - 1] = 1
                pos += slen + 2
                budget -= 1
                continue
            elif b == OPAQUE:
                if depth == 0 or state[depth - 1] & 6:
                    return None
                pos += 1
                if _mb_quiet(buf, n, &pos, &length) < 0 or length > <uint32_t>(n - pos):
                    return None
                nd = &nodes[opened[depth - 1]]
                nd.ooff = <uint32_t>pos
                nd.olen1 = length + 1
                state[depth - 1] |= 2
                pos += length
                budget -= 1
                continue
            tok = b & 0x3F
            if tok < 5 or b & HAS_ATTRS or (depth == 0 and count):
                return None
            budget -= 1
            if budget < 0:
                return None
            if count >= cap:
                cap *= 2
                grown = <Node*>realloc(nodes, cap * sizeof(Node))
                if grown == NULL:
                    raise MemoryError()
                nodes = grown
            nd = &nodes[count]
            nd.id = <uint16_t>((page << 6) | tok)
            nd.tag_at = <uint32_t>pos
            nd.nkids = 0
            nd.tlen1 = 0
            nd.olen1 = 0
            nd.toff = 0
            nd.ooff = 0
            if depth:
                nodes[opened[depth - 1]].nkids += 1
                state[depth - 1] |= 4
            sw = False
            pos += 1
            if b & HAS_CONTENT:
                if depth >= max_depth:
                    return None
                opened[depth] = <uint32_t>count
                state[depth] = 0
                depth += 1
            else:
                nd.end = <uint32_t>(count + 1)
                nd.end_at = <uint32_t>pos
                nd.page_after = <uint8_t>page
                if depth == 0:
                    count += 1
                    done = True
                    break
            count += 1
        if not done or pos != n or budget < 0:
            return None
        doc = _Doc.__new__(_Doc)
        doc.nodes = nodes
        doc.count = count
        doc.src = src
        nodes = NULL           # the document owns them now
        root = _make(doc, 0)
        root._src = src        # the encoder's size hint
        return root
    finally:
        free(nodes)
        free(opened)
        free(state)


def decode(data, *, int max_depth=DEFAULT_MAX_DEPTH, Py_ssize_t max_size=DEFAULT_MAX_SIZE,
           Py_ssize_t max_elements=DEFAULT_MAX_ELEMENTS):
    """WBXML bytes -> Element tree. See seg_fast.eas.wbxml."""
    cdef Py_ssize_t budget = max_elements
    cdef object src
    cdef _Buffer hold
    # The elements keep spans of the document: of an immutable copy if it is not bytes.
    if type(data) is bytes:
        src = data
    else:
        hold = _Buffer(data)
        src = PyBytes_FromStringAndSize(<const char*>hold.view.buf, hold.view.len)
        hold = None
    cdef const uint8_t* buf = <const uint8_t*>PyBytes_AS_STRING(src)
    cdef Py_ssize_t n = len(<bytes>src)
    _check_limits(n, max_size, max_depth)
    cdef Element lazy = _decode_lazy(src, buf, n, max_depth, max_elements)
    if lazy is not None:
        return lazy
    cdef Py_ssize_t pos = _header(buf, n)
    cdef Py_ssize_t start, slen, i, cnt
    cdef object header = None
    if pos != 4 or buf[0] != 3 or buf[1] != 1 or buf[2] != 0x6A or buf[3] != 0:
        header = PyBytes_FromStringAndSize(<const char*>buf, pos)

    cdef int page = 0, depth = 0, tok, st, nsw = 0, prev_page = 0, first_sw = 0
    cdef uint8_t b
    cdef uint32_t length
    cdef const uint8_t* nul
    cdef Element root = None, el, parent
    cdef list swlist = None, kidlist
    cdef object pre, s, items
    # per open element: the element (borrowed: held by ``kids`` or ``root``), its
    # content state (1 str, 2 opaque, 4 child, 8 irregular), where its children
    # start in ``kids`` and, once irregular, the exact item sequence
    cdef PyObject** stack = <PyObject**>malloc((max_depth + 1) * sizeof(PyObject*))
    cdef int* state = <int*>malloc((max_depth + 1) * sizeof(int))
    cdef Py_ssize_t* first = <Py_ssize_t*>malloc((max_depth + 1) * sizeof(Py_ssize_t))
    # the children of the open elements, owned references, each list built once
    # at its parent's END (no appends, no list growth)
    cdef PyObject** kids = NULL
    cdef Py_ssize_t nkids = 0, capkids = 0
    cdef list irregular = [None] * (max_depth + 1)
    cdef int gc_was_on
    if state == NULL or stack == NULL or first == NULL:
        free(state)
        free(stack)
        free(first)
        raise MemoryError()
    # the new elements hold only fresh objects, no cycles: let no collection
    # walk the growing tree again and again
    gc_was_on = PyGC_Disable()
    try:
        while pos < n:
            start = pos
            b = buf[pos]
            pos += 1
            if b == SWITCH_PAGE:
                if pos >= n:
                    raise WBXMLError("truncated SWITCH_PAGE", start)
                if nsw == 0:
                    prev_page = page
                    first_sw = buf[pos]
                elif swlist is None:
                    swlist = [first_sw, buf[pos]]
                else:
                    swlist.append(buf[pos])
                page = buf[pos]
                pos += 1
                nsw += 1
                continue
            if nsw and (b & 0x3F) < 5:
                raise WBXMLError("SWITCH_PAGE not followed by a tag", start)
            if b == END:
                if depth == 0:
                    raise WBXMLError("END outside any element", start)
                depth -= 1
                st = state[depth]
                el = <Element>stack[depth]
                cnt = nkids - first[depth]
                if cnt:
                    kidlist = PyList_New(cnt)
                    for i in range(cnt):
                        PyList_SET_ITEM(kidlist, i, <object>kids[first[depth] + i])   # steals
                    nkids = first[depth]
                    el._children = kidlist
                if st & 8:
                    _finish_irregular(el, <list>irregular[depth])
                    irregular[depth] = None
                elif st == 0:   # content flag with no content
                    el._fmt = (None if el._fmt is None else el._fmt[0], (), None)
                if depth == 0:
                    if pos != n:
                        raise WBXMLError("data after the end of the root element", pos)
                    break
                continue
            if b == STR_I or b == OPAQUE:
                if depth == 0:
                    raise WBXMLError("content outside the root element", start)
                budget -= 1
                if budget < 0:
                    raise WBXMLError(f"more than {max_elements} elements and strings", start)
                s = None
                if b == STR_I:
                    nul = <const uint8_t*>memchr(buf + pos, 0, n - pos)
                    if nul == NULL:
                        raise WBXMLError("inline string without its NUL terminator", start)
                    slen = nul - (buf + pos)
                    if not _is_ascii(buf + pos, slen):
                        s = _utf8(buf, pos, slen)     # checks it (and keeps the str)
                    tok = 1
                else:
                    _mb(buf, n, &pos, &length)
                    if length > <uint32_t>(n - pos):
                        raise WBXMLError(f"opaque of {length} bytes runs past the end", start)
                    slen = length
                    tok = 2
                el = <Element>stack[depth - 1]
                st = state[depth - 1]
                if (st & 8) == 0 and ((tok == 1 and st == 0) or (tok == 2 and (st & 6) == 0)):
                    if tok == 1:
                        if s is not None:
                            el._text = s
                        else:
                            el._src = src
                            el._toff = pos
                            el._tlen = slen + 1
                    else:
                        el._src = src
                        el._ooff = pos
                        el._olen = slen + 1
                    state[depth - 1] = st | tok
                else:
                    if s is None:
                        s = (_utf8(buf, pos, slen) if tok == 1
                             else PyBytes_FromStringAndSize(<const char*>buf + pos, slen))
                    if st & 8:
                        (<list>irregular[depth - 1]).append(s)
                    else:
                        items = _canonical_items(el, nkids - first[depth - 1])
                        items.append(s)
                        irregular[depth - 1] = items
                        state[depth - 1] = st | 8
                pos += slen + 1 if tok == 1 else slen
                continue
            tok = b & 0x3F
            if tok < 5 or b & HAS_ATTRS:
                _not_a_tag(b, start)
            # a tag
            budget -= 1
            if budget < 0:
                raise WBXMLError(f"more than {max_elements} elements and strings", start)
            el = Element.__new__(Element)
            s = _name(page, tok)
            el.tag = s
            el._tok_tag = s
            el._tok = (page << 8) | tok
            if nsw:
                if swlist is not None or first_sw == prev_page:
                    pre = tuple(swlist) if swlist is not None else (first_sw,)
                    el._fmt = (pre, None, None)
                nsw = 0
                swlist = None
            if depth == 0:
                if root is not None:
                    raise WBXMLError("a second root element", start)
                root = el
            else:
                if nkids >= capkids:
                    _grow(&kids, &capkids)
                Py_INCREF(el)
                kids[nkids] = <PyObject*>el
                nkids += 1
                if state[depth - 1] & 8:
                    (<list>irregular[depth - 1]).append(nkids - first[depth - 1] - 1)
                state[depth - 1] |= 4
            if b & HAS_CONTENT:
                if depth >= max_depth:
                    raise WBXMLError(f"elements nested deeper than {max_depth}", start)
                stack[depth] = <PyObject*>el
                state[depth] = 0
                first[depth] = nkids
                depth += 1
            elif depth == 0:
                if pos != n:
                    raise WBXMLError("data after the end of the root element", pos)
                break
        else:
            if root is None:
                raise WBXMLError("no root element", pos)
            if nsw:
                raise WBXMLError("SWITCH_PAGE not followed by a tag", n)
            raise WBXMLError(f"truncated: {depth} element(s) still open", n)
    finally:
        for i in range(nkids):         # an error left children unattached
            Py_DECREF(<object>kids[i])
        free(kids)
        free(state)
        free(stack)
        free(first)
        if gc_was_on:
            PyGC_Enable()
    if root._src is None:
        root._src = src      # the encoder's size hint
    if header is not None:
        fmt = root._fmt
        root._fmt = (None if fmt is None else fmt[0], None if fmt is None else fmt[1], header)
    return root


cdef list _canonical_items(Element el, Py_ssize_t nchildren):
    """The item sequence an element with regular content so far was read as."""
    cdef list items = []
    if el._has_text():
        items.append(el._get_text())
    if el._has_opaque():
        items.append(el._get_opaque())
    items.extend(range(nchildren))
    return items


cdef _finish_irregular(Element el, list items):
    strs = [x for x in items if type(x) is str]
    blobs = [x for x in items if type(x) is bytes]
    el._text = "".join(strs) if strs else None
    el._opaque = b"".join(blobs) if blobs else None
    el._tlen = 0
    el._olen = 0
    el._fmt = (None if el._fmt is None else el._fmt[0], tuple(items), None)


# ---------------------------------------------------------------- writing

cdef struct Writer:
    char* buf
    Py_ssize_t len
    Py_ssize_t cap
    PyObject* obj     # when set, buf is this bytes object's storage (one copy less)
    # Gather output (encode_parts / splice_parts): when set, a list of parts; spans of
    # at least min_ref bytes of an immutable bytes object are appended as memoryviews
    # of it (not copied), at most refs_left of them; buf holds the bytes in between.
    PyObject* parts
    Py_ssize_t min_ref
    Py_ssize_t refs_left
    bint direct       # gather output written straight into bytes objects (obj), part by part
    Py_ssize_t hint   # direct: the bytes still expected (sizes the buffer after a view)


cdef inline void _writer_init(Writer* w):
    w.buf = NULL
    w.len = 0
    w.cap = 0
    w.obj = NULL
    w.parts = NULL
    w.min_ref = 0
    w.refs_left = 0
    w.direct = False
    w.hint = 0


cdef int _direct(Writer* w, Py_ssize_t size) except -1:
    """Write straight into a new bytes object of ``size`` (+ slack): no copy at the end."""
    cdef object result = PyBytes_FromStringAndSize(NULL, size + 64)
    Py_INCREF(result)
    w.obj = <PyObject*>result
    w.buf = PyBytes_AS_STRING(result)
    w.cap = size + 64
    w.len = 0
    w.direct = True
    return 0


cdef object _take(Writer* w):
    """The direct output as a bytes object of its length (the writer lets go of it)."""
    _PyBytes_Resize(&w.obj, w.len)     # frees it and sets NULL on failure
    result = <object>w.obj
    Py_DECREF(result)                  # the writer's reference (result holds its own)
    w.obj = NULL
    w.buf = NULL
    w.cap = 0
    return result


cdef inline bint _may_ref(Writer* w, Py_ssize_t n):
    return w.parts != NULL and n >= w.min_ref and w.refs_left > 0


cdef int _flush(Writer* w) except -1:
    """Gather output: the bytes written since the last part become a part."""
    cdef Py_ssize_t n = w.len
    if not n:
        return 0
    if w.direct:
        (<list>w.parts).append(_take(w))
        w.hint -= n
    else:
        (<list>w.parts).append(PyBytes_FromStringAndSize(w.buf, n))
        w.len = 0
    return 0


cdef int _ref(Writer* w, object src, Py_ssize_t off, Py_ssize_t n) except -1:
    """Gather output: n bytes of the bytes object src at off, as a part that points into it."""
    _flush(w)
    if w.direct:
        w.hint -= n
        if w.obj == NULL:
            # The rest goes straight into a new bytes object; most of it may be pointed at
            # too, so start small (a large malloc is an mmap) and let it grow if it must.
            _direct(w, min(max(w.hint, 0), 64 << 10))
    (<list>w.parts).append(memoryview(src)[off:off + n])
    w.refs_left -= 1
    return 0


cdef int _reserve(Writer* w, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef char* nb
    if w.len + extra <= w.cap:
        return 0
    cap = w.cap * 2 if w.cap else 256
    while cap < w.len + extra:
        cap *= 2
    if w.obj != NULL:
        _PyBytes_Resize(&w.obj, cap)     # frees it and sets NULL on failure
        w.buf = PyBytes_AS_STRING(<object>w.obj)
        w.cap = cap
        return 0
    nb = <char*>realloc(w.buf, cap)
    if nb == NULL:
        raise MemoryError()
    w.buf = nb
    w.cap = cap
    return 0


cdef inline int _put(Writer* w, uint8_t b) except -1:
    if w.len >= w.cap:
        _reserve(w, 1)
    w.buf[w.len] = <char>b
    w.len += 1
    return 0


cdef inline int _write(Writer* w, const char* src, Py_ssize_t n) except -1:
    _reserve(w, n)
    memcpy(w.buf + w.len, src, n)
    w.len += n
    return 0


cdef int _put_mb(Writer* w, uint32_t v) except -1:
    cdef uint8_t tmp[5]
    cdef int i = 4
    tmp[4] = v & 0x7F
    v >>= 7
    while v:
        i -= 1
        tmp[i] = (v & 0x7F) | 0x80
        v >>= 7
    return _write(w, <const char*>&tmp[i], 5 - i)


cdef int _put_str(Writer* w, object text) except -1:
    cdef Py_ssize_t size
    cdef const char* u
    if type(text) is not str:
        if not isinstance(text, str):
            raise WBXMLError(f"text must be str, not {type(text).__name__}")
    try:
        u = PyUnicode_AsUTF8AndSize(text, &size)
    except UnicodeEncodeError:
        raise WBXMLError("text is not encodable as UTF-8 (lone surrogate)") from None
    if memchr(u, 0, size) != NULL:
        raise WBXMLError("text contains NUL, which an inline string cannot carry")
    _reserve(w, size + 2)
    w.buf[w.len] = STR_I
    memcpy(w.buf + w.len + 1, u, size)
    w.buf[w.len + 1 + size] = 0
    w.len += size + 2
    return 0


cdef int _put_opaque(Writer* w, object blob) except -1:
    cdef Py_buffer view
    try:
        PyObject_GetBuffer(blob, &view, PyBUF_SIMPLE)
    except TypeError:
        raise WBXMLError(f"opaque must be bytes-like, not {type(blob).__name__}") from None
    try:
        if view.len > 0xFFFFFFFF:
            raise WBXMLError("opaque larger than 4 GiB")
        _put(w, OPAQUE)
        _put_mb(w, <uint32_t>view.len)
        if type(blob) is bytes and _may_ref(w, view.len):
            _ref(w, blob, 0, view.len)
        else:
            _write(w, <const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef bint _items_match(Element el, tuple items):
    """Whether a recorded item sequence still describes el's content."""
    cdef list strs = [], blobs = []
    cdef Py_ssize_t nxt = 0
    for x in items:
        if type(x) is str:
            strs.append(x)
        elif type(x) is bytes:
            blobs.append(x)
        else:
            if x != nxt:
                return False
            nxt += 1
    if nxt != (0 if el._children is None else len(el._children)):
        return False
    if ("".join(strs) if strs else None) != el._get_text():
        return False
    if blobs:
        return el._has_opaque() and b"".join(blobs) == bytes(el._get_opaque())
    return not el._has_opaque()


cdef int _encode(Writer* w, Element el, int* page, int depth, int max_depth) except -1:
    """Canonical elements (no recorded deviations): one reservation, no reference counting."""
    cdef int packed, tpage, tok
    cdef Py_ssize_t i, nchild, need
    cdef PyObject* kids
    cdef PyObject* child
    cdef char* out
    cdef Node* nd
    if el._fmt is not None or el.tag is None or depth > max_depth or el._tok_tag is not el.tag:
        return _encode_general(w, el, page, depth, max_depth)
    if el._tlen == 0 and el._text is not None or el._olen == 0 and el._opaque is not None:
        return _encode_general(w, el, page, depth, max_depth)
    packed = el._tok
    tpage = packed >> 8
    tok = packed & 0x3F
    if el._doc is not None:
        # children never read: unless its own content changed, the element's bytes
        # are the canonical encoding of its subtree (see _decode_lazy); copy them
        nd = &el._doc.nodes[el._node]
        if (nd.id == ((tpage << 6) | tok) and el._tlen == nd.tlen1 and el._olen == nd.olen1
                and (el._tlen or el._text is None) and (el._olen or el._opaque is None)):
            need = 2 + <Py_ssize_t>(nd.end_at - nd.tag_at)
            if w.parts != NULL and _may_ref(w, need - 2):
                if tpage != page[0]:
                    _put(w, SWITCH_PAGE)
                    _put(w, <uint8_t>tpage)
                _ref(w, el._doc.src, nd.tag_at, need - 2)
                page[0] = nd.page_after
                return 0
            if w.len + need > w.cap:
                _reserve(w, need)
            out = w.buf + w.len
            if tpage != page[0]:
                out[0] = SWITCH_PAGE
                out[1] = <char>tpage
                out += 2
            memcpy(out, PyBytes_AS_STRING(el._doc.src) + nd.tag_at, nd.end_at - nd.tag_at)
            w.len = out + (nd.end_at - nd.tag_at) - w.buf
            page[0] = nd.page_after
            return 0
        _build_kids(el)
    if w.parts != NULL and (_may_ref(w, el._tlen - 1) or _may_ref(w, el._olen - 1)):
        return _encode_general(w, el, page, depth, max_depth)     # a span to point at, not copy
    kids = <PyObject*>el._children
    nchild = 0 if kids == <PyObject*>None else _list_size(kids)
    # SWITCH_PAGE (2), tag (1), STR_I + NUL (2), OPAQUE + length (6), END (1)
    need = 12 + (el._tlen + el._olen)
    if w.len + need > w.cap:
        _reserve(w, need)
    out = w.buf + w.len
    if tpage != page[0]:
        out[0] = SWITCH_PAGE
        out[1] = <char>tpage
        out += 2
        page[0] = tpage
    if el._tlen == 0 and el._olen == 0 and nchild == 0:
        out[0] = <char>tok
        w.len = out + 1 - w.buf
        return 0
    out[0] = <char>(tok | HAS_CONTENT)
    out += 1
    if el._tlen:         # a span of the decoded document: copied as it is
        out[0] = STR_I
        memcpy(out + 1, _bytes_of(<PyObject*>el._src) + el._toff, el._tlen - 1)
        out[el._tlen] = 0
        out += el._tlen + 1
    if el._olen:
        out[0] = <char>OPAQUE
        out += 1 + _mb_into(out + 1, <uint32_t>(el._olen - 1))
        memcpy(out, _bytes_of(<PyObject*>el._src) + el._ooff, el._olen - 1)
        out += el._olen - 1
    w.len = out - w.buf
    for i in range(nchild):
        child = _list_item(kids, i)
        if _type_of(child) != <void*>Element:
            _encode_child(w, <object>child, page, depth, max_depth)
        else:
            _encode(w, <Element>child, page, depth + 1, max_depth)
    if w.len >= w.cap:      # END, written here: _put is not inlined (an element in three has children)
        _reserve(w, 1)
    w.buf[w.len] = END
    w.len += 1
    return 0


cdef inline int _mb_into(char* out, uint32_t v):
    """Writes v as mb_u_int32 at out; returns the number of bytes."""
    cdef uint8_t tmp[5]
    cdef int i = 4, n
    tmp[4] = v & 0x7F
    v >>= 7
    while v:
        i -= 1
        tmp[i] = (v & 0x7F) | 0x80
        v >>= 7
    n = 5 - i
    memcpy(out, &tmp[i], n)
    return n


cdef int _encode_general(Writer* w, Element el, int* page, int depth, int max_depth) except -1:
    cdef int packed, tpage, tok
    cdef object fmt = el._fmt, pre = None, items = None, x
    cdef list children = _kids(el)
    cdef Py_ssize_t i, nchild
    if depth > max_depth:
        raise WBXMLError(f"elements nested deeper than {max_depth}")
    if el.tag is None:
        raise WBXMLError("element without a tag")
    if el._tok_tag is el.tag:
        packed = el._tok
    else:
        packed = _token_of(el.tag)
        el._tok_tag = el.tag
        el._tok = packed
    tpage = packed >> 8
    tok = packed & 0x3F
    if fmt is not None:
        pre = fmt[0]
        items = fmt[1]
        if items is not None and not _items_match(el, <tuple>items):
            items = None
        if pre is not None and (not pre or pre[len(pre) - 1] != tpage):
            pre = None
    if pre is not None:
        for x in pre:
            _put(w, SWITCH_PAGE)
            _put(w, <uint8_t>x)
        page[0] = tpage
    elif tpage != page[0]:
        _put(w, SWITCH_PAGE)
        _put(w, <uint8_t>tpage)
        page[0] = tpage
    nchild = 0 if children is None else PyList_GET_SIZE(children)
    if items is not None:
        _put(w, tok | HAS_CONTENT)
        for x in <tuple>items:
            if type(x) is str:
                _put_str(w, x)
            elif type(x) is bytes:
                _put_opaque(w, x)
            else:
                _encode_child(w, children[<Py_ssize_t>x], page, depth, max_depth)
        _put(w, END)
        return 0
    if not el._has_text() and not el._has_opaque() and nchild == 0:
        _put(w, tok)
        return 0
    _put(w, tok | HAS_CONTENT)
    if el._tlen and _may_ref(w, el._tlen - 1):
        _put(w, STR_I)
        _ref(w, el._src, el._toff, el._tlen - 1)
        _put(w, 0)
    elif el._tlen:         # a span of the decoded document: copied as it is
        _reserve(w, el._tlen + 1)
        w.buf[w.len] = STR_I
        memcpy(w.buf + w.len + 1, PyBytes_AS_STRING(el._src) + el._toff, el._tlen - 1)
        w.buf[w.len + el._tlen] = 0
        w.len += el._tlen + 1
    elif el._text is not None:
        _put_str(w, el._text)
    if el._olen:
        _put(w, OPAQUE)
        _put_mb(w, <uint32_t>(el._olen - 1))
        if _may_ref(w, el._olen - 1):
            _ref(w, el._src, el._ooff, el._olen - 1)
        else:
            _write(w, PyBytes_AS_STRING(el._src) + el._ooff, el._olen - 1)
    elif el._opaque is not None:
        _put_opaque(w, el._opaque)
    for i in range(nchild):
        _encode_child(w, <object>PyList_GET_ITEM(children, i), page, depth, max_depth)
    _put(w, END)
    return 0


cdef inline int _encode_child(Writer* w, object child, int* page, int depth,
                              int max_depth) except -1:
    if type(child) is not Element and not isinstance(child, Element):
        raise WBXMLError(f"child must be an Element, not {type(child).__name__}")
    return _encode(w, <Element>child, page, depth + 1, max_depth)


# One writer buffer kept between encodes (up to 4 MiB): no growth by doubling and no
# fresh pages to fault in for each answer. ``_scratch_busy`` guards re-entry (another
# thread may run while encode calls into Python for an unknown tag's lookup).
cdef char* _scratch = NULL
cdef Py_ssize_t _scratch_cap = 0
cdef bint _scratch_busy = False
cdef enum:
    SCRATCH_KEEP = 4 << 20
    DIRECT_OUTPUT = 64 << 10    # decoded documents from this size on are written in place


def encode(Element root, *, int max_depth=DEFAULT_MAX_DEPTH):
    """Element tree -> WBXML bytes. See seg_fast.eas.wbxml."""
    global _scratch, _scratch_cap, _scratch_busy
    cdef Writer w
    cdef int page = 0
    cdef bint own = False
    cdef object header = CANONICAL_HEADER, result
    cdef Py_ssize_t size_hint = 0
    if root._fmt is not None and root._fmt[2] is not None:
        header = root._fmt[2]
    if max_depth < 1 or max_depth > MAX_DEPTH_LIMIT:
        raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH_LIMIT}")
    _writer_init(&w)
    if root._src is not None:
        size_hint = PyBytes_GET_SIZE(root._src)
    if size_hint >= DIRECT_OUTPUT:
        # A large decoded document: write straight into a bytes object of about its
        # size (bodies are copied once, not into a scratch buffer and then again).
        result = PyBytes_FromStringAndSize(NULL, size_hint + 64)
        w.obj = <PyObject*>result
        Py_INCREF(result)
        result = None
        w.buf = PyBytes_AS_STRING(<object>w.obj)
        w.cap = size_hint + 64
        try:
            _write(&w, PyBytes_AS_STRING(header), len(header))
            _encode(&w, root, &page, 1, max_depth)
            _PyBytes_Resize(&w.obj, w.len)
            result = <object>w.obj
            return result
        finally:
            if w.obj != NULL:
                Py_DECREF(<object>w.obj)
    if not _scratch_busy:
        own = _scratch_busy = True
        w.buf = _scratch
        w.cap = _scratch_cap
    try:
        _write(&w, PyBytes_AS_STRING(header), len(header))
        _encode(&w, root, &page, 1, max_depth)
        return PyBytes_FromStringAndSize(w.buf, w.len)
    finally:
        if own and w.cap <= SCRATCH_KEEP:
            _scratch = w.buf
            _scratch_cap = w.cap
        else:
            if own:
                _scratch = NULL
                _scratch_cap = 0
            free(w.buf)
        if own:
            _scratch_busy = False


def encode_parts(Element root, *, int max_depth=DEFAULT_MAX_DEPTH, Py_ssize_t min_ref=DEFAULT_MIN_REF,
                 Py_ssize_t max_refs=DEFAULT_MAX_REFS):
    """``encode`` as a list of parts (gather output, for writev): ``b"".join(parts) ==
    encode(root)``. A decoded string or opaque span, an unread subtree, or an assigned
    ``bytes`` opaque of at least ``min_ref`` bytes is a memoryview of the bytes that hold
    it (at most ``max_refs`` of them), not a copy; the rest is copied into bytes parts."""
    global _scratch, _scratch_cap, _scratch_busy
    cdef Writer w
    cdef int page = 0
    cdef bint own = False
    cdef object header = CANONICAL_HEADER
    cdef list parts = []
    if root._fmt is not None and root._fmt[2] is not None:
        header = root._fmt[2]
    if max_depth < 1 or max_depth > MAX_DEPTH_LIMIT:
        raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH_LIMIT}")
    _writer_init(&w)
    w.parts = <PyObject*>parts
    w.min_ref = max(min_ref, 1)
    w.refs_left = max_refs
    if root._src is not None and PyBytes_GET_SIZE(root._src) >= DIRECT_OUTPUT:
        # A large decoded document: its parts are written in place (see encode)
        _direct(&w, PyBytes_GET_SIZE(root._src))
        w.hint = PyBytes_GET_SIZE(root._src)
        try:
            _write(&w, PyBytes_AS_STRING(header), len(header))
            _encode(&w, root, &page, 1, max_depth)
            _flush(&w)
            return parts
        finally:
            if w.obj != NULL:
                Py_DECREF(<object>w.obj)
    if not _scratch_busy:
        own = _scratch_busy = True
        w.buf = _scratch
        w.cap = _scratch_cap
    try:
        _write(&w, PyBytes_AS_STRING(header), len(header))
        _encode(&w, root, &page, 1, max_depth)
        _flush(&w)
        return parts
    finally:
        if own and w.cap <= SCRATCH_KEEP:
            _scratch = w.buf
            _scratch_cap = w.cap
        else:
            if own:
                _scratch = NULL
                _scratch_cap = 0
            free(w.buf)
        if own:
            _scratch_busy = False


# ---------------------------------------------------------------- scanning

cdef class Span:
    """Where the content of one wanted element lies in a document.

    ``offset``/``length``: the content bytes (the string without its NUL, or the
    opaque payload). ``token_start``/``token_end``: the whole STR_I or OPAQUE token,
    prefix and terminator included. ``kind``: "str" or "opaque". ``path``: the
    tags of the enclosing elements, root first (the element itself excluded);
    ``path_offsets``: the byte offset of each of those elements' tag token, so
    spans with equal ``within("AirSync:Add")`` belong to the same Add item.
    ``element_offset``: offset of the element's own tag token. ``index``: the
    token's place among the element's string/opaque tokens (0 unless split).
    ``doc_len``: length of the scanned document (splice checks it).

    A whole element asked for with ``scan(..., elements=...)`` has kind "element":
    ``offset``/``length`` cover its tag token to its END (the element itself),
    ``token_start``/``token_end`` the bytes a removal cuts (the SWITCH_PAGEs right
    before the tag included); ``page_before`` is the code page in force before
    those bytes and ``page_after`` the one in force after them.
    """
    cdef readonly str tag
    cdef readonly str kind
    cdef readonly Py_ssize_t offset, length, token_start, token_end
    cdef readonly Py_ssize_t element_offset, index, doc_len
    cdef readonly tuple path, path_offsets
    cdef readonly int page_before, page_after

    def within(self, str tag):
        """Offset of the nearest enclosing element with this tag, or None."""
        cdef Py_ssize_t i
        for i in range(len(self.path) - 1, -1, -1):
            if self.path[i] == tag:
                return self.path_offsets[i]
        return None

    def removable(self, data):
        """True if splice can cut this element out of ``data`` byte-exactly (every
        other token keeps its bytes and its meaning)."""
        return self.cut(data) is not None

    def cut(self, data):
        """(start, end): the bytes splice removes for this element, or None if it cannot."""
        cdef _Buffer hold = _Buffer(data)
        cdef Py_ssize_t guard
        cdef Py_ssize_t start = _cut_start(<const uint8_t*>hold.view.buf, hold.view.len, self, &guard)
        return None if start < 0 else (start, self.token_end)

    def __repr__(self):
        return (f"Span({self.tag!r}, {self.kind}, offset={self.offset}, "
                f"length={self.length}, path={'/'.join(self.path)})")


cdef Py_ssize_t _cut_start(const uint8_t* buf, Py_ssize_t n, Span sp, Py_ssize_t* guard):
    """Where a byte-exact removal of the element starts, or -1 (re-encoding code pages
    is not splice's job: the tokens after the cut must read as before). ``guard``: the
    last byte whose token the decision relied on (another cut must start after it), or -1."""
    guard[0] = -1
    # An element of this very document, not the root.
    if sp.kind != "element" or sp.doc_len != n or sp.token_end > n or not sp.path:
        return -1
    cdef bint switched = sp.token_start != sp.offset
    cdef Py_ssize_t k
    if (buf[sp.offset] & 0x3F) < 5:
        return -1
    if switched:
        # token_start..offset must be nothing but SWITCH_PAGEs (the run before the tag).
        if (sp.offset - sp.token_start) & 1:
            return -1
        k = sp.token_start
        while k < sp.offset:
            if buf[k] != SWITCH_PAGE:
                return -1
            k += 2
    if buf[sp.offset] & HAS_CONTENT and buf[sp.token_end - 1] != END:
        return -1
    # 1. Cut the SWITCH_PAGE before it too: the page in force after the cut is the one
    #    before it; fine if that is the page the followers need, or if only ENDs come
    #    before the next SWITCH_PAGE (ENDs do not depend on the page).
    if sp.page_before == sp.page_after:
        return sp.token_start
    cdef Py_ssize_t q = sp.token_end
    while q < n and buf[q] == END:
        q += 1
    if q == n or buf[q] == SWITCH_PAGE:
        guard[0] = q
        return sp.token_start
    # 2. Leave those SWITCH_PAGEs to the next tag, when the page they end on (the last
    #    one's, right before the tag) is the one the followers need.
    q = sp.token_end
    if switched and buf[sp.offset - 1] == sp.page_after and q < n and (buf[q] & 0x3F) >= 5 \
            and buf[q] != STR_I and buf[q] != OPAQUE and not buf[q] & HAS_ATTRS:
        guard[0] = q
        return sp.offset
    return -1


cdef tuple _path_of(int* ids, Py_ssize_t* at, int count):
    cdef tuple path = PyTuple_New(count)
    cdef tuple offs = PyTuple_New(count)
    cdef object name, o
    cdef int i
    for i in range(count):
        name = _name(ids[i] >> 6, ids[i] & 0x3F)
        Py_INCREF(name)
        PyTuple_SET_ITEM(path, i, name)
        o = at[i]
        Py_INCREF(o)
        PyTuple_SET_ITEM(offs, i, o)
    return (path, offs)


cdef Span _element_span(int kid, Py_ssize_t tag_at, Py_ssize_t cut_at, Py_ssize_t end, int page_before,
                        int page_after, Py_ssize_t n, tuple path):
    cdef Span sp = Span.__new__(Span)
    sp.tag = _name(kid >> 6, kid & 0x3F)
    sp.kind = "element"
    sp.offset = tag_at
    sp.length = end - tag_at
    sp.token_start = cut_at
    sp.token_end = end
    sp.element_offset = tag_at
    sp.index = 0
    sp.doc_len = n
    sp.page_before = page_before
    sp.page_after = page_after
    sp.path, sp.path_offsets = path
    return sp


def scan(data, tags, *, elements=(), int max_depth=DEFAULT_MAX_DEPTH,
         Py_ssize_t max_size=DEFAULT_MAX_SIZE, Py_ssize_t max_spans=DEFAULT_MAX_SPANS):
    """One pass, no tree: Spans of the string/opaque content of the wanted tags, and
    (kind "element", reported at their end) of the whole ``elements`` wanted."""
    cdef uint8_t wanted[256 * 64]
    cdef int packed, i
    for i in range(256 * 64):
        wanted[i] = 0
    for tag in tags:
        packed = _token_of(tag)
        wanted[((packed >> 8) << 6) | (packed & 0x3F)] |= 1
    for tag in elements:
        packed = _token_of(tag)
        wanted[((packed >> 8) << 6) | (packed & 0x3F)] |= 2

    cdef _Buffer hold = _Buffer(data)
    cdef const uint8_t* buf = <const uint8_t*>hold.view.buf
    cdef Py_ssize_t n = hold.view.len
    _check_limits(n, max_size, max_depth)
    cdef Py_ssize_t pos = _header(buf, n)
    cdef Py_ssize_t start, cstart, clen
    cdef int page = 0, depth = 0, tok, nsw = 0, kid, sw_page = 0
    cdef Py_ssize_t sw_at = 0
    cdef bint seen_root = False
    cdef uint8_t b
    cdef uint32_t length
    cdef const uint8_t* nul
    cdef list spans = []
    cdef Span sp
    cdef int* ids = <int*>malloc((max_depth + 1) * sizeof(int))
    cdef int* ntok = <int*>malloc((max_depth + 1) * sizeof(int))
    cdef Py_ssize_t* at = <Py_ssize_t*>malloc((max_depth + 1) * sizeof(Py_ssize_t))
    # per open element: where a removal would cut (a SWITCH_PAGE before its tag) and the page before
    cdef Py_ssize_t* cut = <Py_ssize_t*>malloc((max_depth + 1) * sizeof(Py_ssize_t))
    cdef int* pbefore = <int*>malloc((max_depth + 1) * sizeof(int))
    # The last path built, shared by every span until an element it names is replaced:
    # a deep document's spans then cost one tuple pair, not one each (issue 9: 999k
    # spans at depth 60 took 1.16 GB).
    cdef tuple cpath = None
    cdef int ccount = -1, clean = 0
    if ids == NULL or at == NULL or ntok == NULL or cut == NULL or pbefore == NULL:
        free(ids); free(at); free(ntok); free(cut); free(pbefore)
        raise MemoryError()
    try:
        while pos < n:
            start = pos
            b = buf[pos]
            pos += 1
            if b == SWITCH_PAGE:
                if pos >= n:
                    raise WBXMLError("truncated SWITCH_PAGE", start)
                if not nsw:
                    # A run of SWITCH_PAGEs before a tag: a cut takes the whole run (a
                    # switch left behind would dangle), the page before it is the run's.
                    sw_at, sw_page = start, page
                page = buf[pos]
                pos += 1
                nsw = 1
                continue
            if nsw and (b & 0x3F) < 5:
                raise WBXMLError("SWITCH_PAGE not followed by a tag", start)
            if b == END:
                if depth == 0:
                    raise WBXMLError("END outside any element", start)
                depth -= 1
                if wanted[ids[depth]] & 2:
                    if PyList_GET_SIZE(spans) >= max_spans:
                        raise SpanLimitError(f"more than {max_spans} spans", start)
                    if ccount != depth or clean < depth:
                        cpath, ccount, clean = _path_of(ids, at, depth), depth, depth
                    spans.append(_element_span(ids[depth], at[depth], cut[depth], pos, pbefore[depth], page,
                                               n, cpath))
                if depth == 0:
                    if pos != n:
                        raise WBXMLError("data after the end of the root element", pos)
                    break
                continue
            if b == STR_I or b == OPAQUE:
                if depth == 0:
                    raise WBXMLError("content outside the root element", start)
                if b == STR_I:
                    nul = <const uint8_t*>memchr(buf + pos, 0, n - pos)
                    if nul == NULL:
                        raise WBXMLError("inline string without its NUL terminator", start)
                    cstart = pos
                    clen = nul - (buf + pos)
                    pos = cstart + clen + 1
                else:
                    _mb(buf, n, &pos, &length)
                    if length > <uint32_t>(n - pos):
                        raise WBXMLError(f"opaque of {length} bytes runs past the end", start)
                    cstart = pos
                    clen = length
                    pos += length
                kid = ids[depth - 1]
                if wanted[kid] & 1:
                    if PyList_GET_SIZE(spans) >= max_spans:
                        raise SpanLimitError(f"more than {max_spans} spans", start)
                    sp = Span.__new__(Span)
                    sp.tag = _name(kid >> 6, kid & 0x3F)
                    sp.kind = "str" if b == STR_I else "opaque"
                    sp.offset = cstart
                    sp.length = clen
                    sp.token_start = start
                    sp.token_end = pos
                    sp.element_offset = at[depth - 1]
                    sp.index = ntok[depth - 1]
                    sp.doc_len = n
                    if ccount != depth - 1 or clean < depth - 1:
                        cpath, ccount, clean = _path_of(ids, at, depth - 1), depth - 1, depth - 1
                    sp.path, sp.path_offsets = cpath
                    spans.append(sp)
                ntok[depth - 1] += 1
                continue
            tok = b & 0x3F
            if tok < 5 or b & HAS_ATTRS:
                _not_a_tag(b, start)
            if depth == 0:
                if seen_root:
                    raise WBXMLError("a second root element", start)
                seen_root = True
            if b & HAS_CONTENT:
                if depth >= max_depth:
                    raise WBXMLError(f"elements nested deeper than {max_depth}", start)
                ids[depth] = (page << 6) | tok
                at[depth] = start
                if depth < clean:
                    clean = depth
                ntok[depth] = 0
                cut[depth] = sw_at if nsw else start
                pbefore[depth] = sw_page if nsw else page
                depth += 1
            elif wanted[(page << 6) | tok] & 2:
                if PyList_GET_SIZE(spans) >= max_spans:
                    raise SpanLimitError(f"more than {max_spans} spans", start)
                if ccount != depth or clean < depth:
                    cpath, ccount, clean = _path_of(ids, at, depth), depth, depth
                spans.append(_element_span((page << 6) | tok, start, sw_at if nsw else start, pos,
                                           sw_page if nsw else page, page, n, cpath))
            nsw = 0
            if not b & HAS_CONTENT and depth == 0:
                if pos != n:
                    raise WBXMLError("data after the end of the root element", pos)
                break
        else:
            if not seen_root:
                raise WBXMLError("no root element", pos)
            if nsw:
                raise WBXMLError("SWITCH_PAGE not followed by a tag", n)
            raise WBXMLError(f"truncated: {depth} element(s) still open", n)
    finally:
        free(ids)
        free(at)
        free(ntok)
        free(cut)
        free(pbefore)
    return spans


cdef inline int _run(Writer* w, object src, const uint8_t* buf, Py_ssize_t off, Py_ssize_t n) except -1:
    """Bytes of the spliced document kept as they are: pointed at when long enough (gather
    output of an immutable bytes document), else copied."""
    if src is not None and _may_ref(w, n):
        return _ref(w, src, off, n)
    return _write(w, <const char*>buf + off, n)


cdef int _splice(Writer* w, object data, object replacements) except -1:
    cdef _Buffer hold = _Buffer(data)
    cdef const uint8_t* buf = <const uint8_t*>hold.view.buf
    cdef Py_ssize_t n = hold.view.len, cur = 0, start, guard = -1
    cdef Span sp
    # parts may point into the document only if it cannot change under them
    cdef object src = data if type(data) is bytes and w.parts != NULL else None
    ordered = sorted(replacements, key=lambda r: (<Span?>r[0]).token_start)
    _direct(w, n)          # about the document's size, written in place (no copy at the end)
    w.hint = n
    for span, value in ordered:
        sp = <Span?>span
        if sp.doc_len != n or sp.token_end > n or sp.token_start < cur:
            raise ValueError("span does not belong to this document or overlaps another")
        if sp.token_start <= guard:
            raise ValueError("a cut relied on the tokens another edit changes")
        if sp.kind == "element" or value is None:
            start = _cut_start(buf, n, sp, &guard) if value is None else -1
            if start < 0:
                raise ValueError(f"{sp.tag} cannot be cut out of this document as it is")
            _run(w, src, buf, cur, start - cur)
            cur = sp.token_end
            continue
        if buf[sp.token_start] != (STR_I if sp.kind == "str" else OPAQUE):
            raise ValueError("span does not belong to this document")
        _run(w, src, buf, cur, sp.token_start - cur)
        if isinstance(value, str):
            _put_str(w, value)
        else:
            _put_opaque(w, value)
        cur = sp.token_end
    _run(w, src, buf, cur, n - cur)
    return 0


def splice(data, replacements):
    """A new document with the content of the given spans replaced.

    Each replacement is (span, value): a ``str`` is written as an inline string
    (STR_I), a bytes-like value as OPAQUE; so the kind follows the value's type
    (pass ``str`` for a "str" span to keep its kind). An "element" span with the
    value None is cut out whole (ValueError unless ``span.removable(data)``).
    Spans must come from ``scan`` of this very document and must not overlap.
    """
    cdef Writer w
    _writer_init(&w)
    try:
        _splice(&w, data, replacements)
        return _take(&w)
    finally:
        if w.obj != NULL:
            Py_DECREF(<object>w.obj)


def splice_parts(data, replacements, *, Py_ssize_t min_ref=DEFAULT_MIN_REF,
                 Py_ssize_t max_refs=DEFAULT_MAX_REFS):
    """``splice`` as a list of parts (gather output, for writev): ``b"".join(parts) ==
    splice(data, replacements)``. Unchanged runs of ``data`` (when it is ``bytes``) and
    bytes replacement values of at least ``min_ref`` bytes are memoryviews of them, at
    most ``max_refs`` of them; everything else is copied into bytes parts."""
    cdef Writer w
    cdef list parts = []
    _writer_init(&w)
    w.parts = <PyObject*>parts
    w.min_ref = max(min_ref, 1)
    w.refs_left = max_refs
    try:
        _splice(&w, data, replacements)
        _flush(&w)
        return parts
    finally:
        if w.obj != NULL:
            Py_DECREF(<object>w.obj)
