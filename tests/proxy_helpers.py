"""Test helpers for the proxy: a tiny h11 mail server and a raw HTTP/1.1 client."""
from __future__ import annotations

import hashlib

import h11
import trio

from conftest import REAL_SERVER


def fixture_answer(name: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a real-server capture (<name>.hdr + body file)."""
    head = (REAL_SERVER / f"{name}.hdr").read_bytes() if (REAL_SERVER / f"{name}.hdr").exists() \
        else (REAL_SERVER / f"{name}.resp.hdr").read_bytes()
    lines = head.decode("latin-1").split("\r\n") if b"\r\n" in head else head.decode("latin-1").split("\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            if k.lower() in ("connection",):
                continue
            headers.append((k.strip().encode(), v.strip().encode()))
    for cand in (f"{name}.resp.wbxml", f"{name}.bin", f"attachment_{name}.bin"):
        if (REAL_SERVER / cand).exists():
            return status, headers, (REAL_SERVER / cand).read_bytes()
    return status, headers, b""


class MiniUpstream:
    """An h11 mail server: answers with ``handler(request, body)`` and records what it got."""

    def __init__(self, handler, keep_bodies: bool = True):
        self.handler = handler
        self.keep_bodies = keep_bodies       # False: record (length, sha256) of big bodies instead
        self.requests: list[tuple[h11.Request, bytes]] = []
        self.connections = 0
        self.port = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self.listeners = listeners
        await trio.serve_listeners(self._conn, listeners, task_status=task_status)

    async def _conn(self, stream):
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req, body = None, bytearray()
                digest, size = hashlib.sha256(), 0
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        if self.keep_bodies:
                            body += ev.data
                        digest.update(ev.data)
                        size += len(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                if not self.keep_bodies:
                    body = f"{size}:{digest.hexdigest()}".encode()
                self.requests.append((req, bytes(body)))
                result = self.handler(req, bytes(body))
                if hasattr(result, "__await__"):
                    result = await result
                status, headers, payload = result
                out = conn.send(h11.Response(status_code=status, headers=headers))
                if isinstance(payload, (bytes, bytearray)):
                    if payload:
                        out += conn.send(h11.Data(data=payload))
                    await stream.send_all(out + conn.send(h11.EndOfMessage()))
                else:                      # an iterable of chunks, streamed
                    await stream.send_all(out)
                    for chunk in payload:
                        await stream.send_all(conn.send(h11.Data(data=chunk)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


class Client:
    """A raw HTTP/1.1 client on one connection (keep-alive), for talking to the gateway."""

    def __init__(self, stream):
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int, ssl_context=None, host="127.0.0.1"):
        stream = await trio.open_tcp_stream(host, port)
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname="localhost")
        return cls(stream)

    async def request(self, method: bytes, target: bytes, headers=(), body: bytes = b""):
        headers = [(b"Host", b"gw.example")] + list(headers)
        if body or method == b"POST":
            headers.append((b"Content-Length", str(len(body)).encode()))
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(out)
        return await self.read_answer()

    async def read_answer(self):
        resp, body = None, bytearray()
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            if isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise EOFError("gateway closed the connection")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return resp, bytes(body)

    async def aclose(self):
        await trio.aclose_forcefully(self.stream)
