"""The requests on one blocking socket, for stand-in mail servers that answer by hand
(tests and benchmarks that need to misbehave in ways a real HTTP server will not)."""
from __future__ import annotations

import socket
from collections.abc import Iterator


def requests(conn: socket.socket) -> Iterator[dict[bytes, bytes]]:
    """Each request's header fields (names lower-cased), once its Content-Length body is
    read; ends when the peer closes. Answer before asking for the next one."""
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
        yield fields
