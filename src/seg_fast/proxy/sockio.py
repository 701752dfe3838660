"""Reads and writes that skip trio's scheduler when the kernel can serve them at once.

trio's SocketStream passes through the scheduler on every send and receive, even
when the socket was ready (two checkpoints and a context manager each), and a
proxied request makes about eight of them. On a plain TCP socket the system call
is tried first; only when it would block does the task wait through trio
(``wait_readable``/``wait_writable``, cancellable by the caller's scope). Every
FAIR_EVERY ready operations still checkpoint, so a connection whose data is always
ready cannot starve the others. TLS streams (``sock`` None) take trio's own path.
"""
from __future__ import annotations

import math
import os

import trio
from trio.lowlevel import checkpoint, wait_readable

FAIR_EVERY = 32
_ready = 0


def plain_socket(stream):
    """The trio socket under a plain SocketStream, or None (TLS and other streams)."""
    return stream.socket if type(stream) is trio.SocketStream else None


def read_now(sock, size: int) -> bytes | None:
    """One read if the data is already there (b"" on EOF); None if it would block."""
    if sock is None:
        return None
    fd = sock.fileno()
    if fd < 0:
        return None                   # closed: let trio's path raise ClosedResourceError
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None


async def wait_receive(stream, sock, size: int, scope: trio.CancelScope) -> bytes | None:
    """Wait for one read under ``scope``; None if the scope was cancelled (deadline) first."""
    with scope:
        if sock is None:
            return await stream.receive_some(size)
        while True:
            await wait_readable(sock)
            fd = sock.fileno()
            if fd < 0:
                return await stream.receive_some(size)
            try:
                return os.read(fd, size)
            except BlockingIOError:
                continue
    return None


async def receive(stream, sock, size: int, deadline: float = math.inf) -> bytes | None:
    """One read (b"" on EOF); None if ``deadline`` (trio clock) passed before any data."""
    global _ready
    data = read_now(sock, size)
    if data is None:
        return await wait_receive(stream, sock, size, trio.CancelScope(deadline=deadline))
    _ready += 1
    if _ready >= FAIR_EVERY:
        _ready = 0
        await checkpoint()
    return data


async def send_all(stream, sock, data) -> None:
    """Write all of ``data``; what the kernel does not take at once goes through trio."""
    global _ready
    if sock is not None:
        fd = sock.fileno()
        if fd >= 0:
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                _ready += 1
                if _ready >= FAIR_EVERY:
                    _ready = 0
                    await checkpoint()
                return
            data = memoryview(data)[sent:]
    await stream.send_all(data)
