"""EWS for the notification service, and webmail: paths forwarded beside ActiveSync.

Two routes, each off by default and each with its own switch:

- **EWS** (``[ews]``, the guide's ``enable.boxer.ens.ews.proxy``): the paths listed
  (``/EWS/Exchange.asmx``) go to the mail server's EWS for the notification service (ENS).
  Only from the addresses in ``ews.allowed_sources``; no EAS policy applies (there is no
  device), but a user the user policy blocks is refused 403, the user read from the
  credential (eas/credentials.py) as for ActiveSync. A request acting for another mailbox
  (an ``ExchangeImpersonation`` SOAP header, ews_impersonation.py) is refused 403 too when
  the user policy blocks the impersonated user: EWS bodies are read whole for that, up to
  1 MB (bigger ones 413, never forwarded; non-XML or DTD-carrying ones 400).
- **Webmail** (``[webmail]``): requests under the path prefixes listed (``/owa/``,
  ``/ecp/``) are forwarded untouched; ``Set-Cookie`` domains and ``Location`` redirects that
  name the mail server are rewritten to ``listener.external_url``.

The route decision is made here and only here: ``claims`` (does this request belong to
a passthrough route?) and ``_route`` (which one, or why it is refused). A claimed path
must be canonical: no dot segments, no escaped slash, backslash, dot or percent, no
``;`` parameters, no empty segment, ASCII only. Anything else is refused 400, so a path
can never name one resource here and another at the mail server
(``/owa/../Microsoft-Server-ActiveSync`` would otherwise reach ActiveSync past its policy).

Both routes use the ActiveSync upstream pool (upstream.py: the same TLS trust, outbound
proxy and keep-alive connections; client certificates and KCD for EWS, kcd/). A mail-server
connection NTLM or Negotiate authenticated is kept for the one device connection that
authenticated it (pinning.py): NTLM's legs and later requests without credentials must reach
the mail server on it. Bodies stream both ways, one read at a time, under the
same deadlines: the whole head (downstream.py), the whole body (``timeouts.request_body``
plus ``limits.min_body_rate``), every write to the device (``timeouts.device_write``),
and ``timeouts.upstream_read`` for every read from the mail server.

Each transaction is one summary record (``command`` "EWS" or "webmail") in the
transaction log, written while its logging area (``transactions_ews``,
``transactions_webmail``) is on (it is by default).
"""
from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import h11
import trio

from seg_fast.eas import credentials
from seg_fast.eas.request import parse_request
from seg_fast.errors import EASRequestError, SOAPError
from seg_fast.observe import Transaction
from seg_fast.policy.gate import LOG_AREAS
from seg_fast.proxy import ews_impersonation
from seg_fast.proxy import headers as hdrs
from seg_fast.proxy import exchange, pinning     # exchange: the one relay (bodies, answers)
from seg_fast.proxy.headers import TrustedProxies
from seg_fast.proxy.upstream import Origin, UpstreamError, origin_of

EWS, WEBMAIL = "EWS", "webmail"
# The logging areas (policy/gate.py) whose level decides if a route's records are written.
AREA_LOGGERS = {EWS: LOG_AREAS["transactions_ews"], WEBMAIL: LOG_AREAS["transactions_webmail"]}
for _name in AREA_LOGGERS.values():
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)      # on unless the admin turns it off
del _name

SMALL_BODY = 64 * 1024            # request bodies up to this are read whole (resent once on a dead keep-alive)
_END = h11.EndOfMessage()
_CHUNKED = [(b"Transfer-Encoding", b"transfer-encoding", b"chunked")]
_TEXT = [(b"Content-Type", b"text/plain")]
# Escapes whose byte could change which resource a path names (a separator, a dot, a
# second escape) or that some servers decode their own way (IIS's %uXXXX, overlong UTF-8).
_UNSAFE_DECODED = frozenset(b"/\\.%;") | frozenset(range(0x20)) | frozenset(range(0x7f, 0x100))
_HEX = frozenset(b"0123456789abcdefABCDEF")

ALLOWED_EWS = "allowed.ews"
ALLOWED_WEBMAIL = "allowed.webmail"
BLOCKED_SOURCE = "blocked.source_address"
BLOCKED_CERTIFICATE = "blocked.certificate"     # kcd/: no, a refused or an undelegable certificate


def config_problems(config) -> list[tuple[str, str]]:
    """(key, problem) for the [ews] and [webmail] sections (config.py names the file)."""
    problems = []
    ews, web = config.ews, config.webmail
    eas = [p.lower() for p in config.eas.paths]

    def overlaps(prefix: str) -> bool:
        # A passthrough path that covers an EAS path (or sits under one) would let a
        # request skip the EAS policy by its spelling.
        return any(e.startswith(prefix) or prefix.startswith(e) for e in eas)

    for path in ews.paths:
        if not path.startswith("/") or "?" in path or not canonical(path.encode()):
            problems.append(("ews.paths", f"{path!r} must be a canonical absolute path without a query"))
        elif overlaps(path.lower()):
            problems.append(("ews.paths", f"{path!r} overlaps an eas.paths entry"))
    if ews.enabled and not ews.paths:
        problems.append(("ews.paths", "needs at least one path when ews.enabled"))
    try:
        TrustedProxies(ews.allowed_sources)
    except ValueError as exc:
        problems.append(("ews.allowed_sources", f"not an address or CIDR network: {exc}"))
    if ews.enabled and not ews.allowed_sources:
        problems.append(("ews.allowed_sources", "list the notification service's addresses (CIDR) when "
                         "ews.enabled (0.0.0.0/0 and ::/0 for any)"))
    for prefix in web.prefixes:
        if not prefix.startswith("/") or not prefix.endswith("/") or len(prefix) < 3 or "?" in prefix \
                or not canonical(prefix.encode()):
            problems.append(("webmail.prefixes", f"{prefix!r} must be a canonical path that starts and ends with /"))
        elif overlaps(prefix.lower()):
            problems.append(("webmail.prefixes", f"{prefix!r} overlaps an eas.paths entry"))
        elif any(p.lower().startswith(prefix.lower()) for p in ews.paths):
            # EWS's allow-list and user policy must not be skipped by a spelling webmail takes.
            problems.append(("webmail.prefixes", f"{prefix!r} covers an ews.paths entry"))
    if web.enabled and not web.prefixes:
        problems.append(("webmail.prefixes", "needs at least one prefix when webmail.enabled"))
    if web.enabled and not config.listener.external_url:
        problems.append(("listener.external_url", "webmail.enabled needs the gateway's external URL "
                         "(cookies and redirects are rewritten to it)"))
    for key, url in (("ews.url", ews.url), ("webmail.url", web.url)):
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
                problems.append((key, "must be an http:// or https:// URL with a host and no path (or empty)"))
    return problems


def canonical(path: bytes) -> bool:
    """Whether ``path`` (no query) names the same resource to every reader: no dot
    segment, empty segment or ``;`` parameter, no escape of a separator, dot, percent or
    non-ASCII byte, no backslash, nothing outside printable ASCII."""
    if path[:1] != b"/" or b"\\" in path or b";" in path or b"//" in path:
        return False
    if not path.isascii() or any(b < 0x21 or b == 0x7f for b in path):
        return False
    i = path.find(b"%")
    while i >= 0:
        esc = path[i + 1:i + 3]
        if len(esc) != 2 or esc[0] not in _HEX or esc[1] not in _HEX or int(esc, 16) in _UNSAFE_DECODED:
            return False
        i = path.find(b"%", i + 3)
    for segment in path.split(b"/")[1:]:
        if segment in (b".", b".."):
            return False
    return True


class Passthrough:
    """The passthrough routes of one config (None from ``build`` when both are off)."""

    def __init__(self, config):
        ews, web = config.ews, config.webmail
        self.ews_paths = frozenset(p.lower().encode() for p in ews.paths) if ews.enabled else frozenset()
        self.web_prefixes = tuple(p.lower().encode() for p in web.prefixes) if web.enabled else ()
        # What a target must start with to be claimed (EWS paths as prefixes too: their
        # odd spellings are claimed, then refused, rather than left to the EAS route).
        self.claim = self.web_prefixes + tuple(sorted(self.ews_paths))
        self._claim_len = max(map(len, self.claim), default=0)
        self.sources = TrustedProxies(ews.allowed_sources)     # the CIDR matcher, used as an allow-list
        self.ews_origin = origin_of(ews.url or config.upstream.url)
        self.web_origin = origin_of(web.url or config.upstream.url)
        ext = urlsplit(config.listener.external_url) if config.listener.external_url else None
        self.external = config.listener.external_url.rstrip("/").encode("ascii") if ext else b""
        self.external_host = (ext.hostname or "").encode("ascii") if ext else b""
        self.loggers = {kind: logging.getLogger(name) for kind, name in AREA_LOGGERS.items()}
        # Mail-server connections NTLM/Negotiate authenticated, one device connection's each.
        self.pins = pinning.PINS

    @classmethod
    def build(cls, config) -> "Passthrough | None":
        return cls(config) if config.ews.enabled or config.webmail.enabled else None

    def claims(self, target: bytes) -> bool:
        """Whether this request is a passthrough route's (then ``handle`` answers it)."""
        # The ActiveSync hot path pays this: only as many bytes as the longest prefix are lowered.
        return target[:self._claim_len].lower().startswith(self.claim)

    def _route(self, method: bytes, path: bytes) -> tuple[str, Origin | None, int, str]:
        """(kind, origin or None if refused, refusal status, refusal reason) of a claimed path."""
        low = path.lower()
        if low in self.ews_paths:
            kind, origin = EWS, self.ews_origin
        elif low.startswith(self.web_prefixes):
            kind, origin = WEBMAIL, self.web_origin
        else:
            kind, origin = EWS, None           # an ews.paths entry's prefix with more after it
        if not canonical(path):
            return kind, None, 400, "path is not canonical (dot segment, escaped separator, ...)"
        if origin is None:
            return kind, None, 404, "not an ews.paths entry"
        if method == b"CONNECT":
            return kind, None, 405, "CONNECT is not forwarded"
        return kind, origin, 0, ""

    async def handle(self, gw, dev, request: h11.Request) -> int:
        """Answer one claimed request: refuse it, or forward it and stream the answer back."""
        t0 = time.perf_counter()
        path = request.target.partition(b"?")[0]
        method = request.method.decode("ascii", "replace")
        kind, origin, status, why = self._route(request.method, path)
        rec = Transaction(ts=0.0, method=method, command=kind, client_ip=dev.client_ip)
        try:
            if origin is None:
                rec.decision = "blocked.path"
                return await _refuse(dev, rec, status, why)
            full = hdrs.items(request.headers)
            try:
                # The EAS reader for what both routes need: one Authorization header at most,
                # no control characters in values, the user the credential names, and the
                # client's address past trusted load balancers.
                req = parse_request(method, path, [(low, value) for _, low, value in full], dev.client_ip,
                                    gw.trusted_proxies)
            except EASRequestError as exc:
                rec.decision = "blocked.malformed"
                return await _refuse(dev, rec, 400, str(exc))
            if not self.pins.inherit(dev.stream, req, origin):
                # The mail server takes this request as the user the connection was authenticated
                # for (NTLM/Negotiate): one naming another user is refused.
                rec.decision = "blocked.malformed"
                return await _refuse(dev, rec, 400, "User= names another user than the authenticated connection")
            rec.client_ip, rec.user = req.client_ip, req.user
            if kind == EWS:
                if req.client_ip not in self.sources:
                    rec.decision = BLOCKED_SOURCE
                    return await _refuse(dev, rec, 403, "source address not in ews.allowed_sources")
                certauth = getattr(gw, "certauth", None)
                if certauth is not None:     # a client certificate's user decides, as for ActiveSync
                    refusal = certauth.admit(dev.stream, req, rec)
                    if refusal is not None:
                        rec.decision = BLOCKED_CERTIFICATE
                        return await _refused_by(dev, rec, refusal)
                rec.decision, allowed = user_decision(gw.gatekeeper, req)
                if not allowed:
                    return await _refuse(dev, rec, 403, "refused by the user policy")
                # The body may act for another mailbox (ExchangeImpersonation): read it whole
                # (bounded) and apply the user policy to each user it names too.
                body, status, why = await _ews_body(gw, dev, full, rec)
                if body is None:
                    rec.decision = "blocked.body_too_large" if status == 413 else "blocked.malformed"
                    return await _refuse(dev, rec, status, why)
                try:
                    acting = ews_impersonation.impersonated(body)
                except SOAPError as exc:
                    rec.decision = "blocked.malformed"
                    return await _refuse(dev, rec, 400, str(exc))
                for kind_of_name, name in acting:
                    reason, allowed = impersonation_decision(gw.gatekeeper, req, kind_of_name, name)
                    if reason != ALLOWED_EWS:
                        rec.decision = reason
                    if not allowed:
                        return await _refuse(dev, rec, 403, "impersonated user refused by the user policy")
                kcd = getattr(gw, "kcd", None)
                if kcd is not None:          # to the mail server as the certificate's user (kcd/delegation.py)
                    full, refusal = await kcd.authorize(certauth.identity_of(dev.stream), req, full, rec)
                    if refusal is not None:
                        rec.decision = BLOCKED_CERTIFICATE
                        return await _refused_by(dev, rec, refusal)
            else:
                rec.decision = ALLOWED_WEBMAIL
            rec.upstream = f"{origin.host}:{origin.port}"
            return await self._forward(gw, dev, request, full, origin, req, rec,
                                       body if kind == EWS else None)
        finally:
            if self.loggers[kind].isEnabledFor(logging.INFO):
                _log(gw, rec, t0)
            else:
                gw.stats.tx(rec, t0)

    async def _forward(self, gw, dev, request: h11.Request, full, origin: Origin, req,
                       rec: Transaction, body: bytes | None = None) -> int:
        """``body``: the request body when it was read already (EWS), else it is read here."""
        scheme = req.auth_scheme
        pinned = self.pins.take(gw.pool, dev.stream, origin, scheme)
        await _continue(dev)
        declared = hdrs.facts(full)[0]
        chunked = any(low == b"transfer-encoding" for _, low, _ in full)
        length = None if chunked else (int(declared) if declared is not None else 0)
        if body is None and length is not None and length <= SMALL_BODY:
            body = await _read_body(gw, dev, rec)
        if body is not None:
            framing = hdrs.content_length(len(body)) if body or request.method not in (b"GET", b"HEAD", b"OPTIONS") \
                else []
        elif chunked:
            framing = _CHUNKED
        else:
            framing = hdrs.content_length(length)
        # The gateway frames what it sends by what h11 parsed: a Content-Length beside a
        # Transfer-Encoding (smuggling) never reaches the mail server (downstream.py closes after).
        head = hdrs.upstream_request_headers(full, host=origin.host_header, client_ip=dev.client_ip,
                                             proto=dev.proto, behind_proxy=dev.client_ip in gw.trusted_proxies,
                                             framing=framing)
        up_request = hdrs.request_event(request.method, request.target, head)
        t_up = time.perf_counter()
        for attempt in (0, 1):
            if attempt == 0 and pinned is not None:
                up = pinned                   # this device connection's own, authenticated
            else:
                try:
                    up = await gw.pool.acquire(origin, resendable=body is not None)
                except UpstreamError as exc:
                    return await _unavailable(gw, dev, rec, str(exc))
            try:
                out = up.h11.send(up_request)
                if body is not None:
                    parts = [out]
                    if body:
                        parts += up.h11.send_with_data_passthrough(h11.Data(data=body))
                    parts.append(up.h11.send(_END))
                    await exchange._send_up_parts(gw, up, parts)
                else:
                    await exchange._pump_request(gw, dev, up, out, rec)
                answer = await exchange._answer_head(up, gw.config.timeouts.upstream_read)
                break
            except UpstreamError as exc:
                gw.pool.discard(up)
                # A kept-alive connection the server closed just now: resend once (the body is whole).
                if attempt == 0 and up.reused and body is not None and not isinstance(exc, _Timeout):
                    continue
                return await _unavailable(gw, dev, rec, str(exc))
            except BaseException:
                gw.pool.discard(up)
                raise
        rec.upstream_ms = round((time.perf_counter() - t_up) * 1000, 3)
        try:
            headers = self.rewrite(hdrs.answer_headers(hdrs.items(answer.headers)), origin)
            if dev.closing:
                headers.append((b"Connection", b"connection", b"close"))
            rec.status = answer.status_code
            await exchange._stream_answer(gw, dev, up, answer.status_code, headers, rec, answer.reason)
        except BaseException:
            gw.pool.discard(up)
            raise
        if scheme in credentials.CONNECTION_SCHEMES:
            # NTLM/Negotiate authenticate the connection: never shared with another client, but
            # kept for this device connection, whose next request (the handshake's next leg, or
            # one without credentials) the mail server takes as the same user.
            self.pins.keep(gw.pool, dev.stream, up, origin, req, rec.status, dev.closing)
        else:
            gw.pool.release(up)
        return rec.status

    # -- answer header rewriting ------------------------------------------------------------
    def rewrite(self, headers: hdrs.Full, origin: Origin) -> hdrs.Full:
        """Location redirects and Set-Cookie domains that name the mail server, made to name
        the gateway (listener.external_url); everything else as the mail server sent it."""
        if not self.external:
            return headers
        host = origin.host.lower().encode("ascii", "replace")
        out = []
        for item in headers:
            low = item[1]
            if low == b"location":
                item = (item[0], low, rewrite_location(item[2], host, self.external))
            elif low == b"set-cookie":
                item = (item[0], low, rewrite_cookie_domain(item[2], host, self.external_host))
            out.append(item)
        return out


def rewrite_location(value: bytes, host: bytes, external: bytes) -> bytes:
    """An absolute ``Location`` on ``host`` (any scheme or port) moved to ``external``
    ("https://mail.example.com"); relative ones and other hosts are left alone."""
    low = value.lower()
    for scheme in (b"https://", b"http://"):
        if low.startswith(scheme):
            rest = value[len(scheme):]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0), default=len(rest))
            authority = rest[:cut].lower().rpartition(b"@")[2]
            name = authority[1:].partition(b"]")[0] if authority.startswith(b"[") else authority.partition(b":")[0]
            if name == host:
                tail = rest[cut:]
                return external + (tail if tail.startswith(b"/") else b"/" + tail)
            return value
    return value


def rewrite_cookie_domain(value: bytes, host: bytes, external_host: bytes) -> bytes:
    """A ``Set-Cookie`` whose Domain is the mail server's name or a domain above it, given
    the gateway's name instead (a browser would drop it otherwise); other attributes kept."""
    parts = value.split(b";")
    changed = False
    for i, part in enumerate(parts[1:], 1):
        name, eq, domain = part.partition(b"=")
        if eq and name.strip().lower() == b"domain":
            d = domain.strip().lower().lstrip(b".")
            if d and (host == d or host.endswith(b"." + d)):
                parts[i] = b" Domain=" + external_host
                changed = True
    return b";".join(parts) if changed else value


def user_decision(gatekeeper, req) -> tuple[str, bool]:
    """(reason, forwarded) for an EWS request: the user policy alone (no device, no EAS
    policy). Follows the engine's rules for no document, an unverified user and test mode."""
    from seg_fast.policy import engine as E

    engine = getattr(gatekeeper, "engine", None)
    if engine is None:                       # a gatekeeper without a policy engine (tests, benchmarks)
        return ALLOWED_EWS, True
    pol = engine.policies
    if pol is None:
        reason = E.NO_POLICIES_ALLOWED if engine.allow_if_no_policies else E.NO_POLICIES_BLOCKED
    elif req.identity == credentials.HANDSHAKE:
        reason = ALLOWED_EWS                 # NTLM type 1: the mail server answers a challenge, never mail
    elif pol.user is None:
        reason = ALLOWED_EWS
    elif req.identity == credentials.NONE and engine.refuse_unverified:
        reason = E.USER_UNVERIFIED
    elif not pol.user.passes(*E.user_forms(req.user)):
        reason = E.USER
    else:
        reason = ALLOWED_EWS
    if reason.startswith("blocked."):
        return reason, engine.test_mode      # test mode: decide and record, never block
    return reason, True


IMPERSONATION_SID = "blocked.impersonation_sid"


def impersonation_decision(gatekeeper, req, kind: str, name: str) -> tuple[str, bool]:
    """(reason, forwarded) for a user an EWS request impersonates (ews_impersonation.py):
    the user policy applied to that name as to a credential's user. A user named by SID
    alone cannot be matched against the policy's names: refused while a user policy is on."""
    from seg_fast.policy import engine as E

    engine = getattr(gatekeeper, "engine", None)
    pol = engine.policies if engine is not None else None
    if pol is None or pol.user is None:
        return ALLOWED_EWS, True            # no user policy: nothing to apply (user_decision saw the rest)
    if kind == "sid":
        reason = IMPERSONATION_SID
    elif not pol.user.passes(*E.user_forms(name)):
        reason = E.USER
    else:
        return ALLOWED_EWS, True
    return reason, engine.test_mode


# -- the wire ---------------------------------------------------------------------------------

class _Timeout(UpstreamError):
    pass


def _log(gw, rec: Transaction, t0: float) -> None:
    gw.stats.tx(rec, t0)
    if gw.log.enabled:
        rec.ts = time.time()
        rec.total_ms = round((time.perf_counter() - t0) * 1000, 3)
        gw.log.write(rec)


async def _refuse(dev, rec: Transaction, status: int, why: str) -> int:
    rec.status, rec.error = status, why[:200]
    body = hdrs.reason_phrase(status).lower() + b"\n"
    rec.bytes_out = len(body)
    await dev.answer(status, _TEXT, body)
    return status


async def _refused_by(dev, rec: Transaction, refusal: tuple) -> int:
    """An answer kcd/ made (status, headers, body); its reason is in rec.error already."""
    status, headers, body = refusal
    rec.status, rec.bytes_out = status, len(body)
    await dev.answer(status, headers, body)
    return status


async def _unavailable(gw, dev, rec: Transaction, why: str) -> int:
    rec.status, rec.error = 503, why[:200]
    await dev.answer(503, [(b"Retry-After", str(gw.config.upstream.retry_after).encode())])
    return 503


async def _continue(dev) -> None:
    """Answer an ``Expect: 100-continue`` (once) before the body is read."""
    conn = dev.conn
    if conn.they_are_waiting_for_100_continue:
        await dev.send_bytes(conn.send(h11.InformationalResponse(status_code=100, headers=[])))


async def _ews_body(gw, dev, full, rec: Transaction) -> tuple[bytes | None, int, str]:
    """(body, 0, "") of an EWS request, read whole; (None, status, why) when it cannot be:
    413 for one over ews_impersonation.BODY_LIMIT (declared or as it arrives, the rest left
    unread and the connection closed), never streamed, since its impersonation header
    could not be checked."""
    limit = ews_impersonation.BODY_LIMIT
    declared = hdrs.facts(full)[0]
    chunked = any(low == b"transfer-encoding" for _, low, _ in full)
    if not chunked and declared is not None and int(declared) > limit:
        return None, 413, f"an EWS request body over {limit} bytes is not forwarded"
    await _continue(dev)
    body = await _read_body(gw, dev, rec, limit)
    if body is None:
        return None, 413, f"an EWS request body over {limit} bytes is not forwarded"
    return body, 0, ""


async def _read_body(gw, dev, rec: Transaction, limit: int | None = None) -> bytes | None:
    """A small request body (Content-Length at most SMALL_BODY), whole, by its deadline;
    None as soon as more than ``limit`` bytes came (the rest left unread)."""
    conn = dev.conn
    pace, start = exchange._body_pace(gw), trio.current_time()
    parts = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            await dev.receive(pace.deadline(start, rec.bytes_in))
        elif type(event) is h11.Data:
            rec.bytes_in += len(event.data)
            if limit is not None and rec.bytes_in > limit:
                return None
            parts.append(event.data)
        elif type(event) is h11.EndOfMessage:
            return b"".join(parts)
        else:
            raise exchange.DeviceGone("device closed during the request body")


