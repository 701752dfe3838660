"""The device leg's TLS: OpenSSL on the device's own non-blocking socket (its socket BIO).

trio's SSLStream pays, per record, a lock, two conflict detectors, a retry loop with
several awaits and a checkpoint on every send and receive; on a keep-alive device
connection that was a third of a worker's time (benchmarks/tls_bench.py: 336 vs 66 µs
of server CPU per small exchange, --stream-loop). ``TLSStream`` does what sockio does
for plain sockets: the OpenSSL call first, trio's ``wait_readable``/``wait_writable``
only when it says the socket would block (SSLWantRead/WantWriteError), and deadlines
from sockio's timer wheel rather than a CancelScope per operation.

Memory. The SSL object is the one ssl.SSLSocket uses (``SSLContext._wrap_socket``): it
reads and writes the descriptor itself, and OpenSSL frees its record buffers between
records (SSL_MODE_RELEASE_BUFFERS, CPython's default), so an idle connection costs about
15 KiB whatever it carried. Over two ``ssl.MemoryBIO``s (this module's first design) it
kept the largest burst it had carried, since memory BIOs never shrink: 17 KiB after a
small exchange, 64+ KiB in each BIO after one big answer, for as long as the connection
lived (a parked Ping lives for hours). No ciphertext passes through Python either.

Reads take one record at a time: OpenSSL reads exactly a record's header, then its body
(no read-ahead; _tls13.Records reads the body with the next record's header, never more),
so a read that says to wait holds nothing the socket no longer shows as readable but part
of a record, and the plaintext a short read leaves (``pending()``) is returned by the next
read before any wait. A write of one record goes through OpenSSL to the socket. A bigger
one goes out a batch of records at a time (tlsbatch.BATCH of plaintext): OpenSSL makes the
batch's records in a memory BIO (_tlsrecords.pyx) and they are written as plain bytes, one
write(2) where OpenSSL's socket BIO made one per record; what a full socket does not take
waits in Python, counted against the worker's unsent bytes. Where the SSL object's pointer cannot be proven
(tlsbatch.ssl_of), writes go one record's plaintext (16 KiB) at a time: while the socket is
full, OpenSSL holds that one encrypted record, and the retried write passes the same bytes
(OpenSSL's rule for non-blocking writes). Output a read makes (a KeyUpdate's answer,
the no_renegotiation alert, a fatal alert) OpenSSL writes to the socket itself,
the KeyUpdate's with the next write (after any record still half out).

It keeps the face of trio.SSLStream that the gateway uses (``do_handshake``,
``receive_some``, ``send_all``, ``aclose``, ``transport_stream``, ``ssl_object``,
``getpeercert`` and the other SSLObject queries) and its error semantics:
trio.BrokenResourceError when TLS or the socket fails (or a send or the handshake was
cancelled half-way), ClosedResourceError after aclose/close or once the socket was
closed under it (parking.py closes a parked Ping's socket itself; OpenSSL keeps the
descriptor's number, so nothing is read or written after that); ``do_handshake(deadline)``
raises trio.TooSlowError past its deadline. TLS 1.2 and later only, and no renegotiation
(gateway.server_tls_context). Like SSLStream(https_compatible=True) an EOF without
close_notify is a plain EOF (devices often skip it; HTTP frames its own messages), but
unlike it a graceful close sends close_notify (without waiting for the reply), as nginx
does.

``receive_by``/``read_now``/``send_parts`` are the fast path sockio can call for a
TLS device stream, mirroring what it does for plain sockets (deadlines and write
pacing as ``sockio.Pace`` defines them).
"""
from __future__ import annotations

import collections
import math
import os
import socket
import ssl
import time
from functools import partial

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from seg_fast.proxy import sockio, tickets, tls13, tlsbatch
from seg_fast.proxy import _tls13, _tlsrecords
from seg_fast.proxy._http1 import read_nb

RECORD = 16 * 1024            # the most plaintext one TLS record holds: one read, one write
GATHER_RECORDS = 16           # records one read_more adds at most (256 KiB of full ones)
DISCARD = 64 * 1024           # unread bytes a close takes first (see close)
FAIR_EVERY = 32               # ready operations between checkpoints (as sockio)
_ready = 0

# _want: how receive_by's next read starts. _TRY: with OpenSSL's read; _WRITE: OpenSSL's output
# waits for the socket; _READ: the last read found nothing, so with the wait for the socket.
_TRY, _WRITE, _READ = 0, 1, 2
_WantRead, _WantWrite = ssl.SSLWantReadError, ssl.SSLWantWriteError
_EOFS = (ssl.SSLZeroReturnError, ssl.SSLEOFError)     # close_notify, or the TCP EOF without it

# What trio.SSLStream forwards from its SSLObject (the same names).
_FORWARDED = frozenset({
    "context", "server_side", "server_hostname", "session", "session_reused", "getpeercert",
    "selected_npn_protocol", "cipher", "shared_ciphers", "compression", "pending",
    "get_channel_binding", "selected_alpn_protocol", "version",
})


def socket_bio(context: ssl.SSLContext, sock: socket.socket, server_side: bool,
               server_hostname: str | None = None, session=None, owner=None):
    """The C object ssl.SSLSocket uses (the one place that reaches for the private
    ``SSLContext._wrap_socket``): OpenSSL on ``sock``'s own descriptor, through its socket
    BIO, so an idle connection keeps no buffers (memory BIOs never shrink). The load side
    (sim/wire.py, sim/lean_serve.py) uses it bare."""
    return context._wrap_socket(sock, server_side, server_hostname, owner=owner, session=session)


def wrap_socket(context: ssl.SSLContext, sock: socket.socket, server_side: bool,
                server_hostname: str | None = None, session=None) -> ssl.SSLObject:
    """An ``ssl.SSLObject`` (its whole query API) whose C object is ssl.SSLSocket's: OpenSSL
    reads and writes ``sock`` (a non-blocking stdlib socket) itself, through its socket BIO.
    Its read/write/do_handshake raise SSLWantRead/WantWriteError where the socket would block."""
    face = ssl.SSLObject.__new__(ssl.SSLObject)
    face._sslobj = socket_bio(context, sock, server_side, server_hostname, session, owner=face)
    return face


def records(parts):
    """The plaintext of ``parts`` in slices of at most RECORD bytes, one TLS record each: small
    parts joined (a head and the start of a body in one record), a big part's slices uncopied."""
    held: list = []
    room = RECORD
    for part in parts:
        view = memoryview(part)
        n = len(view)
        off = 0
        while off < n:
            if not held and n - off >= RECORD:
                yield view[off:off + RECORD]
                off += RECORD
                continue
            take = min(room, n - off)
            held.append(view[off:off + take])
            room -= take
            off += take
            if not room:
                yield b"".join(held)
                held, room = [], RECORD
    if held:
        yield b"".join(held)


# -- handshakes admitted per scheduler batch -------------------------------------------------
# A handshake's server flight (key exchange, signature) is ~1 ms of CPU in one task step. Devices
# arriving together (a ramp, a fleet reconnecting after a restart) made batches of hundreds of
# them back to back: hundreds of ms in which no connected device's request was served. So a
# worker admits about HANDSHAKE_BUDGET_MS of handshakes per batch (from their measured cost);
# the rest wait in arrival order and are let through a batch's worth at a time, with the
# connected devices' requests in between. A handshake waits at most HANDSHAKE_MAX_WAIT (s)
# however busy the worker is (the device's and the gateway's handshake deadlines are a few
# seconds): an overloaded worker (batches of ~1 s) then takes the overdue ones together,
# as it did before. (Admitting a share of the last batch's length instead let a worker on a
# shared core, its batches long in wall time, admit 10-25 handshakes a batch.)
HANDSHAKE_BUDGET_MS = 2.0
HANDSHAKE_MAX_WAIT = 1.0


class HandshakeGate(trio.abc.Instrument):
    """One per trio run (``_gate``). As an Instrument it only marks batches (``after_io_wait``:
    called once per batch, not per step)."""

    def __init__(self, budget_ms: float = HANDSHAKE_BUDGET_MS, max_wait: float = HANDSHAKE_MAX_WAIT):
        self.budget = budget_ms / 1000.0
        self.max_wait = max_wait
        self.cost = 0.001             # a handshake's CPU (s), moving average of measured ones
        self.admitted = 0             # handshakes admitted in this batch
        self.waiting: collections.deque = collections.deque()    # (since, trio.Event), oldest first
        self.deferred = 0             # handshakes that waited (for tests and the curious)
        self._pump = False

    def per_batch(self) -> int:
        return max(1, int(self.budget / self.cost))

    def after_io_wait(self, timeout) -> None:
        self.admitted = 0

    async def admit(self) -> None:
        """Return when this handshake may run (at once unless the batch's share is used)."""
        if not self.waiting and self.admitted < self.per_batch():
            self.admitted += 1
            return
        event = trio.Event()
        entry = (time.monotonic(), event)
        self.waiting.append(entry)
        self.deferred += 1
        if not self._pump:
            self._pump = True
            trio.lowlevel.spawn_system_task(self._release)
        try:
            await event.wait()
            self.admitted += 1
        except BaseException:
            if not event.is_set():
                try:
                    self.waiting.remove(entry)
                except ValueError:
                    pass
            raise

    async def _release(self) -> None:
        """While handshakes wait: each batch, let the next batch's share through (they run
        in the next batch, counted there), and any that has waited HANDSHAKE_MAX_WAIT.
        Runnable every batch, so the loop never sleeps in its I/O wait while one waits."""
        waiting = self.waiting
        try:
            while waiting:
                for _ in range(self.per_batch()):
                    if not waiting:
                        break
                    waiting.popleft()[1].set()
                overdue = time.monotonic() - self.max_wait
                while waiting and waiting[0][0] <= overdue:
                    waiting.popleft()[1].set()
                await checkpoint()
        finally:
            self._pump = False

    def spent(self, seconds: float) -> None:
        self.cost += (seconds - self.cost) * 0.125


_the_gate = trio.lowlevel.RunVar("seg_fast_handshake_gate", default=None)


def _gate() -> HandshakeGate:
    gate = _the_gate.get()
    if gate is None:
        gate = HandshakeGate(HANDSHAKE_BUDGET_MS, HANDSHAKE_MAX_WAIT)
        trio.lowlevel.add_instrument(gate)
        _the_gate.set(gate)
    return gate


class _Blocked:
    """A write's waits on a full socket, as on a plain socket (sockio): the pace's deadline runs
    from the first wait, extended by what the device took after it, and from that wait on the
    bytes not yet written count against the worker's unsent bytes."""

    __slots__ = ("stream", "total", "pace", "waited", "since", "taken", "writer")

    def __init__(self, stream, total: int, pace: sockio.Pace | None):
        self.stream, self.total, self.pace = stream, total, pace
        self.waited = False
        self.since = 0.0
        self.taken = 0
        self.writer = None

    async def wait(self, writable: bool, done: int) -> None:
        """Until the socket is writable (readable); TimeoutError past the deadline."""
        pace = self.pace
        if not self.waited:
            self.waited = True
            self.since = trio.current_time()
            if pace is not None and pace.unsent is not None:
                self.writer = sockio._Writer(self.stream.plain, None, self.total - done, self.since)
                pace.unsent.add(self.writer)
        deadline = math.inf if pace is None else pace.deadline(self.since, self.taken)
        if not await self.stream._wait(deadline, writable, self.writer):
            raise TimeoutError("peer did not read in time")

    def took(self, n: int) -> None:
        if self.waited:
            self.taken += n
            if self.writer is not None:
                self.writer.taken = self.taken

    def close(self) -> None:
        if self.writer is not None:
            self.pace.unsent.done(self.writer)


class TLSStream:
    """One device connection's TLS, server side (see the module's docstring); with
    ``server_hostname``, the client side of a connection to an https:// mail server
    (proxy/upstream.py), which starts the handshake and is carried on the same way."""

    fast_tls = True               # sockio's mark: receive_by/read_now/send_parts are here

    __slots__ = ("transport_stream", "socket", "plain", "ssl_object", "_obj", "_ssl", "_want", "_sending",
                 "_handshook", "_closed", "_broken", "_eof", "handshake_started", "seg_client_cert", "_peer",
                 "__weakref__")

    def __init__(self, transport_stream: trio.SocketStream, context: ssl.SSLContext,
                 server_hostname: str | None = None):
        self.transport_stream = transport_stream
        self.socket = transport_stream.socket     # parking.socket_of finds it here
        self.plain = sockio.Plain(self.socket)    # what sockio's waits and timer wheel take
        client = server_hostname is not None
        self._peer = "mail server" if client else "device"       # (for the errors' words)
        if not client and context is not tickets.keyed:
            tickets.key(context)                  # the serve's shared ticket keys (a new or reloaded context)
        self.ssl_object = wrap_socket(context, self.socket._sock, not client, server_hostname)
        self._obj = self.ssl_object._sslobj       # the C object: the calls below skip SSLObject's layer
        self._ssl = -1                # its SSL * for batched writes (tlsbatch.ssl_of): -1 not yet asked, 0 none
        self._want = _TRY             # how the next read starts (see _TRY)
        self._sending = False         # a send is under way: no other may start
        self._handshook = False
        self._closed = False
        self._broken = False
        self._eof = False             # close_notify or the TCP EOF came
        self.handshake_started = False    # a byte of it came from the device

    # -- what trio.SSLStream offers ------------------------------------------------------

    def __getattr__(self, name):
        if name in _FORWARDED:
            return getattr(self.ssl_object, name)
        raise AttributeError(name)

    async def do_handshake(self, deadline: float = math.inf) -> None:
        """The TLS handshake (once), by ``deadline`` (trio clock: trio.TooSlowError past it,
        timed by sockio's wheel rather than a cancel scope); the caller's scope bounds it too."""
        self._check()
        if self._handshook:
            await checkpoint()
            return
        obj = self._obj
        server = self.ssl_object.server_side
        gate = _gate() if server else None    # (a client's handshake is the server's cost)
        cpu = 0.0
        try:
            if server:
                if not self.handshake_started:
                    await self._first_byte(deadline)
                await gate.admit()    # the ClientHello is here: its answer is the costly step
            while True:
                if self.plain.fileno() < 0:
                    raise trio.ClosedResourceError("socket was closed")
                t0 = time.perf_counter()
                try:
                    obj.do_handshake()
                    break
                except _WantRead:
                    writable = False
                except _WantWrite:
                    writable = True   # the device does not take the server's flight yet
                finally:
                    cpu += time.perf_counter() - t0
                if not await self._wait(deadline, writable):
                    raise TimeoutError
        except _EOFS:
            self._broken = True
            raise trio.BrokenResourceError(f"{self._peer} closed the connection during the TLS handshake") from None
        except ssl.SSLError as exc:
            self._broken = True       # OpenSSL wrote its alert, if any, to the socket itself
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from None
        except TimeoutError:
            self._broken = True
            raise trio.TooSlowError("TLS handshake deadline") from None
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"socket failed during the TLS handshake: {exc}") from None
        except BaseException:
            self._broken = True       # cancelled half-way, or the socket closed under it
            raise
        finally:
            if self._broken and self.plain.fileno() >= 0:
                tls13.forget(self._ssl_ptr())     # the secrets of a handshake that did not finish
        if gate is not None:
            gate.spent(cpu)
        self._handshook = True
        if tls13.prepared(self.ssl_object.context):
            self._hand_over()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes (up to ``max_bytes``); b"" at EOF, with or without close_notify."""
        data = await self.receive_by(max_bytes or RECORD, math.inf)
        return data

    async def send_all(self, data) -> None:
        await self.send_parts([data], None)

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await wait_writable(self.socket)

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
        if self._handshook and not self._broken and not self._sending and self.plain.fileno() >= 0:
            try:
                self._obj.shutdown()  # close_notify, if the socket takes it now
            except (ssl.SSLError, OSError, ValueError):
                pass                  # SSLWantReadError: the device's close_notify is not awaited
        fd = self.plain.fileno()
        if fd >= 0:
            # What already came and was not read (the rest of a refused record, say) is taken,
            # so the close is a FIN, not the reset the kernel sends over unread bytes.
            try:
                read_nb(fd, DISCARD)
            except OSError:
                pass
        try:
            self.socket.close()       # wakes any task waiting on it (notify_closing)
        except OSError:
            pass

    # -- the fast path (sockio's plain-socket calls, for TLS) ------------------------------

    def read_now(self, size: int) -> bytes | None:
        """Decrypted bytes if they can be had without waiting (b"" at EOF), else None."""
        if self._closed or self._broken or not self._handshook:
            return None               # the awaited path raises or handshakes, as it should
        try:
            return self._read(size if size < RECORD else RECORD)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None               # the awaited path says so

    def read_more(self, data: bytes, size: int) -> bytes:
        """``data`` (what a read just gave) with the records already whole after it, up to
        ``size`` bytes in all and GATHER_RECORDS more records, without waiting: a relay's pass
        takes what is there up to its size, not one 16 KiB record (an https:// mail server's
        big answer went in four times as many passes and device writes). The record bound
        keeps a peer sending one-byte records from holding the worker for 64 Ki of them in
        one step. An EOF or failure after data is said by the next read."""
        n = len(data)
        if not data or n >= size:
            return data
        obj = self._obj
        if type(obj) is _tls13.Records:           # the same, in one compiled call
            if self._closed or self._broken or self.plain.fileno() < 0:
                return data
            return obj.gather(data, size, GATHER_RECORDS)
        parts = [data]
        while n < size and len(parts) <= GATHER_RECORDS:
            more = self.read_now(size - n)
            if not more:
                break
            parts.append(more)
            n += len(more)
        return data if len(parts) == 1 else b"".join(parts)

    @property
    def failed(self) -> bool:
        """Closed, or broken (TLS or the socket failed): nothing more comes from it."""
        return self._closed or self._broken

    def waits_readable(self) -> bool:
        """The last read found nothing and nothing else is pending: the socket turning readable
        is the next thing to wait for (the keep-alive lane then holds the connection)."""
        return self._want == _READ and self._handshook and not self._closed and not self._broken

    def write_now(self, data) -> bool:
        """One record's plaintext (at most RECORD), written if the socket takes it now: True.
        False if it must wait: send_parts must then be given the same bytes (OpenSSL may hold
        a record of them; its rule for a retried write)."""
        if self._closed or self._broken or self._sending or not self._handshook or self.plain.fileno() < 0:
            return False              # send_parts raises or waits, as it should
        try:
            self._obj.write(data)
        except (_WantWrite, _WantRead):
            return False
        except (ssl.SSLError, OSError) as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from None
        return True

    def seal_now(self, parts: list):
        """The records of ``parts`` (at most tlsbatch.BATCH of plaintext, more than one record),
        made by OpenSSL in one batch and written as far as the socket takes them now: what it
        did not take (ciphertext, for send_sealed; empty once all went). None where records are
        not batched here (the SSL object unproven, a write under way): send_parts then."""
        if self._closed or self._broken or self._sending or not self._handshook:
            return None
        fd = self.plain.fileno()
        if fd < 0:
            return None
        seal = self._sealer()
        if seal is None:
            return None
        try:
            sealed = seal(fd, parts)  # OpenSSL (or Records) counts these records as sent
            try:
                n = os.write(fd, sealed)
            except BlockingIOError:
                n = 0
        except (ssl.SSLError, OSError) as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from None
        return memoryview(sealed)[n:]

    async def send_sealed(self, view, pace: sockio.Pace | None = None) -> None:
        """The rest of seal_now's records, as the socket takes them, within ``pace`` (as
        _write_batched waits: TimeoutError past its deadline, the stream then broken)."""
        self._sending = True
        blocked = _Blocked(self, len(view), pace)
        try:
            await self._write_sealed(view, blocked, 0)
        except TimeoutError:
            self._broken = True       # the pace's deadline (or Evicted): the caller resets it
            raise
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"{self._peer} socket failed: {exc}") from None
        except BaseException:
            self._broken = True       # part of a record may be out: nothing else may follow
            raise
        finally:
            blocked.close()
            self._sending = False

    async def receive_by(self, size: int, deadline: float = math.inf) -> bytes | None:
        """Decrypted bytes (b"" at EOF); None if ``deadline`` (trio clock) passed first, after
        which the stream must be closed. Without a deadline the caller's scope bounds it."""
        global _ready
        self._check()
        if not self._handshook:
            await self.do_handshake()
        if size > RECORD:
            size = RECORD             # one read gives at most a record: no 64 KiB bytes to shrink
        if self._want < _READ:
            data = self._read(size)   # (else straight to the wait: see _TRY)
            if data is not None:
                _ready += 1
                if _ready >= FAIR_EVERY:
                    _ready = 0
                    await checkpoint()
                return data
        while True:
            if not await self._wait(deadline, self._want == _WRITE):
                self._broken = True
                return None
            data = self._read(size)
            if data is not None:
                return data
        # A cancel while waiting loses nothing (OpenSSL has read no part of a record it
        # would drop): not broken.

    async def send_parts(self, parts: list, pace: sockio.Pace | None = None) -> None:
        """Encrypt and write the buffers in order, one record at a time; what the socket does
        not take at once waits, paced by ``pace`` as sockio's writes are (TimeoutError past
        its deadline; the stream is then broken and must be closed)."""
        global _ready
        self._check()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        if not self._handshook:
            await self.do_handshake()
        self._sending = True
        waited = False
        try:
            total = 0
            for part in parts:
                total += len(part)
            if total <= RECORD:
                # The common answer: one record, one write, nothing to wait for.
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                if total:
                    if self.plain.fileno() < 0:
                        raise trio.ClosedResourceError("socket was closed")
                    try:
                        self._obj.write(data)
                    except (_WantWrite, _WantRead):
                        waited = await self._write_records((data,), total, pace)
            else:
                # Not corked (TCP_CORK): a corked write that had to wait for a slow reader held
                # its partial segments up to the kernel's 200 ms cork limit (10,000 devices with
                # security on: 1 in 10 answers over 256 KB took 200-430 ms longer to write).
                seal = self._sealer()
                if seal is not None:
                    waited = await self._write_batched(seal, parts, total, pace)
                else:
                    waited = await self._write_records(records(parts), total, pace)
        except ssl.SSLError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from None
        except TimeoutError:
            self._broken = True       # sockio's pace (or Evicted): the caller resets the connection
            raise
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"{self._peer} socket failed: {exc}") from None
        except BaseException:
            self._broken = True       # a cancel, or the socket closed: part of a record may be out
            raise
        finally:
            self._sending = False
        if not waited:
            _ready += 1
            if _ready >= FAIR_EVERY:
                _ready = 0
                await checkpoint()

    # -- inside ------------------------------------------------------------------------------

    def _hand_over(self) -> None:
        """TLS 1.3 on a prepared context: the connection goes on with a ``Records`` and
        OpenSSL's object is freed (tls13.py); a server's session tickets are its first bytes out."""
        face = self.ssl_object
        fd = self.plain.fileno()
        ptr = self._ssl_ptr()
        if not ptr:
            return
        try:
            records = tls13.shed(face, ptr, fd)
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS session tickets failed: {exc}") from None
        if records is None:
            return
        self.ssl_object = tls13.Shed(face, records)
        self._obj = records
        self._ssl = 0
        try:
            records.write(b"")        # the tickets, if the socket takes them now
        except _WantWrite:
            pass                      # they go out before the next record
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"{self._peer} socket failed: {exc}") from None

    def _sealer(self):
        """``seal(fd, parts)`` making a batch of records at once, or None (one by one)."""
        obj = self._obj
        if type(obj) is _tls13.Records:
            return obj.seal
        ptr = self._ssl_ptr()
        return partial(_tlsrecords.seal, ptr) if ptr else None

    def _ssl_ptr(self) -> int:
        """The SSL object's pointer for batched writes (tlsbatch.ssl_of, asked once); 0 if none."""
        ptr = self._ssl
        if ptr < 0:
            ptr = self._ssl = tlsbatch.ssl_of(self._obj, self.plain.fileno())
        return ptr

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._broken:
            raise trio.BrokenResourceError("this TLS stream is broken")

    def _read(self, size: int) -> bytes | None:
        """One OpenSSL read: plaintext, b"" at EOF, None if the socket must be waited for
        (``_want`` says how)."""
        if self._eof:
            return b""
        if self.plain.fileno() < 0:
            raise trio.ClosedResourceError("socket was closed")   # never a reused descriptor
        try:
            data = self._obj.read(size)
        except _WantRead:
            self._want = _READ
            return None
        except _WantWrite:
            self._want = _WRITE       # its output (a KeyUpdate's answer) waits for the socket
            return None
        except _EOFS:
            self._eof = True          # with close_notify or without (https_compatible)
            return b""
        except ssl.SSLError as exc:
            self._broken = True       # OpenSSL wrote its alert, if any (record_overflow, ...)
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from None
        except OSError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"{self._peer} socket failed: {exc}") from None
        self._want = _TRY
        return data

    async def _write_records(self, chunks, total: int, pace: sockio.Pace | None) -> bool:
        """Write each chunk (at most a record) whole, waiting while the socket is full; True if
        it waited (the waits as _Blocked keeps them).

        Each record the socket takes at once is a ready operation (FAIR_EVERY of them, 512 KiB,
        then a checkpoint): a big answer to a device that reads fast went out whole in one task
        step while the socket took it (a 10 MB pass-through: 2 MB per step, ~5-7 ms of CPU, the
        other connections of the worker waiting; OpenSSL's encryption and a write(2) per record
        are ~10-20 us a record)."""
        global _ready
        obj = self._obj
        plain = self.plain
        blocked = _Blocked(self, total, pace)
        done = 0
        try:
            for chunk in chunks:
                while True:
                    if plain.fileno() < 0:
                        raise trio.ClosedResourceError("socket was closed")
                    try:
                        obj.write(chunk)      # a retry passes the same bytes (OpenSSL's rule)
                        break
                    except _WantWrite:
                        writable = True
                    except _WantRead:
                        writable = False
                    await blocked.wait(writable, done)
                done += len(chunk)
                blocked.took(len(chunk))
                _ready += 1
                if _ready >= FAIR_EVERY:
                    _ready = 0
                    await checkpoint()    # (a cancel here breaks the stream, as one in a wait does)
        finally:
            blocked.close()
        return blocked.waited

    async def _write_batched(self, seal, parts, total: int, pace: sockio.Pace | None) -> bool:
        """``_write_records`` a batch of records at a time (tlsbatch.BATCH of plaintext, made by
        _tlsrecords.seal, one write(2)), with the same waits and checkpoints (a batch counts its
        records as ready operations). OpenSSL counts a batch's records as written once they are
        made: every byte of them goes out, in order, or the stream is broken (the caller's
        except clauses)."""
        global _ready
        plain = self.plain
        blocked = _Blocked(self, total, pace)
        done = 0
        try:
            for batch, size in tlsbatch.batches(parts):
                fd = plain.fileno()
                if fd < 0:
                    raise trio.ClosedResourceError("socket was closed")
                await self._write_sealed(memoryview(seal(fd, batch)), blocked, done)
                done += size
                _ready += (size + RECORD - 1) // RECORD
                if _ready >= FAIR_EVERY:
                    _ready = 0
                    await checkpoint()
        finally:
            blocked.close()
        return blocked.waited

    async def _write_sealed(self, view, blocked: _Blocked, done: int) -> None:
        """Records already made (ciphertext) written as the socket takes them, waiting (``blocked``'s
        pace) while it is full; ``done``: plaintext bytes of the write before them."""
        while view:
            fd = self.plain.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("socket was closed")
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                n = 0
            if n:
                view = view[n:]
                blocked.took(n)
                continue
            await blocked.wait(True, done)

    async def _wait(self, deadline: float, writable: bool = False, writer=None) -> bool:
        """Wait until the socket is readable (writable) by ``deadline``; False if it passed
        (sockio's wheel ends the wait). Evicted if the worker's unsent-bytes limit cut ``writer``."""
        plain = self.plain
        wheel = sockio._the_wheel() if deadline != math.inf else None
        slot = wheel.add(plain, deadline) if wheel is not None else 0
        try:
            fd = plain.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("socket was closed")
            if writable:
                await wait_writable(fd)
            else:
                await wait_readable(fd)
            return True
        except trio.ClosedResourceError:
            if writer is not None and writer.evicted:
                raise sockio.Evicted("slowest reader while the worker's unsent bytes passed their limit") from None
            if wheel is not None and wheel.remove(plain, slot):
                return False
            raise
        finally:
            if wheel is not None:
                wheel.remove(plain, slot)

    async def _first_byte(self, deadline: float) -> None:
        """Wait for the device's first byte (peeked, left for OpenSSL): a connection closed
        before it (a load balancer's TCP check) is not a failed handshake."""
        sock = self.socket._sock
        while True:
            try:
                got = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                if not await self._wait(deadline):
                    raise TimeoutError from None
                continue
            if not got:
                raise trio.BrokenResourceError("device closed the connection during the TLS handshake")
            self.handshake_started = True
            return
