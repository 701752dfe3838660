"""The sizing instrument's own failures on the direct path (fleet -> simulator, no proxy).

A run whose direct path records a failure says "the fleet or simulator is wrong" and
claims nothing. Overloaded development runs showed two kinds that were neither:

- **GetItemEstimate Status 4.** A foreground GetItemEstimate waits on the device's
  SyncKey lock behind a Sync; that Sync is abandoned after the simulator answered it
  (the run stops and cancels it, or the device gives up after a failure), the lock
  goes to the estimate, and it names the SyncKey the simulator has moved past. A
  phone that is switched off or gone sends nothing more: the estimate is not sent.
- **Sync.lost** counted every device still short of its mail when the drain ended,
  though most were waiting on their own request (a Sync sent, a Ping's answer not
  read yet) within its deadline: late, not answered wrongly. The fleet now sorts them
  at the stop (``behind_at_stop``) and keeps ``Sync.lost`` for a device whose Ping
  the simulator holds parked although the device is short of mail (a lost wake-up);
  the verdict calls the first the load side's limit on the direct path.

Each mechanism is reproduced here with a real simulator over loopback and real
fleet devices, ordered by events (the simulator's answer tap, the lock's queue),
not by sleeps.
"""
from __future__ import annotations

import socket
import ssl
import time

import pytest
import trio

from seg_fast.sim import fleet as fleet_mod
from seg_fast.sim import lean_serve, sizing
from seg_fast.sim.fleet import Clock, Fleet, Go, PooledCorpus, ShardSpec
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.oracle import Opener
from seg_fast.sim.state import INBOX
from seg_fast.sim.wire import HttpConn, RawStream


@pytest.fixture(scope="module")
def corpus():
    return PooledCorpus(11, pool=40)


async def _shard(nursery, corpus, devices: int = 1) -> tuple[Fleet, MailboxSimulator]:
    """A fleet and its simulator (served as a sizing shard serves it), ready as
    ``Fleet.run`` makes it, without the schedule."""
    spec = ShardSpec(devices=devices, seed=11, source_hosts=["127.0.0.1"])
    sim = MailboxSimulator(password=spec.password, seed=spec.seed, corpus=corpus,
                           initial_messages=fleet_mod.INITIAL_MESSAGES)
    port = await nursery.start(lean_serve.serve, sim, "127.0.0.1", 0)
    fleet = Fleet(spec, sim)
    fleet.go = Go(host="127.0.0.1", port=port, t0=time.time())
    fleet.opener = Opener("", "")
    fleet.strict, fleet.security, fleet.tls = True, False, None
    fleet.clock = Clock(fleet.go.t0)
    return fleet, sim


async def _set_up(dev):
    conn = await dev._connect("setup")
    assert conn is not None and await dev.setup(conn), dev.fleet.stats.failure_samples
    dev.ready.set()
    return conn


async def _one_device_with_new_mail(nursery, corpus):
    """A shard of one device, set up, with one message delivered and not synced yet."""
    fleet, sim = await _shard(nursery, corpus)
    dev = fleet.devices[0]
    conn = await _set_up(dev)
    dev.delivered += 1
    sim.deliver(dev.user)
    return fleet, sim, dev, conn


def _estimate_key(dev) -> str:
    """A foreground ``misc`` key that makes this device send GetItemEstimate."""
    k = next(k for k in range(3) if fleet_mod.eas._MISC[(dev.idx + k) % 3] == "GetItemEstimate")
    return f"{dev.idx}:m{k}"


async def _queued(lock, n: int) -> None:
    with trio.fail_after(20):
        while lock.lot.statistics().tasks_waiting < n:
            await trio.sleep(0.01)


async def _estimate_behind_an_abandoned_sync(corpus, abandon: str) -> tuple[Fleet, object, object]:
    """A device Syncs with a GetItemEstimate queued behind it on the SyncKey lock; the
    simulator answers the Sync and, as it does (its answer tap), the Sync is
    abandoned: ``stop`` as Fleet.run stops a run (stopping, then its tasks
    cancelled), ``fail`` as a damaged answer fails it. Returns the fleet, the device
    and the simulator's record of the device's Inbox sync state."""
    async with trio.open_nursery() as nursery:
        fleet, sim, dev, conn = await _one_device_with_new_mail(nursery, corpus)
        scope = trio.CancelScope()
        tap = sim.answer_tap

        def abandoning_tap(seq, answer, late=0.0):
            out = tap(seq, answer, late)
            if seq.startswith(b"Sync."):
                if abandon == "stop":
                    fleet.stopping = True
                    scope.cancel()
                else:                     # one byte changed on the way: a failed Sync
                    body = bytearray(out.body)
                    body[len(body) // 2] ^= 1
                    out = type(out)(out.status, out.headers, bytes(body))
            return out

        sim.answer_tap = abandoning_tap
        done = trio.Event()

        async def syncing():
            with scope:
                await dev.sync(conn)

        async def estimate():
            await dev.foreground("misc", _estimate_key(dev))
            done.set()

        # hold the lock so that the Sync, then the estimate, queue on it in that order
        assert dev.sync_lock.try_acquire()
        nursery.start_soon(syncing)
        await _queued(dev.sync_lock, 1)
        nursery.start_soon(estimate)
        await _queued(dev.sync_lock, 2)
        dev.sync_lock.release()
        with trio.fail_after(20):
            await done.wait()
        await conn.aclose()
        nursery.cancel_scope.cancel()
    held = sim.mailbox(dev.user).devices[dev.device_id].sync[INBOX]
    return fleet, dev, held


async def test_an_estimate_queued_behind_a_sync_the_stop_abandoned_is_not_sent(corpus):
    fleet, dev, held = await _estimate_behind_an_abandoned_sync(corpus, "stop")
    # the scene was real: the simulator answered the Sync, the device never read it
    assert str(held.key) != dev.sync_key and str(held.prev_key) == dev.sync_key
    # ... and the estimate behind it was not sent with that stale key (it was: Status 4)
    st = fleet.stats
    assert st.failures == {}, st.failure_samples
    assert st.requests.get("GetItemEstimate", 0) == 0


async def test_an_estimate_queued_behind_a_failed_sync_is_not_sent(corpus):
    fleet, dev, held = await _estimate_behind_an_abandoned_sync(corpus, "fail")
    assert str(held.key) != dev.sync_key
    st = fleet.stats
    # the damaged answer is the one failure; the device is gone, and its estimate with it
    assert dict(st.failures) == {"Sync.bytes": 1}, st.failure_samples
    assert not dev.alive
    assert st.requests.get("GetItemEstimate", 0) == 0


async def test_an_estimate_after_a_good_sync_is_sent_and_answered(corpus):
    # the control: nothing abandoned, the estimate goes out with the current key
    async with trio.open_nursery() as nursery:
        fleet, _sim, dev, conn = await _one_device_with_new_mail(nursery, corpus)
        assert await dev.sync(conn)
        await dev.foreground("misc", _estimate_key(dev))
        await conn.aclose()
        nursery.cancel_scope.cancel()
    st = fleet.stats
    assert st.failures == {}, st.failure_samples
    assert st.requests["GetItemEstimate"] == 1 and dev.alive


async def test_devices_behind_at_the_stop_are_late_and_a_lost_wake_up_is_a_failure(corpus, monkeypatch):
    """Three devices short of their mail when the run stops: one whose Ping's answer
    the simulator sent and the device has not read (the load side is late), one with a
    Sync sent and unanswered (late), one whose Ping the simulator holds parked because
    it never woke it (a lost delivery: the one failure)."""
    async with trio.open_nursery() as nursery:
        fleet, sim = await _shard(nursery, corpus, devices=3)
        unread, syncing, forgotten = fleet.devices
        conns = [await _set_up(d) for d in fleet.devices]
        # the Parker is not running: parked answers stay unread, as on a starved load core
        fleet.parker.nursery = nursery
        for dev in (unread, forgotten):
            assert await dev.park(conns[dev.idx], fleet_mod.HEARTBEAT)
        held = {d: sim.mailbox(d.user).devices[d.device_id] for d in fleet.devices}
        with trio.fail_after(20):
            while held[unread].parked is None or held[forgotten].parked is None:
                await trio.sleep(0.01)
        # 1: delivered; the simulator wakes the Ping and records its answer (tap)
        unread.delivered += 1
        sim.deliver(unread.user)
        assert held[unread].parked is None
        with trio.fail_after(20):
            while not any(s.startswith(b"Ping.") for s in fleet.sent):
                await trio.sleep(0.01)
        # 2: delivered; its Sync goes to a server that has not answered yet
        syncing.delivered += 1
        sim.deliver(syncing.user)
        a, b = socket.socketpair()
        a.setblocking(False)
        nursery.start_soon(syncing.sync, HttpConn(RawStream(a)))
        with trio.fail_after(20):
            await trio.lowlevel.wait_readable(b)       # the Sync request arrived
        assert syncing.state == "sync"
        # 3: the simulator loses the wake-up: delivered, its Ping stays parked
        monkeypatch.setattr(sim, "_notify", lambda mbox: None)
        forgotten.delivered += 1
        sim.deliver(forgotten.user)
        assert held[forgotten].parked is not None

        fleet.census_at_stop(foreground=2)
        fleet.stopping = True
        result = fleet.result()
        await fleet.parker.close()
        nursery.cancel_scope.cancel()
    for c in conns:
        await c.aclose()
    b.close()
    assert result["behind_at_stop"] == {"ping answered, answer unread": 1, "sync": 1,
                                        "foreground request": 2}
    assert result["failures"] == {"Sync.lost": 1}, result["failure_samples"]
    assert forgotten.device_id in result["failure_samples"][0]


def _path(name: str, behind: dict, failures: dict | None = None) -> dict:
    return {"path": name, "devices": 100, "ready": 100, "ready_late_s": 0.0,
            "failures": failures or {}, "failure_samples": [], "latency_raw": {"Sync": {"a": 1.0}},
            "latency_ms": {"Sync": {"p50": 1.0, "p99": 1.0}}, "behind_at_stop": behind,
            "server": {"cpu_s": 10.0, "cpu_share": 0.1, "rss_kib_max": 1000, "rss_kib_idle": 500,
                       "runqueue_wait": 0.0, "died": False},
            "load": {"cpu_share": 0.2, "core_busy": 0.2, "runqueue_wait": 0.0, "gateway_core_busy": 0.3,
                     "lag_p99": 0.0, "lag_max": 0.0, "fds_max": 10, "fd_limit": 20000, "conn_errors": 0}}


def test_the_verdict_calls_devices_behind_on_the_direct_path_the_load_side_limit():
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    late = {"sync": 914, "ping answered, answer unread": 3, "foreground request": 2}
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", late),
                                                 "gateway": _path("gateway", {})}}, opts)
    assert not v["meets"] and v["broke"] == []
    why = [x for x in v["invalid"] if x.startswith("direct:")]
    assert why == ["direct: 917 devices had not synced all their mail (3 ping answered, answer unread, "
                   "914 sync) and 2 foreground requests were still running when the drain ended, each "
                   "within its own deadline: the load side fell behind (not a wrong answer); fewer "
                   "devices, or a longer --drain"]
    assert not any("the fleet or simulator is wrong" in x for x in v["invalid"])
    # a real failure on the direct path still says so
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", {}, {"Sync.lost": 1}),
                                                 "gateway": _path("gateway", {})}}, opts)
    assert any("the fleet or simulator is wrong" in x for x in v["invalid"])


def test_devices_left_waiting_through_the_gateway_break_the_service_level():
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", {}),
                                                 "gateway": _path("gateway", {"ping not yet answered": 4})}},
                     opts)
    assert v["broke"] == ["gateway: 4 devices had not synced all their mail (4 ping not yet answered) "
                          "when the drain ended, each within its own deadline"]
    assert not v["meets"]


def _overloaded(p: dict) -> dict:
    p["load"].update(lag_p99=3.8, lag_max=4.3)
    return p


def test_direct_timeouts_of_an_overloaded_load_side_are_its_limit_not_wrong_answers():
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    gave_up = {"Sync.timeout": 3, "Provision.connect-timeout": 2}
    v = sizing.judge({"devices": 100, "paths": {
        "direct": _overloaded(_path("direct", {}, dict(gave_up))), "gateway": _path("gateway", {})}}, opts)
    direct = [x for x in v["invalid"] if x.startswith("direct:")]
    assert any("load side fell behind schedule" in x for x in direct)
    assert any(x.startswith("direct: 5 requests gave up at their own deadline") and "load side's limit" in x
               and "its schedule ran up to 4.3s late" in x for x in direct), direct
    assert not any("the fleet or simulator is wrong" in x for x in direct)
    # the same timeouts with the load side on schedule: nothing excuses them
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", {}, dict(gave_up)),
                                                 "gateway": _path("gateway", {})}}, opts)
    assert [x for x in v["invalid"] if x.startswith("direct:")] == [
        "direct: 5 failures without any proxy (Provision.connect-timeout, Sync.timeout): "
        "the fleet or simulator is wrong"]
    # a wrong answer is wrong however late the load side ran
    v = sizing.judge({"devices": 100, "paths": {
        "direct": _overloaded(_path("direct", {}, {"Sync.timeout": 1, "GetItemEstimate.status": 1})),
        "gateway": _path("gateway", {})}}, opts)
    direct = [x for x in v["invalid"] if x.startswith("direct:")]
    assert "direct: 1 failures without any proxy (GetItemEstimate.status): the fleet or simulator is wrong" in direct
    assert any(x.startswith("direct: 1 requests gave up") for x in direct)


async def test_a_connection_not_made_in_time_is_told_from_one_refused(corpus, monkeypatch):
    """A device whose TLS handshake the server never answers (the kernel queued the
    connection, nobody served it: what a starved shard does to its own devices on the
    direct path) records ``.connect-timeout``; a refused connection stays ``.connect``."""
    monkeypatch.setattr(fleet_mod, "CONNECT_TIMEOUT", 0.3)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                          # connections queue in the kernel, never accepted
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))            # bound, not listening: connections are refused
    async with trio.open_nursery() as nursery:
        fleet, _sim = await _shard(nursery, corpus)
        dev = fleet.devices[0]
        fleet.tls = ssl.create_default_context()
        fleet.go = Go(host="127.0.0.1", port=silent.getsockname()[1], t0=fleet.go.t0)
        assert await dev._connect("Provision") is None
        fleet.go = Go(host="127.0.0.1", port=closed.getsockname()[1], t0=fleet.go.t0)
        assert await dev._connect("Ping") is None
        nursery.cancel_scope.cancel()
    silent.close()
    closed.close()
    assert dict(fleet.stats.failures) == {"Provision.connect-timeout": 1, "Ping.connect": 1}
    assert "ConnectionRefusedError" in fleet.stats.failure_samples[1]
