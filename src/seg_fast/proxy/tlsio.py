"""The device leg's TLS: an ``ssl.SSLObject`` over two memory BIOs on the bare socket.

trio's SSLStream pays, per record, a lock, two conflict detectors, a retry loop with
several awaits and a checkpoint on every send and receive; on a keep-alive device
connection that was a third of a worker's time (benchmarks/tls_bench.py: 336 vs 66 µs
of server CPU per small exchange, --stream-loop). ``TLSStream`` does what sockio does
for plain sockets: the system call first (``read_nb``, ``os.write``), trio's
``wait_readable``/``wait_writable`` only when the socket would block, and deadlines
from sockio's timer wheel rather than a CancelScope per operation.

It keeps the face of trio.SSLStream that the gateway uses (``do_handshake``,
``receive_some``, ``send_all``, ``aclose``, ``transport_stream``, ``getpeercert`` and
the other SSLObject queries) and its error semantics: trio.BrokenResourceError when
TLS or the socket fails (or a send or the handshake was cancelled half-way),
ClosedResourceError after aclose/close; ``do_handshake(deadline)`` raises
trio.TooSlowError past its deadline. TLS 1.2 and later only, and no renegotiation
(gateway.server_tls_context): OpenSSL answers a renegotiating ClientHello with a
no_renegotiation alert, which goes out at once like anything else a read produces. Like SSLStream(https_compatible=True) an EOF without close_notify is a
plain EOF (devices often skip it; HTTP frames its own messages), but unlike it a
graceful close sends close_notify (without waiting for the reply), as nginx does.
Buffers stay bounded: at most SLICE plaintext bytes are encrypted ahead of the socket,
and one socket read (64 KiB) is taken at a time.

``receive_by``/``read_now``/``send_parts`` are the fast path sockio can call for a
TLS device stream, mirroring what it does for plain sockets (deadlines and write
pacing as ``sockio.Pace`` defines them).
"""
from __future__ import annotations

import math
import os
import ssl

import trio
from trio.lowlevel import checkpoint

from seg_fast.proxy import sockio
from seg_fast.proxy._http1 import read_nb

READ_SIZE = 64 * 1024         # one socket read (read_nb's buffer)
RECORD = 16 * 1024            # the most plaintext one TLS record holds
SLICE = 64 * 1024             # plaintext encrypted ahead of what the socket took
FAIR_EVERY = 32               # ready operations between checkpoints (as sockio)
_ready = 0

# What trio.SSLStream forwards from its SSLObject (the same names).
_FORWARDED = frozenset({
    "context", "server_side", "server_hostname", "session", "session_reused", "getpeercert",
    "selected_npn_protocol", "cipher", "shared_ciphers", "compression", "pending",
    "get_channel_binding", "selected_alpn_protocol", "version",
})


class TLSStream:
    """One device connection's TLS, server side (see the module's docstring)."""

    fast_tls = True               # sockio's mark: receive_by/read_now/send_parts are here

    __slots__ = ("transport_stream", "socket", "plain", "_obj", "_in", "_out", "_backlog", "_sending",
                 "_handshook", "_closed", "_broken", "_eof", "handshake_started", "seg_client_cert",
                 "__weakref__")

    def __init__(self, transport_stream: trio.SocketStream, context: ssl.SSLContext):
        self.transport_stream = transport_stream
        self.socket = transport_stream.socket     # parking.socket_of finds it here
        self.plain = sockio.Plain(self.socket)    # what sockio's waits and timer wheel take
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self._backlog = b""           # ciphertext a read produced (a KeyUpdate's answer) not yet sent
        self._sending = False         # a send is under way: its bytes go first
        self._handshook = False
        self._closed = False
        self._broken = False
        self._eof = False             # the socket said EOF
        self.handshake_started = False    # a byte of it came from the device

    # -- what trio.SSLStream offers ------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    def __getattr__(self, name):
        if name in _FORWARDED:
            return getattr(self._obj, name)
        raise AttributeError(name)

    async def do_handshake(self, deadline: float = math.inf) -> None:
        """The TLS handshake (once), by ``deadline`` (trio clock: trio.TooSlowError past it,
        timed by sockio's wheel rather than a cancel scope); the caller's scope bounds it too."""
        self._check()
        if self._handshook:
            await checkpoint()
            return
        obj = self._obj
        try:
            while True:
                try:
                    obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                if self._out.pending:
                    pace = None if deadline == math.inf else sockio.Pace(deadline - trio.current_time())
                    await self._send_ciphertext(self._out.read(), pace)
                if done:
                    break
                if self._eof:
                    raise trio.BrokenResourceError("device closed the connection during the TLS handshake")
                if not await self._fill(deadline):
                    raise trio.TooSlowError("TLS handshake deadline")
                if not self._eof:
                    self.handshake_started = True
        except ssl.SSLError as exc:
            self._fail_quietly()
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from None
        except TimeoutError:
            self._broken = True       # the device did not take the server's flight in time
            raise trio.TooSlowError("TLS handshake deadline") from None
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"socket failed during the TLS handshake: {exc}") from None
        except BaseException:
            self._broken = True       # cancelled or timed out half-way
            raise
        self._handshook = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes (up to ``max_bytes``); b"" at EOF, with or without close_notify."""
        data = await self.receive_by(max_bytes or READ_SIZE, math.inf)
        return data

    async def send_all(self, data) -> None:
        await self.send_parts([data], None)

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self.socket)

    async def aclose(self) -> None:
        """``close()``, then a checkpoint (trio's contract for aclose)."""
        self.close()
        await checkpoint()

    def close(self) -> None:
        """Send close_notify if the connection is sound (never waiting for the device to take
        it or to answer it), then close the socket. Synchronous: nothing here waits, so the
        connection's last step needs no cancel scope (aclose_forcefully's)."""
        if self._closed:
            return
        self._closed = True
        if self._handshook and not self._broken and not self._sending:
            try:
                self._obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass                  # SSLWantReadError: the device's close_notify is not awaited
            ciphertext = self._backlog + self._out.read()
            if ciphertext:
                try:
                    os.write(self.plain.fileno(), ciphertext)
                except OSError:
                    pass              # would block, or the device left: a close is a close
        try:
            self.socket.close()       # wakes any task waiting on it (notify_closing)
        except OSError:
            pass

    # -- the fast path (sockio's plain-socket calls, for TLS) ------------------------------

    def read_now(self, size: int) -> bytes | None:
        """Decrypted bytes if they can be had without waiting (b"" at EOF), else None."""
        if self._closed or self._broken or not self._handshook:
            return None               # the awaited path raises, or handshakes, as it should
        data = self._decrypt(size)
        if data is not None:
            return data
        if self._eof:
            return None
        fd = self.plain.fileno()
        if fd < 0:
            return None
        try:
            raw = read_nb(fd, READ_SIZE)
        except OSError:
            return None               # the awaited path meets the same error and says Broken
        if raw is None:
            return None
        self._feed(raw)
        return self._decrypt(size)

    async def receive_by(self, size: int, deadline: float = math.inf) -> bytes | None:
        """Decrypted bytes (b"" at EOF); None if ``deadline`` (trio clock) passed first, after
        which the stream must be closed. Without a deadline the caller's scope bounds it."""
        global _ready
        self._check()
        if not self._handshook:
            await self.do_handshake()
        try:
            data = self._decrypt(size)
            if data is not None:
                _ready += 1
                if _ready >= FAIR_EVERY:
                    _ready = 0
                    await checkpoint()
                return data
            while True:
                if self._backlog and not self._sending:
                    if not await self._flush_backlog(deadline):
                        return None
                if not await self._fill(deadline):
                    return None
                data = self._decrypt(size)
                if data is not None:
                    return data
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"device socket failed: {exc}") from None
        # A cancel while waiting to read loses nothing (what came is in the BIO): not broken.

    async def _flush_backlog(self, deadline: float) -> bool:
        """Send what a read made (a KeyUpdate's answer) before waiting for more input, by
        ``deadline``; False if it passed. Counts as a send: no other may interleave."""
        backlog, self._backlog = self._backlog, b""
        pace = None if deadline == math.inf else sockio.Pace(deadline - trio.current_time())
        self._sending = True
        try:
            await self._send_ciphertext(backlog, pace)
        except TimeoutError:
            self._broken = True
            return False
        except BaseException:
            self._broken = True       # part of a record may be out
            raise
        finally:
            self._sending = False
        return True

    async def send_parts(self, parts: list, pace: sockio.Pace | None = None) -> None:
        """Encrypt and write the buffers in order, SLICE bytes at a time; what the socket does
        not take at once waits, paced by ``pace`` as sockio's writes are (TimeoutError past
        its deadline; the stream is then broken and must be closed)."""
        global _ready
        self._check()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        if not self._handshook:
            await self.do_handshake()
        obj, out = self._obj, self._out
        self._sending = True
        waited = False
        try:
            total = 0
            for part in parts:
                total += len(part)
            if total <= SLICE:
                if len(parts) == 1:
                    obj.write(parts[0])
                elif total:
                    obj.write(b"".join(parts))
                waited = await self._send_ciphertext(self._backlog + out.read(), pace)
                self._backlog = b""
            else:
                paced = pace is not None and pace.grace != math.inf
                blocked_at = None     # as on a plain socket: the deadline runs from the first wait,
                since = 0             # extended by what the device took after it
                for part in parts:
                    view = memoryview(part)
                    for off in range(0, len(view), SLICE):
                        obj.write(view[off:off + SLICE])
                        ciphertext = self._backlog + out.read()
                        self._backlog = b""
                        slice_pace = pace
                        if paced:
                            now = trio.current_time()
                            if blocked_at is not None:
                                slice_pace = sockio.Pace(pace.deadline(blocked_at, since) - now,
                                                         pace.rate, pace.unsent)
                        if await self._send_ciphertext(ciphertext, slice_pace):
                            waited = True
                            if paced and blocked_at is None:
                                blocked_at = now
                        if blocked_at is not None:
                            since += len(ciphertext)
        except ssl.SSLError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from None
        except TimeoutError:
            self._broken = True       # sockio's pace (or Evicted): the caller resets the connection
            raise
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"device socket failed: {exc}") from None
        except BaseException:
            self._broken = True       # a timeout, an eviction or a cancel: part of a record may be out
            raise
        finally:
            self._sending = False
        if not waited:
            _ready += 1
            if _ready >= FAIR_EVERY:
                _ready = 0
                await checkpoint()

    # -- inside ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._broken:
            raise trio.BrokenResourceError("this TLS stream is broken")

    def _feed(self, raw: bytes) -> None:
        if raw:
            self._in.write(raw)
        else:
            self._eof = True
            self._in.write_eof()

    def _decrypt(self, size: int) -> bytes | None:
        """Plaintext the SSLObject can give now (b"" at EOF); None if it needs more bytes."""
        if not self._in.pending and not self._eof and not self._obj.pending():
            return None               # nothing to decrypt: skip OpenSSL's WantRead exception
        if size > RECORD:
            size = RECORD             # one read gives at most a record: no 64 KiB bytes to shrink
        try:
            data = self._obj.read(size)
        except ssl.SSLWantReadError:
            if self._out.pending:
                self._queue_output()      # an answer to what was read (a no_renegotiation alert)
            if self._eof:
                return b""
            return None
        except ssl.SSLZeroReturnError:
            return b""                # close_notify: the device closed properly
        except (ssl.SSLEOFError, ssl.SSLSyscallError):
            if self._eof:
                return b""            # EOF without close_notify: tolerated (https_compatible)
            self._broken = True
            raise trio.BrokenResourceError("TLS failed") from None
        except ssl.SSLError as exc:
            self._fail_quietly()
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from None
        if self._out.pending:
            self._queue_output()
        return data

    def _queue_output(self) -> None:
        """Reading made something to send (a KeyUpdate's answer, an alert): sent now if the
        socket takes it, after any send under way, else before the next wait for input."""
        self._backlog += self._out.read()
        if self._sending:
            return
        backlog = self._backlog
        fd = self.plain.fileno()
        if fd < 0:
            return
        try:
            n = os.write(fd, backlog)
        except BlockingIOError:
            return
        except OSError:
            self._broken = True
            return
        self._backlog = backlog[n:]

    async def _fill(self, deadline: float) -> bool:
        """One socket read into the incoming BIO, waiting for it if need be; False on timeout."""
        if self._eof:
            return True
        fd = self.plain.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("socket was closed")
        raw = read_nb(fd, READ_SIZE)
        if raw is None:
            raw = await sockio.wait_plain(self.plain, READ_SIZE, deadline)
            if raw is None:
                self._broken = True
                return False
        self._feed(raw)
        return True

    async def _send_ciphertext(self, data: bytes, pace: sockio.Pace | None) -> bool:
        """Write ``data`` to the socket; True if it had to wait for the device."""
        if not data:
            return False
        fd = self.plain.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("socket was closed")
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return False
        await sockio._write_rest(self.plain, memoryview(data)[sent:], pace)
        return True

    def _fail_quietly(self) -> None:
        """A TLS error: the alert OpenSSL wrote goes out if the socket takes it now."""
        self._broken = True
        alert = self._out.read()
        if alert:
            try:
                os.write(self.plain.fileno(), alert)
            except OSError:
                pass
