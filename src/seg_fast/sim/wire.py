"""The fleet's HTTP/1.1 client: pre-encoded requests, a strict small response reader.

A fleet device's request head is the same bytes every time but for the command,
the PolicyKey, the X-Fleet-Seq and the length, so it is built by joining bytes
(no header validation per request: ours are well-formed by construction). The
answer is read with a parser that accepts only what RFC 9112 allows a server to
send on this exchange (status line, ``name: value`` lines without folding, one
Content-Length of digits or chunked coding, or a close-delimited body) and raises
``WireError`` on anything else: the fleet checks the proxy under test, so the
reader is strict where h11 is (tests/test_sizing_wire.py holds it to h11).

Both transports are bare non-blocking sockets tried before trio is asked to wait:
``RawStream`` (plain) and ``TlsStream`` (TLS over OpenSSL's socket BIO: the C object
ssl.SSLSocket uses inside, without trio.SSLStream's memory BIOs, lock, conflict
detectors and retry loop per operation), so the fleet's poller can read either
where the socket turns readable (``HttpConn.poll_answer``).
"""
from __future__ import annotations

import errno
import os
import re
import select
import socket
import ssl
import time

import trio

from seg_fast.errors import HTTPProtocolError
from seg_fast.proxy import http1
from seg_fast.proxy.tlsio import socket_bio
from seg_fast.sim import stamps, tlssession

MAX_HEAD = 64 * 1024
SERVER_NAME = "mail.seg-fast.test"    # the name on the benchmark's certificate
RECV = 262144
# SSL_read gives one record's plaintext (at most 2**14 bytes) per call: a larger
# buffer is only a larger allocation to shrink
TLS_RECV = 16384
# An answer's bytes read in one loop step at most: a 10 MB answer already in the socket
# was read (decrypted, joined) in one step, 20-40 ms of the shard's CPU during which
# every other device's answer waited (sim/steps.py); past this the reader lets the loop
# run (the waiting reader checkpoints, the poller leaves the rest to its next wake-up)
READ_SLICE = 1 << 20
# Linux: the source port is picked at connect() (knowing the destination), not at
# bind(), so each (source, destination) pair has its own ~28,000 ports
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNK = re.compile(rb"([0-9A-Fa-f]+)(?:;[^\r\n]*)?")


# poll_answer: this answer is for the waiting reader (``answer``)
FALLBACK = object()
# read_tls: how a drain without waiting ended
TLS_DRAINED, TLS_EOF, TLS_STUCK = 0, 1, 2


class WireError(Exception):
    """The server's answer broke HTTP/1.1 framing (or the connection was cut)."""


def request_head(target: bytes, const: bytes, policy_key: bytes, seq: bytes | None, length: int) -> bytes:
    """``POST target`` with the device's constant header lines ``const`` (each ending
    in CRLF), its PolicyKey, the request's X-Fleet-Seq and Content-Length."""
    parts = [b"POST ", target, b" HTTP/1.1\r\n", const, b"X-MS-PolicyKey: ", policy_key, b"\r\n"]
    if seq is not None:
        parts += [b"X-Fleet-Seq: ", seq, b"\r\n"]
    parts += [b"Content-Length: ", str(length).encode(), b"\r\n\r\n"]
    return b"".join(parts)


class RawStream(trio.abc.HalfCloseableStream):
    """A trio stream over a connected non-blocking stdlib socket with nothing else per
    call: the operation is tried first and trio is asked to wait only when the kernel
    says it would block (trio.SocketStream adds a conflict detector, an
    error-translating context manager and a checkpoint to every call, which cost the
    load side more than the request's own bytes). Socket errors surface as OSError,
    which the fleet counts; under TLS, SSLStream sits on top of it."""
    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    async def send_all(self, data) -> None:
        sock = self.socket
        n = len(data)
        sent = 0
        with memoryview(data) as view:
            while sent < n:
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)

    async def receive_some(self, max_bytes=None) -> bytes:
        sock = self.socket
        while True:
            try:
                return sock.recv(max_bytes or RECV)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        self.socket.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class TlsStream(trio.abc.Stream):
    """TLS over a connected non-blocking socket with OpenSSL's socket BIO (the
    ``_ssl._SSLSocket`` that ssl.SSLSocket wraps): each operation is tried first and
    trio is asked to wait only when OpenSSL says it wants the socket. OpenSSL's rule
    for a write that wanted the socket: it is retried with the same bytes (it keeps
    what it already put into records), never with "the rest". Ragged EOFs read as
    EOF (https_compatible, as trio.SSLStream was used): HTTP framing says whether
    the answer was whole. SSL errors are OSErrors (ssl.SSLError), which the fleet
    counts. ``session``/``session_reused``/``do_handshake`` as on trio.SSLStream;
    the handshake also happens on first use."""
    __slots__ = ("socket", "ssl")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool = False,
                 server_hostname: str | None = None, session=None) -> None:
        self.socket = sock          # the SSL object holds only a weak reference to it
        if session is not None and not server_side:
            # resumed without CPython's copy of the session (tlssession.py: ~390 µs each)
            set_session = tlssession.setter()
            if set_session is not None:
                obj = socket_bio(context, sock, False, server_hostname)
                if set_session(context, obj, session) or type(session) is tlssession.Session:
                    # (a Session not set: a full handshake, counted as not resumed)
                    self.ssl = obj
                    return
        self.ssl = socket_bio(context, sock, server_side, server_hostname, session)

    @classmethod
    def over(cls, sock: socket.socket, ssl_object) -> "TlsStream":
        """A stream over an SSL object already made on ``sock`` (lean_serve's hand-off)."""
        self = cls.__new__(cls)
        self.socket = sock
        self.ssl = ssl_object
        return self

    @property
    def session(self):
        """The session to resume: a reference (tlssession.Session) where this process
        allows, not CPython's copy (~400 µs per read: once per device at set-up)."""
        get = tlssession.getter()
        return self.ssl.session if get is None else get(self.ssl)

    @property
    def session_reused(self) -> bool:
        return self.ssl.session_reused

    async def do_handshake(self) -> None:
        obj = self.ssl
        while True:
            try:
                obj.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)

    def send_nowait(self, data) -> bool:
        """Without waiting: True when all of ``data`` went out; False when the socket
        is full and ``send_all(data)`` (the same bytes) must finish it."""
        try:
            self.ssl.write(data)
            return True
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False

    async def send_all(self, data) -> None:
        if not data:
            return
        obj = self.ssl
        while True:
            try:
                obj.write(data)
                return
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)

    async def receive_some(self, max_bytes=None) -> bytes:
        obj = self.ssl
        n = TLS_RECV if max_bytes is None or max_bytes > TLS_RECV else max_bytes
        while True:
            try:
                return obj.read(n)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
            except ssl.SSLEOFError:
                return b""

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    def close(self) -> None:
        sock = self.socket
        if sock.fileno() >= 0:
            try:
                self.ssl.shutdown()         # our close_notify, not waiting for theirs
            except (OSError, ValueError):
                pass
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


def read_tls(obj, parts: list, limit: int = 0) -> tuple[int, int]:
    """Decrypted records read from the SSL object ``obj`` without waiting, appended to
    ``parts``: (bytes read, TLS_DRAINED | TLS_EOF | TLS_STUCK). Drained: OpenSSL wants
    more from the socket, or a short record most likely ended what was sent (a try past
    it would cost an SSLWantReadError; epoll says when more comes), or ``limit`` bytes
    (0: none) were read and OpenSSL holds nothing more decrypted (the rest is still in
    the socket: a level-triggered epoll reports it again). EOF: close_notify or a
    ragged EOF. Stuck: OpenSSL wants to write before it reads on."""
    n = 0
    while True:
        if limit and n >= limit and not obj.pending():
            return n, TLS_DRAINED
        try:
            data = obj.read(TLS_RECV)
        except ssl.SSLWantReadError:
            return n, TLS_DRAINED
        except ssl.SSLWantWriteError:
            return n, TLS_STUCK
        except ssl.SSLEOFError:
            return n, TLS_EOF
        if not data:
            return n, TLS_EOF
        parts.append(data)
        n += len(data)
        if len(data) < TLS_RECV and not obj.pending():
            return n, TLS_DRAINED


def _writable_now(sock: socket.socket) -> bool:
    p = select.poll()
    p.register(sock.fileno(), select.POLLOUT)
    return bool(p.poll(0))


async def connect(host: str, port: int, local: str | None) -> RawStream:
    """A TCP connection from ``local`` (any port) to (host, port): a socket, a bind
    and a non-blocking connect, without open_tcp_stream's resolver and
    happy-eyeballs nursery."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stamps.enable(sock)
        if local is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((local, 0))
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            # over loopback the handshake has mostly completed within connect(): one
            # poll(0) instead of a trio loop pass to learn it
            if not _writable_now(sock):
                await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {host}:{port}: {os.strerror(err)}")
    except BaseException:
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return RawStream(sock)


class HttpConn:
    """One client connection to a server, one request at a time (keep-alive while
    both sides allow it)."""

    __slots__ = ("stream", "buf", "reusable", "want", "parts", "have", "facts", "unyielded", "head_at",
                 "late", "fresh")

    def __init__(self, stream) -> None:
        self.stream = stream
        self.buf = b""
        self.reusable = True
        # poll_answer's state between calls: body bytes wanted (-1: head not read yet),
        # the pieces received so far and their length, (status, headers, keep-alive)
        self.want = -1
        self.parts: list[bytes] = []
        self.have = 0
        self.facts = None
        self.unyielded = 0          # bytes _more read since the loop last ran (READ_SLICE)
        self.head_at = 0.0          # perf_counter() when the last answer's head was read (time to first byte)
        self.late = 0.0             # s the answer's first bytes sat in the socket before we read them (stamps.py)
        self.fresh = True           # no answer read yet (under TLS the session tickets come first)

    @classmethod
    async def open(cls, host: str, port: int, local: str | None, tls=None, session=None,
                   server_name: str = SERVER_NAME) -> "HttpConn":
        """A connection; over TLS when ``tls`` (an ssl.SSLContext) is given, resuming
        ``session`` if one is (the handshake happens on first use)."""
        stream = await connect(host, port, local)
        if tls is not None:
            try:
                stream = TlsStream(stream.socket, tls, server_hostname=server_name, session=session)
            except BaseException:
                stream.close()
                raise
        return cls(stream)

    async def _more(self) -> bytes:
        data = await self.stream.receive_some(RECV)
        if not data:
            raise WireError("connection closed before the answer ended")
        # receive_some returns without a checkpoint while bytes are there: a large
        # answer already received would be read whole in one step
        self.unyielded += len(data)
        if self.unyielded >= READ_SLICE:
            self.unyielded = 0
            await trio.lowlevel.checkpoint()
        return data

    async def request(self, head: bytes, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, headers by lower-case name, body) of the answer to one request."""
        await self.send(head, body)
        return await self.answer()

    async def send(self, head: bytes, body: bytes) -> None:
        """The request only; ``answer`` reads what comes back (a parked Ping waits
        between the two without a task: fleet.Parker)."""
        if not self.reusable:
            raise WireError("connection not reusable")
        self.reusable = False
        if len(body) < 65536:
            await self.stream.send_all(head + body)
        else:
            await self.stream.send_all(head)
            await self.stream.send_all(body)

    def fileno(self) -> int:
        """The TCP socket under the stream (plain or TLS)."""
        return self.stream.socket.fileno()

    def buffered(self) -> bool:
        """Bytes already read from the socket and not yet consumed (here or, under
        TLS, decrypted in the SSL object): readiness of the socket would not say so."""
        if self.buf:
            return True
        stream = self.stream
        return type(stream) is TlsStream and stream.ssl.pending() > 0

    def poll_answer(self):
        """Without waiting (a connection whose socket is readable, plain or TLS): the
        answer when what has arrived completes it, None when more must come, FALLBACK
        when it is a form left to ``answer`` (anything but a final Content-Length
        answer: chunked, read-to-close, 1xx, a head the compiled parser defers; or
        TLS that wants to write before it reads on). What was read stays buffered for
        ``answer`` to go on from. Same bytes, same checks as ``answer``
        (tests/test_sizing_wire.py holds the two to each other)."""
        stream = self.stream
        parts = self.parts
        eof = stuck = False
        if self.want < 0 and not self.buf and not parts:
            self.late = self._arrived() or 0.0
        if type(stream) is RawStream:
            sock = stream.socket
            n = 0
            while n < READ_SLICE:          # the rest at the next readable (level-triggered)
                try:
                    data = sock.recv(RECV)
                except BlockingIOError:
                    break
                if not data:
                    eof = True
                    break
                parts.append(data)
                n += len(data)
                if len(data) < RECV:       # drained, most likely: epoll says when more comes
                    break
            self.have += n
        else:
            n, state = read_tls(stream.ssl, parts, READ_SLICE)
            self.have += n
            eof = state == TLS_EOF
            stuck = state == TLS_STUCK     # the waiting reader waits for the socket to drain
        if self.want < 0:
            if parts:
                self.buf = self.buf + b"".join(parts) if self.buf else b"".join(parts)
                parts.clear()
                self.have = 0
            try:
                head = http1.parse_response(self.buf, b"POST", MAX_HEAD)
            except HTTPProtocolError:
                return FALLBACK
            if head is http1.NEED_MORE:
                if eof:
                    raise WireError("connection closed before the answer ended")
                return FALLBACK if stuck else None
            if (type(head) is not http1.ResponseHead or head.status_code < 200
                    or head.status_code in (204, 304) or head.framing != http1.FRAMING_LENGTH):
                return FALLBACK
            headers: dict[bytes, bytes] = {}
            for _name, name, value in head.headers:
                headers[name] = headers[name] + b", " + value if name in headers else value
            cl = headers.get(b"content-length")
            if cl is None or b"transfer-encoding" in headers or not cl.isdigit():
                return FALLBACK
            keep = b"close" not in headers.get(b"connection", b"").lower()
            self.facts = (head.status_code, headers, keep)
            self.want = int(cl)
            self.head_at = time.perf_counter()
            rest = self.buf[head.head_len:]
            self.buf = b""
            parts.append(rest)
            self.have = len(rest)
        if self.have < self.want:
            if eof:
                raise WireError("connection closed before the answer ended")
            return FALLBACK if stuck else None
        return self._polled()

    def _polled(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """The answer whose head poll_answer read, now that its body is all here."""
        parts = self.parts
        whole = parts[0] if len(parts) == 1 else b"".join(parts)
        want = self.want
        body = whole[:want]
        self.buf = whole[want:]
        parts.clear()
        self.have = 0
        self.want = -1
        status, headers, keep = self.facts
        self.facts = None
        self.reusable = keep
        return status, headers, body

    def _arrived(self) -> float | None:
        """stamps.late of a new answer's first bytes; None: nothing has come yet. 0.0
        (not measured) on a TLS connection's first answer, which the server's session
        tickets precede, or with bytes already decrypted in the SSL object."""
        stream = self.stream
        kind = type(stream)
        if kind is TlsStream:
            if self.fresh or stream.ssl.pending():
                self.fresh = False
                return 0.0
        elif kind is not RawStream:       # (a test's stream: no socket to ask)
            return 0.0
        return stamps.late(stream.socket)

    async def _arrival(self) -> float:
        while True:
            late = self._arrived()
            if late is not None:
                return late
            await trio.lowlevel.wait_readable(self.stream.socket)

    async def answer(self) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.want >= 0:                # poll_answer read the head: the body's rest
            while self.have < self.want:
                data = await self._more()
                self.parts.append(data)
                self.have += len(data)
            return self._polled()
        # how long the answer's first bytes wait for us is the load side's delay
        self.late = await self._arrival() if not self.buf else 0.0
        while True:
            status, version, headers = await self._head()
            if status >= 200:
                break
            if status == 101:
                raise WireError("unexpected 101 Switching Protocols")
        answer, delimited = await self._body(status, headers)
        conn = headers.get(b"connection", b"").lower()
        keep = (b"keep-alive" in conn) if version == b"0" else (b"close" not in conn)
        self.reusable = delimited and keep
        return status, headers, answer

    async def _head(self) -> tuple[int, bytes, dict[bytes, bytes]]:
        # The common case in compiled code (the gateway's parser, held to h11 itself);
        # anything it defers or rejects is read by the strict reader below.
        buf = self.buf
        while True:
            try:
                head = http1.parse_response(buf, b"POST", MAX_HEAD)
            except HTTPProtocolError:
                break
            if type(head) is http1.ResponseHead:
                self.head_at = time.perf_counter()
                self.buf = buf[head.head_len:]
                headers: dict[bytes, bytes] = {}
                for _name, name, value in head.headers:
                    headers[name] = headers[name] + b", " + value if name in headers else value
                return head.status_code, b"1", headers
            if head is not http1.NEED_MORE:
                break
            buf += await self._more()
        self.buf = buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > MAX_HEAD:
                raise WireError("answer head too long")
            buf += await self._more()
        self.head_at = time.perf_counter()
        head, self.buf = buf[:end], buf[end + 4:]
        lines = head.split(b"\r\n")
        m = _STATUS.fullmatch(lines[0])
        if m is None:
            raise WireError(f"bad status line {lines[0][:80]!r}")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name) or b"\n" in value or b"\r" in value:
                raise WireError(f"bad header line {line[:80]!r}")
            name = name.lower()
            value = value.strip(b" \t")
            if name in headers:
                if name in (b"content-length", b"transfer-encoding"):
                    if name == b"content-length" and headers[name] == value:
                        continue
                    raise WireError(f"repeated {name.decode()}")
                headers[name] += b", " + value
            else:
                headers[name] = value
        return int(m.group(2)), m.group(1), headers

    async def _body(self, status: int, headers: dict[bytes, bytes]) -> tuple[bytes, bool]:
        """(body, framed): framed False when the body ran to the connection's end."""
        te = headers.get(b"transfer-encoding")
        cl = headers.get(b"content-length")
        if status in (204, 304):
            return b"", True
        if te is not None:
            if te.lower() != b"chunked" or cl is not None:
                raise WireError(f"unsupported framing: Transfer-Encoding {te!r}")
            return await self._chunked(), True
        if cl is not None:
            if not cl.isdigit():
                raise WireError(f"bad Content-Length {cl[:40]!r}")
            return await self._exactly(int(cl)), True
        parts = [self.buf]
        self.buf = b""
        while True:
            data = await self.stream.receive_some(RECV)
            if not data:
                return b"".join(parts), False
            parts.append(data)

    async def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                return line
            if len(self.buf) > MAX_HEAD:
                raise WireError("chunk line too long")
            self.buf += await self._more()

    async def _chunked(self) -> bytes:
        out = []
        while True:
            m = _CHUNK.fullmatch(await self._line())
            if m is None:
                raise WireError("bad chunk size line")
            n = int(m.group(1), 16)
            if n == 0:
                while await self._line():        # trailers, up to the empty line
                    pass
                return b"".join(out)
            data = await self._exactly(n + 2)
            if data[n:] != b"\r\n":
                raise WireError("chunk not followed by CRLF")
            out.append(data[:n])

    async def _exactly(self, n: int) -> bytes:
        buf = self.buf
        if len(buf) >= n:
            self.buf = buf[n:]
            return buf[:n]
        parts, have = [buf], len(buf)
        while have < n:
            data = await self._more()
            parts.append(data)
            have += len(data)
        whole = b"".join(parts)
        self.buf = whole[n:]
        return whole[:n]

    async def aclose(self) -> None:
        stream = self.stream
        if type(stream) is RawStream or type(stream) is TlsStream:
            stream.close()                  # TLS: close_notify sent, no wait for theirs
            return
        with trio.CancelScope(deadline=trio.current_time() + 1, shield=True):
            await stream.aclose()
