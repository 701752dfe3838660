"""Connections to the mail server: a keep-alive pool, the outbound CONNECT proxy, TLS trust.

A connection goes back to the pool only when both h11 sides finished their
message (DONE/DONE), the way httpcore decides reuse; anything else is closed.
"""
from __future__ import annotations

import base64
import errno
import ipaddress
import os
import select
import socket
import ssl
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import h11
import trio

from seg_fast.errors import SegFastError
from seg_fast.proxy import sockio, tls13, tlsio

RECEIVE_SIZE = 64 * 1024
# A pooled connection back this recently is reused unprobed when the request can be resent (acquire()).
TRUST_IDLE = 1.0


class UpstreamError(SegFastError):
    """The mail server (or the outbound proxy) cannot be reached or failed mid-answer."""


class Origin(NamedTuple):
    """A mail server (origin_of makes them). The last two fields follow from the first three,
    made once: every request reads them."""
    scheme: str         # "http" | "https"
    host: str
    port: int
    host_header: bytes  # the Host header for it
    name: str           # "host:port", as the transaction record names the mail server


def origin_of(url: str) -> Origin:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"not an http(s) URL: {url[:200]!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UpstreamError(f"bad port in URL: {url[:200]!r}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    host_header = host if port == (443 if parts.scheme == "https" else 80) else f"{host}:{port}"
    return Origin(parts.scheme, parts.hostname, port, host_header.encode(), f"{parts.hostname}:{port}")


def run_clock():
    """trio's clock as one call: the current run's own ``current_time`` (``trio.current_time``
    is three Python functions deep), or ``trio.current_time`` outside a run."""
    try:
        return trio.lowlevel.current_clock().current_time
    except RuntimeError:
        return trio.current_time


def client_tls_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """TLS for the mail-server leg; verify=False is the guide's "ignore SSL errors"."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def proxy_tls_context(ca_file: str = "") -> ssl.SSLContext:
    """TLS to an https:// outbound proxy: always verified (its name and chain), system trust plus ca_file.

    The proxy sees the CONNECT target and, for http:// mail servers, the traffic: it is never
    covered by upstream.verify_tls (the guide's "ignore SSL errors" is about the mail server)."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class UpstreamConn:
    """One connection to a mail server and its h11 client state.

    Between requests and on the compiled fast path (exchange.py) the connection has no
    h11 state (``_h11`` None): ``sent`` holds what was written, ``reusable`` says the
    answer was read to its end with keep-alive. ``h11`` makes a fresh client connection
    on first use, for the exchanges h11 still carries (streamed or unusual ones).
    """

    __slots__ = ("origin", "stream", "_h11", "sock", "plain", "tls", "reused", "pool", "sent", "rest",
                 "reusable", "idle_since", "idle", "opened", "uses")

    def __init__(self, origin: Origin, stream, sock):
        self.origin = origin
        self.stream = stream
        self.sock = sock              # the trio socket under any TLS, for liveness checks
        self.plain = sockio.plain_socket(stream)    # sockio's fast path (None under TLS)
        # tlsio's TLS on the socket itself (an https:// mail server without an outbound proxy):
        # its read_now/write_now/seal_now carry the keep-alive lane as the plain socket's do
        self.tls = stream if type(stream) is tlsio.TLSStream else None
        self._h11 = None
        self.reused = False
        self.pool = None              # the pool it counts against (a reload may replace gw.pool)
        self.sent = None              # fast path: (method, target, headers) of the request written
        self.rest = b""               # fast path: what came after the answer head in its read
        self.reusable = False         # fast path: answer read to its end, keep-alive, nothing after it
        self.idle_since = 0.0
        self.idle = 0.0               # seconds it sat in the pool before this request
        self.opened = trio.current_time()
        self.uses = 0                 # requests sent on it (this one included)

    @property
    def h11(self) -> h11.Connection:
        h = self._h11
        if h is None:
            h = self._h11 = h11.Connection(h11.CLIENT)
        return h

    @h11.setter
    def h11(self, value) -> None:
        self._h11 = value

    def facts(self) -> str:
        """Age and use of the connection, for the record of a request that failed on it
        (a mail server that stops answering kept-alive connections shows here)."""
        now = trio.current_time()
        if not self.reused:
            return f"new connection, {now - self.opened:.1f} s old"
        return (f"kept-alive connection: request {self.uses} on it, idle {self.idle:.1f} s before it, "
                f"{now - self.opened:.0f} s old")

    def looks_alive(self) -> bool:
        # An idle keep-alive connection the server closed reads EOF (or junk) at once. Over
        # TLS a readable socket may hold records that carry no data (session tickets, a
        # KeyUpdate): those are read, and only data or an EOF mean the connection is done.
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        if not poller.poll(0):
            return True
        tls = self.tls
        return tls is not None and tls.read_now(tlsio.RECORD) is None and tls.waits_readable()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await trio.aclose_forcefully(self.stream)
            except Exception:
                pass


class UpstreamPool:
    """Keep-alive connections per origin, opened through the outbound proxy when configured."""

    def __init__(self, settings, timeouts):
        self.settings = settings
        self.connect_timeout = timeouts.upstream_connect
        self.tls = None
        self.idle: dict[Origin, list[UpstreamConn]] = {}
        self.max_idle = settings.idle_pool_size
        self.max_open = settings.pool_size
        self.open = 0                 # connections to mail servers, idle or busy
        self.closed = False
        self.proxy = None
        self.proxy_auth = None
        self.proxy_tls = None         # an https:// proxy: TLS to the proxy, then CONNECT inside it
        # upstream.source_addresses, taken in turn; one whose ports toward this server are all
        # in use (EADDRNOTAVAIL) passes the connection to the next
        self.sources: list[str | None] = list(getattr(settings, "source_addresses", ())) or [None]
        self._source = 0
        self.now = self._bind_clock   # the pool is made before the run starts
        if settings.proxy_url:
            px = urlsplit(settings.proxy_url)
            self.proxy = (px.hostname, px.port or (443 if px.scheme == "https" else 3128))
            if px.scheme == "https":
                self.proxy_tls = proxy_tls_context(getattr(settings, "proxy_ca_file", ""))
            if px.username is not None:
                creds = f"{unquote(px.username)}:{unquote(px.password or '')}".encode()
                self.proxy_auth = b"Basic " + base64.b64encode(creds)

    def _bind_clock(self) -> float:
        # take() and release() run per request: trio.current_time is three functions deep
        self.now = run_clock()
        return self.now()

    def _tls(self) -> ssl.SSLContext:
        if self.tls is None:
            self.tls = client_tls_context(self.settings.verify_tls, self.settings.ca_file)
            if self.settings.tls13_records:
                tls13.prepare(self.tls)
        return self.tls

    async def acquire(self, origin: Origin, resendable: bool = False) -> UpstreamConn:
        """A kept-alive connection (most recently used first), or a new one.

        ``resendable``: the caller holds the whole request and sends it again once on a
        fresh connection if this one fails before any answer byte (exchange.py). Then a
        connection back in the pool less than TRUST_IDLE seconds is taken without the
        liveness probe (a system call per request): servers close idle connections after
        seconds (Apache 5 s, IIS 120 s, nginx 75 s) and say Connection: close when they
        close after an answer, which is never pooled, so a close inside that window is a
        crash or a restart, whose failure the resend covers as it covers the probe's own
        race (the server closing between probe and write). Streamed bodies and Pings
        (parked right after the write, where nothing resends) are always probed."""
        idle = self.idle.get(origin)
        if idle:
            now = self.now()
            while idle:
                conn = idle.pop()
                if (resendable and now - conn.idle_since < TRUST_IDLE) or conn.looks_alive():
                    conn.reused = True
                    conn.uses += 1
                    conn.idle = now - conn.idle_since
                    return conn
                self._forget(conn)
        if self.open >= self.max_open:
            raise UpstreamError(f"upstream.pool_size ({self.max_open}) connections are in use")
        conn = await self.connect(origin)
        conn.pool = self
        conn.uses = 1
        self.open += 1
        return conn

    def take(self, origin: Origin) -> UpstreamConn | None:
        """acquire(origin, resendable=True)'s common case without a coroutine: the most recently
        used idle connection, if it came back less than TRUST_IDLE seconds ago; else None
        (then acquire decides: the probe, an older one, a new one)."""
        idle = self.idle.get(origin)
        if idle:
            conn = idle[-1]
            now = self.now()
            if now - conn.idle_since < TRUST_IDLE:
                idle.pop()
                conn.reused = True
                conn.uses += 1
                conn.idle = now - conn.idle_since
                return conn
        return None

    def release(self, conn: UpstreamConn) -> bool:
        """Keep the connection for reuse if both sides are DONE; otherwise close it."""
        if conn.pool is not self and conn.pool is not None:
            return conn.pool.release(conn)
        h = conn._h11
        if h is None:
            done = conn.reusable      # the fast path read the answer to its end, keep-alive
        else:
            # Bytes after the answer (trailing_data) would be read as the next answer.
            done = h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0]
        conn.reusable = False
        conn.sent = None
        conn.rest = b""
        if done and not self.closed:
            idle = self.idle.setdefault(conn.origin, [])
            if len(idle) < self.max_idle:
                conn._h11 = None      # the next request starts on the fast path
                conn.idle_since = self.now()
                idle.append(conn)
                return True
        self._forget(conn)
        return False

    def discard(self, conn: UpstreamConn) -> None:
        (conn.pool or self)._forget(conn)

    def _forget(self, conn: UpstreamConn) -> None:
        if conn.sock.fileno() != -1:
            self.open -= 1
        _close_now(conn)

    def close(self) -> None:
        self.closed = True
        for conns in self.idle.values():
            for conn in conns:
                self._forget(conn)
        self.idle.clear()

    async def connect(self, origin: Origin) -> UpstreamConn:
        deadline = trio.current_time() + self.connect_timeout
        try:
            host, port = (origin.host, origin.port) if self.proxy is None else self.proxy
            stream = await self._open_tcp(host, port, deadline)
            sock = stream.socket
            with trio.fail_at(deadline):
                if self.proxy is not None:
                    try:
                        if self.proxy_tls is not None:
                            stream = trio.SSLStream(stream, self.proxy_tls, server_hostname=self.proxy[0],
                                                    https_compatible=True)
                            await stream.do_handshake()
                        await self._tunnel(stream, origin)
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
                if origin.scheme == "https":
                    if self.proxy_tls is None:
                        # On the socket itself (tlsio), as the device leg: reads and writes the
                        # fast way, and after a TLS 1.3 handshake no OpenSSL object kept. An
                        # http:// proxy's tunnel is that socket too, past the CONNECT answer.
                        stream = tlsio.TLSStream(stream, self._tls(), server_hostname=origin.host)
                    else:             # TLS inside the https:// proxy's TLS
                        stream = trio.SSLStream(stream, self._tls(), server_hostname=origin.host,
                                                https_compatible=True)
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
        except trio.TooSlowError:
            raise UpstreamError(f"connecting to {origin.host}:{origin.port} timed out") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {origin.host}:{origin.port}: {_reason(exc)}") from None
        return UpstreamConn(origin, stream, sock)

    async def _open_tcp(self, host: str, port: int, deadline: float) -> trio.SocketStream:
        last = len(self.sources) - 1
        for attempt in range(last + 1):
            source = self.sources[self._source]
            self._source = (self._source + 1) % len(self.sources)
            try:
                return await open_tcp(host, port, deadline, source)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL or attempt == last:
                    raise

    async def _tunnel(self, stream, origin: Origin) -> None:
        """HTTP CONNECT through the outbound proxy (RFC 9110 9.3.6)."""
        target = f"{origin.host}:{origin.port}".encode()
        conn = h11.Connection(h11.CLIENT)
        headers = [(b"Host", target)]
        if self.proxy_auth:
            headers.append((b"Proxy-Authorization", self.proxy_auth))
        await stream.send_all(conn.send(h11.Request(method=b"CONNECT", target=target, headers=headers)))
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                # The proxy's fault, not the device's: a 503, never h11's hint (431/400) for the device.
                raise UpstreamError(f"outbound proxy sent a malformed answer to CONNECT: {exc}") from None
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    raise UpstreamError("outbound proxy closed the connection during CONNECT")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                if event.status_code // 100 != 2:
                    raise UpstreamError(f"outbound proxy refused CONNECT with HTTP {event.status_code}")
                # h11 switches protocol after a 2xx to CONNECT; bytes it already read belong to the tunnel.
                if conn.trailing_data[0]:
                    raise UpstreamError("outbound proxy sent data before the tunnel was used")
                return
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamError("outbound proxy closed the connection during CONNECT")


def _close_now(conn: UpstreamConn) -> None:
    # Closing the socket is enough on both legs; no TLS close_notify needed for a discarded connection.
    try:
        conn.sock.close()
    except OSError:
        pass


def _reason(exc: BaseException) -> str:
    # trio's open_tcp_stream wraps one error per address tried in a group: name the first.
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _reason(exc.exceptions[0])
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(exc, OSError) and exc.__cause__ is not None:
        return _reason(exc.__cause__)
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


# Linux: bind an address without a port; the port is picked at connect, per destination, so
# each source address has the whole ephemeral range toward each mail server address.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def family_of(address: str) -> int:
    """AF_INET or AF_INET6 for an IP address literal; ValueError for anything else (a name)."""
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def bind_source(sock: socket.socket, source: str) -> None:
    """Bind ``sock`` to the local address ``source`` (upstream.source_addresses), port left to connect."""
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)     # IPv6 sockets too, on Linux
    except OSError:
        pass              # elsewhere the port is taken at bind: fewer connections per address
    sock.bind((source, 0))


async def open_tcp(host: str, port: int, deadline: float, source: str | None = None) -> trio.SocketStream:
    """A TCP connection (from the local address ``source`` if given), timed out by the kernel's
    word rather than this worker's clock: a handshake the kernel completed is used even when
    the loop lagged past ``deadline`` meanwhile (a long step, or a starved core: the soaks'
    "connect timed out" with no listen overflow); only a socket still connecting at the
    deadline is TooSlowError."""
    try:
        family = family_of(host)
    except ValueError:
        with trio.fail_at(deadline):          # a name: trio resolves it and tries each address
            stream = await trio.open_tcp_stream(host, port, local_address=source)
        sockio.notsent_lowat(stream.socket)
        return stream
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            bind_source(sock, source)
        err = sock.connect_ex((host, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err:
                try:
                    sock.getpeername()
                except OSError:
                    raise trio.TooSlowError from None     # still connecting at the deadline
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sockio.tcp_stream(trio.socket.from_stdlib_socket(sock))
