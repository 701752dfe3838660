"""One EAS transaction: identify, decide, forward, answer, record.

Bodies stream through untouched unless a Decision holds transforms for the
command; then they are buffered (bounded) and rewritten. Small request bodies are
read whole first, so the request leaves in one write and can be resent once if a
kept-alive mail-server connection turns out to be dead.
"""
from __future__ import annotations

import os
import time

import h11
import msgspec
import trio

from seg_fast.content._mime import join as join_parts, writable_bytes
from seg_fast.eas.credentials import CERTIFICATE, CONNECTION_SCHEMES
from seg_fast.eas.resolverecipients import CertificateFill
from seg_fast.eas.request import EasRequest, parse_request
from seg_fast.errors import ContentError, EASRequestError, HTTPProtocolError, WBXMLError
from seg_fast.hooks import Decision
from seg_fast import dx
from seg_fast.observe import Transaction
from seg_fast.proxy import headers as hdrs
from seg_fast.proxy import http1, parking, ping, sealstream, sockio
from seg_fast.proxy._http1 import identify
from seg_fast.proxy.parking import Parked
from seg_fast.proxy.pinning import PINS
from seg_fast.proxy.redirects import is_redirect
from seg_fast.proxy.upstream import RECEIVE_SIZE, UpstreamConn, UpstreamError

# A Content-Length answer's body goes on in passes of up to this much. A plain socket's read
# gives at most 64 KiB (read_nb); an https:// mail server's gathers what is whole, up to 16
# records (tlsio.read_more): 256 KiB passes halve a big answer's device writes and loop passes
# (benchmarks/README.md, "Relay passes of 256 KiB").
RELAY_SIZE = 4 * RECEIVE_SIZE

# Request bodies up to this size are read whole before going upstream.
SMALL_BODY = 64 * 1024
# The fast lane yields once before reading the mail server's answer: on a busy worker the
# answer is there after the others' ready work and is read without an epoll registration;
# on a worker with little to do it is not, and the yield was one more loop pass per
# request. After a read that found nothing the next YIELD_BACKOFF requests wait at once.
YIELD_BACKOFF = 8
OPTIONS_DECISION = Decision(allowed=True, reason="allowed.options")
_CHUNKED = [(b"Transfer-Encoding", b"transfer-encoding", b"chunked")]


class DeviceGone(Exception):
    """The device closed or stalled its connection; nothing more can be sent to it."""


class DeviceTimeout(DeviceGone):
    """The device missed a request deadline (head, body); answered 408 if it still can be."""


PARKED = "parked"      # handle() result: the Ping waits in the parking lot, its task may end
END = h11.EndOfMessage()   # events are immutable: one end-of-message serves every send


async def handle(gw, dev, request: h11.Request):
    if gw.passthrough is not None and gw.passthrough.claims(request.target):
        return await gw.passthrough.handle(gw, dev, request)     # EWS, webmail: proxy/passthrough.py
    t0 = time.perf_counter()
    rec = Transaction(ts=0.0, method=request.method.decode("ascii", "replace"), client_ip=dev.client_ip)
    result = None
    try:
        result = await _handle(gw, dev, request, rec, t0)
        return result
    finally:
        if result is not PARKED:
            _log(gw, rec, t0)


NOT_FAST = "not fast"   # fast() result: the exchange is handle()'s (nothing was done yet)
FAST_LANE = True        # tests turn it off to hold the lane to the general path (test_fastpath_lane.py)
_POST = b"POST"


class Plan(msgspec.Struct, eq=False):
    """A request the fast lane carries (fast_plan): what its steps need, decided once. (A
    Struct: made by C, not by a Python frame, once per request.)"""

    head: object                      # http1.RequestHead (its target and headers go up)
    req: object                       # EasRequest
    decision: object
    body: bytes
    rec: Transaction
    t0: float
    host: bytes = b""                 # a held Ping's Host header, for a redirect (shed())
    answer_tx: object = ()            # the answer's transforms (email security): a list, or none


async def fast(gw, dev, head: http1.RequestHead):
    """The common exchange in one frame (handle() minus what it does not need): a POST to an
    EAS path whose whole small body came with its head, identified by the compiled code, an
    allowed decision with no transforms but the answer's, not a Ping, no passthrough, pinned
    connection, client certificate, delegation or Dx. The request head goes up rewritten by the
    compiled writer, the answer comes back through the compiled parser and, when its body is
    whole in the read that brought its head (Content-Length, no redirect) and nothing transforms
    it, goes to the device in one write; anything else continues on the general path's own
    steps (_finish, the answer's transforms included). Returns NOT_FAST,
    having done nothing, for any other request: handle() then takes it whole."""
    plan = fast_plan(gw, dev, head)
    if plan is NOT_FAST:
        return NOT_FAST
    return await fast_run(gw, dev, plan)


def fast_plan(gw, dev, head: http1.RequestHead):
    """fast()'s choice, made without waiting: the exchange's Plan (its body taken from the
    device's read), or NOT_FAST having done nothing. proxy/lane.py carries a Plan itself."""
    if not FAST_LANE or head.method != _POST or head.framing != http1.FRAMING_LENGTH or dev.behind_proxy \
            or PINS.by_stream.data or gw.stats.dx.active or dx.PENDING \
            or getattr(gw, "certauth", None) is not None or getattr(gw, "kcd", None) is not None:
        return NOT_FAST
    n = head.length
    if n > SMALL_BODY or len(dev._rest) < n:
        return NOT_FAST
    t0 = time.perf_counter()
    target = head.target
    q = target.find(b"?")
    if (target[:q] if q >= 0 else target).lower() not in gw.eas_paths:
        return NOT_FAST
    if gw.passthrough is not None and gw.passthrough.claims(target):
        return NOT_FAST
    full = head.headers
    req = identify("POST", target, full, dev.client_ip)
    if req is None:
        return NOT_FAST
    command = req.command
    if command == "Ping":
        # Parked as _forward parks it, or not on this lane: bytes after the body (a pipelined
        # request) or an NTLM/Negotiate connection keep a Ping on the general path.
        if gw.parking is None or gw.draining or len(dev._rest) != n or req.auth_scheme in CONNECTION_SCHEMES:
            return NOT_FAST
    elif command == "ResolveRecipients" and getattr(gw, "certs", None) is not None:
        return NOT_FAST
    gatekeeper = gw.gatekeeper
    decision = gatekeeper.decide(req)
    if not decision.allowed:
        return NOT_FAST
    answer_tx = ()
    if decision.transforms:
        answer_tx, request_tx = _transforms_for(decision, command)
        # The answer's transforms run where the general path runs them (_finish; the lane's step
        # for a small whole answer: transformed_parts). A request's transforms, one that waits
        # (LDAP), a Ping's (then never parked) and a worker already holding max_unsent_bytes
        # (refused before the mail server works) are the general path's.
        if request_tx or (answer_tx and (command == "Ping" or gw.unsent.full() or any(
                getattr(t, "transform_answer_async", None) is not None for t in answer_tx))):
            return NOT_FAST
    # From here the exchange is this lane's.
    body = dev.take_body()
    rec = Transaction(ts=0.0, method="POST", client_ip=req.client_ip, command=command, user=req.user,
                      device_id=req.device_id, device_type=req.device_type,
                      protocol_version=req.protocol_version, decision=decision.reason, bytes_in=n)
    return Plan(head, req, decision, body, rec, t0, answer_tx=answer_tx or ())


async def fast_run(gw, dev, plan: Plan):
    """A planned exchange, from its request's write: PARKED (a Ping), or None once answered."""
    result = None
    try:
        if plan.req.command == "Ping":
            result = await _fast_park(gw, dev, plan)
            return result
        await _fast_forward(gw, dev, plan)
    finally:
        if result is not PARKED:      # a parked Ping's transaction is resume()'s to finish
            finish_log(gw, plan)


def finish_log(gw, plan: Plan) -> None:
    """The exchange's end: its status counted for the device's record, its line logged."""
    rec = plan.rec
    if rec.status:
        gw.gatekeeper.record(plan.req, plan.decision, rec.status)
    _log(gw, rec, plan.t0)


def read_timeout(gw, plan: Plan) -> float:
    """How long the mail server may take to answer: a Ping's heartbeat (plus margin), a Sync
    long-poll's Wait, or timeouts.upstream_read."""
    req, body = plan.req, plan.body
    if req.command == "Ping":
        return ping.upstream_deadline(gw, req, body)
    timeouts = gw.config.timeouts
    timeout = timeouts.upstream_read
    if req.command == "Sync" and (b"\x64" in body or b"\x69" in body):
        wait = sync_wait(body)
        if wait is not None:          # a Sync long-poll: the mail server may hold it this long
            timeout = max(timeout, wait + timeouts.ping_margin)
    return timeout


def upstream_parts(dev, plan: Plan, origin) -> list:
    """The fast lane's request to the mail server: the compiled writer's head (headers.py's
    rules when a Connection header names headers to drop), then the body."""
    body = plan.body
    n = len(body)
    head = plan.head
    out = http1.write_upstream(_POST, head.target, head.headers, origin.host_header, dev.client_ip.encode(),
                               dev.proto, n)
    if out is None:
        full = hdrs.upstream_request_headers(head.headers, host=origin.host_header, client_ip=dev.client_ip,
                                             proto=dev.proto, behind_proxy=False, framing=hdrs.content_length(n))
        out = http1.write_request(_POST, head.target, full, http1.FRAMING_LENGTH, n)
    return [out, body] if body else [out]


def parked(dev, plan: Plan, up: UpstreamConn, deadline: float, t_up: float) -> Parked:
    """The record of a Ping whose request went up, for the parking lot."""
    head = plan.head
    _, host, _ = hdrs.facts(head.headers)
    up.h11, up.sent = None, None
    return Parked(dev.stream, dev.client_ip, dev.proto, dev.closing or not head.keep_alive, up, plan.req,
                  plan.decision, plan.rec, host or b"", deadline, t_up, plan.t0)


async def _fast_park(gw, dev, plan: Plan):
    """A Ping on the fast lane: written up in one piece (the compiled writer), then parked as
    _forward parks one (PARKED); or answered 503 if the mail server cannot be reached."""
    rec = plan.rec
    origin = gw.redirects.origin_for(plan.req.user)
    rec.upstream = origin.name
    timeout = read_timeout(gw, plan)
    parts = upstream_parts(dev, plan, origin)
    t_up = time.perf_counter()
    for attempt in (0, 1):
        try:
            up = await gw.pool.acquire(origin, False)   # as _forward: a Ping parks right after the write
        except UpstreamError as exc:
            return await _unavailable(gw, dev, rec, str(exc))
        try:
            await _send_up_parts(gw, up, parts)
            break
        except UpstreamError as exc:
            gw.pool.discard(up)
            # A kept-alive connection may have been closed by the server just now: resend once.
            if attempt == 0 and up.reused:
                continue
            return await _unavailable(gw, dev, rec, f"{exc} ({up.facts()})")
        except BaseException:
            gw.pool.discard(up)
            raise
    gw.parking.park(parked(dev, plan, up, trio.current_time() + timeout, t_up))
    return PARKED


async def _fast_forward(gw, dev, plan: Plan) -> None:
    # The steps of _forward and _finish for this one case, inline: each await of a helper
    # coroutine is a frame made and resumed through on every wakeup.
    rec = plan.rec
    timeout = read_timeout(gw, plan)
    origin = gw.redirects.origin_for(plan.req.user)
    rec.upstream = origin.name
    target = plan.head.target
    body = plan.body
    parts = upstream_parts(dev, plan, origin)
    t_up = time.perf_counter()
    pool = gw.pool
    for attempt in (0, 1):
        up = pool.take(origin)        # acquire()'s common case, without its coroutine
        if up is None:
            try:
                up = await pool.acquire(origin, True)
            except UpstreamError as exc:
                await _unavailable(gw, dev, rec, str(exc))
                return
        try:
            up.sent = (_POST, target, len(body))
            try:
                await sockio.send_parts(up.stream, up.plain, parts, gw.upstream_pace)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamError(f"mail server connection broke while sending: {type(exc).__name__}") from None
            first = b""
            if up.plain is not None:
                if gw.yield_skips:
                    gw.yield_skips -= 1
                else:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    try:
                        first = sockio.read_now(up.plain, RECEIVE_SIZE) or b""
                    except OSError as exc:
                        raise UpstreamError(f"mail server connection broke: {type(exc).__name__}") from None
                    if not first:
                        gw.yield_skips = YIELD_BACKOFF
            answer = answer_in(up, first) if first else None
            if answer is None:
                answer = await _fast_answer_head(up, timeout, first)
            break
        except UpstreamError as exc:
            pool.discard(up)
            # A kept-alive connection may have been closed by the server just now: resend once.
            if attempt == 0 and up.reused and not isinstance(exc, _Timeout):
                continue
            await _unavailable(gw, dev, rec, f"{exc} ({up.facts()})")
            return
        except BaseException:
            pool.discard(up)
            raise
    rec.upstream_ms = round((time.perf_counter() - t_up) * 1000, 3)
    await deliver(gw, dev, up, answer, plan, b"")


def answer_in(up: UpstreamConn, data: bytes) -> http1.ResponseHead | None:
    """The compiled head of the answer ``data`` starts (what follows it in ``up.rest``); None
    for more to read, a 1xx, or what h11 must read (_fast_answer_head's loop)."""
    try:
        answer = http1.parse_response(data, _POST, MAX_ANSWER_HEAD)
    except HTTPProtocolError as exc:
        raise UpstreamError(f"mail server sent a malformed answer: {exc}") from None
    if type(answer) is http1.ResponseHead and not answer.informational:
        up.rest = data[answer.head_len:]
        return answer
    return None


async def answer_inflight(gw, dev, f, why: str, first: bytes | None) -> bool:
    """Finish, on a task, an exchange proxy/lane.py sent up (``f``, a parking.Inflight): the
    answer whose first bytes the lane read (``first``; b"": the mail server closed), or the
    device gone, the deadline passed, the worker draining. True if the device connection can
    serve another request."""
    plan, up = f.plan, f.up
    rec, command = plan.rec, plan.req.command
    try:
        if why == parking.DEVICE_GONE:
            gw.pool.discard(up)
            rec.status = 499
            rec.error = f"device closed the connection while its {command} was with the mail server"
            return False
        if why == parking.TIMEOUT:
            gw.pool.discard(up)
            # (the words of the task's paths: resume() for a Ping, _up_read otherwise)
            await _unavailable(gw, dev, rec, "mail server did not answer the Ping within heartbeat + margin"
                               if command == "Ping" else
                               f"mail server did not answer within {f.timeout:g} s ({up.facts()})")
            return True
        if gw.draining:
            dev.closing = True
        if why == parking.DRAIN and command == "Ping":
            gw.pool.discard(up)       # as resume(): the device pings again elsewhere
            rec.decision += ".drained"
            await _answer(dev, rec, 200, ping.HEARTBEAT_EXPIRED_HEADERS, ping.HEARTBEAT_EXPIRED)
            return True
        if first == b"" and up.reused and command != "Ping":
            # A kept-alive connection the server closed as the request went up: resend once,
            # on another (_fast_forward's rule; a Ping's connection was probed, as acquire does).
            gw.pool.discard(up)
            await _fast_forward(gw, dev, plan)
            return True
        try:
            answer = await _fast_answer_head(up, max(f.deadline - trio.current_time(), 0.001), first or b"")
        except UpstreamError as exc:
            gw.pool.discard(up)
            await _unavailable(gw, dev, rec, f"{exc} ({up.facts()})")
            return True
        except BaseException:
            gw.pool.discard(up)
            raise
        rec.upstream_ms = round((time.perf_counter() - f.t_up) * 1000, 3)
        host = b""
        if command == "Ping":         # as a parked Ping's (resume): redirects name the device's Host
            host = plan.host
        await deliver(gw, dev, up, answer, plan, host)
        return True
    finally:
        finish_log(gw, plan)


def whole_answer(answer, rest: bytes) -> bool:
    """The answer is all in hand and can go to the device as read: a compiled head with a
    Content-Length body all in ``rest``, not a redirect (those are rewritten)."""
    return type(answer) is http1.ResponseHead and answer.framing == http1.FRAMING_LENGTH \
        and len(rest) >= answer.length and not is_redirect(answer.status_code)


def whole_parts(gw, dev, up: UpstreamConn, answer: http1.ResponseHead, rec: Transaction) -> list | None:
    """A whole answer's write to the device (whole_answer), the exchange recorded and the
    mail-server connection back in the pool; None if the compiled writer leaves it to _finish."""
    pool = gw.pool
    status = answer.status_code
    data = up.rest
    length = answer.length
    try:
        out = http1.write_answer(status, answer.reason, answer.headers, http1.FRAMING_LENGTH, length,
                                 dev.keeps_open())
    except BaseException:
        pool.discard(up)              # as _finish does: the connection is neither pooled nor leaked
        raise
    if out is None:
        return None
    # The whole answer is here: the mail-server connection goes back before the device
    # write (a slow device must not hold it); bytes after the answer make it unusable.
    up.reusable = answer.keep_alive and len(data) == length
    up.rest = b""
    pool.release(up)
    if len(data) > length:
        data = data[:length]
    rec.status = status
    rec.bytes_out = length
    dev.answer_written(status, answer.headers, answer.reason, raw=True)
    dev.answer_done()
    return [out, data] if length else [out]


def transformed_parts(gw, dev, up: UpstreamConn, answer: http1.ResponseHead, plan: Plan) -> list | None:
    """whole_parts for an answer the email-security transforms change (proxy/lane.py): a whole
    200 answer small enough to be transformed on the loop (THREAD_TRANSFORM_BYTES), transformed
    and framed as _finish and Device.answer make it, the mail-server connection back in the
    pool. None, having changed nothing, for anything else: the task's _finish takes the answer
    as read (a transform's ContentError too: it answers 500 there)."""
    length = answer.length
    if answer.status_code != 200 or length >= THREAD_TRANSFORM_BYTES or dev.closing:
        return None
    data = up.rest
    body = data[:length] if len(data) > length else data
    req = plan.req
    headers = hdrs.pairs(hdrs.answer_headers(answer.headers))
    try:
        for t in plan.answer_tx:
            headers, body = _apply(t, req, 200, headers, body)
    except ContentError:
        return None
    size_out = sum(map(len, body)) if type(body) is list else len(body)
    parts = dev.answer_parts(200, headers, body)
    if parts is None:
        return None
    up.reusable = answer.keep_alive and len(data) == length
    up.rest = b""
    gw.pool.release(up)
    rec = plan.rec
    rec.status = 200
    rec.bytes_out = size_out
    gw.stats.transform(req.command, length, size_out)
    return parts


async def deliver(gw, dev, up: UpstreamConn, answer, plan: Plan, host: bytes) -> None:
    """The fast lane's answer to the device: in one write when it is whole (whole_answer)
    and nothing transforms it, else through _finish."""
    answer_tx = plan.answer_tx
    if not answer_tx and whole_answer(answer, up.rest):
        parts = whole_parts(gw, dev, up, answer, plan.rec)
        if parts is not None:
            try:                      # Device.send_parts, inline
                await sockio.send_parts(dev.stream, dev.sock, parts, gw.device_pace)
            except TimeoutError as exc:
                dev._write_timeout(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise DeviceGone(type(exc).__name__) from None
            return
    await _finish(gw, dev, up, plan.req, answer, answer_tx, plan.rec, host)


def _log(gw, rec: Transaction, t0: float) -> None:
    gw.stats.tx(rec, t0)          # counters for /metrics and the console; Dx lines when targeted
    if not gw.log.enabled:
        return
    rec.ts = time.time()
    rec.total_ms = round((time.perf_counter() - t0) * 1000, 3)
    gw.log.write(rec)


async def _handle(gw, dev, request: h11.Request, rec: Transaction, t0: float):
    target = request.target
    if target.split(b"?", 1)[0].lower() not in gw.eas_paths:
        rec.error = "not an EAS path"
        return await _answer(dev, rec, 404, [(b"Content-Type", b"text/plain")], b"not found\n")
    full = hdrs.items(request.headers)
    # The common request is identified in compiled code; the reference (parse_request) takes
    # everything else, refusals included, and so has the last word (tests/test_request_compiled.py).
    req = identify(rec.method, target, full, dev.client_ip) if not dev.behind_proxy else None
    if req is None:
        try:
            req = parse_request(rec.method, target, [(low, value) for _, low, value in full], dev.client_ip,
                                gw.trusted_proxies)
        except EASRequestError as exc:
            rec.error = str(exc)[:200]
            return await _answer(dev, rec, 400, [(b"Content-Type", b"text/plain")],
                                 b"malformed ActiveSync request\n")
    if PINS.by_stream.data and not PINS.inherit(dev.stream, req, gw.redirects.origin_for(req.user)):
        # NTLM/Negotiate authenticated this device connection's mail-server connection for
        # another user than User= names: the mail server would answer as that user.
        rec.error = "User= names another user than the authenticated connection"
        return await _answer(dev, rec, 400, [(b"Content-Type", b"text/plain")], b"malformed ActiveSync request\n")
    rec.command, rec.user, rec.device_id, rec.device_type = req.command, req.user, req.device_id, req.device_type
    rec.client_ip = req.client_ip        # past trusted proxies (listener.trusted_proxies)
    rec.protocol_version = req.protocol_version     # the console's device detail shows it (no Dx needed)
    certauth = getattr(gw, "certauth", None)
    if certauth is not None:             # the client certificate's user decides (kcd/clientcert.py)
        refusal = certauth.admit(dev.stream, req, rec)
        if refusal is not None:
            return await _answer(dev, rec, *refusal)
    if gw.stats.dx.active:               # targeted (Dx) logging: keep this request's headers
        gw.stats.dx.begin(rec, full)

    gatekeeper = gw.gatekeeper
    decision = OPTIONS_DECISION if req.method == "OPTIONS" else gatekeeper.decide(req)
    rec.decision = decision.reason
    if not decision.allowed and not decision.test_mode:
        status, headers, body = gatekeeper.blocked_answer(req, decision)
        await _answer(dev, rec, status, headers, body)
        gatekeeper.record(req, decision, status)
        return

    answer_tx, request_tx = _transforms_for(decision, req.command)
    if req.command == "ResolveRecipients" and getattr(gw, "certs", None) is not None:
        # S/MIME certificates from LDAP where the mail server has none ([smime]): one per request.
        fill = CertificateFill(gw.certs, gw.incidents)
        answer_tx, request_tx = answer_tx + [fill], request_tx + [fill]
    if answer_tx and gw.unsent.full():
        # The answer would be buffered, and the worker already holds limits.max_unsent_bytes
        # for devices with nothing slow to cut: refused before the mail server does any work.
        gw.incidents.note("refused_max_unsent_bytes", client_ip=dev.client_ip)
        dev.closing = True
        status = await _unavailable(gw, dev, rec, "limits.max_unsent_bytes reached")
        gatekeeper.record(req, decision, status)
        return status
    if getattr(gw, "kcd", None) is not None:     # Negotiate as the certificate's user (kcd/delegation.py)
        full, refusal = await gw.kcd.authorize(certauth.identity_of(dev.stream), req, full, rec)
        if refusal is not None:
            await _answer(dev, rec, *refusal)
            gatekeeper.record(req, decision, rec.status)
            return rec.status
    result = None
    try:
        result = await _forward(gw, dev, request, full, req, decision, answer_tx, request_tx, rec, t0)
        return result
    finally:
        if rec.status and result is not PARKED:
            gatekeeper.record(req, decision, rec.status)


_SYNC_WAIT_TAGS = frozenset({"AirSync:Wait", "AirSync:HeartbeatInterval"})


def sync_wait(body: bytes) -> int | None:
    """Seconds a Sync may wait on the mail server for changes (MS-ASCMD 2.2.3.194 Wait,
    in minutes, 1-59; 2.2.3.79.2 HeartbeatInterval, in seconds, 60-3540), or None.
    Like a Ping it is answered when something changes or the interval ends, so
    timeouts.upstream_read alone would cut it with a 503."""
    # WBXML tag bytes of Wait (0x24) and HeartbeatInterval (0x29) with content (0x40):
    # a Sync holding neither byte is not scanned (most are not long-polls).
    if b"\x64" not in body and b"\x69" not in body:
        return None
    from seg_fast.eas.wbxml import scan

    try:
        spans = scan(body, _SYNC_WAIT_TAGS)
    except WBXMLError:
        return None                   # the mail server judges a malformed Sync
    for span in spans:
        if span.kind == "str" and span.path == ("AirSync:Sync",):
            try:
                value = int(body[span.offset:span.offset + span.length])
            except ValueError:
                continue
            if span.tag == "AirSync:Wait" and 1 <= value <= 59:
                return value * 60
            if span.tag == "AirSync:HeartbeatInterval" and 60 <= value <= 3540:
                return value
    return None


def _transforms_for(decision: Decision, command: str | None) -> tuple[list, list]:
    if not decision.transforms or command is None:
        return [], []
    answer_tx, request_tx = [], []
    for t in decision.transforms:
        if command in t.commands:
            if hasattr(t, "transform_answer"):
                answer_tx.append(t)
            if hasattr(t, "transform_request"):
                request_tx.append(t)
    return answer_tx, request_tx


async def _answer(dev, rec: Transaction, status: int, headers, body: bytes | list = b"") -> None:
    """``body``: bytes, or a list of parts (a transform's gather output), sent uncopied."""
    rec.status = status
    rec.bytes_out = sum(map(len, body)) if type(body) is list else len(body)
    if dx.PENDING:
        dx.note_answer(rec, headers, b"".join(body) if type(body) is list else body)
    await dev.answer(status, headers, body)


async def _unavailable(gw, dev, rec: Transaction, why: str) -> int:
    rec.error = why[:200]
    retry = str(gw.config.upstream.retry_after).encode()
    await _answer(dev, rec, 503, [(b"Retry-After", retry)])
    return 503


def _body_pace(gw) -> sockio.Pace:
    """The whole request body's deadline: timeouts.request_body, plus a second per
    limits.min_body_rate bytes received (a slow body also holds a mail-server connection)."""
    return sockio.Pace(gw.config.timeouts.request_body, gw.config.limits.min_body_rate)


async def _read_request_body(gw, dev, limit: int) -> bytes | None:
    """The whole request body, or None if it is larger than ``limit``."""
    conn = dev.conn
    pace, start = _body_pace(gw), trio.current_time()
    parts = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            await dev.receive(pace.deadline(start, size))
            continue
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                return None
            parts.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:
            raise DeviceGone("device closed during the request body")


def _chunked(full) -> bool:
    for _, low, _ in full:
        if low == b"transfer-encoding":
            return True
    return False


def _declared_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


async def _forward(gw, dev, request, full, req: EasRequest, decision, answer_tx, request_tx,
                   rec: Transaction, t0: float):
    config = gw.config
    fast_body = dev.take_body()       # the compiled parser's whole body: h11 never reads it
    if fast_body is None:
        conn = dev.conn
        if conn.they_are_waiting_for_100_continue:
            await _send_dev(dev, conn.send(h11.InformationalResponse(status_code=100, headers=[])))

    is_ping = req.command == "Ping"
    declared, host, connection = hdrs.facts(full)
    host = host or b""
    length = _declared_length(declared)
    chunked = _chunked(full)
    if chunked:
        length = None                 # h11 frames the body by Transfer-Encoding (RFC 9112 6.3)
    body: bytes | None = None
    if fast_body is not None or request_tx or is_ping or (length is not None and length <= SMALL_BODY):
        limit = config.security.max_transform_bytes if request_tx else (
            config.limits.max_ping_body if is_ping else SMALL_BODY)
        if fast_body is not None:
            body = fast_body if len(fast_body) <= limit else None
        else:
            body = await _read_request_body(gw, dev, limit)
        if body is None:
            rec.error = "request body too large"
            await _answer(dev, rec, 413, [(b"Content-Type", b"text/plain")],
                          b"request body too large for this gateway\n")
            return 413
        rec.bytes_in = len(body)
        if dx.PENDING:
            dx.note(rec, "request_body", body)
        for t in request_tx:
            new = t.transform_request(req, body)
            if new is None:
                status, headers, answer_body = gw.gatekeeper.blocked_answer(req, decision)
                rec.decision = decision.reason + ".request_refused"
                await _answer(dev, rec, status, headers, answer_body)
                return status
            body = new

    read_timeout = config.timeouts.upstream_read
    if is_ping:
        read_timeout = ping.upstream_deadline(gw, req, body)
    elif req.command == "Sync" and body:
        wait = sync_wait(body)
        if wait is not None:          # a Sync long-poll: the mail server may hold it this long
            read_timeout = max(read_timeout, wait + config.timeouts.ping_margin)

    origin = gw.redirects.origin_for(req.user)
    rec.upstream = origin.name
    # The gateway frames what it sends by what h11 parsed: a device's Content-Length
    # beside Transfer-Encoding (a repaired framing) never reaches the mail server.
    if body is not None:
        framing = hdrs.content_length(len(body)) if body or request.method not in (b"GET", b"OPTIONS", b"HEAD") \
            else []
    elif chunked:
        framing = _CHUNKED
    else:
        framing = hdrs.content_length(length) if length is not None else []
    head = hdrs.upstream_request_headers(full, host=origin.host_header, client_ip=dev.client_ip,
                                         proto=dev.proto, behind_proxy=dev.behind_proxy,
                                         framing=framing)
    # The device's headers were validated by h11 (or the compiled parser, its equal) when
    # parsed and ours are well-formed.
    t_up = time.perf_counter()
    up = None
    # This device connection's own NTLM/Negotiate-authenticated connection (pinning.py).
    pinned = PINS.take(gw.pool, dev.stream, origin, req.auth_scheme) if PINS.by_stream.data else None
    for attempt in (0, 1):
        if attempt == 0 and pinned is not None:
            up = pinned
        else:
            try:
                # A whole body (not a Ping's: it parks right after the write) can be resent.
                up = await gw.pool.acquire(origin, body is not None and not is_ping)
            except UpstreamError as exc:
                return await _unavailable(gw, dev, rec, str(exc))
        try:
            if body is not None and up._h11 is None:
                # The compiled path: the request written in one piece, h11 not involved;
                # the answer head is read by _answer_head's fast path (up.sent).
                out = http1.write_request(request.method, request.target, head,
                                          http1.FRAMING_LENGTH if framing else http1.FRAMING_NONE, len(body))
                up.sent = (request.method, request.target, head)
                await _send_up_parts(gw, up, [out, body] if body else [out])
            elif body is not None:
                out = up.h11.send(hdrs.request_event(request.method, request.target, head))
                parts = [out]
                if body:
                    parts += up.h11.send_with_data_passthrough(h11.Data(data=body))
                parts.append(up.h11.send(END))
                await _send_up_parts(gw, up, parts)
            else:
                out = up.h11.send(hdrs.request_event(request.method, request.target, head))
                await _pump_request(gw, dev, up, out, rec)
            if is_ping and not answer_tx and _can_park(gw, dev) and req.auth_scheme not in CONNECTION_SCHEMES:
                # The task ends here; the parking lot finishes the transaction (resume()).
                # Nothing of the request is kept: resume() gives the connection fresh h11 state.
                up.h11, up.sent = None, None
                gw.parking.park(Parked(dev.stream, dev.client_ip, dev.proto,
                                       dev.closing or _wants_close(request, connection), up,
                                       req, decision, rec, host, trio.current_time() + read_timeout, t_up, t0))
                return PARKED
            if is_ping:
                answer = await ping.wait_answer(gw, up, read_timeout)
                if answer is None:            # the worker drains: the device pings again elsewhere
                    gw.pool.discard(up)
                    dev.closing = True
                    await _answer(dev, rec, 200, ping.HEARTBEAT_EXPIRED_HEADERS, ping.HEARTBEAT_EXPIRED)
                    rec.decision += ".drained"
                    return 200
            else:
                answer = await _answer_head(up, read_timeout)
            break
        except UpstreamError as exc:
            gw.pool.discard(up)
            # A kept-alive connection may have been closed by the server just now: resend once.
            if attempt == 0 and up.reused and body is not None and not isinstance(exc, _Timeout):
                continue
            return await _unavailable(gw, dev, rec, f"{exc} ({up.facts()})")
        except BaseException:
            gw.pool.discard(up)
            raise
    rec.upstream_ms = round((time.perf_counter() - t_up) * 1000, 3)
    return await _finish(gw, dev, up, req, answer, answer_tx, rec, host)


async def _finish(gw, dev, up: UpstreamConn, req, answer: h11.Response, answer_tx, rec: Transaction,
                  host: bytes) -> int:
    """Send the mail server's answer on to the device; the connection goes back to the pool."""
    # NTLM/Negotiate authenticate the connection, not the request: the mail server may serve
    # a later request on it as this user, so it never goes back to be shared by other devices;
    # it is kept for this device connection alone (pinning.py).
    if req.auth_scheme in CONNECTION_SCHEMES and req.identity == CERTIFICATE:
        release = gw.pool.discard     # KCD's Negotiate (kcd/delegation.py) authenticates each request anew
    elif req.auth_scheme in CONNECTION_SCHEMES:
        def release(conn):
            PINS.keep(gw.pool, dev.stream, conn, conn.origin, req, rec.status, dev.closing)
    else:
        release = gw.pool.release
    try:
        fast = type(answer) is http1.ResponseHead
        # A whole answer for the transforms with a Content-Length is read past h11 (_whole_body).
        whole = fast and answer_tx and answer.status_code == 200 and answer.framing == http1.FRAMING_LENGTH
        if fast and not whole and (answer_tx or not _fast_answer_fits(dev, answer)):
            answer, fast = _answer_to_h11(up, answer), False
        status = answer.status_code
        headers = hdrs.answer_headers(answer.headers if fast else hdrs.items(answer.headers))
        reason = answer.reason
        if is_redirect(status):
            status, headers, reason = gw.redirects.rewrite(req, status, headers, reason)
        if dev.closing:
            headers.append((b"Connection", b"connection", b"close"))
        rec.status = status
        if answer_tx and status == 200:
            if whole and sealstream.candidate(gw, dev, answer, req, answer_tx):
                # A fetched file sealed as its answer streams (or passed on, or back to the whole path).
                carried = await sealstream.carry(gw, dev, up, answer, req, status, headers, reason, answer_tx, rec)
                if carried is not None:
                    release(up)
                    return carried
            hold = _Hold(gw.unsent)
            try:
                body = await (_whole_body(gw, dev, up, answer, rec, hold) if whole else
                              _whole_answer(gw, dev, up, rec, hold))
                # The mail-server connection goes back before the device write: a slow
                # device must not hold it (a half-read one is closed by release()).
                release(up)
                up = None
                if body is not None:
                    await _transformed_answer(gw, dev, req, status, hdrs.pairs(headers), answer_tx, rec, body, hold)
            finally:
                hold.drop()
            return status
        if fast:
            await _stream_fast(gw, dev, up, answer, status, headers, rec, reason)
        else:
            await _stream_answer(gw, dev, up, status, headers, rec, reason)
    except BaseException:
        if up is not None:
            gw.pool.discard(up)
        raise
    release(up)
    return status


def _can_park(gw, dev) -> bool:
    # Bytes the device already sent beyond this request would be lost with its h11 state.
    return gw.parking is not None and not gw.draining and not dev.pipelined()


def _wants_close(request: h11.Request, value: bytes | None) -> bool:
    if request.http_version != b"1.1":
        return True
    return value is not None and b"close" in value.lower()


# A request that puts a fresh h11 server connection where a parked one was (answer pending).
# (A bodiless GET: the shortest request h11 parses; the method only matters for HEAD.)
_RESUME_KEEP = b"GET / HTTP/1.1\r\nHost: p\r\n\r\n"
_RESUME_CLOSE = b"GET / HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
# The compiled path's heads of the same requests: the device's exchange resumes as one the
# compiled parser read whole (Device.resumed), h11 told only if something asks (Device.conn).
_RESUME_HEADS = {False: http1.parse_request(_RESUME_KEEP), True: http1.parse_request(_RESUME_CLOSE)}
_RESUME_SENT = (_POST, b"/", 0)       # its request to the mail server, as the answer's parser sees it


def shed(dev, plan: Plan, up: UpstreamConn) -> None:
    """A Ping the lane holds while it waits (minutes, for every device at once): its parsed head
    (~1.6 KB in ~29 objects) gives way to the shared head a resumed Ping's exchange stands on,
    its Host kept for a redirect; its body and target (sent) go. What the answer needs is what
    parked() and resume() keep for a parked Ping."""
    head = plan.head
    plan.host = hdrs.facts(head.headers)[1] or b""
    plan.head = dev._head = _RESUME_HEADS[not head.keep_alive]
    plan.body = b""
    up.sent = _RESUME_SENT


async def resume(gw, p: Parked, why: str, dev) -> bool:
    """Finish a parked Ping; True if the device connection can serve another request."""
    dev.resumed(_RESUME_HEADS[bool(p.dev_close)])
    up = p.up
    # As if the fast path had written the request (a bodiless POST): the answer head is read
    # by the compiled parser, h11 built from this only for what it defers (_sent_to_h11).
    up.h11, up.sent, up.rest = None, _RESUME_SENT, b""
    rec = p.rec
    ok = False
    try:
        if why == parking.DEVICE_GONE:
            gw.pool.discard(up)
            rec.status = 499
            rec.error = "device closed the connection while its Ping was parked"
            return False
        if why == parking.DRAIN:
            gw.pool.discard(up)
            dev.closing = True
            rec.decision += ".drained"
            await _answer(dev, rec, 200, ping.HEARTBEAT_EXPIRED_HEADERS, ping.HEARTBEAT_EXPIRED)
        elif why == parking.TIMEOUT:
            gw.pool.discard(up)
            await _unavailable(gw, dev, rec, "mail server did not answer the Ping within heartbeat + margin")
        else:
            # Readable is not always the answer (a TLS 1.3 session ticket, say): wait on in
            # this task until the Ping's own deadline, still answerable by a drain.
            remaining = max(p.deadline - trio.current_time(), 0.001)
            try:
                answer = _answer_ready(up)
                if answer is None:
                    answer = await ping.wait_answer(gw, up, remaining)
            except UpstreamError as exc:
                gw.pool.discard(up)
                await _unavailable(gw, dev, rec, str(exc))
                answer = False
            if answer is None:
                gw.pool.discard(up)
                dev.closing = True
                rec.decision += ".drained"
                await _answer(dev, rec, 200, ping.HEARTBEAT_EXPIRED_HEADERS, ping.HEARTBEAT_EXPIRED)
            elif answer is not False:
                rec.upstream_ms = round((time.perf_counter() - p.t_up) * 1000, 3)
                if gw.draining:
                    dev.closing = True
                await _finish(gw, dev, up, p.req, answer, (), rec, p.host)
        ok = True
    finally:
        if rec.status:
            gw.gatekeeper.record(p.req, p.decision, rec.status)
        _log(gw, rec, p.t0)
    return ok


class _Timeout(UpstreamError):
    pass


async def _send_up(gw, up: UpstreamConn, data) -> None:
    try:
        await sockio.send_all(up.stream, up.plain, data, gw.upstream_pace)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError(f"mail server connection broke while sending: {type(exc).__name__}") from None


async def _send_dev(dev, data) -> None:
    await dev.send_bytes(data)


async def _send_up_parts(gw, up: UpstreamConn, parts: list) -> None:
    try:
        await sockio.send_parts(up.stream, up.plain, parts, gw.upstream_pace)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError(f"mail server connection broke while sending: {type(exc).__name__}") from None


async def _up_read(up: UpstreamConn, timeout: float, size: int = RECEIVE_SIZE, ready: bool = True) -> bytes:
    """One read from the mail server (b"" on EOF) within ``timeout`` seconds (``ready``: see sockio.receive)."""
    try:
        data = await sockio.receive(up.stream, up.plain, size, trio.current_time() + timeout, ready)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError(f"mail server connection broke: {type(exc).__name__}") from None
    if data is None:
        raise _Timeout(f"mail server did not answer within {timeout:g} s")
    return data


async def _up_receive(up: UpstreamConn, timeout: float) -> None:
    up.h11.receive_data(await _up_read(up, timeout))


def _answer_ready(up: UpstreamConn) -> h11.Response | http1.ResponseHead | None:
    """The answer head if what the socket holds right now completes it (plain sockets only):
    the compiled parser's if the request went the fast way (``up.sent``), else h11's."""
    data = sockio.read_now(up.plain, RECEIVE_SIZE)
    if data is None:
        return None
    if not data:                      # h11 would call the EOF a malformed answer
        raise UpstreamError(f"mail server closed the connection before answering ({up.facts()})")
    if up._h11 is None and up.sent is not None:
        try:
            head = http1.parse_response(data, up.sent[0], MAX_ANSWER_HEAD)
        except HTTPProtocolError as exc:
            raise UpstreamError(f"mail server sent a malformed answer: {exc}") from None
        if type(head) is http1.ResponseHead and not head.informational:
            up.rest = data[head.head_len:]
            return head
        h = _sent_to_h11(up)          # part of a head, a 1xx, or what it defers: h11 reads it all
    else:
        h = up.h11
    h.receive_data(data)
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamError(f"mail server sent a malformed answer: {exc}") from None
        if event is h11.NEED_DATA:
            return None               # the rest of the head: _answer_head reads on
        if isinstance(event, h11.Response):
            return event
        if not isinstance(event, h11.InformationalResponse):
            raise UpstreamError("mail server closed the connection before answering")


# h11's default limit for a client connection's incomplete event (the answer head).
MAX_ANSWER_HEAD = 16 * 1024


def _sent_to_h11(up: UpstreamConn) -> h11.Connection:
    """Give the connection the h11 state of a client that sent ``up.sent`` (fast path) whole."""
    h = up.h11
    method, target, head = up.sent
    up.sent = None
    if type(head) is int:
        # The fast lane keeps only the Content-Length it wrote: h11's client state takes its
        # framing (and keep-alive: the lane never writes Connection) from these alone.
        head = [(b"Host", b"host", up.origin.host_header)] + hdrs.content_length(head)
    http1.sent(h, hdrs.request_event(method, target, head))
    http1.sent(h, END)
    return h


def _answer_to_h11(up: UpstreamConn, head: http1.ResponseHead) -> h11.Response:
    """Hand an answer the fast path read the head of to h11 (it reads the body from here)."""
    h = _sent_to_h11(up)
    rest, up.rest = up.rest, b""
    return http1.prime_h11_response(h, head, rest)


def _fast_answer_fits(dev, head: http1.ResponseHead) -> bool:
    """The answer's body can be passed on by _stream_fast: a Content-Length or chunked body
    (HEAD, 204, 304 and close-delimited ones stay h11's), to an HTTP/1.1 device whose
    request was read whole (h11 would re-frame otherwise)."""
    if head.framing != http1.FRAMING_LENGTH and head.framing != http1.FRAMING_CHUNKED:
        return False
    if dev.compiled_answer():
        return True                   # the compiled parser's HTTP/1.1 request, its body taken
    conn = dev.conn
    return conn.our_state is h11.SEND_RESPONSE and conn.their_http_version == b"1.1" \
        and (conn.their_state is h11.DONE or conn.their_state is h11.MUST_CLOSE)


async def _fast_answer_head(up: UpstreamConn, timeout: float, buf: bytes = b""):
    """The answer head read by the compiled parser: a ResponseHead (what follows it in
    ``up.rest``), or, for anything it defers, h11's Response from the same bytes.
    ``buf``: the answer's first bytes, if already read."""
    method = up.sent[0]
    while True:
        if buf:
            try:
                head = http1.parse_response(buf, method, MAX_ANSWER_HEAD)
            except HTTPProtocolError as exc:
                raise UpstreamError(f"mail server sent a malformed answer: {exc}") from None
            if head is http1.DEFER:
                _sent_to_h11(up).receive_data(buf)
                return await _answer_head(up, timeout)
            if head is not http1.NEED_MORE:
                buf = buf[head.head_len:]
                if head.informational:
                    continue          # 1xx: the final head follows (h11 skips them the same way)
                up.rest = buf
                return head
        # The first read follows the request's write at once: the answer is not there yet.
        data = await _up_read(up, timeout, RECEIVE_SIZE, bool(buf))
        if not data:
            raise UpstreamError("mail server closed the connection before answering")
        buf = buf + data if buf else data


async def _answer_head(up: UpstreamConn, timeout: float) -> h11.Response:
    if up._h11 is None and up.sent is not None:
        return await _fast_answer_head(up, timeout)
    h = up.h11
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamError(f"mail server sent a malformed answer: {exc}") from None
        if event is h11.NEED_DATA:
            await _up_receive(up, timeout)
        elif isinstance(event, h11.Response):
            return event
        elif isinstance(event, h11.InformationalResponse):
            continue
        else:
            raise UpstreamError("mail server closed the connection before answering")


async def _pump_request(gw, dev, up: UpstreamConn, out: bytes, rec: Transaction) -> None:
    """Stream the device's request body upstream as it comes: at most one read held
    (backpressure), the body's bytes never copied (writev)."""
    conn = dev.conn
    pace, start = _body_pace(gw), trio.current_time()
    pending = [out]
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if pending:
                await _send_up_parts(gw, up, pending)
                pending = []
            await dev.receive(pace.deadline(start, rec.bytes_in))
        elif type(event) is h11.Data:
            rec.bytes_in += len(event.data)
            pending += up.h11.send_with_data_passthrough(event)
        elif type(event) is h11.EndOfMessage:
            pending.append(up.h11.send(END))
            await _send_up_parts(gw, up, pending)
            return
        else:
            raise DeviceGone("device closed during the request body")


async def _stream_answer(gw, dev, up: UpstreamConn, status: int, headers: hdrs.Full, rec: Transaction,
                         reason: bytes = b"") -> None:
    """Stream the mail server's answer to the device, one read at a time (backpressure)."""
    conn = dev.conn
    h = up.h11
    timeout = gw.config.timeouts.upstream_read
    # Head and body leave in as few writes as reads came in, the body never copied (writev).
    pending = [conn.send(hdrs.response_event(status, headers, reason))]
    dx_parts = dx.tap(rec, headers) if dx.PENDING else None
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise DeviceGone(f"mail server answer broke off: {exc}") from None
        if event is h11.NEED_DATA:
            if pending:
                await dev.send_parts(pending)
                pending = []
            try:
                await _up_receive(up, timeout)
            except UpstreamError as exc:
                raise DeviceGone(str(exc)) from None
        elif isinstance(event, h11.Data):
            rec.bytes_out += len(event.data)
            pending += conn.send_with_data_passthrough(event)
            if dx_parts is not None:
                dx_parts.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            pending.append(conn.send(END))
            await dev.send_parts(pending)
            return
        else:
            raise DeviceGone("mail server closed the connection mid-answer")


async def _stream_fast(gw, dev, up: UpstreamConn, head: http1.ResponseHead, status: int, headers: hdrs.Full,
                       rec: Transaction, reason: bytes) -> None:
    """_stream_answer for an answer head the compiled parser read: the body passed on as it
    comes (Content-Length) or re-chunked as h11 would (chunked), the device's head written by
    write_response; h11 only hears that the answer went (its state decides keep-alive)."""
    conn = None if dev.compiled_answer() else dev.conn
    if conn is None:                  # h11 is not told (Device.conn tells it if asked)
        out = [http1.write_response(status, reason, headers, head.framing, head.length, dev.keeps_open())]
        dev.answer_written(status, headers, reason)
    else:
        keep = not dev.closing and conn.their_state is h11.DONE
        out = [http1.write_response(status, reason, headers, head.framing, head.length, keep)]
        http1.sent(conn, hdrs.response_event(status, headers, reason))
    dx_parts = dx.tap(rec, headers) if dx.PENDING else None
    timeout = gw.config.timeouts.upstream_read
    buf, up.rest = up.rest, b""
    if head.framing == http1.FRAMING_LENGTH:
        left = head.length
        while True:
            if buf:
                piece = buf if len(buf) <= left else buf[:left]
                buf = buf[len(piece):]
                left -= len(piece)
                rec.bytes_out += len(piece)
                out.append(piece)
                if dx_parts is not None:
                    dx_parts.append(piece)
            if not left:
                break
            await dev.send_parts(out)
            out = []
            buf = await _up_body_read(up, timeout, min(left, RELAY_SIZE))
    else:
        decoder = http1.ChunkedDecoder()
        while True:
            if buf:
                try:
                    pieces, used = decoder.decode(buf)
                except HTTPProtocolError as exc:
                    raise DeviceGone(f"mail server answer broke off: {exc}") from None
                buf = buf[used:]
                for piece in pieces:
                    if piece:         # h11's ChunkedWriter skips empty data the same way
                        out += (b"%x\r\n" % len(piece), piece, b"\r\n")
                        rec.bytes_out += len(piece)
                        if dx_parts is not None:
                            dx_parts.append(piece)
                if decoder.done:
                    break
            if out:
                await dev.send_parts(out)
                out = []
            more = await _up_body_read(up, timeout)
            buf = buf + more if buf else more
        out.append(b"0\r\n\r\n")   # trailers are not passed on (as on h11's path)
    if conn is None:
        dev.answer_done()
    else:
        http1.sent(conn, END)
    # Reusable: keep-alive, and nothing after the answer that would be read as the next one.
    up.reusable = head.keep_alive and not buf
    await dev.send_parts(out)


async def _up_body_read(up: UpstreamConn, timeout: float, size: int = RECEIVE_SIZE) -> bytes:
    try:
        data = await _up_read(up, timeout, size)
    except UpstreamError as exc:
        raise DeviceGone(str(exc)) from None
    if not data:
        raise DeviceGone("mail server closed the connection mid-answer")
    return data


class _Hold:
    """Bytes of one buffered answer counted against the worker's limit (sockio.Unsent)."""

    __slots__ = ("unsent", "n")

    def __init__(self, unsent):
        self.unsent, self.n = unsent, 0

    def take(self, n: int) -> bool:
        if not self.unsent.hold(n):
            return False
        self.n += n
        return True

    def drop(self) -> None:
        self.unsent.release(self.n)
        self.n = 0


async def _whole_answer(gw, dev, up: UpstreamConn, rec, hold: _Hold) -> bytes | list | None:
    """The answer body, buffered (bounded): bytes, or its parts when it is large enough to be
    transformed in a thread (which joins them, without the GIL: a 14 MB join on the loop is
    ~10 ms of page faults); None when the device was answered an error instead."""
    limit = gw.config.security.max_transform_bytes
    timeout = gw.config.timeouts.upstream_read
    h = up.h11
    parts = []
    size = 0
    next_yield = YIELD_EVERY_BYTES
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError:
            await _unavailable(gw, dev, rec, "mail server answer broke off")
            return None
        if event is h11.NEED_DATA:
            try:
                await _up_receive(up, timeout)
            except UpstreamError as exc:
                await _unavailable(gw, dev, rec, str(exc))
                return None
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                await _too_large(dev, rec, limit)
                return None
            if not hold.take(len(event.data)):
                await _no_room(gw, dev, rec)
                return None
            parts.append(event.data)
            if size >= next_yield:
                # A fast mail server keeps the reads ready: let the worker's other devices
                # in every few hundred KB, not only every FAIR_EVERY reads (2 MB).
                next_yield = size + YIELD_EVERY_BYTES
                await trio.lowlevel.checkpoint()
        elif isinstance(event, h11.EndOfMessage):
            return parts if size >= THREAD_TRANSFORM_BYTES else b"".join(parts)
        else:
            await _unavailable(gw, dev, rec, "mail server closed the connection mid-answer")
            return None


async def _too_large(dev, rec, limit: int) -> None:
    # Never pass untransformed content: tell the device; the half-read mail-server
    # connection is closed by the pool on release.
    rec.error = f"answer larger than security.max_transform_bytes ({limit})"
    await _answer(dev, rec, 500, [(b"Content-Type", b"text/plain")],
                  b"answer too large for the email security policy\n")


async def _no_room(gw, dev, rec) -> None:
    # The worker holds limits.max_unsent_bytes for devices already: retry later.
    gw.incidents.note("refused_max_unsent_bytes", client_ip=dev.client_ip)
    dev.closing = True                # and let the connection go: it may be one of the slow readers
    await _unavailable(gw, dev, rec, "limits.max_unsent_bytes reached")


async def _whole_body(gw, dev, up: UpstreamConn, head: http1.ResponseHead, rec, hold: _Hold) -> bytes | None:
    """_whole_answer for a Content-Length answer whose head the compiled parser read: the
    body read into one buffer of its length, past h11 (which copies each read out of a
    buffer of its own: ~30 ms of loop CPU for a 14 MB answer), a megabyte per read on a
    plain socket (readv into the buffer) and handed to the transform thread as it is,
    with no join. None when the device was answered an error instead."""
    length = head.length
    limit = gw.config.security.max_transform_bytes
    if length > limit:
        await _too_large(dev, rec, limit)
        return None
    if not hold.take(length):
        await _no_room(gw, dev, rec)
        return None
    timeout = gw.config.timeouts.upstream_read
    rest, up.rest = up.rest, b""
    if len(rest) >= length:
        up.reusable = head.keep_alive and len(rest) == length
        return rest[:length] if len(rest) > length else rest
    body, view = writable_bytes(length)
    try:
        view[:len(rest)] = rest
        at = len(rest)
        next_yield = at + YIELD_EVERY_BYTES
        while at < length:
            want = min(length - at, WHOLE_READ_BYTES)
            if up.plain is not None:
                n = await _read_into(up, view[at:at + want], timeout)
            else:                     # TLS to the mail server: its reads, copied in
                piece = await _up_read(up, timeout, min(want, RECEIVE_SIZE))
                n = len(piece)
                view[at:at + n] = piece
            if not n:
                raise UpstreamError("mail server closed the connection mid-answer")
            at += n
            if at >= next_yield:      # the worker's other devices in between, as _whole_answer
                next_yield = at + YIELD_EVERY_BYTES
                await trio.lowlevel.checkpoint()
    except UpstreamError as exc:
        await _unavailable(gw, dev, rec, str(exc))
        return None
    finally:
        view.release()                # nothing writes into the bytes once they are handed on
    # The reads stop at the Content-Length: bytes beyond it (an answer nobody asked for)
    # are still in the socket, and would be read as the next request's answer.
    up.reusable = head.keep_alive and up.looks_alive()
    return body


async def _read_into(up: UpstreamConn, view: memoryview, timeout: float) -> int:
    """One read from a plain mail-server socket into ``view`` (0 on EOF) within ``timeout``."""
    sock = up.plain
    while True:
        fd = sock.fileno()
        if fd < 0:
            raise UpstreamError("mail server connection broke: closed")
        try:
            return os.readv(fd, (view,))
        except BlockingIOError:
            pass
        except OSError as exc:
            raise UpstreamError(f"mail server connection broke: {type(exc).__name__}") from None
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(sock.sock)
            continue
        raise _Timeout(f"mail server did not answer within {timeout:g} s")


# One read's most into a whole answer's buffer (the kernel gives what it holds).
WHOLE_READ_BYTES = 1 << 20
# A buffered answer this large is transformed in a worker thread while the loop serves the
# worker's other devices: BENCH-PROFILE's 300 KB attachments take ~2 ms of CPU, 2 MB ones
# 10-25 ms, 10 MB ones 60-120 ms, all of it one loop step on the loop. Smaller answers
# (~1 ms and less) stay on the loop: a thread's round trip would cost about as much.
THREAD_TRANSFORM_BYTES = 256 * 1024
# While an answer is buffered for the transforms, the loop is let go this often.
YIELD_EVERY_BYTES = 256 * 1024
_threads: tuple | None = None     # (the run's trio token, its CapacityLimiter)


def _thread_limiter() -> trio.CapacityLimiter:
    """One transform thread per worker: the worker has one core, and a queued answer's
    bytes are already counted (limits.max_unsent_bytes) while it waits its turn."""
    global _threads
    token = trio.lowlevel.current_trio_token()
    if _threads is None or _threads[0] is not token:
        _threads = (token, trio.CapacityLimiter(1))
    return _threads[1]


def _apply(t, req, status, headers, body):
    """One transform's (headers, body), in the loop or in a worker thread (hooks.Transform:
    the optional forms set the answer's headers, or give the body as parts for writev)."""
    if type(body) is list:            # parts (buffered, or an earlier transform's): it reads bytes
        body = join_parts(body)
    gather = getattr(t, "transform_answer_parts", None)
    if gather is not None:
        return gather(req, status, headers, body)
    with_headers = getattr(t, "transform_answer_and_headers", None)
    if with_headers is not None:
        return with_headers(req, status, headers, body)
    return headers, t.transform_answer(req, status, headers, body)


async def _transformed_answer(gw, dev, req, status, headers, answer_tx, rec, body: bytes, hold: _Hold) -> None:
    """Run the transforms on the buffered answer, send it with a fixed Content-Length."""
    size_in = sum(map(len, body)) if type(body) is list else len(body)
    try:
        for t in answer_tx:
            later = getattr(t, "transform_answer_async", None)     # one that waits on I/O (LDAP)
            if later is not None:
                body = await later(req, status, headers, join_parts(body) if type(body) is list else body)
            elif getattr(t, "in_thread", False) and size_in >= THREAD_TRANSFORM_BYTES:
                # Not cancellable: a cancelled task (device gone, drain) waits for the thread
                # and drops its result, and the hold is released by _finish as always.
                headers, body = await trio.to_thread.run_sync(_apply, t, req, status, headers, body,
                                                              limiter=_thread_limiter())
            else:
                headers, body = _apply(t, req, status, headers, body)
    except ContentError as exc:
        rec.error = str(exc)[:200]
        await _answer(dev, rec, 500, [(b"Content-Type", b"text/plain")],
                      b"answer could not be checked by the email security policy\n")
        return
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    rec.status = status
    gw.stats.transform(req.command, size_in, sum(map(len, body)) if type(body) is list else len(body))
    hold.drop()                       # from here the write counts what the device has not taken
    await _answer(dev, rec, status, headers, body)
