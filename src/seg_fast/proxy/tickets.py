"""TLS session tickets any worker of a serve can open: keys made by the control process.

A serve's workers share one listener (SO_REUSEPORT), so a device's next connection lands
on any of them. OpenSSL makes each SSL_CTX its own random ticket keys, so a ticket one
worker issued was opaque to the others: the device got a full handshake (key exchange
and the certificate's signature, ~1 ms of worker CPU with an RSA key) instead of a
resumed one whenever it reached another worker.

Here the control process makes the keys (``os.urandom``, 80 bytes each: OpenSSL's
16-byte name, 32-byte HMAC-SHA256 key, 32-byte AES-256-CBC key) and keeps a ring of
three: *next*, *current*, *previous*. Every ``listener.tls_ticket_key_rotation`` seconds
next becomes current, current becomes previous, and a new next is made. Workers encrypt
under current and decrypt under all three (``_tickets.pyx``, OpenSSL's ticket key
callback, as nginx does with several ``ssl_session_ticket_key`` files; every resumption
gets a new ticket under current, as OpenSSL's own keys give for TLS 1.3): a ticket stays
good for one to two periods, and since every worker knew a key as *next* one period before any encrypts
with it, a worker that takes the new ring a moment later still opens the tickets of one
that took it first. OpenSSL 3 uses the same keys for TLS 1.3 tickets (and 1.2's).

The keys travel over the worker's channel (proxy/channel.py: a Unix socketpair per worker,
one message per ring), made by the control process before the worker starts: the first ring
waits in it, so the worker has its keys before its first handshake; later rings come as they
are made. They are never written to a file or a log, nor passed in the environment. Python's ssl has no call for ticket keys: the SSL_CTX pointer is
read from the SSLContext object and proven before it is used (``openssl.ssl_ctx_of``) and the callback set with
SSL_CTX_set_tlsext_ticket_key_evp_cb (OpenSSL 1.1: SSL_CTX_set_tlsext_ticket_key_cb).
Where that cannot be done, the worker says so once and keeps OpenSSL's own keys.
"""
from __future__ import annotations

import ctypes
import os
import ssl
import struct
import sys
import time

import trio

from seg_fast import openssl
from seg_fast.proxy.console import say

KEY_BYTES = 80
# A ring message: MAGIC, when current became current (a big-endian double, Unix time), then
# current, next and previous (if any).
MAGIC = b"SFTK2"
_SINCE = struct.Struct("!d")
MIN_ROTATION = 60.0

_state: dict = {}
keyed = None                      # the SSLContext the callback was last set on (tlsio checks it)


# -- the ring (control process) --------------------------------------------------------------

def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


class Ring:
    """The control process's keys: ``current`` encrypts; ``next`` and ``previous`` decrypt too."""

    def __init__(self):
        self.current, self.next, self.previous = new_key(), new_key(), None
        self.since = time.time()      # when current became current (its age is a metric)

    def rotate(self) -> None:
        self.previous, self.current, self.next = self.current, self.next, new_key()
        self.since = time.time()

    def message(self) -> bytes:
        return MAGIC + _SINCE.pack(self.since) + self.current + self.next + (self.previous or b"")


def keys_of(message: bytes) -> bytes:
    """The ring for ``_tickets.set_keys`` (the encrypting key first); ValueError if malformed."""
    body = message[len(MAGIC) + _SINCE.size:]
    if not message.startswith(MAGIC) or len(body) not in (2 * KEY_BYTES, 3 * KEY_BYTES):
        raise ValueError("not a ticket key ring")
    return body


def since_of(message: bytes) -> float:
    """When the ring's encrypting key became current (Unix time), from a well-formed message."""
    return _SINCE.unpack_from(message, len(MAGIC))[0]


class Keeper:
    """The ring (control process): its message goes into each new worker's channel first
    (``first``), and every rotation's to every worker (channel.Hub)."""

    def __init__(self, rotation: float, hub):
        self.ring = Ring()
        self.rotation = rotation
        self.hub = hub

    def first(self) -> bytes:
        return self.ring.message()

    def rotate(self) -> None:
        self.ring.rotate()
        self.hub.send_all(self.ring.message())

    async def run(self) -> None:
        """Rotate every ``rotation`` seconds (read each time: a reload may change it)."""
        while True:
            await trio.sleep(self.rotation)
            self.rotate()


# -- the worker ----------------------------------------------------------------------------------

def _bind():
    """Resolve OpenSSL's functions and hand them to _tickets (once): the module, or a reason."""
    if "lib" in _state:
        return _state["lib"]
    _state["lib"] = why = _bind_now()
    return why


def _bind_now():
    if sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
        return "not a release build of CPython"
    try:
        from seg_fast.proxy import _tickets
    except ImportError:
        return "the compiled module seg_fast.proxy._tickets is not built"
    libssl, libcrypto = openssl.libssl(), openssl.libcrypto()
    if libssl is None or libcrypto is None:
        return "libssl/libcrypto not found in this process"
    addr = openssl.address
    legacy = not addr(libssl, "SSL_CTX_set_tlsext_ticket_key_evp_cb")
    cipher = 0
    if not legacy:
        fetch = libcrypto.EVP_CIPHER_fetch
        fetch.restype, fetch.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        cipher = fetch(None, b"AES-256-CBC", None) or 0      # fetched once, not per ticket
    if not cipher:
        get = libcrypto.EVP_aes_256_cbc
        get.restype, get.argtypes = ctypes.c_void_p, []
        cipher = get() or 0
    md = 0
    if legacy:
        get = libcrypto.EVP_sha256
        get.restype, get.argtypes = ctypes.c_void_p, []
        md = get() or 0
    try:
        _tickets.init(legacy, addr(libcrypto, "RAND_bytes"), addr(libcrypto, "EVP_EncryptInit_ex"),
                      addr(libcrypto, "EVP_DecryptInit_ex"),
                      addr(libcrypto, "HMAC_Init_ex" if legacy else "EVP_MAC_CTX_set_params"),
                      addr(libssl, "SSL_CTX_callback_ctrl" if legacy else "SSL_CTX_set_tlsext_ticket_key_evp_cb"),
                      cipher, md, addr(libssl, "SSL_session_reused"))
    except ValueError as exc:
        return f"OpenSSL: {exc}"
    _state["libssl"] = libssl
    return _tickets


def use(message: bytes) -> None:
    """Take a ring (a Keeper's message): every context keyed, before or after, uses it."""
    lib = _bind()
    if isinstance(lib, str):
        _say_once(f"session tickets: keys from the control process not used ({lib}); "
                  "each worker keeps OpenSSL's own, so a device resumes only on the worker that issued its ticket")
        return
    global keyed
    lib.set_keys(keys_of(message))    # the callback already set on a context reads the new ring
    _state["since"] = since_of(message)
    keyed = None                      # a context passed over before the first ring gets it at its next connection


def key(context: ssl.SSLContext) -> None:
    """Set the shared keys' callback on ``context`` (once; tlsio calls it for each new context).
    Without keys from a control process (tests, a worker started by hand) nothing changes."""
    global keyed
    lib = _bind()
    if isinstance(lib, str) or not lib.key_count():
        keyed = context               # nothing to install: not asked again per connection (use() resets)
        return
    ptr = openssl.ssl_ctx_of(context)
    if not ptr:
        _say_once("session tickets: this Python's SSLContext layout is not the expected one; "
                  "each worker keeps OpenSSL's own ticket keys")
        keyed = context               # not again for this context
        return
    if not lib.install(ptr):
        raise RuntimeError("OpenSSL refused the session ticket key callback")
    keyed = context


def counts() -> dict:
    """Tickets made / renewed (made on a resumption) / opened (current key) / older (another key) /
    unknown in this process."""
    lib = _bind()
    if isinstance(lib, str):
        return {"made": 0, "renewed": 0, "opened": 0, "older": 0, "unknown": 0}
    return lib.counts()


def metrics(now: float | None = None) -> dict[str, float]:
    """This worker's ticket figures for its statistics (stats.py, once a second): empty unless it
    uses the control process's keys (OpenSSL's own keys are not counted)."""
    lib = _bind()
    if isinstance(lib, str) or "since" not in _state:
        return {}
    c = lib.counts()
    now = time.time() if now is None else now
    return {"issued": c["made"], "renewed": c["renewed"], "accepted_current": c["opened"],
            "accepted_other": c["older"], "refused": c["unknown"],
            "key_age_s": round(max(now - _state["since"], 0.0), 3)}


def _say_once(text: str) -> None:
    if text not in _state.setdefault("said", set()):
        _state["said"].add(text)
        say(text)


def received(message: bytes) -> None:
    """A ring from the control process (channel.handlers)."""
    try:
        use(message)
    except ValueError as exc:
        _say_once(f"session tickets: {exc} from the control process; ignored")
