"""Parked Pings without a task each: one epoll set watches every parked long-poll.

A forwarded Ping may wait up to its heartbeat (15 min in production) for the mail
server. Keeping a task, its coroutine frames and two h11 connections alive for
each would cost more memory per device than the device's two sockets. Instead the
Ping's task ends once the request is upstream; what is kept is a ``Parked`` record
(the two streams, the request's identity, the deadline). One task waits on an
epoll descriptor holding every parked upstream socket (readable: the answer is
coming) and device socket (EPOLLRDHUP: the device went away), plus the nearest
deadline; whatever fires gets a fresh task that rebuilds the h11 state and
finishes the transaction (``exchange.resume``).

The same set holds the keep-alive lane's connections (proxy/lane.py): an ``Idle`` device
connection waiting for its next request, an ``Inflight`` exchange waiting for its answer.
Those the lot hands to lane.fire, which carries the common case in this task's step.
"""
from __future__ import annotations

import heapq
import math
import select
from typing import ClassVar

import msgspec
import trio

from seg_fast.ownepoll import OwnEpoll
from seg_fast.proxy.looplag import in_slices
from seg_fast.proxy.upstream import run_clock
from seg_fast.timerfd import Timer

ANSWER, DEVICE_GONE, TIMEOUT, DRAIN = "answer", "device_gone", "timeout", "drain"
# Released in the step that found them up to this many; more go a slice per loop step.
RELEASE_AT_ONCE = 16
# Ready descriptors (and heap entries) taken per wake-up. Taking one costs ~2.5 us of the step
# (epoll, the look-up, the due entry): 4,096 devices leaving together were 10 ms before the
# first slice. The epoll set is level-triggered: the rest are ready again at the next wake-up,
# a loop pass later; heap entries left due make the next wake-up's deadline already past.
POLL_AT_ONCE = 1024
_IN_ONESHOT = select.EPOLLIN | select.EPOLLONESHOT


# The lot's task puts the worker to sleep itself when trio has nothing to run (ownepoll.py):
# a request carried by the keep-alive lane then wakes the worker into this loop directly;
# through trio's scheduler each wake-up ran ~34 of its functions first
# (benchmarks/wake_footprint.py), ~135 µs on a cold core. Tests turn it off to hold the lot
# to trio's wait.
SLEEP_HERE = True


class Parked:
    ping = True                   # counted as a parked Ping (metrics: parked_pings)
    __slots__ = ("dev_stream", "client_ip", "proto", "dev_close", "up", "req", "decision", "rec",
                 "host", "deadline", "t_up", "t0", "fds", "seq", "done")

    def __init__(self, dev_stream, client_ip, proto, dev_close, up, req, decision, rec, host, deadline,
                 t_up, t0):
        self.dev_stream = dev_stream
        self.client_ip = client_ip
        self.proto = proto
        self.dev_close = dev_close    # the device asked to close after this answer (or is HTTP/1.0)
        self.up = up                  # UpstreamConn with its h11 state dropped
        self.req = req
        self.decision = decision
        self.rec = rec
        self.host = host              # the device's Host header, for redirects
        self.deadline = deadline      # trio clock
        self.t_up = t_up
        self.t0 = t0
        self.fds = (-1, -1)
        self.seq = 0                  # its heap entry's (PingPark.park)
        self.done = False

    def close(self) -> None:
        _close_sockets(self.up.sock, socket_of(self.dev_stream))


# The lane's records are Structs, made by C where a class's __init__ is a Python frame (once or
# twice per request); eq=False: compared and hashed as objects are.
class Idle(msgspec.Struct, eq=False):
    """A keep-alive device connection between requests, its Device kept (proxy/lane.py)."""

    ping: ClassVar[bool] = False
    dev: object
    deadline: float                   # the idle keep-alive deadline (trio clock)
    fds: tuple = (-1,)
    seq: int = 0
    done: bool = False

    def close(self) -> None:
        _close_sockets(socket_of(self.dev.stream))


class Inflight(msgspec.Struct, eq=False):
    """An exchange the lane sent up, waiting for its answer (proxy/lane.py)."""

    dev: object
    up: object                        # UpstreamConn, ``sent`` set as the fast lane sets it
    plan: object                      # exchange.Plan
    timeout: float                    # seconds the mail server may take (exchange.read_timeout)
    deadline: float                   # trio clock
    t_up: float
    ping: bool                        # a Ping: counted as parked
    fds: tuple = (-1,)
    seq: int = 0
    done: bool = False

    def close(self) -> None:
        _close_sockets(self.up.sock, socket_of(self.dev.stream))


def _close_sockets(*socks) -> None:
    """What a record holds, closed when handing it back failed (_release)."""
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


def socket_of(stream):
    """The trio socket under a SocketStream or an SSLStream over one."""
    while not hasattr(stream, "socket"):
        stream = stream.transport_stream
    return stream.socket


def fileno(sock) -> int:
    """A trio socket's descriptor from the stdlib socket it wraps: trio forwards ``fileno``
    through ``__getattr__``, after the normal look-up failed (~2.5 us a call here, two per
    park: a third of ``park`` without its epoll_ctl calls). Any other socket: its own."""
    return getattr(sock, "_sock", sock).fileno()


class PingPark:
    def __init__(self, spawn, incidents=None, lane=None):
        self._spawn = spawn           # spawn(parked, why): start the task that finishes it
        self._lane = lane             # lane(record, why): the keep-alive lane's records (lane.fire)
        self._incidents = incidents   # where a failure to hand one back is reported
        self._epoll = select.epoll()
        # The nearest deadline as a descriptor in the set: a CancelScope per wait was ~20 of
        # trio's functions at every wake-up (benchmarks/wake_footprint.py), and with the
        # keep-alive lane every request's wake-ups are this task's.
        self._timer = Timer()
        self._epoll.register(self._timer.fd, select.EPOLLIN)
        self._by_fd: dict[int, Parked] = {}
        # (deadline, seq, upstream fd): an entry names its Ping without holding it, so a
        # released Ping's record is freed by the task that finished it, one at a time. Held
        # here, thousands were freed together (SSL_free per TLS connection) when the entries
        # were popped or compacted after devices left together: 41-65 ms of CPU in one step.
        self._heap: list[tuple[float, int, int]] = []
        self._seq = 0
        self._dead = 0
        self.count = 0
        self.now = trio.current_time  # the run's clock itself once it runs (one call, not three)
        self.carried = 0              # exchanges the keep-alive lane answered in this task's step
        self.handed = 0               # lane connections it handed to a task (downstream.carry_on)

    def park(self, p: Parked) -> None:
        self.hold(p, fileno(p.up.sock), fileno(socket_of(p.dev_stream)))

    def hold(self, p, fd: int, dev_fd: int = -1) -> None:
        """Watch ``fd`` (readable: ANSWER) and, if given, ``dev_fd`` (the device hung up:
        DEVICE_GONE) for ``p`` until ``p.deadline`` (TIMEOUT).

        One descriptor is watched one-shot: its event disarms it, so the keep-alive lane's
        records (a connection idle, an exchange in flight) cost one epoll_ctl each, not a
        register and an unregister; the registration stays, disarmed, until the socket closes.
        A pair (a parked Ping) is registered and unregistered, so that neither fires alone."""
        if dev_fd >= 0:
            self._watch(fd, select.EPOLLIN)
            try:
                self._watch(dev_fd, select.EPOLLRDHUP)
            except OSError:
                self._epoll.unregister(fd)
                raise
            p.fds = (fd, dev_fd)
            self._by_fd[dev_fd] = p
        else:
            try:                      # (_watch, inline: once per lane request)
                self._epoll.modify(fd, _IN_ONESHOT)
            except FileNotFoundError:
                self._epoll.register(fd, _IN_ONESHOT)
            p.fds = (fd,)
        self._by_fd[fd] = p
        self._seq += 1
        p.seq = self._seq
        heapq.heappush(self._heap, (p.deadline, p.seq, fd))
        if p.ping:
            self.count += 1
        if p.deadline < self._timer.armed:
            self._timer.arm(p.deadline)

    def _watch(self, fd: int, mask: int) -> None:
        try:
            self._epoll.modify(fd, mask)          # registered before (one-shot, disarmed)
        except FileNotFoundError:
            self._epoll.register(fd, mask)

    def _release(self, p: Parked, why: str) -> None:
        if p.done:
            return
        p.done = True
        if p.ping:
            self.count -= 1
        self._dead += 1
        fds = p.fds
        if len(fds) == 1:
            # One-shot: disarmed by its event; after a deadline or a drain its socket is closed
            # (or handed to a task: at most one event then, for no record, ignored).
            self._by_fd.pop(fds[0], None)
        else:
            for fd in fds:
                self._by_fd.pop(fd, None)
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
        try:
            if type(p) is Parked:
                self._spawn(p, why)
            else:
                self._lane(p, why)
        except Exception as exc:      # noqa: BLE001 - one Ping must not stop the lot: drop its connections
            if self._incidents is not None:
                self._incidents.exception("contained_exception", exc, p.client_ip if type(p) is Parked else p.dev.client_ip)
            p.close()

    def _live(self, entry) -> Parked | None:
        """The parked Ping a heap entry names, or None if it left (its descriptor since reused
        by another Ping: a different seq)."""
        p = self._by_fd.get(entry[2])
        return p if p is not None and p.seq == entry[1] else None

    def _release_due(self, item) -> None:
        self._release(*item)

    async def drain(self) -> None:
        """Hand every parked Ping back (the worker is stopping), a slice per loop step: each
        release starts a task that answers and closes, and 100,000 of them in one step would
        stall the worker for seconds."""
        while self._by_fd:
            parked = list({id(p): p for p in self._by_fd.values()}.values())
            await in_slices(parked, lambda p: self._release(p, DRAIN))     # a no-op for one answered meanwhile

    def _arm(self) -> None:
        """The timer at the nearest live deadline (entries of records gone dropped first)."""
        heap = self._heap
        while heap and self._live(heap[0]) is None:
            heapq.heappop(heap)
            self._dead -= 1
        deadline = heap[0][0] if heap else math.inf
        if deadline != self._timer.armed:
            self._timer.arm(deadline)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.now = run_clock()
        task_status.started()
        timer_fd = self._timer.fd
        sleep = OwnEpoll(self._epoll, SLEEP_HERE)
        trio_fd = sleep.fd
        fired = True
        try:
            while True:
                if fired:
                    # Re-armed only once it fired (or at the start): a later deadline set by
                    # hold() waits behind an earlier one, and the timer firing for a record
                    # gone costs one pass, where re-arming at every change cost a syscall a request.
                    self._arm()
                    fired = False
                events, to_trio = await sleep.poll(POLL_AT_ONCE)
                due = []
                for fd, mask in events:
                    if fd == timer_fd:
                        self._timer.clear()
                        fired = True
                        continue
                    if fd == trio_fd:
                        to_trio = True
                        continue
                    p = self._by_fd.get(fd)
                    if p is not None:
                        due.append((p, ANSWER if fd == p.fds[0] else DEVICE_GONE))
                now = self.now()
                heap = self._heap
                popped = 0
                by_fd = self._by_fd
                while heap and popped < POLL_AT_ONCE:
                    popped += 1
                    entry = heap[0]
                    p = by_fd.get(entry[2])   # (_live, inline: once per wake-up)
                    if p is not None and p.seq != entry[1]:
                        p = None
                    if p is not None and entry[0] > now:
                        break
                    heapq.heappop(heap)
                    if p is not None:
                        due.append((p, TIMEOUT))
                    self._dead -= 1           # its heap entry (_release counts it as dead again)
                p = None
                if len(due) <= RELEASE_AT_ONCE:
                    for p, why in due:
                        self._release(p, why)
                    p = None
                    due.clear()               # (in_slices consumes its list the same way)
                else:
                    # Pings answered together (a mail server's wave, heartbeats parked in a
                    # ramp): each release spawns a task that answers its device (~0.5-1 ms with
                    # TLS), and thousands in one step and one batch stalled the worker for
                    # hundreds of ms. A slice per loop step, the slice sized by the step's length.
                    await in_slices(due, self._release_due)       # a no-op for one done meanwhile
                if self._dead > 1024 and self._dead > len(heap) // 2:
                    # Pings answered early leave their heap entries behind: compact.
                    self._heap = [e for e in heap if self._live(e) is not None]
                    heapq.heapify(self._heap)
                    self._dead = 0
                if to_trio:
                    await trio.lowlevel.checkpoint()      # trio's I/O and timers (and a cancel)
        finally:
            sleep.close()
            self._epoll.close()
            self._timer.close()
