"""ownepoll.OwnEpoll: a task's own epoll set as the process's sleep.

- Its own sockets wake it without a pass of trio's scheduler: a byte bounced N times
  between a thread and the task costs trio no I/O wait while the task sleeps in its set,
  and at least one each when the same task waits through trio.
- trio is not starved: another task's deadline and another task's socket wake while the
  task sleeps in its set.
- One sleeper per trio run; a second waits through trio, and both get their events.
"""
from __future__ import annotations

import select
import socket
import threading

import trio

from seg_fast.ownepoll import OwnEpoll


class _IoWaits(trio.abc.Instrument):
    def __init__(self):
        self.n = 0

    def before_io_wait(self, timeout):
        self.n += 1


def _bouncer(sock: socket.socket, rounds: int, acks: threading.Semaphore) -> threading.Thread:
    """A thread that writes a byte, waits for the task to have read it, ``rounds`` times."""
    def run():
        for _ in range(rounds):
            sock.send(b"x")
            if not acks.acquire(timeout=30):
                return
    return threading.Thread(target=run, daemon=True)


async def _bounce(enabled: bool, rounds: int = 40) -> tuple[int, bool]:
    a, b = socket.socketpair()
    a.setblocking(False)
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    acks = threading.Semaphore(0)
    waits = _IoWaits()
    done = trio.Event()
    here = []

    async def sleeper():
        own = OwnEpoll(ep, enabled)
        here.append(own.here)
        got = 0
        try:
            while got < rounds:
                events, to_trio = await own.poll()
                for fd, _mask in events:
                    if fd == a.fileno():
                        got += len(a.recv(64))
                        acks.release()
                    elif fd == own.fd:
                        to_trio = True
                if to_trio:
                    await trio.lowlevel.checkpoint()
        finally:
            own.close()
            done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            await trio.sleep(0)                      # the sleeper is set up
            trio.lowlevel.add_instrument(waits)
            thread = _bouncer(b, rounds, acks)
            thread.start()
            with trio.fail_after(30):
                await done.wait()
            trio.lowlevel.remove_instrument(waits)
        thread.join(5)
    finally:
        ep.close()
        a.close()
        b.close()
    return waits.n, here[0]


async def test_its_own_sockets_wake_it_without_trios_scheduler():
    rounds = 40
    through_trio, here = await _bounce(False, rounds)
    assert not here
    assert through_trio >= rounds - 1                # a trio I/O wait per byte
    own, here = await _bounce(True, rounds)
    assert here
    # (the first bytes may land while trio still waits: the task is set up in the same step)
    assert own <= rounds // 4, (own, through_trio)


async def test_trio_deadlines_and_io_still_run_while_it_sleeps():
    ep = select.epoll()
    a, b = socket.socketpair()
    a.setblocking(False)
    stop = trio.Event()

    async def sleeper(task_status=trio.TASK_STATUS_IGNORED):
        own = OwnEpoll(ep)
        assert own.here
        task_status.started()
        try:
            while not stop.is_set():
                events, to_trio = await own.poll()
                if to_trio or any(fd == own.fd for fd, _ in events):
                    await trio.lowlevel.checkpoint()
        finally:
            own.close()

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(sleeper)
                t0 = trio.current_time()
                await trio.sleep(0.05)               # a deadline of trio's: the sleep ends for it
                assert trio.current_time() - t0 >= 0.05
                # a socket of trio's, written from a thread: trio's descriptor wakes the sleeper
                threading.Timer(0.05, b.send, (b"y",)).start()
                await trio.lowlevel.wait_readable(a)
                assert a.recv(8) == b"y"
                stop.set()
                nursery.cancel_scope.cancel()
    finally:
        ep.close()
        a.close()
        b.close()


async def test_one_sleeper_per_run():
    ep1, ep2, ep3 = select.epoll(), select.epoll(), select.epoll()
    try:
        first = OwnEpoll(ep1)
        second = OwnEpoll(ep2)
        assert first.here and not second.here and second.fd == -1
        # the second waits through trio: its set's events still reach it
        a, b = socket.socketpair()
        with a, b:
            ep2.register(a.fileno(), select.EPOLLIN)
            b.send(b"z")
            with trio.fail_after(10):
                events, to_trio = await second.poll()
            assert [fd for fd, _ in events] == [a.fileno()] and not to_trio
        first.close()
        third = OwnEpoll(ep3)
        assert third.here
        third.close()
        assert not OwnEpoll(ep3, enabled=False).here
    finally:
        for ep in (ep1, ep2, ep3):
            ep.close()
