"""One device connection: h11 server side, keep-alive loop, per-phase timeouts."""
from __future__ import annotations

import h11
import trio

from seg_fast.proxy import exchange, sockio
from seg_fast.proxy.exchange import DeviceGone

RECEIVE_SIZE = 64 * 1024


class Device:
    """The device side of one connection: its stream, h11 state and who it is."""

    __slots__ = ("stream", "sock", "conn", "client_ip", "proto", "closing")

    def __init__(self, stream, client_ip: str, proto: bytes, max_head: int):
        self.stream = stream
        self.sock = sockio.plain_socket(stream)      # None under TLS
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.client_ip = client_ip
        self.proto = proto
        self.closing = False          # set when draining: answer, then close

    async def receive(self, timeout: float) -> None:
        """Feed h11 one read from the device (b"" on EOF)."""
        try:
            data = await sockio.receive(self.stream, self.sock, RECEIVE_SIZE, trio.current_time() + timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise DeviceGone(type(exc).__name__) from None
        if data is None:
            raise DeviceGone("device stalled")
        self.conn.receive_data(data)

    async def send_bytes(self, data) -> None:
        try:
            await sockio.send_all(self.stream, self.sock, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise DeviceGone(type(exc).__name__) from None

    async def answer(self, status: int, headers, body: bytes = b"") -> None:
        """A whole answer the gateway makes itself (errors, blocked devices)."""
        conn = self.conn
        if conn.our_state not in (h11.SEND_RESPONSE, h11.IDLE):      # IDLE: the head was malformed
            raise DeviceGone("answer already started")
        headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")]
        headers.append((b"Content-Length", str(len(body)).encode()))
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
        out = conn.send(h11.Response(status_code=status, headers=headers))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(exchange.END)
        await self.send_bytes(out)


async def serve_device(gw, stream, client_ip: str, proto: bytes) -> bool:
    """Serve requests on one device connection until it closes, idles out or the worker drains.

    Returns True when the connection was handed to the parking lot (a parked Ping):
    then it stays open and the lot's resume task owns it.
    """
    dev = Device(stream, client_ip, proto, gw.config.limits.max_header_bytes)
    parked = False
    try:
        parked = await _loop(gw, dev)
    except DeviceGone:
        pass
    finally:
        if not parked:
            await _close(stream)
    return parked


async def resume_parked(gw, p, why: str) -> None:
    """The task a parked Ping gets back: answer it, then go on serving the connection."""
    dev = Device(p.dev_stream, p.client_ip, p.proto, gw.config.limits.max_header_bytes)
    parked = False
    try:
        if await exchange.resume(gw, p, why, dev) and _next_cycle(dev):
            parked = await _loop(gw, dev)
    except DeviceGone:
        pass
    finally:
        if not parked:
            await _close(p.dev_stream)
            gw.active -= 1


async def _close(stream) -> None:
    with trio.CancelScope(shield=True):
        try:
            await trio.aclose_forcefully(stream)
        except Exception:
            pass


def _next_cycle(dev: Device) -> bool:
    conn = dev.conn
    if dev.closing or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
        return False
    conn.start_next_cycle()
    return True


async def _loop(gw, dev: Device) -> bool:
    conn = dev.conn
    while True:
        timeouts = gw.config.timeouts
        # Waiting for the next request is the idle keep-alive phase; the drain cancels it.
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if gw.draining:
                return False
            try:
                data = sockio.read_now(dev.sock, RECEIVE_SIZE)
                if data is None:
                    deadline = trio.current_time() + timeouts.idle_keepalive
                    if dev.sock is not None:
                        wait = sockio.IdleWait(dev.sock)      # the drain ends it via cancel()
                        gw.idle_scopes.add(wait)
                        try:
                            data = await sockio.wait_plain(dev.sock, RECEIVE_SIZE, deadline)
                        finally:
                            gw.idle_scopes.discard(wait)
                    else:
                        scope = trio.CancelScope(deadline=deadline)
                        gw.idle_scopes.add(scope)
                        try:
                            data = await sockio.wait_receive(dev.stream, dev.sock, RECEIVE_SIZE, scope)
                        finally:
                            gw.idle_scopes.discard(scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return False
            if data is None:
                return False
            try:
                conn.receive_data(data)
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    await dev.receive(timeouts.request_head)
                    event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await _bad_request(dev, exc)
                return False
        if not isinstance(event, h11.Request):
            return False
        if gw.draining:
            dev.closing = True
        try:
            if await exchange.handle(gw, dev, event) is exchange.PARKED:
                return True
        except h11.RemoteProtocolError as exc:
            await _bad_request(dev, exc)
            return False
        if not _next_cycle(dev):
            return False


async def _bad_request(dev: Device, exc: h11.RemoteProtocolError) -> None:
    if dev.conn.our_state in (h11.SEND_RESPONSE, h11.IDLE):
        try:
            await dev.answer(exc.error_status_hint, [(b"Content-Type", b"text/plain")],
                             b"malformed HTTP request\n")
        except (DeviceGone, h11.LocalProtocolError):
            pass
