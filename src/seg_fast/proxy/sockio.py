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

import heapq
import math
import os
import socket
from typing import NamedTuple

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from seg_fast.proxy._http1 import read_nb

FAIR_EVERY = 32
_ready = 0
NOTSENT_LOWAT = 1 << 20               # bytes a socket holds unsent past the peer's window (tcp_stream)
DEFER_ACCEPT_S = 1                    # seconds a silent connection waits in the kernel (defer_accept)


class Plain:
    """A plain SocketStream's socket, with the stdlib socket's own fileno (trio forwards
    attribute look-ups through __getattr__, a cost on every operation)."""

    __slots__ = ("sock", "fileno")

    def __init__(self, sock):
        self.sock = sock              # the trio socket: what trio's waits and notify_closing take
        self.fileno = sock.fileno     # -1 once closed


def tcp_stream(sock) -> trio.SocketStream:
    """A trio SocketStream over a connected TCP socket, with NOTSENT_LOWAT's bound raised.

    trio sets TCP_NOTSENT_LOWAT to 16 KiB: the kernel then takes at most 16 KiB beyond what
    the peer's window admits and reports the socket writable only under 8 KiB, so an answer
    larger than the window went out in 8-16 KiB steps as the device read, each a wake-up of
    this worker (on a busy core, a wait for the core each) while the device waited for the
    next step: a 2 MiB answer to a device reading 64 KiB a millisecond woke the worker ~30
    times (benchmarks/big_fetch_tail.py --reader-pause-ms 1), ~12 times at 1 MiB (128 KiB
    saved little: the worker wakes under half the bound). NOTSENT_LOWAT still bounds what the
    kernel holds unsent for a device that stops reading (the worker's
    max_unsent_bytes and the write deadline deal with that device), where the system's own
    setting (unbounded) would let a socket's send buffer, several MB on a fast link, take
    a whole attachment out of the worker's account."""
    stream = trio.SocketStream(sock)
    notsent_lowat(sock)
    return stream


def notsent_lowat(sock) -> None:
    """TCP_NOTSENT_LOWAT = NOTSENT_LOWAT on a SocketStream's socket (see tcp_stream)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except (OSError, AttributeError):     # not Linux/macOS: trio did not set it either
        pass


def defer_accept(sock) -> None:
    """Report a listener's connection only once its first bytes are in (TCP_DEFER_ACCEPT,
    nginx's ``listen ... deferred``): the accept and the ClientHello's read are one wake-up
    of the worker, not two (a device's ClientHello comes after its connect() returns, and
    the worker woken for the connection alone found nothing to read and slept again). A
    connection that sends nothing (a port scan, a load balancer's TCP check) waits in the
    kernel, without a descriptor, and is accepted after DEFER_ACCEPT_S anyway, when the
    TLS handshake deadline takes over; one closed without a byte is reported at once."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
    except (OSError, AttributeError):     # not Linux
        pass


def plain_socket(stream) -> Plain | None:
    """The socket under a plain SocketStream, or None (TLS and other streams)."""
    return Plain(stream.socket) if type(stream) is trio.SocketStream else None


def read_now(sock, size: int) -> bytes | None:
    """One read if the data is already there (b"" on EOF); None if it would block
    (read_nb: no exception for that, one reusable buffer)."""
    if sock is None:
        return None
    fd = sock.fileno()
    if fd < 0:
        return None                   # closed: let trio's path raise ClosedResourceError
    return read_nb(fd, size)


class _Wheel:
    """Deadlines for socket waits without a CancelScope each (about 10 us apiece in trio).

    A waiting socket is filed under its deadline rounded up to TICK; one system task
    sleeps until the earliest slot and wakes the sockets still waiting there with
    ``notify_closing`` (their wait raises ClosedResourceError, read as a timeout).
    A timed-out socket is closed by its owner, as after a cancelled wait. Expiry is
    never early and at most TICK late.

    The sleep is moved only earlier: a wait filed before it (``rearms``). A wait that
    ends early, as most do, leaves the sleep where it was; the wheel then wakes once at
    that time, finds nothing due and sleeps until the earliest slot still waiting.
    Moving a trio deadline costs ~12 Python calls (the scope's deadline setter, its
    context manager, the runner's deadline heap); moved both ways it was done ~4 times
    per proxied request, for an early wake-up about once per timeout (seconds).
    """

    TICK = 0.05

    def __init__(self):
        self.slots: dict[int, dict[int, object]] = {}
        self.heap: list[int] = []
        self.expired: set[int] = set()
        self.wake = trio.Event()
        self.sleep: trio.CancelScope | None = None
        self.next = math.inf              # the slot the wheel sleeps until
        self.wakeups = 0                  # the wheel's own (tests: waits ended early cost at most one)
        self.rearms = 0                   # sleeps moved earlier by a wait filed before them
        trio.lowlevel.spawn_system_task(self._run, name="seg_fast.sockio.wheel")

    def add(self, sock, deadline: float) -> int:
        slot = math.ceil(deadline / self.TICK)
        waiting = self.slots.get(slot)
        if waiting is None:
            waiting = self.slots[slot] = {}
            heapq.heappush(self.heap, slot)
            if slot < self.next:
                self.next = slot
                if self.sleep is not None:
                    self.sleep.deadline = slot * self.TICK
                    self.rearms += 1
                self.wake.set()
        waiting[id(sock)] = sock
        return slot

    def remove(self, sock, slot: int) -> bool:
        """Done waiting; True if the wait was ended by the deadline."""
        waiting = self.slots.get(slot)
        if waiting is not None:
            # An emptied slot stays, as the sleep does, until the wheel passes it: a wait
            # filed there again needs no second heap entry.
            waiting.pop(id(sock), None)
        if self.expired and id(sock) in self.expired:
            self.expired.discard(id(sock))
            return True
        return False

    async def _run(self) -> None:
        heap, slots = self.heap, self.slots
        while True:
            while heap and not slots.get(heap[0]):
                slots.pop(heapq.heappop(heap), None)
            if not heap:
                self.next = math.inf
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            self.next = heap[0]
            with trio.CancelScope(deadline=self.next * self.TICK) as self.sleep:
                await trio.sleep_forever()
            self.sleep = None
            self.wakeups += 1
            now = trio.current_time()
            while heap and heap[0] * self.TICK <= now:
                for key, sock in slots.pop(heapq.heappop(heap), {}).items():
                    self.expired.add(key)
                    trio.lowlevel.notify_closing(sock.sock)


_wheel = trio.lowlevel.RunVar("seg_fast.sockio.wheel")


def _the_wheel() -> _Wheel:
    try:
        return _wheel.get()
    except LookupError:
        wheel = _Wheel()
        _wheel.set(wheel)
        return wheel


class IdleWait:
    """Stands for a device connection's idle wait in the drain's set: cancel() ends it."""

    __slots__ = ("sock", "scope")

    def __init__(self, sock, scope=None):
        self.sock = sock
        self.scope = scope

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        else:
            trio.lowlevel.notify_closing(self.sock.sock)


async def wait_plain(sock, size: int, deadline: float) -> bytes | None:
    """Wait for one read on a plain socket until ``deadline``; None on timeout.

    The socket must be closed after a timeout (its trio registration is gone).
    """
    wheel = _the_wheel() if deadline != math.inf else None
    slot = wheel.add(sock, deadline) if wheel is not None else 0
    try:
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("socket was closed")
            await wait_readable(fd)
            data = read_nb(fd, size)
            if data is not None:
                return data
    except trio.ClosedResourceError:
        if wheel is not None and wheel.remove(sock, slot):
            return None
        raise
    finally:
        if wheel is not None:
            wheel.remove(sock, slot)


async def wait_receive(stream, sock, size: int, scope: trio.CancelScope) -> bytes | None:
    """Wait for one read under ``scope``; None if the scope was cancelled (deadline) first."""
    with scope:
        if sock is None:
            return await stream.receive_some(size)
        while True:
            await wait_readable(sock.sock)
            fd = sock.fileno()
            if fd < 0:
                return await stream.receive_some(size)
            data = read_nb(fd, size)
            if data is not None:
                return data
    return None


async def receive(stream, sock, size: int, deadline: float = math.inf, ready: bool = True) -> bytes | None:
    """One read (b"" on EOF); None if ``deadline`` (trio clock) passed before any data.
    ``ready=False``: the data is not expected yet (an answer just asked for), so the
    read is not tried before waiting (a system call that would say EAGAIN)."""
    global _ready
    if sock is not None:
        data = read_now(sock, size) if ready else None
        if data is None:
            return await wait_plain(sock, size, deadline)
    elif getattr(stream, "fast_tls", False):      # proxy/tlsio.TLSStream: the same calls, decrypted
        data = stream.read_now(size) if ready else None
        if data is None:
            data = await stream.receive_by(size, deadline)
            return data and stream.read_more(data, size)
        data = stream.read_more(data, size)
    else:
        return await wait_receive(stream, sock, size, trio.CancelScope(deadline=deadline))
    _ready += 1
    if _ready >= FAIR_EVERY:
        _ready = 0
        await checkpoint()
    return data


class Evicted(TimeoutError):
    """A write cut because the worker's unsent bytes passed their limit and this peer
    was among the slowest readers."""


class _Writer:
    __slots__ = ("sock", "scope", "size", "start", "taken", "evicted")

    def __init__(self, sock, scope, size: int, start: float):
        self.sock, self.scope, self.size, self.start = sock, scope, size, start
        self.taken = 0
        self.evicted = False


class Unsent:
    """Answer bytes a worker holds for devices, with a limit (limits.max_unsent_bytes).

    Two kinds count: buffers filled for the content pipeline (``hold``/``release``),
    and writes the kernel did not take at once, until they complete (``add``/``done``).
    Past the limit, slow writers are cut, slowest first (fewest bytes taken per
    second), until the total is back under 90% of it; a writer is slow when it has
    waited ``min_age`` seconds and taken less than ``min_rate`` bytes/s, so a device
    reading at limits.min_send_rate is never cut. A buffer that still does not fit
    is refused (the caller answers 503): memory stays bounded either way. A cut
    write's wait is ended the way the wheel ends one (``notify_closing``) or by
    cancelling its scope.
    """

    def __init__(self, limit: int, min_rate: float = 0.0, min_age: float = 1.0):
        self.limit = limit
        self.min_rate = min_rate
        self.min_age = min_age
        self.total = 0
        self.writers: dict[_Writer, None] = {}
        self.evictions = 0
        self.refused = 0

    def hold(self, n: int) -> bool:
        """Count ``n`` more buffered bytes; False (nothing counted) if they cannot fit."""
        self.total += n
        if self.limit and self.total > self.limit:
            self._evict()
            if self.total > self.limit:
                self.total -= n
                self.refused += 1
                return False
        return True

    def release(self, n: int) -> None:
        self.total -= n

    def full(self) -> bool:
        """Past 90% of the limit with no slow writer to cut: a new buffer would be refused."""
        if not self.limit or self.total < self.limit * 0.9:
            return False
        now = trio.current_time()
        return not any(now - w.start >= self.min_age and w.taken < self.min_rate * (now - w.start)
                       for w in self.writers)

    def add(self, w: _Writer) -> None:
        self.writers[w] = None
        self.total += w.size
        if self.limit and self.total > self.limit:
            self._evict()

    def done(self, w: _Writer) -> None:
        if self.writers.pop(w, 0) is None:
            self.total -= w.size

    def _evict(self) -> None:
        now = trio.current_time()
        slow = [(w.taken / (now - w.start), w) for w in self.writers
                if now - w.start >= self.min_age and w.taken < self.min_rate * (now - w.start)]
        slow.sort(key=lambda e: e[0])
        for _, w in slow:
            if self.total <= self.limit * 0.9:
                break
            self.done(w)
            w.evicted = True
            self.evictions += 1
            if w.scope is not None:
                w.scope.cancel()
            else:
                trio.lowlevel.notify_closing(w.sock.sock)


class Pace(NamedTuple):
    """How long a write may take: ``grace`` seconds, plus one second per ``rate`` bytes the
    peer has taken so far (Apache mod_reqtimeout's MinRate): a peer that takes nothing is
    cut after ``grace``, one that keeps reading at ``rate`` or faster never is. With
    ``unsent``, a write that waits counts against the worker's limit of unsent bytes."""

    grace: float
    rate: float = 0.0                 # bytes/s; 0: no extension
    unsent: Unsent | None = None

    def deadline(self, start: float, taken: int) -> float:
        return start + self.grace + (taken / self.rate if self.rate > 0 else 0.0)


async def send_all(stream, sock, data, pace: Pace | None = None) -> None:
    """Write all of ``data``; what the kernel does not take at once waits, paced by ``pace``
    (TimeoutError, an OSError, when the peer reads too slowly; the stream must then be closed)."""
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
            await _write_rest(sock, memoryview(data)[sent:], pace)
            return
    if getattr(stream, "fast_tls", False):
        await stream.send_parts([data], pace)
        return
    await _send_stream(stream, data, pace)


async def send_parts(stream, sock, parts: list, pace: Pace | None = None) -> None:
    """Write the buffers in order: one writev on a plain socket, no joining copy."""
    global _ready
    if sock is not None and len(parts) <= 64:
        fd = sock.fileno()
        if fd >= 0:
            try:
                sent = os.writev(fd, parts)
            except BlockingIOError:
                sent = 0
            total = 0
            for part in parts:
                total += len(part)
            if sent == total:
                _ready += 1
                if _ready >= FAIR_EVERY:
                    _ready = 0
                    await checkpoint()
                return
            # The rest, part by part (a big part, say a transformed answer, is not copied).
            for part in parts:
                size = len(part)
                if sent >= size:
                    sent -= size
                    continue
                await _write_rest(sock, memoryview(part)[sent:], pace)
                sent = 0
            return
    if sock is not None:
        for part in parts:
            await send_all(stream, sock, part, pace)
        return
    if getattr(stream, "fast_tls", False):         # tlsio.TLSStream: the parts uncopied
        await stream.send_parts(parts, pace)
        return
    await _send_stream(stream, b"".join(parts), pace)


async def _write_rest(sock, view: memoryview, pace: Pace | None) -> None:
    """Wait until the kernel took all of ``view`` (plain socket), within ``pace``."""
    if pace is None:
        pace = _NO_PACE
    wheel = _the_wheel() if pace.grace != math.inf else None
    start = trio.current_time()
    taken = 0
    slot = wheel.add(sock, pace.deadline(start, 0)) if wheel is not None else 0
    unsent = pace.unsent
    writer = None
    if unsent is not None:
        writer = _Writer(sock, None, len(view), start)
        unsent.add(writer)
    try:
        while view:
            fd = sock.fileno()
            if fd < 0 or (writer is not None and writer.evicted):
                raise trio.ClosedResourceError("socket was closed")
            await wait_writable(fd)
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            view = view[n:]
            taken += n
            if writer is not None:
                writer.taken = taken
            if wheel is not None and pace.rate > 0:
                # Progress moves the deadline (re-filed on the wheel: one dict move).
                if wheel.remove(sock, slot):
                    raise TimeoutError("peer did not read in time")
                slot = wheel.add(sock, pace.deadline(start, taken))
    except trio.ClosedResourceError:
        if writer is not None and writer.evicted:
            raise Evicted("slowest reader while the worker's unsent bytes passed their limit") from None
        if wheel is not None and wheel.remove(sock, slot):
            raise TimeoutError("peer did not read in time") from None
        raise
    finally:
        if wheel is not None:
            wheel.remove(sock, slot)
        if writer is not None:
            unsent.done(writer)


async def _send_stream(stream, data, pace: Pace | None) -> None:
    """trio's send_all (TLS), a slice at a time so the pace's deadline follows progress."""
    if pace is None or pace.grace == math.inf:
        await stream.send_all(data)
        return
    view = memoryview(data)
    start = trio.current_time()
    taken = 0
    unsent = pace.unsent
    writer = None
    try:
        while True:
            piece = view[taken:taken + _PACE_SLICE]
            with trio.CancelScope(deadline=pace.deadline(start, taken)) as scope:
                if writer is not None:
                    writer.scope = scope
                await stream.send_all(piece)
            if writer is not None and writer.evicted:
                raise Evicted("slowest reader while the worker's unsent bytes passed their limit")
            if scope.cancelled_caught:
                raise TimeoutError("peer did not read in time")
            taken += len(piece)
            if taken >= len(view):
                return
            if writer is None and unsent is not None:
                # Slices that go at once cost nothing to track; from the second on, they wait.
                writer = _Writer(None, scope, len(view), start)
                unsent.add(writer)
            if writer is not None:
                writer.taken = taken
    finally:
        if writer is not None:
            unsent.done(writer)


_PACE_SLICE = 64 * 1024
_NO_PACE = Pace(math.inf)
