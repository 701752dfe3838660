"""A tiny h11 client for tests that talk to the admin API and the test JSON servers."""
from __future__ import annotations

import h11
import trio


async def request(port: int, method: str, path: str, body: bytes = b"", *, token: str | None = None,
                  host: str = "127.0.0.1", headers: list | None = None) -> tuple[int, dict, bytes]:
    stream = await trio.open_tcp_stream(host, port)
    try:
        conn = h11.Connection(h11.CLIENT)
        hdrs = [(b"host", b"localhost"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")] + (headers or [])
        if token is not None:
            hdrs.append((b"authorization", b"Bearer " + token.encode()))
        await stream.send_all(conn.send(h11.Request(method=method, target=path, headers=hdrs)))
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status, rhdrs, chunks = 0, {}, []
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Response):
                status, rhdrs = ev.status_code, {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                chunks.append(ev.data)
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, rhdrs, b"".join(chunks)
    finally:
        await stream.aclose()


class JsonServer:
    """A small trio + h11 JSON server: ``routes[path] -> (status, body bytes)`` or a callable
    taking (path, headers) and returning that. Records every request it saw."""

    def __init__(self, routes):
        self.routes = routes
        self.seen: list[tuple[str, dict]] = []
        self.port = 0

    async def handle(self, stream):
        conn = h11.Connection(h11.SERVER)
        try:
            req = None
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(ev, h11.Request):
                    req = ev
                elif isinstance(ev, h11.EndOfMessage):
                    break
            path = req.target.decode()
            hdrs = {k.decode(): v.decode() for k, v in req.headers}
            self.seen.append((path, hdrs))
            route = self.routes.get(path.split("?")[0])
            if callable(route):
                status, body = route(path, hdrs)
            elif route is None:
                status, body = 404, b"{}"
            else:
                status, body = route
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())])))
            await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def serve(self, *, ssl_context=None, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        if ssl_context is not None:
            listeners = [trio.SSLListener(l, ssl_context, https_compatible=True) for l in listeners]
        task_status.started(self.port)
        await trio.serve_listeners(self.handle, listeners)
