"""The fleet's parked Pings: sockets in one epoll set per shard, no task per device.

- Parker alone, over real socket pairs: a socket that becomes readable starts its
  device's ``resume`` (not expired), one whose deadline passes starts it as expired,
  and nothing is started for a quiet socket before its deadline.
- A real shard in this process (fleet + mailbox simulator over loopback): with most
  devices parked the process runs far fewer trio tasks than devices, and every Ping
  the simulator released was read, checked byte for byte and followed by its Sync
  (every delivered message received, no failures).
"""
from __future__ import annotations

import socket
import time

import pytest
import trio

from seg_fast.sim import fleet as fleet_mod
from seg_fast.sim.fleet import Fleet, Go, Parked, Parker, PooledCorpus, ShardSpec
from seg_fast.sim.wire import HttpConn, RawStream


class _Dev:
    def __init__(self):
        self.calls: list[tuple[Parked, bool]] = []
        self.answers: list[tuple] = []
        self.event = trio.Event()

    async def resume(self, p: Parked, expired: bool) -> None:
        self.calls.append((p, expired))
        self.event.set()

    def answered(self, p: Parked, conn, res, err=None) -> bool:
        # a plain socket's answer is read by the Parker itself (HttpConn.poll_answer)
        self.answers.append((p, res, err))
        self.event.set()
        return False


async def test_parker_wakes_on_readable_and_on_deadline(monkeypatch):
    monkeypatch.setattr(fleet_mod, "PING_GRACE", 0.3)
    parker = Parker()
    pairs = [socket.socketpair() for _ in range(3)]
    for a, _b in pairs:
        a.setblocking(False)
    devs = [_Dev() for _ in pairs]
    async with trio.open_nursery() as nursery:
        await nursery.start(parker.run, nursery)
        now = trio.current_time()
        parked = []
        for (a, _b), dev, hb in zip(pairs, devs, (3600, 0, 3600)):
            p = Parked(dev, HttpConn(RawStream(a)), hb, None, now, 0)
            parker.add(p)
            parked.append(p)
        assert len(parker.by_fd) == 3
        # the answer arrives on the first, in two pieces: the Parker reads it
        # without a task and hands it to its device, whole
        pairs[0][1].send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        await trio.sleep(0.05)
        assert devs[0].answers == [] and list(parker.by_fd.values())[0] is parked[0]
        pairs[0][1].send(b"cde")
        with trio.fail_after(10):
            await devs[0].event.wait()
        assert devs[0].calls == []
        assert len(devs[0].answers) == 1
        got_p, (status, headers, body), err = devs[0].answers[0]
        assert got_p is parked[0] and err is None
        assert (status, headers[b"content-length"], body) == (200, b"5", b"abcde")
        # the second's deadline (heartbeat 0 + grace) passes with nothing said
        with trio.fail_after(10):
            await devs[1].event.wait()
        assert devs[1].calls == [(parked[1], True)]
        # the third is still parked, untouched, its socket still registered
        assert devs[2].calls == [] and list(parker.by_fd.values()) == [parked[2]]
        nursery.cancel_scope.cancel()
    for a, b in pairs:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def corpus():
    return PooledCorpus(11, pool=40)


DEVICES = 150


async def test_parked_devices_hold_no_task(corpus):
    from seg_fast.sim.mailbox import MailboxSimulator

    spec = ShardSpec(devices=DEVICES, seed=11, ramp=1.0, settle=1.0, hold=8.0, drain=20.0,
                     rate_scale=30.0, source_hosts=["127.0.0.1"])
    sim = MailboxSimulator(password=spec.password, seed=spec.seed, corpus=corpus,
                           initial_messages=fleet_mod.INITIAL_MESSAGES)
    fleet = Fleet(spec, sim)
    census: list[tuple[int, int]] = []

    def tasks() -> int:
        """The fleet's tasks (the simulator in this process keeps its own per connection)."""
        todo, n = [trio.lowlevel.current_root_task()], 0
        while todo:
            t = todo.pop()
            n += "sim.fleet." in t.name
            for nursery in t.child_nurseries:
                todo.extend(nursery.child_tasks)
        return n

    async def watch():
        # through the run: how many devices are parked, how many fleet tasks exist
        while not fleet.stopping:
            census.append((fleet.stats.parked, tasks()))
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        t0 = time.time() + 0.2
        fleet.clock = fleet_mod.Clock(t0)          # run() sets the same one
        nursery.start_soon(watch)
        result = await fleet.run(Go(host="127.0.0.1", port=port, t0=t0))
        nursery.cancel_scope.cancel()
    assert result["failures"] == {}, result["failure_samples"]
    assert result["ready"] == DEVICES
    # Pings were released by mail and resumed: every delivered message was synced
    assert result["pings_changes"] > 20
    assert result["received"] == result["delivered"]
    assert result["byte_checked"] > 0
    # the steady-state cycle ran in the Parker: every released Ping's answer and most
    # of the Syncs after them read there, not by a task per request
    assert result["polled"] >= result["pings_changes"], result
    # when most of the fleet was parked there were far fewer fleet tasks than parked
    # devices (a task per parked Ping would make it at least as many); on a loaded
    # machine the ramp may still run at the end, hence "most", not "all"
    busiest = max(census)
    assert busiest[0] >= DEVICES // 2, census
    assert busiest[1] < busiest[0] // 2, census
