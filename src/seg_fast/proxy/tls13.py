"""A TLS 1.3 connection without OpenSSL's object once the handshake is done: a device's,
and the gateway's own to an https:// mail server.

OpenSSL keeps ~14 KiB per connection for as long as it lives; a parked Ping lives for
hours, and at 100,000 devices per core that was two thirds of the gateway's memory. After
a TLS 1.3 handshake a connection needs only its traffic secrets and record counters
(_tls13.pyx, ``Records``): tlsio.TLSStream hands its connection over right after the
handshake (``shed``) and OpenSSL's object is freed.

How the keys are had: OpenSSL reports each handshake's traffic secrets through the
SSL_CTX's keylog callback (``prepare`` sets it, on the context's proven SSL_CTX pointer).
The counters: the device's first record after its Finished is its first under those keys
(OpenSSL reads one record at a time, never ahead); ours start after the session tickets,
which OpenSSL no longer sends by itself in the handshake (``num_tickets = 0`` on a prepared
context) but makes afterwards into a memory BIO (_tlsrecords.tickets), so they can be
counted: ``TICKETS`` of them, as CPython's default gave devices before.

TLS 1.2 connections, and TLS 1.3 with a suite ``Records`` does not know, keep OpenSSL's
object as before (tickets for the latter are made the same way). Where the functions, the
pointers or the secrets are missing nothing is prepared and every connection keeps OpenSSL.

The mail-server leg (a client context, ``upstream.tls13_records``): a parked Ping holds a
connection to the mail server as long as the device's, so with an https:// mail server each
parked device held two OpenSSL objects (benchmarks/upstream_tls.py). Our Finished is the
last handshake record we write, and OpenSSL as a client reads nothing after the server's
Finished, so both counters start at zero; the server's NewSessionTickets come after, under
its traffic keys, and ``Records(client=True)`` passes over them. A client makes no tickets.
"""
from __future__ import annotations

import os
import ssl
import sys

from seg_fast import openssl
from seg_fast.proxy import _tls13, _tlsrecords, tlsbatch

_CIPHERS: dict = {}           # the few cipher() tuples, one object each for every connection
# the peer certificates (DER -> (DER, getpeercert())): a mail server's one certificate, not one
# copy per connection (~2.5 KiB each; every parked Ping holds a mail-server connection)
_CERTS: dict = {}
TICKETS = 2                   # per full or resumed handshake (CPython's default num_tickets)
_state: dict = {}
_CRYPTO = ("EVP_CIPHER_CTX_new", "EVP_CipherInit_ex", "EVP_CipherUpdate", "EVP_CipherFinal_ex",
           "EVP_CIPHER_CTX_ctrl", "EVP_aes_128_gcm", "EVP_aes_256_gcm", "EVP_chacha20_poly1305")


def available() -> bool:
    """The functions were found (once per process)."""
    if "on" not in _state:
        _state["on"] = _init()
    return _state["on"]


def _init() -> bool:
    if not tlsbatch.available():
        return False                  # the memory BIO and the SSL * proof are tlsbatch's
    libssl, libcrypto = openssl.libssl(), openssl.libcrypto()
    if libssl is None or libcrypto is None:
        return False
    if not _tlsrecords.init_tickets(*openssl.addresses(libssl, ("SSL_new_session_ticket", "SSL_do_handshake"))):
        return False
    return bool(_tls13.init(tuple(openssl.addresses(libcrypto, _CRYPTO))
                            + (openssl.address(libssl, "SSL_CTX_set_keylog_callback"),)))


def prepare(context: ssl.SSLContext) -> bool:
    """Have ``context``'s handshakes report their secrets and, a server's, leave the tickets
    to ``shed`` (listener.tls13_records; a client's: upstream.tls13_records); False (nothing
    changed) where that cannot be done here."""
    ok = False
    if available() and context.maximum_version in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3):
        ptr = openssl.ssl_ctx_of(context)
        if ptr:
            _tls13.watch(ptr)
            if context.protocol != ssl.PROTOCOL_TLS_CLIENT:
                context.num_tickets = 0
            ok = True
    context._seg_tls13 = ok
    return ok


def prepared(context: ssl.SSLContext) -> bool:
    return getattr(context, "_seg_tls13", False)


def shed(sslobj, ssl_ptr: int, fd: int):
    """After ``sslobj``'s handshake on a prepared context: a server's session tickets made,
    and a ``Records`` that carries the connection on (the tickets its first bytes out), or
    None where the connection stays OpenSSL's (TLS 1.2, another suite; a server's tickets
    then go out through OpenSSL). ``ssl_ptr`` is its proven ``SSL *`` (tlsbatch.ssl_of)."""
    secrets = _tls13.take(ssl_ptr)
    suite = _tls13.SUITES.get((sslobj.cipher() or ("",))[0])
    if sslobj.version() != "TLSv1.3":
        return None                   # TLS 1.2 sends its ticket in the handshake
    client = not sslobj.server_side
    # as OpenSSL's own: two after a full handshake, one after a resumption
    made = b"" if client else _tlsrecords.tickets(ssl_ptr, fd, 1 if sslobj.session_reused else TICKETS)
    if secrets is None or suite is None:
        if made:
            _write_all(fd, made)      # OpenSSL counted them as written: they must go out
        return None
    return _tls13.Records(fd, suite, secrets[0], secrets[1], count_records(made), made, client=client)


def count_records(data: bytes) -> int:
    """How many whole records ``data`` holds (ValueError if it does not end on one)."""
    n = at = 0
    while at < len(data):
        if len(data) - at < 5:
            raise ValueError("a partial TLS record")
        at += 5 + int.from_bytes(data[at + 3:at + 5], "big")
        n += 1
    if at != len(data):
        raise ValueError("a partial TLS record")
    return n


def _write_all(fd: int, data: bytes) -> None:
    # A connection that stays OpenSSL's: its tickets, right after the handshake (a few
    # hundred bytes into an empty socket buffer; one that does not take them is broken).
    n = os.write(fd, data)
    if n != len(data):
        raise BlockingIOError("the device's socket did not take the session tickets")


def forget(ssl_ptr: int) -> None:
    """A handshake that did not finish: its secrets are not kept."""
    if ssl_ptr and "on" in _state and _state["on"]:
        _tls13.forget(ssl_ptr)


class Shed:
    """What the connection's ``ssl_object`` answered, kept once OpenSSL's object is gone
    (the SSLObject queries tlsio forwards)."""

    __slots__ = ("context", "server_side", "server_hostname", "_cipher", "_alpn", "_cert", "_cert_der",
                 "session_reused", "_records", "__weakref__")
    session = None

    def __init__(self, sslobj, records):
        self.context = sslobj.context
        self.server_side = sslobj.server_side
        self.server_hostname = sslobj.server_hostname
        cipher = sslobj.cipher()
        self._cipher = _CIPHERS.setdefault(cipher, cipher) if len(_CIPHERS) < 64 else cipher
        self._alpn = sslobj.selected_alpn_protocol()
        der = sslobj.getpeercert(binary_form=True)
        if der:
            kept = _CERTS.get(der)
            if kept is None:
                kept = (der, sslobj.getpeercert())
                if len(_CERTS) < 64:
                    _CERTS[der] = kept
            der, self._cert = kept
        else:
            self._cert = None
        self._cert_der = der
        self.session_reused = sslobj.session_reused
        self._records = records

    def version(self):
        return "TLSv1.3"

    def cipher(self):
        return self._cipher

    def shared_ciphers(self):
        return None

    def compression(self):
        return None

    def selected_alpn_protocol(self):
        return self._alpn

    def selected_npn_protocol(self):
        return None

    def get_channel_binding(self, cb_type="tls-unique"):
        return None

    def pending(self):
        return self._records.pending()

    def getpeercert(self, binary_form=False):
        return self._cert_der if binary_form else self._cert


if sys.implementation.name != "cpython":          # the pointers read are CPython's
    _state["on"] = False
