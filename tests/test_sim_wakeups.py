"""The load side's timers wake for live deadlines only (issue 11: its cost per device-hour
must not grow with running time).

The fleet's Parker and the mailbox simulator's heartbeat task each keep one heap of
deadlines; an answered request (a Ping woken early) leaves its entry behind. Those
entries used to wake the timer once each when they came due: at real rates a loop pass
of its own per request. Here K requests are answered early and one more is left to
expire: the timer passes over the K stale deadlines and wakes once, for the live one.
Counted (``Parker.wakeups``, ``MailboxSimulator.heartbeat_wakeups``), not timed."""
from __future__ import annotations

import socket
import types

import trio

from seg_fast.sim.fleet import Parked, Parker
from seg_fast.sim.mailbox import MailboxSimulator, _Park
from seg_fast.sim.wire import HttpConn, RawStream

K = 20
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Dev:
    def __init__(self):
        self.answered_n = 0
        self.expired: list[Parked] = []
        self.event = trio.Event()

    def answered(self, p, conn, res, err=None) -> bool:
        assert err is None and res[0] == 200 and res[2] == b"ok"
        self.answered_n += 1
        return False

    async def resume(self, p, expired: bool) -> None:
        assert expired
        self.expired.append(p)
        self.event.set()


async def test_parker_does_not_wake_for_answered_requests_deadlines():
    parker = Parker()
    pairs = [socket.socketpair() for _ in range(K + 1)]
    for a, _b in pairs:
        a.setblocking(False)
    dev = _Dev()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(parker.run, nursery)
            now = trio.current_time()
            parked = []
            for i, (a, _b) in enumerate(pairs):
                p = Parked(dev, HttpConn(RawStream(a)), 0, None, now, 0)
                # deadlines 20 ms apart: each would have been a pass of its own
                p.deadline = now + 0.3 + 0.02 * i
                parker.add(p)
                parked.append(p)
            for _a, b in pairs[:K]:               # all but the last answered at once
                b.send(ANSWER)
            with trio.fail_after(20):
                while dev.answered_n < K:
                    await trio.sleep(0.01)
            # the answered ones' deadlines were dropped from the heap's top before it slept
            assert [e[2] for e in parker.heap] == [parked[K]]
            before = parker.wakeups
            with trio.fail_after(20):
                await dev.event.wait()
            assert dev.expired == [parked[K]]     # the live deadline still fires, on time or later
            assert trio.current_time() >= parked[K].deadline
            assert parker.wakeups - before == 1   # K stale deadlines passed over
            assert parker.heap == []
            nursery.cancel_scope.cancel()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


class _Conn:
    """Stands in for a lean_serve connection that a parked Ping is woken on."""

    def __init__(self, woken: list):
        self.woken = woken

    def ping_woken(self, park) -> None:
        self.woken.append(park)


async def test_heartbeat_task_does_not_wake_for_pings_answered_early():
    sim = MailboxSimulator(corpus=None)
    woken: list = []
    parks = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sim._heartbeats)
        now = trio.current_time()
        for i in range(K + 1):
            dev = types.SimpleNamespace(parked=None)
            park = dev.parked = _Park(dev, ("1",))
            park.task = _Conn(woken)
            sim._expire_at(park, now + 0.3 + 0.02 * i)
            parks.append(park)
        for park in parks[:K]:                    # mail arrived: answered before their heartbeat
            sim._wake(park, ("1",))
        assert woken == parks[:K]
        # the first of them was what the task slept to: it sleeps to the live one now
        assert sim._timer.deadline == now + 0.3 + 0.02 * K
        before = sim.heartbeat_wakeups
        with trio.fail_after(20):
            while len(woken) < K + 1:
                await trio.sleep(0.02)
        assert woken[K] is parks[K] and parks[K].changed == ()     # Status 1: no changes
        assert sim.heartbeat_wakeups - before == 1
        assert sim._deadlines == []
        nursery.cancel_scope.cancel()


async def test_a_replaced_ping_still_expires_by_its_successor():
    """A newer Ping from the same device replaces the parked one: the old entry is stale,
    the new one's deadline is live and answered when it comes."""
    sim = MailboxSimulator(corpus=None)
    woken: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sim._heartbeats)
        now = trio.current_time()
        dev = types.SimpleNamespace(parked=None)
        old = dev.parked = _Park(dev, ("1",))
        old.task = _Conn(woken)
        sim._expire_at(old, now + 0.2)
        sim._wake(old, ())                         # replaced (as _ping does)
        new = dev.parked = _Park(dev, ("1",))
        new.task = _Conn(woken)
        sim._expire_at(new, now + 0.4)
        with trio.fail_after(20):
            while len(woken) < 2:
                await trio.sleep(0.02)
        assert woken == [old, new]
        assert trio.current_time() >= now + 0.4
        assert sim.heartbeat_wakeups == 1
        nursery.cancel_scope.cancel()


async def test_a_woken_ping_is_answered_by_the_delivery_itself():
    """lean_serve's Reactor writes a woken Ping's answer in the delivery's own call (it
    used to mark the socket writable and write it in the reactor's next pass: a loop
    pass of its own per woken Ping at real rates); the connection then reads on."""
    import base64

    from seg_fast.sim import fleet_eas as eas
    from seg_fast.sim import lean_serve

    sim = MailboxSimulator(seed=3, require_provisioning=False)
    auth = b"Basic " + base64.b64encode(b"user1:secret")
    body = eas.ping_body(300)
    request = (b"POST /Microsoft-Server-ActiveSync?Cmd=Ping&User=user1&DeviceId=D1&DeviceType=iPhone HTTP/1.1\r\n"
               b"Host: x\r\nMS-ASProtocolVersion: 14.1\r\nAuthorization: " + auth +
               b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lean_serve.serve, sim, "127.0.0.1", 0)
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        for round_ in range(2):
            await sock.send(request)
            with trio.fail_after(20):
                while sim.parked != 1:
                    await trio.sleep(0.01)
            written = sim.lean_answers
            sim.deliver("user1")                  # no checkpoint between this and the next line
            assert sim.lean_answers == written + 1 and sim.parked == 0
            got = b""
            with trio.fail_after(20):
                while not got.endswith(eas.encode(eas.E("Ping:Ping", eas.E("Ping:Status", 2), eas.E(
                        "Ping:Folders", eas.E("Ping:Folder", eas.INBOX))))):
                    got += await sock.recv(65536)
            assert got.startswith(b"HTTP/1.1 200 ")
            # a Sync would take the new mail; a Ping now finds it pending and is answered
            # at once, so take it away for the next round's Ping to park again
            sim.mailbox("user1").folder(eas.INBOX).clear()
        sock.close()
        nursery.cancel_scope.cancel()


async def test_parker_runs_the_schedule_when_due():
    """Fleet.drive's events run in the Parker's task, woken by its timerfd: in order, none
    before its time, ``events_done`` after the last; a parked request's deadline between
    them still fires."""
    parker = Parker()
    ran: list = []
    a, b = socket.socketpair()
    a.setblocking(False)
    dev = _Dev()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(parker.run, nursery)
            base = trio.current_time()
            events = [(0.05 + 0.01 * i, i, 0, "deliver") for i in range(K)]
            p = Parked(dev, HttpConn(RawStream(a)), 0, None, base, 0)
            p.deadline = base + 0.12                 # amid the events
            parker.add(p)
            parker.schedule(events, lambda e: ran.append((trio.current_time() - base, e)), base)
            with trio.fail_after(20):
                await parker.events_done.wait()
            assert [e for _t, e in ran] == events
            assert all(t >= e[0] for t, e in ran)
            with trio.fail_after(20):
                await dev.event.wait()
            assert dev.expired == [p] and trio.current_time() >= p.deadline
            # an empty schedule is done at once
            other = Parker()
            other.schedule([], None, base)
            assert other.events_done.is_set()
            other.ep.close()
            other.timer.close()
            nursery.cancel_scope.cancel()
    finally:
        a.close()
        b.close()
