# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""AES-GCM over megabytes without the GIL (compiled).

cryptography's AEAD calls hold the GIL for as long as they run (~0.6 ms a megabyte
here), so a sealed 10 MB attachment in a worker thread kept the event loop waiting.
This calls OpenSSL's EVP interface, from the libcrypto Python's own ``_hashlib`` is
linked against (already loaded), with the GIL released. The bytes are AES-GCM's as
``cryptography``'s AESGCM makes them (tests/test_content_base64.py checks against it);
where libcrypto cannot be found ``HAVE_LIBCRYPTO`` is False and the caller keeps using
cryptography.

``TextSeal`` is a streamed fetch's whole step (proxy/sealstream.py): base64 text in, the
base64 of its AES-GCM out, a cache-sized chunk at a time through one scratch buffer. The
same step as three Python-level calls (pybase64 decode, GcmStream.update, pybase64 encode,
with their carries joined and sliced) made four new buffers of each read and was ~24% of
a worker's busy time in a sealed 10 MiB fetch (py-spy, benchmarks/big_fetch_tail.py
--security on); here ~19%.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdlib cimport free, malloc


cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject** bytes, Py_ssize_t newsize) except -1
    # A new bytes object as a raw reference, so that it can be shrunk in place (its only one).
    PyObject* _new_bytes "PyBytes_FromStringAndSize"(const char* v, Py_ssize_t n)
    char* _bytes_data "PyBytes_AS_STRING"(PyObject* o) nogil

ctypedef void* (*_new_t)() noexcept nogil
ctypedef void (*_free_t)(void* ctx) noexcept nogil
ctypedef const void* (*_cipher_t)() noexcept nogil
ctypedef int (*_init_t)(void* ctx, const void* cipher, void* engine, const unsigned char* key,
                        const unsigned char* iv) noexcept nogil
ctypedef int (*_ctrl_t)(void* ctx, int type, int arg, void* ptr) noexcept nogil
ctypedef int (*_update_t)(void* ctx, unsigned char* out, int* outl, const unsigned char* inp,
                          int inl) noexcept nogil
ctypedef int (*_final_t)(void* ctx, unsigned char* out, int* outl) noexcept nogil

cdef _new_t _ctx_new = NULL
cdef _free_t _ctx_free = NULL
cdef _cipher_t _aes_128_gcm = NULL
cdef _cipher_t _aes_192_gcm = NULL
cdef _cipher_t _aes_256_gcm = NULL
cdef _init_t _encrypt_init = NULL
cdef _ctrl_t _ctrl = NULL
cdef _update_t _encrypt_update = NULL
cdef _final_t _encrypt_final = NULL

cdef int _GCM_SET_IVLEN = 0x9
cdef int _GCM_GET_TAG = 0x10
# EVP_EncryptUpdate takes an int length: a gigabyte per call.
cdef Py_ssize_t _STEP = 1 << 30


cdef void _load():
    global _ctx_new, _ctx_free, _aes_128_gcm, _aes_192_gcm, _aes_256_gcm
    global _encrypt_init, _ctrl, _encrypt_update, _encrypt_final
    try:
        from seg_fast import openssl
        lib = openssl.libcrypto()
        if lib is None:
            return
        funcs = openssl.addresses(lib, (
            "EVP_CIPHER_CTX_new", "EVP_CIPHER_CTX_free", "EVP_aes_128_gcm", "EVP_aes_192_gcm", "EVP_aes_256_gcm",
            "EVP_EncryptInit_ex", "EVP_CIPHER_CTX_ctrl", "EVP_EncryptUpdate", "EVP_EncryptFinal_ex"))
    except Exception:       # no libcrypto to be found: cryptography does the work (with the GIL)
        return
    if not all(funcs):
        return
    _ctx_new = <_new_t><size_t>funcs[0]
    _ctx_free = <_free_t><size_t>funcs[1]
    _aes_128_gcm = <_cipher_t><size_t>funcs[2]
    _aes_192_gcm = <_cipher_t><size_t>funcs[3]
    _aes_256_gcm = <_cipher_t><size_t>funcs[4]
    _encrypt_init = <_init_t><size_t>funcs[5]
    _ctrl = <_ctrl_t><size_t>funcs[6]
    _encrypt_update = <_update_t><size_t>funcs[7]
    _encrypt_final = <_final_t><size_t>funcs[8]


_load()
HAVE_LIBCRYPTO = _encrypt_update != NULL


cdef class GcmStream:
    """AES-GCM a piece at a time (an attachment sealed while its answer streams): the same
    bytes as gcm_seal_into of the pieces joined. ``GcmStream(key, nonce, aad)`` (key 16, 24
    or 32 bytes; ``aad`` authenticated); ``update(piece)`` -> its ciphertext (GCM writes as
    many bytes as it reads), without the GIL; ``final()`` -> the 16-byte tag (the stream is
    done then)."""

    cdef void* ctx
    cdef bint done

    def __cinit__(self, key, nonce, aad):
        cdef Py_buffer k, iv, a
        cdef const void* cipher
        cdef int outl = 0, ok = 0
        self.ctx = NULL
        self.done = False
        if _encrypt_update == NULL:
            raise RuntimeError("libcrypto not available")
        PyObject_GetBuffer(key, &k, PyBUF_SIMPLE)
        try:
            cipher = (_aes_128_gcm() if k.len == 16 else _aes_192_gcm() if k.len == 24
                      else _aes_256_gcm() if k.len == 32 else NULL)
            if cipher == NULL:
                raise ValueError("AES key must be 16, 24 or 32 bytes")
            PyObject_GetBuffer(nonce, &iv, PyBUF_SIMPLE)
            try:
                if iv.len < 1 or iv.len > 128:
                    raise ValueError("bad GCM nonce length")
                PyObject_GetBuffer(aad, &a, PyBUF_SIMPLE)
                try:
                    if a.len > 0x7FFFFFFF:
                        raise ValueError("associated data too long")
                    self.ctx = _ctx_new()
                    if self.ctx == NULL:
                        raise MemoryError()
                    ok = (_encrypt_init(self.ctx, cipher, NULL, NULL, NULL) == 1
                          and _ctrl(self.ctx, _GCM_SET_IVLEN, <int>iv.len, NULL) == 1
                          and _encrypt_init(self.ctx, NULL, NULL, <const unsigned char*>k.buf,
                                            <const unsigned char*>iv.buf) == 1
                          and (a.len == 0 or _encrypt_update(self.ctx, NULL, &outl,
                                                             <const unsigned char*>a.buf, <int>a.len) == 1))
                    if not ok:
                        raise RuntimeError("OpenSSL AES-GCM failed")
                finally:
                    PyBuffer_Release(&a)
            finally:
                PyBuffer_Release(&iv)
        finally:
            PyBuffer_Release(&k)

    def __dealloc__(self):
        if self.ctx != NULL:
            _ctx_free(self.ctx)
            self.ctx = NULL

    cdef int _update(self, const unsigned char* data, Py_ssize_t n, unsigned char* out) noexcept nogil:
        """Ciphertext of data (n bytes) into out (n bytes); 1 when OpenSSL says so."""
        cdef int outl = 0, ok = 1
        cdef Py_ssize_t at = 0, take, w = 0
        while ok and at < n:
            take = n - at if n - at < _STEP else _STEP
            ok = _encrypt_update(self.ctx, out + w, &outl, data + at, <int>take) == 1
            w += outl
            at += take
        return ok and w == n

    cdef int _final(self, unsigned char* tag) noexcept nogil:
        """The 16-byte tag into tag; 1 when OpenSSL says so."""
        cdef unsigned char rest[32]
        cdef int outl = 0
        self.done = True
        return _encrypt_final(self.ctx, rest, &outl) == 1 and outl == 0 \
            and _ctrl(self.ctx, _GCM_GET_TAG, 16, tag) == 1

    def update(self, data):
        """The ciphertext of ``data`` (any buffer), as new bytes."""
        cdef Py_buffer d
        cdef int ok
        cdef unsigned char* o
        if self.done or self.ctx == NULL:
            raise ValueError("GcmStream already finalized")
        PyObject_GetBuffer(data, &d, PyBUF_SIMPLE)
        try:
            out = PyBytes_FromStringAndSize(NULL, d.len)
            o = <unsigned char*>PyBytes_AS_STRING(out)
            with nogil:
                ok = self._update(<const unsigned char*>d.buf, d.len, o)
            if not ok:
                raise RuntimeError("OpenSSL AES-GCM failed")
            return out
        finally:
            PyBuffer_Release(&d)

    def final(self):
        """The 16-byte tag."""
        cdef unsigned char tag[16]
        if self.done or self.ctx == NULL:
            raise ValueError("GcmStream already finalized")
        if not self._final(tag):
            raise RuntimeError("OpenSSL AES-GCM failed")
        return PyBytes_FromStringAndSize(<char*>tag, 16)


def gcm_seal_into(key, nonce, aad, data, out):
    """AES-GCM of ``data`` under ``key`` (16, 24 or 32 bytes) and ``nonce``, ``aad``
    authenticated: the ciphertext then the 16-byte tag written into the writable buffer
    ``out`` (exactly len(data) + 16 bytes), without the GIL."""
    cdef Py_buffer d, o
    cdef GcmStream gcm = GcmStream(key, nonce, aad)
    cdef int ok
    PyObject_GetBuffer(data, &d, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &o, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if o.len != d.len + 16:
                raise ValueError("out must be len(data) + 16 bytes")
            with nogil:
                ok = (gcm._update(<const unsigned char*>d.buf, d.len, <unsigned char*>o.buf)
                      and gcm._final(<unsigned char*>o.buf + d.len))
            if not ok:
                raise RuntimeError("OpenSSL AES-GCM failed")
        finally:
            PyBuffer_Release(&o)
    finally:
        PyBuffer_Release(&d)


# -- base64 text in, the base64 of its AES-GCM out (a sealed ItemOperations Data string) ------
# libbase64's one-shot codec (pybase64's extension exports it; _mime finds it).
ctypedef int (*_b64dec_t)(const char* src, size_t srclen, char* out, size_t* outlen, int flags) noexcept nogil
ctypedef void (*_b64enc_t)(const char* src, size_t srclen, char* out, size_t* outlen, int flags) noexcept nogil

cdef _b64dec_t _b64_decode = NULL
cdef _b64enc_t _b64_encode = NULL
# Characters decoded, encrypted and encoded at a time: the plaintext stays in the L2 cache.
cdef Py_ssize_t _TEXT_CHUNK = 1 << 16


cdef void _load_libbase64():
    global _b64_decode, _b64_encode
    cdef size_t dec, enc
    try:
        from seg_fast.content import _mime
        dec, enc = _mime.libbase64_addresses()
    except Exception:
        return
    if dec and enc:
        _b64_decode = <_b64dec_t>dec
        _b64_encode = <_b64enc_t>enc


def _set_text_chunk(Py_ssize_t chars):
    """Tests: a small chunk so its edges fall everywhere (a multiple of 4)."""
    global _TEXT_CHUNK
    if chars <= 0 or chars % 4:
        raise ValueError("chunk must be a positive multiple of 4")
    _TEXT_CHUNK = chars


_load_libbase64()
HAVE_TEXT_SEAL = _b64_decode != NULL and _encrypt_update != NULL

cdef int _BAD = 1, _AFTER_PAD = 2


cdef object _shrunk(PyObject* raw, Py_ssize_t w):
    """The new bytes object ``raw`` (our only reference to it) cut to ``w`` bytes in place."""
    _PyBytes_Resize(&raw, w)          # on failure it frees raw and raises
    out = <object>raw
    Py_DECREF(out)                    # the reference ``raw`` held, now ``out``'s
    return out


cdef class TextSeal:
    """Base64 text a piece at a time -> the base64 of its AES-GCM, as one pass per piece:
    the strict decode (exactly pybase64's validate=True of the pieces joined), the
    encryption in place and the encode of a cache-sized chunk at a time, written into the
    bytes returned, without the GIL; the quad (up to 3 characters) and the triple (up to 2
    bytes) a piece ends inside are carried. The text must hold no line breaks (the caller
    takes them out). ``TextSeal(key, nonce, aad, carry=b"", padded=False)``: ``carry``, the
    characters of an incomplete quad already read; ``padded``, a quad with "=" was.
    ``encode(data)`` base64 of ``data`` not encrypted (the envelope's header); ``seal(plain)``
    of bytes already decoded; ``text(text)`` of base64 text; ``finish()`` the tag's and the
    last padding (ValueError if the text ended inside a quad)."""

    cdef GcmStream gcm
    cdef unsigned char quad[4]
    cdef int nquad
    cdef unsigned char triple[3]
    cdef int ntriple
    cdef bint padded
    cdef bint done
    cdef char* scratch

    def __cinit__(self, key, nonce, aad, carry=b"", bint padded=False):
        cdef const unsigned char[:] c = carry
        cdef int i
        self.scratch = NULL
        if _b64_decode == NULL:
            raise RuntimeError("libbase64 not available")
        if len(c) > 3:
            raise ValueError("carry is at most 3 characters")
        self.gcm = GcmStream(key, nonce, aad)
        self.nquad = len(c)
        for i in range(self.nquad):
            self.quad[i] = c[i]
        self.ntriple = 0
        self.padded = padded
        self.done = False
        self.scratch = <char*>malloc(_TEXT_CHUNK // 4 * 3 + 3)
        if self.scratch == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.scratch != NULL:
            free(self.scratch)
            self.scratch = NULL

    cdef Py_ssize_t _encode(self, const unsigned char* b, Py_ssize_t n, char* out) noexcept nogil:
        """Base64 of the carried bytes and ``b`` (whole triples) into ``out``; returns its length."""
        cdef Py_ssize_t w = 0, whole
        cdef size_t got
        if self.ntriple:
            while self.ntriple < 3 and n:
                self.triple[self.ntriple] = b[0]
                self.ntriple += 1
                b += 1
                n -= 1
            if self.ntriple < 3:
                return 0
            got = 0
            _b64_encode(<const char*>self.triple, 3, out, &got, 0)
            w = <Py_ssize_t>got
            self.ntriple = 0
        whole = n // 3 * 3
        if whole:
            got = 0
            _b64_encode(<const char*>b, whole, out + w, &got, 0)
            w += <Py_ssize_t>got
        while whole < n:
            self.triple[self.ntriple] = b[whole]
            self.ntriple += 1
            whole += 1
        return w

    cdef int _text(self, const unsigned char* p, Py_ssize_t n, char* out, Py_ssize_t* written) noexcept nogil:
        """The base64 of the sealed decode of ``p`` (and the carried quad) into ``out``: 0, or
        _BAD / _AFTER_PAD (the text is not strict base64)."""
        cdef Py_ssize_t i = 0, w = 0, take
        cdef size_t got
        if self.nquad:
            while self.nquad < 4 and i < n:
                self.quad[self.nquad] = p[i]
                self.nquad += 1
                i += 1
            if self.nquad < 4:
                written[0] = 0
                return 0
            if self.padded:
                return _AFTER_PAD
            got = 0
            if not _b64_decode(<const char*>self.quad, 4, self.scratch, &got, 0):
                return _BAD
            self.nquad = 0
            self.padded = self.quad[3] == 61
            if not self.gcm._update(<const unsigned char*>self.scratch, <Py_ssize_t>got,
                                    <unsigned char*>self.scratch):
                return _BAD
            w += self._encode(<const unsigned char*>self.scratch, <Py_ssize_t>got, out + w)
        while n - i >= 4:
            take = (n - i) // 4 * 4
            if take > _TEXT_CHUNK:
                take = _TEXT_CHUNK
            if self.padded:
                return _AFTER_PAD
            got = 0
            if not _b64_decode(<const char*>p + i, take, self.scratch, &got, 0):
                return _BAD
            self.padded = p[i + take - 1] == 61
            # GCM may write where it reads (EVP_EncryptUpdate in place)
            if not self.gcm._update(<const unsigned char*>self.scratch, <Py_ssize_t>got,
                                    <unsigned char*>self.scratch):
                return _BAD
            w += self._encode(<const unsigned char*>self.scratch, <Py_ssize_t>got, out + w)
            i += take
        while i < n:
            self.quad[self.nquad] = p[i]
            self.nquad += 1
            i += 1
        written[0] = w
        return 0

    cdef PyObject* _out(self, Py_ssize_t plain_bound) except NULL:
        """A new bytes object (a raw reference: _shrunk takes it) with room for the base64 of
        ``plain_bound`` more bytes."""
        cdef PyObject* raw = _new_bytes(NULL, (plain_bound + self.ntriple + 2) // 3 * 4)
        if raw == NULL:
            raise MemoryError()
        return raw

    cdef _check(self):
        if self.done:
            raise ValueError("TextSeal already finished")

    def text(self, text):
        """The base64 of the sealed decode of ``text`` (strict base64, no line breaks)."""
        cdef Py_buffer v
        cdef Py_ssize_t w = 0
        cdef int err
        cdef PyObject* raw
        self._check()
        PyObject_GetBuffer(text, &v, PyBUF_SIMPLE)
        try:
            raw = self._out((v.len + self.nquad) // 4 * 3)
            with nogil:
                err = self._text(<const unsigned char*>v.buf, v.len, _bytes_data(raw), &w)
        finally:
            PyBuffer_Release(&v)
        if err:
            Py_DECREF(<object>raw)
            self.done = True              # its state is part way: nothing more from it
            raise ValueError("base64 text after its padding" if err == _AFTER_PAD else "not strict base64 text")
        return _shrunk(raw, w)

    def seal(self, plain):
        """The base64 of the AES-GCM of ``plain`` (bytes already decoded)."""
        cdef Py_buffer v
        cdef Py_ssize_t w = 0, at = 0, take
        cdef int ok = 1
        cdef char* o
        cdef PyObject* raw
        self._check()
        PyObject_GetBuffer(plain, &v, PyBUF_SIMPLE)
        try:
            raw = self._out(v.len)
            o = _bytes_data(raw)
            with nogil:
                while ok and at < v.len:
                    take = v.len - at
                    if take > _TEXT_CHUNK // 4 * 3:
                        take = _TEXT_CHUNK // 4 * 3
                    ok = self.gcm._update(<const unsigned char*>v.buf + at, take, <unsigned char*>self.scratch)
                    w += self._encode(<const unsigned char*>self.scratch, take, o + w)
                    at += take
        finally:
            PyBuffer_Release(&v)
        if not ok:
            Py_DECREF(<object>raw)
            raise RuntimeError("OpenSSL AES-GCM failed")
        return _shrunk(raw, w)

    def encode(self, data):
        """The base64 of ``data`` as it is (not encrypted), in the same stream."""
        cdef Py_buffer v
        cdef Py_ssize_t w = 0
        cdef PyObject* raw
        self._check()
        PyObject_GetBuffer(data, &v, PyBUF_SIMPLE)
        try:
            raw = self._out(v.len)
            with nogil:
                w = self._encode(<const unsigned char*>v.buf, v.len, _bytes_data(raw))
        finally:
            PyBuffer_Release(&v)
        return _shrunk(raw, w)

    def finish(self):
        """The base64 of the tag and of the bytes carried, padded; ValueError if the text
        ended inside a quad."""
        cdef unsigned char tag[16]
        cdef size_t got = 0
        cdef Py_ssize_t w
        self._check()
        self.done = True
        if self.nquad:
            raise ValueError("base64 text ends inside a quad")
        if not self.gcm._final(tag):
            raise RuntimeError("OpenSSL AES-GCM failed")
        cdef PyObject* raw = self._out(16)
        w = self._encode(tag, 16, _bytes_data(raw))
        if self.ntriple:
            _b64_encode(<const char*>self.triple, self.ntriple, _bytes_data(raw) + w, &got, 0)
            w += <Py_ssize_t>got
            self.ntriple = 0
        return _shrunk(raw, w)
