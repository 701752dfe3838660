# cython: language_level=3
"""OpenSSL's session ticket key callback, in C: the keys a serve's workers share.

``proxy/tickets.py`` says why and how the keys travel. This module holds the process's
key ring (at most ``MAX_KEYS`` keys of 80 bytes: a 16-byte name, a 32-byte HMAC-SHA256
key and a 32-byte AES-256-CBC key, OpenSSL's own ticket format and
SSL_CTX_set_tlsext_ticket_keys' layout) and the callback OpenSSL calls during a
handshake, with the GIL released by ``_ssl``: it never touches a Python object. The
first key encrypts new tickets; every key in the ring decrypts. Every ticket that opens is
answered "renew" (2): the device gets a new ticket under the first key on each resumption.
OpenSSL's own keys do that for TLS 1.3 (answering 1 made OpenSSL send none after a TLS 1.3
resumption, so a device reused one ticket until it aged out, and a client that sends its
request right after its Finished waited for the gateway's delayed ACK, ~40 ms, with Nagle);
so a device that connects at least once a rotation period always holds a ticket the ring
opens, and no ticket is used twice (RFC 8446, C.4). nginx answers renew for its later
``ssl_session_ticket_key`` files only.

Nothing is linked at build time (no OpenSSL headers or -lssl): ``tickets.py`` resolves
the few libssl/libcrypto functions in the libraries ``_ssl`` already loaded (ctypes) and
hands their addresses to ``init``, so the callback runs against the very OpenSSL that
made the SSL_CTX.
"""
from libc.stdint cimport uintptr_t
from libc.string cimport memcmp, memcpy, memset


cdef extern from *:
    """
    typedef struct seg_ossl_param {
        const char *key;
        unsigned int data_type;
        void *data;
        size_t data_size;
        size_t return_size;
    } seg_ossl_param;
    """
    ctypedef struct seg_ossl_param:    # OpenSSL 3's OSSL_PARAM (core.h)
        const char *key
        unsigned int data_type
        void *data
        size_t data_size
        size_t return_size


cdef enum:
    NAME_BYTES = 16
    KEY_BYTES = 80
    MAX_KEYS = 4
    IV_BYTES = 16                     # AES-CBC's IV (OpenSSL's EVP_MAX_IV_LENGTH is 16)
    PARAM_UTF8_STRING = 4             # OSSL_PARAM_UTF8_STRING
    PARAM_OCTET_STRING = 5            # OSSL_PARAM_OCTET_STRING
    CTRL_SET_TICKET_KEY_CB = 72       # SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB (the OpenSSL 1.1 API)

ctypedef int (*rand_fn)(unsigned char *buf, int num) noexcept nogil
ctypedef int (*cipher_init_fn)(void *cctx, const void *cipher, void *impl, const unsigned char *key,
                               const unsigned char *iv) noexcept nogil
ctypedef int (*mac_params_fn)(void *hctx, const seg_ossl_param *params) noexcept nogil
ctypedef int (*hmac_init_fn)(void *hctx, const void *key, int length, const void *md, void *impl) noexcept nogil
ctypedef int (*ticket_cb_fn)(void *s, unsigned char *name, unsigned char *iv, void *cctx, void *hctx,
                             int enc) noexcept nogil
ctypedef int (*set_evp_cb_fn)(void *ctx, ticket_cb_fn cb) noexcept nogil
ctypedef long (*callback_ctrl_fn)(void *ctx, int cmd, void *fp) noexcept nogil
ctypedef int (*session_reused_fn)(const void *s) noexcept nogil


cdef struct Key:
    unsigned char name[16]
    unsigned char hmac[32]
    unsigned char aes[32]
    seg_ossl_param params[3]          # the HMAC's key and digest, for EVP_MAC_CTX_set_params


cdef Key _keys[4]
cdef int _count = 0
cdef bint _ready = False
cdef bint _legacy = False             # OpenSSL 1.1: HMAC_CTX and HMAC_Init_ex
cdef rand_fn _rand = NULL
cdef cipher_init_fn _encrypt_init = NULL
cdef cipher_init_fn _decrypt_init = NULL
cdef mac_params_fn _mac_params = NULL
cdef hmac_init_fn _hmac_init = NULL
cdef set_evp_cb_fn _set_evp_cb = NULL
cdef callback_ctrl_fn _callback_ctrl = NULL
cdef session_reused_fn _session_reused = NULL     # SSL_session_reused: a ticket made on a resumption
cdef const void *_cipher = NULL       # AES-256-CBC
cdef const void *_md = NULL           # SHA-256 (the OpenSSL 1.1 API only)
cdef const char *_DIGEST = b"SHA256"
# What the callback did, for tests and metrics (plain counters: one thread makes the handshakes,
# read once a second by the worker's statistics): tickets made; of those, made on a resumed
# connection (the renewal); tickets opened with the first key; with another key of the ring;
# tickets under no key of the ring (full handshake).
cdef unsigned long long _made = 0, _renewed = 0, _opened = 0, _older = 0, _unknown = 0


cdef inline int _mac_key(void *hctx, Key *k) noexcept nogil:
    if _legacy:
        return _hmac_init(hctx, k.hmac, 32, _md, NULL)
    return _mac_params(hctx, k.params)


cdef int _ticket_cb(void *s, unsigned char *name, unsigned char *iv, void *cctx, void *hctx,
                    int enc) noexcept nogil:
    global _made, _renewed, _opened, _older, _unknown
    cdef Key *k
    cdef int i
    if enc == 1:
        if _count == 0:
            return 0                  # no ticket (never: the callback is set once keys are here)
        k = &_keys[0]
        if _rand(iv, IV_BYTES) != 1:
            return -1
        if _encrypt_init(cctx, _cipher, NULL, k.aes, iv) != 1 or _mac_key(hctx, k) != 1:
            return -1
        memcpy(name, k.name, NAME_BYTES)
        _made += 1
        if _session_reused != NULL and _session_reused(s) == 1:
            _renewed += 1
        return 1
    for i in range(_count):
        k = &_keys[i]
        if memcmp(name, k.name, NAME_BYTES) == 0:
            if _mac_key(hctx, k) != 1 or _decrypt_init(cctx, _cipher, NULL, k.aes, iv) != 1:
                return -1
            if i == 0:
                _opened += 1
            else:
                _older += 1
            return 2                  # good, and renewed: a new ticket under the first key
    _unknown += 1
    return 0                          # a key this serve no longer has (or never had): full handshake


def init(bint legacy, uintptr_t rand_bytes, uintptr_t encrypt_init, uintptr_t decrypt_init,
         uintptr_t mac_or_hmac, uintptr_t setter, uintptr_t cipher, uintptr_t md, uintptr_t session_reused=0):
    """The OpenSSL functions (addresses): RAND_bytes, EVP_EncryptInit_ex, EVP_DecryptInit_ex,
    EVP_MAC_CTX_set_params (legacy: HMAC_Init_ex), SSL_CTX_set_tlsext_ticket_key_evp_cb
    (legacy: SSL_CTX_callback_ctrl), the AES-256-CBC EVP_CIPHER, (legacy) EVP_sha256() and
    SSL_session_reused (0: renewals not counted)."""
    global _legacy, _rand, _encrypt_init, _decrypt_init, _mac_params, _hmac_init, _set_evp_cb
    global _callback_ctrl, _cipher, _md, _ready, _session_reused
    if not (rand_bytes and encrypt_init and decrypt_init and mac_or_hmac and setter and cipher):
        raise ValueError("an OpenSSL function is missing")
    if legacy and not md:
        raise ValueError("the OpenSSL 1.1 API needs EVP_sha256")
    _legacy = legacy
    _rand = <rand_fn>rand_bytes
    _encrypt_init = <cipher_init_fn>encrypt_init
    _decrypt_init = <cipher_init_fn>decrypt_init
    if legacy:
        _hmac_init = <hmac_init_fn>mac_or_hmac
        _callback_ctrl = <callback_ctrl_fn>setter
    else:
        _mac_params = <mac_params_fn>mac_or_hmac
        _set_evp_cb = <set_evp_cb_fn>setter
    _cipher = <const void *>cipher
    _md = <const void *>md
    _session_reused = <session_reused_fn>session_reused
    _ready = True


def set_keys(const unsigned char[:] ring):
    """The ring: 1 to MAX_KEYS keys of 80 bytes, the encrypting one first. Names must differ."""
    global _count
    cdef Py_ssize_t n = ring.shape[0]
    cdef int count = <int>(n // KEY_BYTES)
    cdef int i, j
    cdef Key *k
    if n == 0 or n % KEY_BYTES or count > MAX_KEYS:
        raise ValueError(f"a ticket key ring is 1 to {MAX_KEYS} keys of {KEY_BYTES} bytes, not {n} bytes")
    for i in range(count):
        for j in range(i):
            if memcmp(&ring[i * KEY_BYTES], &ring[j * KEY_BYTES], NAME_BYTES) == 0:
                raise ValueError("two ticket keys of the ring have the same name")
    for i in range(count):
        k = &_keys[i]
        memcpy(k.name, &ring[i * KEY_BYTES], NAME_BYTES)
        memcpy(k.hmac, &ring[i * KEY_BYTES + 16], 32)
        memcpy(k.aes, &ring[i * KEY_BYTES + 48], 32)
        k.params[0].key = b"key"                      # OSSL_MAC_PARAM_KEY
        k.params[0].data_type = PARAM_OCTET_STRING
        k.params[0].data = k.hmac
        k.params[0].data_size = 32
        k.params[0].return_size = <size_t>-1          # OSSL_PARAM_UNMODIFIED
        k.params[1].key = b"digest"                   # OSSL_MAC_PARAM_DIGEST
        k.params[1].data_type = PARAM_UTF8_STRING
        k.params[1].data = <void *>_DIGEST
        k.params[1].data_size = 6
        k.params[1].return_size = <size_t>-1
        k.params[2].key = NULL                        # OSSL_PARAM_END
        k.params[2].data_type = 0
        k.params[2].data = NULL
        k.params[2].data_size = 0
        k.params[2].return_size = 0
    for i in range(count, MAX_KEYS):
        memset(&_keys[i], 0, sizeof(Key))             # a dropped key leaves no copy here
    _count = count


def key_count() -> int:
    return _count


def install(uintptr_t ssl_ctx) -> bool:
    """Set the callback on an SSL_CTX (its address). False: init was not called, or no keys yet."""
    if not _ready or _count == 0 or not ssl_ctx:
        return False
    if _legacy:
        return _callback_ctrl(<void *>ssl_ctx, CTRL_SET_TICKET_KEY_CB, <void *>_ticket_cb) == 1
    return _set_evp_cb(<void *>ssl_ctx, _ticket_cb) == 1


def counts() -> dict:
    """Tickets made; renewed (made on a resumed connection); opened (first key), older (another
    key of the ring), unknown (no key)."""
    return {"made": _made, "renewed": _renewed, "opened": _opened, "older": _older, "unknown": _unknown}
