"""A small Redis client over trio sockets: RESP2 commands, pipelines and pub/sub.

Only what the policy store needs. The parser is sans-IO (``RespParser`` eats
bytes, yields replies); ``RedisConnection`` is the trio shell around it.
"""
from __future__ import annotations

import select
from urllib.parse import unquote, urlsplit

import trio

from seg_fast.errors import SegFastError


class RedisError(SegFastError):
    """The Redis server answered with an error, or the connection broke."""


class _Incomplete(Exception):
    pass


# Replies larger than this are refused (a policy snapshot is far smaller).
MAX_REPLY = 512 * 1024 * 1024
MAX_ITEMS = 10_000_000
MAX_DEPTH = 8       # our commands never nest deeper than EXEC -> HVALS


def encode_command(*args: bytes | str | int | float) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, (int, float)):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RespParser:
    def __init__(self):
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def next(self):
        """One complete reply, or raise _Incomplete. Errors come back as RedisError values."""
        start = self.pos
        try:
            value = self._parse()
        except _Incomplete:
            self.pos = start
            raise
        return value

    def _line(self) -> bytes:
        end = self.buf.find(b"\r\n", self.pos)
        if end < 0:
            if len(self.buf) - self.pos > 64 * 1024:
                raise RedisError("Redis reply line too long")
            raise _Incomplete
        line = bytes(self.buf[self.pos:end])
        self.pos = end + 2
        return line

    def _parse(self, depth: int = 0):
        if depth > MAX_DEPTH:
            raise RedisError("Redis reply nested too deeply")
        line = self._line()
        if not line:
            raise RedisError("empty Redis reply line")
        kind, rest = line[:1], line[1:]
        if kind in (b":", b"$", b"*"):
            try:
                n = int(rest)
            except ValueError:
                raise RedisError(f"bad Redis reply length/integer {rest[:20]!r}") from None
        if kind == b"+":
            return rest.decode(errors="replace")
        if kind == b"-":
            return RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return n
        if kind == b"$":
            if n < 0:
                return None
            if n > MAX_REPLY:
                raise RedisError("Redis reply too large")
            if len(self.buf) - self.pos < n + 2:
                raise _Incomplete
            data = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n + 2
            return data
        if kind == b"*":
            if n < 0:
                return None
            if n > MAX_ITEMS:
                raise RedisError("Redis reply array too long")
            return [self._parse(depth + 1) for _ in range(n)]
        raise RedisError(f"unknown Redis reply type {kind!r}")


class RedisConnection:
    """One connection. Not shared between tasks concurrently (use a lock or one per task)."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.parser = RespParser()
        self.lock = trio.Lock()

    @classmethod
    async def connect(cls, url: str, *, timeout: float = 5.0) -> "RedisConnection":
        parts = urlsplit(url)
        if parts.scheme not in ("redis", ""):
            raise RedisError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis://host:port/db)")
        with trio.fail_after(timeout):
            try:
                stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 6379)
            except OSError as exc:
                raise RedisError(f"cannot connect to Redis at {parts.hostname}:{parts.port}: {exc.strerror}") from None
        conn = cls(stream)
        if parts.password:
            args = ([unquote(parts.username)] if parts.username else []) + [unquote(parts.password)]
            await conn.execute("AUTH", *args)
        db = (parts.path or "/").strip("/")
        if db:
            await conn.execute("SELECT", db)
        return conn

    async def _read_reply(self):
        while True:
            try:
                return self.parser.next()
            except _Incomplete:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise RedisError("Redis closed the connection") from None
                self.parser.feed(data)

    async def pipeline(self, commands: list[tuple]) -> list:
        """Send several commands at once; return their replies (errors raised after all are read)."""
        async with self.lock:
            try:
                await self.stream.send_all(b"".join(encode_command(*c) for c in commands))
                replies = [await self._read_reply() for _ in commands]
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise RedisError(f"Redis connection lost: {exc}") from None
        for r in replies:
            if isinstance(r, RedisError):
                raise r
        return replies

    async def execute(self, *args):
        return (await self.pipeline([args]))[0]

    def dropped(self) -> bool:
        """True when Redis has closed this idle connection (a restart, an idle timeout).

        Checked before a pipeline is sent: commands never sent cannot have run, so
        reconnecting then is safe for every command, version bumps included. With no
        request outstanding Redis sends nothing, so any readable byte (EOF included)
        means the connection is no longer one we can use.
        """
        if self.lock.locked():
            return False
        stream = getattr(self.stream, "transport_stream", self.stream)
        sock = getattr(stream, "socket", None)
        if sock is None:
            return False
        try:
            fd = sock.fileno()
        except OSError:
            return True
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLRDHUP)
        return bool(poller.poll(0))

    async def send(self, *args) -> None:
        """Send without waiting for a reply (pub/sub mode)."""
        await self.stream.send_all(encode_command(*args))

    async def read(self):
        """Next pushed message (pub/sub mode)."""
        try:
            r = await self._read_reply()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise RedisError(f"Redis connection lost: {exc}") from None
        if isinstance(r, RedisError):
            raise r
        return r

    async def aclose(self) -> None:
        await self.stream.aclose()
