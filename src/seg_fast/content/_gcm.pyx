# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""AES-GCM over megabytes without the GIL (compiled).

cryptography's AEAD calls hold the GIL for as long as they run (~0.6 ms a megabyte
here), so a sealed 10 MB attachment in a worker thread kept the event loop waiting.
This calls OpenSSL's EVP interface, from the libcrypto Python's own ``_hashlib`` is
linked against (already loaded), with the GIL released. The bytes are AES-GCM's as
``cryptography``'s AESGCM makes them (tests/test_content_base64.py checks against it);
where libcrypto cannot be found ``HAVE_LIBCRYPTO`` is False and the caller keeps using
cryptography.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

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
