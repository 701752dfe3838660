"""The keep-alive lane: a device's common exchange carried by the parking lot's task.

A request that wakes an idle worker went through trio's scheduler at each of its wake-ups
(~34 of trio's functions each, ~135 µs of a cold request: benchmarks/wake_footprint.py), then
resumed a task per connection, its descriptor re-armed at every wait. So a keep-alive
connection has no task between requests, and the lot's task sleeps for the worker when
trio has nothing to run (parking.SLEEP_HERE): 0.845 of the CPU per cold request before it
(benchmarks/README.md, "The keep-alive lane").

Between requests the connection's Device waits in the lot's epoll set (parking.Idle, with
the idle deadline). When its next request is whole in one read and the fast lane takes it
(exchange.fast_plan), the lot's task writes it up to a pooled connection at once and holds
that connection (parking.Inflight, with the answer's deadline). When the answer is whole in
one read, the same task writes it to the device and the connection waits as Idle again. An
answer the email-security policies transform is transformed there too when it is a small
whole 200 (exchange.transformed_parts: under THREAD_TRANSFORM_BYTES, the size the general
path also transforms on the loop). A wake-up of the worker runs one task step for everything
that was ready.

A pooled connection to an https:// mail server that tlsio carries (upstream.UpstreamConn.tls)
is written and read here as a plain one is: the request sealed and written at once, the
answer's records read as far as they are whole.

Anything else goes back to a task where the exchange stands (downstream.carry_on): a head or
body in pieces, a request the fast lane does not take, no pooled connection or one inside an
https:// outbound proxy's TLS, a socket that does not take the whole write, an answer in
pieces, a 1xx, a redirect, chunked, the mail server gone, the device gone, a deadline, a drain,
an answer to transform that is large or that a transform refuses. Nothing here waits: each step is one
read (over TLS, of the records there are) and at most one write of each socket, and the
deadlines are the lot's.
"""
from __future__ import annotations

import os
import time

import trio

from seg_fast.errors import HTTPProtocolError
from seg_fast.proxy import downstream, exchange, http1, parking, sockio, tlsbatch
from seg_fast.proxy.downstream import Device, carry_on, close_now
from seg_fast.proxy.exchange import DeviceGone
from seg_fast.proxy.tlsio import RECORD
from seg_fast.proxy.upstream import RECEIVE_SIZE, UpstreamError

_POST = b"POST"


def fire(gw, p, why: str) -> None:
    """What the lot found for a lane record (readable, the device gone, its deadline, a drain).
    Never raises: an exception is its connection's alone (contained on a task)."""
    dev = p.dev
    try:
        if type(p) is parking.Idle:
            _ready(gw, dev, why)
        else:
            _answered(gw, p, why)
    except Exception as exc:          # noqa: BLE001 - the containment line, as serve_device's
        up = getattr(p, "up", None)
        if up is not None and up.pool is not None and up.sock.fileno() >= 0 and up.sent is not None:
            gw.pool.discard(up)       # taken for this exchange and not handed on
        gw._conns.start_soon(downstream.contained, gw, dev, exc)


def _spawn(gw, dev: Device, head=None, step=None, *args) -> None:
    gw.parking.handed += 1
    gw._conns.start_soon(carry_on, gw, dev, head, step, *args)


def _ready(gw, dev: Device, why: str) -> None:
    if why != parking.ANSWER:
        close_now(gw, dev)            # the idle deadline or a drain: closed, as _loop closes it
        return
    size = min(RECEIVE_SIZE, dev.max_head)
    try:
        data = sockio.read_now(dev.sock, size) if dev.sock is not None else dev.stream.read_now(size)
    except OSError:
        data = b""
    if data is None:
        _spawn(gw, dev)               # readable yet nothing to read (a TLS record in pieces): its task waits
    elif not data:
        close_now(gw, dev)            # EOF between requests
    else:
        request(gw, dev, data)


def request(gw, dev: Device, data: bytes) -> None:
    """A request's first read: carried here if the fast lane takes it whole, else by a task."""
    try:
        head = http1.parse_request(data, dev.max_head)
    except HTTPProtocolError:
        head = None                   # h11 rejects the same bytes, with its own status (_read_head)
    if type(head) is not http1.RequestHead:
        dev.pending = data
        _spawn(gw, dev)
        return
    dev._head = head                  # as _read_head leaves a compiled head
    dev._rest = data[head.head_len:]
    dev.fresh = False
    if gw.draining:
        dev.closing = True
    plan = exchange.fast_plan(gw, dev, head)
    if plan is exchange.NOT_FAST:
        _spawn(gw, dev, head)         # _loop goes on from the head, as if it had read it
        return
    origin = gw.redirects.origin_for(plan.req.user)
    pool = gw.pool
    up = pool.take(origin)
    ping = plan.req.command == "Ping"
    if up is not None and ((up.plain is None and up.tls is None) or (ping and not up.looks_alive())):
        # A connection inside an https:// proxy's TLS is the task's to use; a Ping is parked right
        # after its write, where nothing resends it, so its connection is probed first
        # (acquire's rule).
        if up.plain is None and up.tls is None:
            up.reusable = True
            pool.release(up)
        else:
            pool.discard(up)
        up = None
    if up is None:
        _spawn(gw, dev, None, exchange.fast_run, plan)       # acquire, connect, resend: all there
        return
    plan.rec.upstream = origin.name
    try:
        parts = exchange.upstream_parts(dev, plan, origin)
    except BaseException:
        pool.discard(up)
        raise
    up.sent = (_POST, head.target, len(plan.body))
    fd = up.sock.fileno()
    total = 0
    for part in parts:
        total += len(part)
    t_up = time.perf_counter()
    if up.plain is not None:
        try:
            sent = os.writev(fd, parts)
        except OSError:               # (BlockingIOError too: a pooled connection's buffer is empty)
            sent = -1
    else:
        sent = total if _write_tls_now(up.tls, parts, total) else -1
    if sent != total:
        # At most part of the request went: closing the connection tells the mail server it
        # will not get the rest, and the task sends it whole on another.
        pool.discard(up)
        _spawn(gw, dev, None, exchange.fast_run, plan)
        return
    timeout = exchange.read_timeout(gw, plan)
    lot = gw.parking
    if ping:
        exchange.shed(dev, plan, up)
    f = parking.Inflight(dev, up, plan, timeout, lot.now() + timeout, t_up, ping)
    # A Ping waits minutes: its device leaving is watched (EPOLLRDHUP), as a parked Ping's is.
    lot.hold(f, fd, dev.fd if ping else -1)      # (dev.fd: set when it idled, before this request)


def _answered(gw, f: parking.Inflight, why: str) -> None:
    dev, up, plan = f.dev, f.up, f.plan
    if why != parking.ANSWER:
        _spawn(gw, dev, None, exchange.answer_inflight, f, why, None)
        return
    try:
        data = sockio.read_now(up.plain, RECEIVE_SIZE) if up.plain is not None else _read_tls_now(up.tls)
    except OSError:
        data = b""
    answer = None
    if data:
        try:
            answer = exchange.answer_in(up, data)
        except UpstreamError:
            answer = None             # the task parses it again and answers 502/503 (answer_inflight)
    if answer is None or not exchange.whole_answer(answer, up.rest):
        _spawn(gw, dev, None, exchange.answer_inflight, f, why, data)
        return
    rec = plan.rec
    rec.upstream_ms = round((time.perf_counter() - f.t_up) * 1000, 3)
    if plan.answer_tx:
        parts = exchange.transformed_parts(gw, dev, up, answer, plan)
    else:
        parts = exchange.whole_parts(gw, dev, up, answer, rec)
    if parts is None:
        _spawn(gw, dev, None, exchange.answer_inflight, f, why, data)
        return
    try:
        rest = _write_now(dev, parts)
    except (OSError, trio.BrokenResourceError):
        exchange.finish_log(gw, plan)
        close_now(gw, dev)            # the device left: nothing more to say to it
        return
    if rest:
        _spawn(gw, dev, None, _send_sealed if type(rest) is memoryview else _send_rest, plan, rest)
        return
    gw.parking.carried += 1
    exchange.finish_log(gw, plan)
    _next(gw, dev)


def _write_tls_now(tls, parts: list, total: int) -> bool:
    """A request's records written to a mail server's TLS connection at once; False if the
    socket did not take them all (the connection is then discarded, as a plain one's is)."""
    try:
        if total <= RECORD:
            return tls.write_now(parts[0] if len(parts) == 1 else b"".join(parts))
        rest = tls.seal_now(parts) if total <= tlsbatch.BATCH else None
    except trio.BrokenResourceError:
        return False
    return rest is not None and not rest


def _read_tls_now(tls) -> bytes | None:
    """What a mail server's TLS connection holds decrypted now, up to RECEIVE_SIZE: the
    records that are whole (None if none is: part of one, or only a session ticket; b"" at
    EOF, and when TLS failed before any of the answer came, which answer_inflight treats as
    the close of a kept-alive connection: the request goes again, once, on a new one)."""
    data = tls.read_now(RECORD)
    if data is None:
        return b"" if tls.failed else None
    return tls.read_more(data, RECEIVE_SIZE)


def _write_now(dev: Device, parts: list):
    """Write what the device's socket takes now; what it did not take: parts (for TLS the
    same bytes again: OpenSSL's rule), or a memoryview of TLS records already made (tlsio's
    seal_now: send_sealed writes them); empty once all of it went."""
    if dev.sock is not None:
        fd = dev.sock.fileno()
        if fd < 0:
            raise OSError("socket was closed")
        try:
            sent = os.writev(fd, parts)
        except BlockingIOError:
            sent = 0
        rest = []
        for part in parts:
            n = len(part)
            if sent >= n:
                sent -= n
            else:
                rest.append(memoryview(part)[sent:] if sent else part)
                sent = 0
        return rest
    total = 0
    for part in parts:
        total += len(part)
    if total > RECORD:
        # Several records: made in one batch and written at once, as far as the socket takes them.
        rest = dev.stream.seal_now(parts) if total <= tlsbatch.BATCH else None
        return parts if rest is None else rest
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return [] if dev.stream.write_now(data) else [data]


async def _send_rest(gw, dev: Device, plan, rest: list) -> bool:
    try:
        await dev.send_parts(rest)    # the write's deadline and pace, as every device write
    finally:
        exchange.finish_log(gw, plan)
    return True


async def _send_sealed(gw, dev: Device, plan, rest: memoryview) -> bool:
    try:
        await dev.stream.send_sealed(rest, gw.device_pace)
    except TimeoutError as exc:
        dev._write_timeout(exc)       # (raises DeviceGone, as Device.send_parts does)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise DeviceGone(type(exc).__name__) from None
    finally:
        exchange.finish_log(gw, plan)
    return True


def _next(gw, dev: Device) -> None:
    """After an answer the lane wrote whole: the connection's next request, here or on a task."""
    if not dev.next_cycle():          # (a compiled exchange, whole: never None, _next_cycle's case)
        close_now(gw, dev)
        return
    if dev.pending:
        _spawn(gw, dev)               # a pipelined request came with this one
        return
    if dev.tls:
        # OpenSSL may hold decrypted bytes the socket no longer shows: read before waiting.
        try:
            data = dev.stream.read_now(min(RECEIVE_SIZE, dev.max_head))
        except OSError:
            data = b""
        if data:
            request(gw, dev, data)
            return
        if data is not None:
            close_now(gw, dev)
            return
        if not dev.stream.waits_readable():
            _spawn(gw, dev)           # (OpenSSL's output waits for the socket: the task's wait)
            return
    # A compiled exchange, whole: h11 was never told, nothing of a next request is here.
    downstream.idle(gw, dev)
