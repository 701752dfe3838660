"""The requests on one connection (a blocking socket, or a trio stream), for stand-in mail
servers that answer by hand (tests and benchmarks that need to misbehave in ways a real
HTTP server will not). Content-Length bodies only: what a gateway sends its mail server."""
from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator


def requests(conn: socket.socket) -> Iterator[dict[bytes, bytes]]:
    """Each request's header fields (names lower-cased), once its Content-Length body is
    read; ends when the peer closes. Answer before asking for the next one."""
    for _line, fields in heads(conn):
        yield fields


def heads(conn: socket.socket) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """Each request as (its request line, its header fields), as ``requests``."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            more = conn.recv(65536)
            if not more:
                return
            buf += more
        head, buf = buf.split(b"\r\n\r\n", 1)
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        length = int(fields.get(b"content-length", b"0"))
        while len(buf) < length:
            more = conn.recv(65536)
            if not more:
                return
            buf += more
        buf = buf[length:]
        yield head.split(b"\r\n", 1)[0], fields


async def stream_requests(stream) -> AsyncIterator[tuple[bytes, bytes]]:
    """Each request on a trio stream as (its head without the blank line, its Content-Length
    body); ends when the peer closes, mid-request too. Answer before asking for the next one."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            more = await stream.receive_some(65536)
            if not more:
                return
            buf += more
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(buf) < length:
            more = await stream.receive_some(65536)
            if not more:
                return
            buf += more
        body, buf = buf[:length], buf[length:]
        yield head, body
