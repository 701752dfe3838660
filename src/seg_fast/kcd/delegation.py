"""Kerberos constrained delegation: a Negotiate token for the mail server, per mapped user.

The gateway holds its own keys (kcd.keytab, kcd.service_principal). For a user it asks
the KDC for a ticket from that user to itself (S4U2Self, protocol transition: no password
of the user's is involved), then uses it as evidence for a ticket from the user to the
mail server (S4U2Proxy, kcd.target_spn); the mail server sees ``Authorization: Negotiate``
as if the user had logged on with Kerberos.

Both steps are blocking calls into MIT krb5 (python-gssapi): they run in worker threads
(trio.to_thread, at most kcd.threads at once). The user's credentials, which hold the
service ticket, are kept in memory until shortly before the ticket ends, so later requests
(a storm of Pings) make their tokens without the KDC; only one fetch per user runs at a
time. A KDC refusal for a user (not allowed to be delegated, unknown) is remembered for
kcd.refusal_cache seconds. A token from a kept credential needs no network but some
0.3 ms of cryptography (an SPNEGO-wrapped AP-REQ), so it too is made in a thread.
"""
from __future__ import annotations

import base64
import os
import threading
import time

import trio

from seg_fast.errors import ConfigError

MARGIN = 120.0                 # seconds before a ticket's end that it is renewed
MAX_USERS = 100_000             # users whose credentials a worker keeps
# MIT krb5 error codes (krb5_err.et) inside GSS minor codes: the KDC says no for this user.
_KDC_BASE = 2529638912                          # KRB5KDC_ERR_NONE as unsigned 32 bits
_USER_REFUSALS = {6: "unknown to the KDC", 12: "refused by KDC policy",
                  13: "may not be delegated (KDC can't fulfill requested option)",
                  18: "revoked or locked in the KDC", 23: "password expired in the KDC"}
_REFUSED = [(b"Content-Type", b"text/plain")]
_KRB5_OID = "1.2.840.113554.1.2.2"
# DER of the SPNEGO and Kerberos 5 OIDs (RFC 4178, RFC 4121).
_SPNEGO_OID_DER = bytes.fromhex("06062b0601050502")
_KRB5_OID_DER = bytes.fromhex("06092a864886f712010202")


# Delegator.outcomes' keys: rounds with the KDC by how they ended, then the rest.
KDC_OUTCOMES = ("fetched", "refused", "unavailable", "timeout", "refused_cached", "tokens")


class _Entry:
    __slots__ = ("creds", "expires", "refused", "token")

    def __init__(self, creds=None, expires: float = 0.0, refused: str = ""):
        self.creds = creds
        self.expires = expires             # time.monotonic() after which it is fetched again
        self.refused = refused
        self.token = b""                   # the first token, made with the fetch


class KcdRefused(Exception):
    """The KDC refused this user (answered 403; remembered kcd.refusal_cache seconds)."""


class KcdUnavailable(Exception):
    """The KDC could not be asked, or refused the gateway itself (answered 503; not remembered)."""


def load_gssapi(where: str = "(config)"):
    try:
        import gssapi
    except ImportError:
        raise ConfigError(f"{where}: key kcd.enabled: needs python-gssapi, which is not installed: "
                          "pip install 'seg-fast[kcd]' (it builds against libkrb5-dev)") from None
    return gssapi


class Delegator:
    """Per worker: the gateway's own credentials and the per-user cache."""

    def __init__(self, settings, where: str = "(config)"):
        self.settings = settings
        for key in ("keytab",) + (("kerberos_config",) if settings.kerberos_config else ()):
            path = getattr(settings, key)
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{where}: key kcd.{key}: cannot read {path}")
        if settings.kerberos_config:
            # MIT reads it whenever it makes a context (each call below), so the process's
            # environment is the one place to say it; a worker serves one config.
            os.environ["KRB5_CONFIG"] = settings.kerberos_config
        self.gssapi = load_gssapi(where)
        g = self.gssapi
        self.service = g.Name(settings.service_principal, g.NameType.kerberos_principal)
        self.target = g.Name(settings.target_spn, g.NameType.kerberos_principal)
        self.krb5 = g.OID.from_int_seq(_KRB5_OID)
        self.limiter = trio.CapacityLimiter(settings.threads)
        self.cache: dict[str, _Entry] = {}
        self._fetching: dict[str, trio.Event] = {}
        self._own = None                   # the gateway's own (initiator) credentials
        self._own_expires = 0.0
        self._own_lock = threading.Lock()
        self.fetches = 0                   # S4U2Self + S4U2Proxy rounds (each reaches the KDC)
        self.tokens = 0
        # For /metrics (stats.py): how each round with the KDC ended (fetched, refused,
        # unavailable: counted in the thread), waits given up at kcd.timeout, refusals
        # answered from the cache. Threads count too: under a lock.
        self.outcomes = dict.fromkeys(KDC_OUTCOMES, 0)
        self._count_lock = threading.Lock()

    @classmethod
    def build(cls, config, where: str, old: Delegator | None = None) -> Delegator | None:
        if not config.kcd.enabled:
            return None
        if old is not None and old.settings == config.kcd:
            return old
        return cls(config.kcd, where)

    # -- on the event loop ------------------------------------------------------------------
    async def authorize(self, ident, req, full, rec):
        """(headers for the mail server, None) or (None, refusal answer): the device's own
        Authorization is replaced by a Negotiate token for the certificate's user
        (``ident``: clientcert.CertIdentity of the connection, checked by CertAuth.admit)."""
        principal = ident.principal if ident is not None and not ident.problem else None
        if principal is None:
            rec.error = "kcd: no certificate user to act for"
            return None, (403, _REFUSED, b"client certificate not accepted\n")
        try:
            token = await self.token_for(principal)
        except KcdRefused as exc:
            rec.error = f"kcd: {principal} {exc}"
            return None, (403, _REFUSED, b"the mail server may not be reached as this user\n")
        except KcdUnavailable as exc:
            rec.error = f"kcd: {exc}"[:300]
            return None, (503, [(b"Retry-After", b"30")], b"")
        out = [h for h in full if h[1] != b"authorization"]
        out.append((b"Authorization", b"authorization", b"Negotiate " + token))
        # Negotiate authenticates a connection (exchange._finish): never pooled for another user.
        req.auth_scheme = "negotiate"
        return out, None

    async def token_for(self, principal: str) -> bytes:
        """A base64 Negotiate token for ``principal`` to kcd.target_spn."""
        while True:
            entry = self.cache.get(principal)
            now = time.monotonic()
            if entry is not None and now < entry.expires:
                if entry.refused:
                    self.count("refused_cached")
                    raise KcdRefused(entry.refused)
                return await self._in_thread(self._token, entry)
            pending = self._fetching.get(principal)
            if pending is not None:
                await pending.wait()                  # one fetch per user at a time
                continue
            done = self._fetching[principal] = trio.Event()
            try:
                entry = await self._in_thread(self._fetch, principal)
                self.cache[principal] = entry
            except KcdRefused as exc:
                if self.settings.refusal_cache > 0:
                    self.cache[principal] = _Entry(expires=time.monotonic() + self.settings.refusal_cache,
                                                   refused=str(exc))
                raise
            finally:
                del self._fetching[principal]
                done.set()
            if len(self.cache) > MAX_USERS:
                self._prune(now)
            token, entry.token = entry.token, b""     # made by _fetch; a token is used once
            return token

    async def _in_thread(self, fn, arg):
        # A KDC that does not answer holds a thread until MIT gives up (tens of seconds): the
        # request stops waiting after kcd.timeout (503); the thread finishes on its own and
        # keeps its kcd.threads slot until then, so a dead KDC cannot pile threads up.
        with trio.move_on_after(self.settings.timeout):
            return await trio.to_thread.run_sync(fn, arg, limiter=self.limiter, cancellable=True)
        self.count("timeout")
        raise KcdUnavailable(f"no answer from the KDC within kcd.timeout ({self.settings.timeout:g} s)")

    def _prune(self, now: float) -> None:
        # Expired entries first; a cache still full of live ones starts over (bounded memory).
        for key in [k for k, e in self.cache.items() if e.expires <= now]:
            del self.cache[key]
        if len(self.cache) > MAX_USERS:
            self.cache.clear()

    # -- blocking (worker threads) ---------------------------------------------------------
    def _token(self, entry: _Entry) -> bytes:
        g = self.gssapi
        try:
            ctx = g.SecurityContext(name=self.target, creds=entry.creds, usage="initiate", mech=self.krb5,
                                    flags=g.RequirementFlag.out_of_sequence_detection)
            token = spnego_init(ctx.step())
        except g.exceptions.GSSError as exc:
            raise _classified(exc, "service ticket (S4U2Proxy)") from None
        self.count("tokens")
        self.tokens += 1
        return base64.b64encode(token)

    def own_credentials(self):
        """The gateway's own initiator credentials from its keytab (a TGT, from the KDC when needed)."""
        g = self.gssapi
        with self._own_lock:
            if self._own is None or time.monotonic() >= self._own_expires:
                try:
                    creds = g.Credentials(name=self.service, usage="initiate", store={
                        "client_keytab": self.settings.keytab,
                        "ccache": f"MEMORY:seg-fast-kcd-{os.getpid()}-{id(self)}"})
                    lifetime = creds.lifetime
                except g.exceptions.GSSError as exc:
                    raise KcdUnavailable(f"the gateway's own ticket ({self.settings.service_principal}): "
                                         f"{_minor_text(exc)}") from None
                self._own, self._own_expires = creds, time.monotonic() + max(lifetime - MARGIN, 30)
            return self._own

    def count(self, outcome: str) -> None:
        with self._count_lock:
            self.outcomes[outcome] += 1

    def _fetch(self, principal: str) -> _Entry:
        try:
            entry = self._s4u(principal)
        except KcdRefused:
            self.count("refused")
            raise
        except KcdUnavailable:
            self.count("unavailable")
            raise
        self.count("fetched")
        return entry

    def _s4u(self, principal: str) -> _Entry:
        g = self.gssapi
        own = self.own_credentials()
        self.fetches += 1
        try:
            # The Kerberos mechanism itself, so a refusal keeps its krb5 error code (through
            # MIT's SPNEGO it would be a remapped one); tokens are wrapped in SPNEGO below.
            creds = own.impersonate(g.Name(principal, g.NameType.kerberos_principal), usage="initiate",
                                    mechs=[self.krb5])
            lifetime = creds.lifetime
        except g.exceptions.GSSError as exc:
            raise _classified(exc, "ticket to the gateway (S4U2Self)") from None
        entry = _Entry(creds, time.monotonic() + max(min(lifetime, self._own_expires - time.monotonic()
                                                         + MARGIN) - MARGIN, 30))
        entry.token = self._token(entry)    # S4U2Proxy now, in this thread: later ones from the cache
        return entry

    def keytab_problem(self) -> str:
        """Why the keytab cannot act as kcd.service_principal ("" when it can); no KDC needed."""
        g = self.gssapi
        try:
            g.Credentials(name=self.service, usage="accept", store={"keytab": self.settings.keytab})
        except g.exceptions.GSSError as exc:
            return _minor_text(exc)
        return ""

    def check(self, principal: str) -> dict:
        """For check-config --connect: fetch for ``principal`` and describe the result (blocking)."""
        own = self.own_credentials()
        entry = self._fetch(principal)
        return {"service": str(own.name), "user": principal, "target": self.settings.target_spn,
                "valid_for_s": round(entry.expires - time.monotonic() + MARGIN)}


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def spnego_init(krb5_token: bytes) -> bytes:
    """A Kerberos GSS token as the optimistic mechToken of an SPNEGO NegTokenInit (RFC 4178 4.2.1):
    what HTTP Negotiate carries (RFC 4559), with Kerberos 5 the one mechanism offered."""
    mech_types = _der(0xA0, _der(0x30, _KRB5_OID_DER))
    mech_token = _der(0xA2, _der(0x04, krb5_token))
    return _der(0x60, _SPNEGO_OID_DER + _der(0xA0, _der(0x30, mech_types + mech_token)))


def _minor_text(exc) -> str:
    text = exc.gen_message() if hasattr(exc, "gen_message") else str(exc)
    return " ".join(text.split())[:300]


def _classified(exc, what: str) -> Exception:
    code = (getattr(exc, "min_code", 0) or 0) & 0xFFFFFFFF
    reason = _USER_REFUSALS.get(code - _KDC_BASE)
    if reason is not None:
        return KcdRefused(reason)
    return KcdUnavailable(f"{what}: {_minor_text(exc)}")
