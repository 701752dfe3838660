"""One device connection: h11 server side, keep-alive loop, deadlines, containment.

Deadlines (hypercorn style: absolute, per phase, never per read): the whole request
head from its first byte (``timeouts.request_head``); the whole request body
(exchange.py); every write to the device (``timeouts.device_write`` plus a minimum
send rate, sockio.Pace). Whatever escapes one connection's handling is contained
here: logged (incidents.py), answered when an answer can still start, and the
connection closed. Input never ends a worker.
"""
from __future__ import annotations

import socket
import struct

import h11
import trio

from seg_fast.errors import HTTPProtocolError
from seg_fast.proxy import exchange, http1, parking, sockio
from seg_fast.proxy import headers as hdrs
from seg_fast.proxy.exchange import DeviceGone, DeviceTimeout
from seg_fast.proxy.parking import socket_of
from seg_fast.proxy.tlsio import TLSStream
from seg_fast.proxy.upstream import UpstreamError

RECEIVE_SIZE = 64 * 1024
_RESET = struct.pack("ii", 1, 0)      # SO_LINGER on, 0 s: close() sends RST and drops unsent data


class HeadTooLarge(h11.RemoteProtocolError):
    """The request head passed limits.max_header_bytes (answered 431)."""


class Device:
    """The device side of one connection: its stream, h11 state and who it is."""

    __slots__ = ("gw", "stream", "sock", "_conn", "client_ip", "proto", "closing", "max_head", "leftover",
                 "_head", "_event", "_rest", "_taken", "_answer", "_answered", "pending", "fresh",
                 "behind_proxy", "tls", "fd")

    def __init__(self, gw, stream, client_ip: str, proto: bytes):
        self.gw = gw
        self.stream = stream
        self.sock = sockio.plain_socket(stream)      # None under TLS
        self.tls = getattr(stream, "fast_tls", False)   # proxy/tlsio.TLSStream: sockio's calls, decrypted
        self.max_head = gw.config.limits.max_header_bytes
        # h11's state, made when something first needs it (_h11): an exchange the compiled path
        # carries never does, and a connection the lot holds drops it (idle), ~0.8 KiB each.
        self._conn = None
        self.client_ip = client_ip
        self.proto = proto
        self.behind_proxy = client_ip in gw.trusted_proxies     # its forwarding headers are believed
        self.closing = False          # set when draining or the framing was repaired: answer, then close
        self.leftover = 0             # bytes of the next request already in h11's buffer
        # The compiled path's exchange, not yet shown to h11 (see ``conn``):
        self._head = None             # the request head the compiled parser read
        self._event = None            # ... as an h11.Request
        self._rest = b""              # what followed the head (after take_body: what followed the body)
        self._taken = False           # take_body() took the whole body
        self._answer = None           # (status, headers, reason) of the answer head written (_stream_fast)
        self._answered = False        # ... and its body
        self.pending = b""            # a pipelined next request's first bytes, read with this one
        self.fresh = True             # h11 untouched since its last cycle: it holds no bytes
        self.fd = -1                  # its socket's descriptor, once the lot watches it (idle)

    @property
    def conn(self) -> h11.Connection:
        """The connection's h11 state. While the compiled path carries an exchange, h11 is
        not told; whoever asks for it gets it told everything so far, in h11's own order
        (the request head, with the bytes after it or, if the body was taken, the body's
        end and what followed it; the answer head and end if written): the state h11 would
        be in had it carried the exchange itself (tests/test_fastpath.py)."""
        if self._head is not None:
            self._tell_h11()
        return self._h11()

    def _h11(self) -> h11.Connection:
        conn = self._conn
        if conn is None:
            conn = self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
        return conn

    def _tell_h11(self) -> None:
        conn, head, rest = self._h11(), self._head, self._rest
        self._head, self._rest = None, b""
        self.fresh = False
        if not self._taken:
            http1.prime_h11(conn, head, rest, self._event)
            return
        self._taken = False
        http1.prime_h11(conn, head, b"", self._event)
        http1.body_done(conn)
        if rest:
            conn.receive_data(rest)           # a pipelined next request
        answer, self._answer = self._answer, None
        if answer is not None:
            status, headers, reason, raw, closing = answer
            if raw:                           # the mail server's headers, as the lane wrote them
                headers = hdrs.answer_headers(headers)
                if closing:
                    headers.append((b"Connection", b"connection", b"close"))
            http1.sent(conn, hdrs.response_event(status, headers, reason))
            if self._answered:
                self._answered = False
                http1.sent(conn, exchange.END)

    def resumed(self, head) -> None:
        """A parked Ping's connection, back: its exchange stands as one the compiled path read
        whole (``head``: a bodiless request with the Ping's keep-alive), answer pending."""
        self._head, self._event, self._rest, self._taken = head, None, b"", True

    def take_body(self) -> bytes | None:
        """The whole request body, if the compiled parser framed it (Content-Length, or no
        body) and the head's read held all of it: then h11 never reads it. None otherwise
        (the body is h11's to read, as before)."""
        head = self._head
        if head is None or self._taken:
            return None
        framing = head.framing
        if framing == http1.FRAMING_LENGTH:
            n = head.length
        elif framing == http1.FRAMING_NONE:
            n = 0
        else:
            return None
        rest = self._rest
        if len(rest) < n:
            return None
        self._taken = True
        if len(rest) > n:
            self._rest = rest[n:]
            return rest[:n]
        self._rest = b""
        return rest

    def compiled_answer(self) -> bool:
        """The exchange is the compiled path's so far (head and whole body, no answer yet):
        _stream_fast may write the answer without h11."""
        return self._taken and self._answer is None and self._head is not None

    def keeps_open(self) -> bool:
        """The connection stays open after this answer (compiled path): h11's keep-alive rule."""
        return not self.closing and self._head.keep_alive

    def answer_written(self, status: int, headers, reason: bytes, raw: bool = False) -> None:
        """The answer head went out (compiled path). ``raw``: ``headers`` are the mail server's,
        rewritten by the writer (exchange.fast): h11 is told the rewritten ones if it asks."""
        self._answer = (status, headers, reason, raw, self.closing)

    def answer_done(self) -> None:
        self._answered = True

    def pipelined(self) -> bool:
        """Bytes of a next request arrived with this one."""
        if self._head is not None:
            return bool(self._rest) if self._taken else True
        conn = self._conn
        return conn is not None and bool(conn.trailing_data[0])

    def next_cycle(self) -> bool | None:
        """After a whole compiled exchange: ready for the next request (True), or the
        connection closes (False); None when h11 carried (part of) it (_next_cycle decides)."""
        if self._head is None:
            return None
        if not (self._taken and self._answered):
            self._tell_h11()
            return None
        keep = not self.closing and self._head.keep_alive
        self.pending, self._rest = self._rest, b""
        self._head = self._answer = self._event = None
        self._taken = self._answered = False
        self.fresh = True
        return keep

    async def receive(self, deadline: float, size: int = RECEIVE_SIZE) -> int:
        """Feed h11 one read from the device by ``deadline``; the number of bytes read."""
        try:
            data = await sockio.receive(self.stream, self.sock, size, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise DeviceGone(type(exc).__name__) from None
        if data is None:
            raise DeviceTimeout("device too slow")
        if not data:
            raise DeviceGone("device closed the connection mid-request")
        self.conn.receive_data(data)
        return len(data)

    async def send_bytes(self, data) -> None:
        try:
            await sockio.send_all(self.stream, self.sock, data, self.gw.device_pace)
        except TimeoutError as exc:
            self._write_timeout(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise DeviceGone(type(exc).__name__) from None

    async def send_parts(self, parts: list) -> None:
        try:
            await sockio.send_parts(self.stream, self.sock, parts, self.gw.device_pace)
        except TimeoutError as exc:
            self._write_timeout(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise DeviceGone(type(exc).__name__) from None

    def _write_timeout(self, exc: TimeoutError):
        # Nothing more can be said to a device that stopped reading: count it, and make the
        # close a reset (nginx's reset_timedout_connection), so the kernel does not keep the
        # unsent answer and retry it to a zero window for minutes.
        kind = "device_write_evicted" if isinstance(exc, sockio.Evicted) else "device_write_timeout"
        self.gw.incidents.note(kind, client_ip=self.client_ip)
        try:
            socket_of(self.stream).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass
        raise DeviceGone("device did not read its answer in time") from None

    def answer_parts(self, status: int, headers, body: bytes | list) -> list | None:
        """``answer``'s write for the compiled path's exchange (head and whole body read, no
        answer yet): the answer h11 would write, by write_response, recorded as written (h11
        hears of it if asked); None, having done nothing, where h11 writes it."""
        if not self.compiled_answer() or self._head.method == b"HEAD":
            return None
        size = sum(map(len, body)) if type(body) is list else len(body)
        keep = self.keeps_open()
        full = _compiled_answer_headers(headers, size, keep)
        if full is None:
            return None
        reason = hdrs.reason_phrase(status)
        out = http1.write_response(status, reason, full, http1.FRAMING_LENGTH, size, keep)
        self.answer_written(status, full, reason)
        self.answer_done()
        return [out, *body] if type(body) is list else [out, body] if body else [out]

    async def answer(self, status: int, headers, body: bytes | list = b"") -> None:
        """A whole answer the gateway makes itself (errors, blocked devices, transformed answers).

        ``body`` may be a list of parts (a transform's gather output: memoryviews into the
        mail server's answer for what it left unchanged): they go out in one writev."""
        parts = self.answer_parts(status, headers, body)
        if parts is not None:
            await self.send_parts(parts)
            return
        size = sum(map(len, body)) if type(body) is list else len(body)
        conn = self.conn
        if conn.our_state not in (h11.SEND_RESPONSE, h11.IDLE):      # IDLE: the head was malformed
            raise DeviceGone("answer already started")
        headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")]
        headers.append((b"Content-Length", str(size).encode()))
        # Skip a request body that has already arrived, so the connection can be kept.
        while conn.their_state is h11.SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                break
            if event is h11.NEED_DATA or type(event) is not h11.Data:
                break
        if self.closing or conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
            # An unread request body would be taken for the next request: close after this answer.
            headers.append((b"Connection", b"close"))
        parts = [conn.send(h11.Response(status_code=status, headers=headers, reason=hdrs.reason_phrase(status)))]
        if type(body) is list:
            for part in body:             # each part as it is (h11 counts it against Content-Length)
                parts += conn.send_with_data_passthrough(h11.Data(data=part))
        elif body:
            parts += conn.send_with_data_passthrough(h11.Data(data=body))   # the body is not copied
        parts.append(conn.send(exchange.END))
        await self.send_parts(parts)


def _compiled_answer_headers(headers, size: int, keep: bool) -> hdrs.Full | None:
    """Device.answer's headers as triples, framed as h11 frames them (the caller's framing
    dropped, Content-Length of ``size``, ``Connection: close`` unless ``keep``); None when
    the caller sent a Connection header of its own (h11 reads keep-alive from it: its path)."""
    full = []
    for name, value in headers:
        low = name.lower()
        if low == b"connection":
            return None
        if low != b"content-length" and low != b"transfer-encoding":
            full.append((name, low, value))
    full.append((b"Content-Length", b"content-length", b"%d" % size))
    if not keep:
        full.append((b"Connection", b"connection", b"close"))
    return full


async def serve_device(gw, stream, client_ip: str, proto: bytes) -> bool:
    """Serve requests on one device connection until it closes, idles out or the worker drains.

    Returns True when the connection was handed to the parking lot (a parked Ping):
    then it stays open and the lot's resume task owns it.
    """
    dev = Device(gw, stream, client_ip, proto)
    parked = False
    try:
        parked = await _loop(gw, dev)
    except Exception as exc:          # noqa: BLE001 - the containment line: nothing from input ends the worker
        await contain(gw, dev, exc)
    finally:
        if not parked:
            await _close(stream)
    return parked


async def resume_parked(gw, p, why: str) -> None:
    """The task a parked Ping gets back: answer it, then go on serving the connection."""
    dev = Device(gw, p.dev_stream, p.client_ip, p.proto)
    parked = False
    try:
        if await exchange.resume(gw, p, why, dev) and _next_cycle(dev):
            parked = await _loop(gw, dev)
    except Exception as exc:          # noqa: BLE001
        await contain(gw, dev, exc)
    finally:
        if not parked:
            await _close(p.dev_stream)
            gw.connection_closed(p.client_ip)


async def carry_on(gw, dev: Device, head=None, step=None, *args) -> None:
    """A connection the keep-alive lane (proxy/lane.py) hands back to a task where its exchange
    stands: ``step(gw, dev, *args)`` finishes the exchange (PARKED: a Ping parked; False: the
    connection closes after it), then the connection is served as serve_device serves it,
    from the request ``head`` if one was read."""
    parked = False
    try:
        if step is not None:
            result = await step(gw, dev, *args)
            if result is exchange.PARKED:
                parked = True
                return
            if result is False or not _next_cycle(dev):
                return
        parked = await _loop(gw, dev, head)
    except Exception as exc:          # noqa: BLE001 - the containment line, as serve_device's
        await contain(gw, dev, exc)
    finally:
        if not parked:
            await _close(dev.stream)
            gw.connection_closed(dev.client_ip)


async def contained(gw, dev: Device, exc: Exception) -> None:
    """What the lane could not finish (an exception in its step): contained, then closed."""
    try:
        await contain(gw, dev, exc)
    finally:
        await _close(dev.stream)
        gw.connection_closed(dev.client_ip)


def can_idle(gw, dev: Device) -> bool:
    """The connection may wait for its next request in the parking lot (proxy/lane.py): the
    lane is on, nothing of a next request is buffered, and its socket turning readable is
    what to wait for."""
    if not LANE or gw.parking is None or gw.draining or dev.leftover or dev.pending or dev._head is not None:
        return False
    conn = dev._conn
    if conn is not None and (conn.our_state is not h11.IDLE or conn.their_state is not h11.IDLE
                             or conn.trailing_data[0]):
        return False
    return dev.sock is not None or (dev.tls and dev.stream.waits_readable())


def idle(gw, dev: Device) -> None:
    """Hand the connection to the lot until its next request or its idle deadline."""
    lot = gw.parking
    fd = dev.fd
    if fd < 0:
        fd = dev.fd = parking.fileno(socket_of(dev.stream))
    # Nothing of a next request is here (can_idle, or a compiled exchange whole): h11 at IDLE
    # holds nothing a new one would not, and the lot may hold the connection for minutes.
    dev._conn = None
    dev.fresh = True
    lot.hold(parking.Idle(dev, lot.now() + gw.config.timeouts.idle_keepalive), fd)


def close_now(gw, dev: Device) -> None:
    """Close a connection the lot held (its idle deadline, a drain, EOF) and count it closed
    (the lot holds plain and tlsio streams only: _closed_now closes those)."""
    _closed_now(dev.stream)
    gw.connection_closed(dev.client_ip)


async def contain(gw, dev: Device, exc: Exception) -> None:
    """Log what ended this connection; answer it if an answer can still start. Never raises."""
    if isinstance(exc, DeviceTimeout):
        kind, status = "device_timeout", 408
    elif isinstance(exc, DeviceGone):
        return                        # the device left: nothing to answer, nothing to report
    elif isinstance(exc, HeadTooLarge):
        kind, status = "head_too_large", 431
    elif isinstance(exc, h11.RemoteProtocolError):
        kind, status = "malformed_request", exc.error_status_hint
    elif isinstance(exc, UpstreamError):
        kind, status = "upstream_error", 502
    else:
        kind, status = "contained_exception", 500
    try:
        gw.incidents.exception(kind, exc, dev.client_ip)
        if dev.conn.our_state in (h11.SEND_RESPONSE, h11.IDLE):
            dev.closing = True
            await dev.answer(status, [(b"Content-Type", b"text/plain")], _TEXT.get(status, b"error\n"))
    except Exception:                 # noqa: BLE001 - the device may be gone or h11 in ERROR: just close
        pass
    finally:
        # h11 keeps the error it raised, and its traceback holds this connection's
        # frames: a reference cycle per bad request. Dropped here, refcounting frees it all.
        exc.__traceback__ = None


_TEXT = {400: b"malformed HTTP request\n", 408: b"request took too long\n", 431: b"request head too large\n",
         500: b"internal error\n", 502: b"mail server answer unusable\n"}


def _closed_now(stream) -> bool:
    """Close a plain or tlsio stream without waiting (True); False for any other stream."""
    if type(stream) is trio.SocketStream:
        # What SocketStream.aclose does, less its checkpoint and aclose_forcefully's cancel
        # scopes (a fifth of a Connection: close request's cost): trio's socket close tells
        # any task waiting on it (notify_closing), then closes the descriptor.
        try:
            stream.socket.close()
        except OSError:
            pass
        return True
    if type(stream) is TLSStream:
        # tlsio's close never waits (close_notify only if the socket takes it now) and never
        # raises: no shielded scope, no aclose_forcefully, no checkpoint (they were two
        # thirds of a TLS connection's close in a real-rate sizing run's profile).
        stream.close()
        return True
    return False


async def _close(stream) -> None:
    if _closed_now(stream):
        return
    with trio.CancelScope(shield=True):
        try:
            await trio.aclose_forcefully(stream)
        except Exception:
            pass


def _next_cycle(dev: Device) -> bool:
    done = dev.next_cycle()
    if done is not None:
        return done
    conn = dev.conn
    if dev.closing or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
        return False
    conn.start_next_cycle()
    # A pipelining device's next head may be in h11's buffer already; it counts against the limit.
    dev.leftover = len(conn.trailing_data[0])
    return True


def _framing_repaired(request: h11.Request) -> bool:
    """Content-Length beside Transfer-Encoding (h11 frames by the latter), or
    Transfer-Encoding on HTTP/1.0: RFC 9112 6.1 wants the connection closed after the answer."""
    te = cl = False
    for _, low, _ in hdrs.items(request.headers):
        if low == b"transfer-encoding":
            te = True
        elif low == b"content-length":
            cl = True
    return te and (cl or request.http_version != b"1.1")


# The keep-alive lane (proxy/lane.py): tests turn it off to hold connections to their tasks.
LANE = True


async def _loop(gw, dev: Device, head=None) -> bool:
    """Serve requests until the connection closes (False) or is handed on (True: a parked
    Ping, or an idle connection the lot holds); ``head``: a request head already read."""
    while True:
        if head is not None:
            event, head = head, None
        elif dev.pending:
            # A pipelined request's first bytes came with the last one (compiled path).
            first, dev.pending = dev.pending, b""
            dev.fresh = False
            event = await _read_head(gw, dev, first)
        elif dev.fresh:
            event = h11.NEED_DATA     # h11 holds nothing: what its next_event would say
            dev.fresh = False
        else:
            event = dev.conn.next_event()
        if event is h11.NEED_DATA:
            if gw.draining:
                return False
            # Waiting for the next request is the idle keep-alive phase; the drain cancels it.
            size = min(RECEIVE_SIZE, max(dev.max_head - dev.leftover, 1))
            try:
                sock = dev.sock
                data = sockio.read_now(sock, size) if sock is not None else \
                    (dev.stream.read_now(size) if dev.tls else None)
                if data is None and can_idle(gw, dev):
                    idle(gw, dev)     # the task ends; the lot has the connection (proxy/lane.py)
                    return True
                if data is None:
                    deadline = trio.current_time() + gw.config.timeouts.idle_keepalive
                    if sock is not None or dev.tls:
                        # The drain ends the wait via cancel() (notify_closing: ClosedResourceError).
                        wait = sockio.IdleWait(sock if sock is not None else dev.stream.plain)
                        gw.idle_scopes.add(wait)
                        try:
                            data = await (sockio.wait_plain(sock, size, deadline) if sock is not None
                                          else dev.stream.receive_by(size, deadline))
                        finally:
                            gw.idle_scopes.discard(wait)
                    else:
                        scope = trio.CancelScope(deadline=deadline)
                        gw.idle_scopes.add(scope)
                        try:
                            data = await sockio.wait_receive(dev.stream, dev.sock, size, scope)
                        finally:
                            gw.idle_scopes.discard(scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return False
            if not data:
                return False          # idle timeout, drain or EOF between requests: just close
            event = await _read_head(gw, dev, data)
        if type(event) is http1.RequestHead:
            # The compiled parser's head (never a repaired framing: it defers those to h11).
            if gw.draining:
                dev.closing = True
            result = await exchange.fast(gw, dev, event)
            if result is not exchange.NOT_FAST:
                if result is exchange.PARKED:
                    return True
                if not _next_cycle(dev):
                    return False
                continue
            event = dev._event = http1.request_event(event)
        elif not isinstance(event, h11.Request):
            return False
        if gw.draining or _framing_repaired(event):
            dev.closing = True
        if await exchange.handle(gw, dev, event) is exchange.PARKED:
            return True
        if not _next_cycle(dev):
            return False


async def _read_head(gw, dev: Device, first: bytes) -> h11.Request:
    """The rest of a request head whose first bytes came in: one deadline for all of it
    (from its first byte), and never more than limits.max_header_bytes of it read."""
    if not dev.leftover:
        # The common case in compiled code (proxy/_http1.pyx): a whole head in the first read,
        # exactly the Request h11 would make (tests/test_http1.py), handed to h11's state
        # machine for the body and the answer. Anything else is h11's, as before.
        try:
            head = http1.parse_request(first, dev.max_head)
        except HTTPProtocolError:
            head = None               # h11 rejects the same bytes below, with its own status
        if type(head) is http1.RequestHead:
            # h11 gets it when someone asks for dev.conn; the forwarding path may take the
            # body first (take_body), so h11 never reads it. Its h11.Request is made only if
            # the fast lane (exchange.fast) does not carry the exchange (_loop).
            dev._head = head
            dev._rest = first[head.head_len:]
            return head
    conn = dev.conn
    deadline = trio.current_time() + gw.config.timeouts.request_head
    fed = dev.leftover + len(first)
    conn.receive_data(first)
    event = conn.next_event()
    while event is h11.NEED_DATA:
        room = dev.max_head - fed
        if room <= 0:
            raise HeadTooLarge("request head larger than limits.max_header_bytes", error_status_hint=431)
        fed += await dev.receive(deadline, min(RECEIVE_SIZE, room))
        event = conn.next_event()
    if fed > dev.max_head and isinstance(event, h11.Request):
        # Only with bytes left over from a pipelined request: measure the head exactly.
        if fed - len(conn.trailing_data[0]) > dev.max_head:
            raise HeadTooLarge("request head larger than limits.max_header_bytes", error_status_hint=431)
    dev.leftover = 0
    return event
