"""The fleet's parked Pings: sockets in one epoll set per shard, no task per device.

- Parker alone, over real socket pairs: a socket that becomes readable starts its
  device's ``resume`` (not expired), one whose deadline passes starts it as expired,
  and nothing is started for a quiet socket before its deadline.
- A real shard in this process (fleet + mailbox simulator over loopback): with most
  devices parked the process runs far fewer trio tasks than devices, and every Ping
  the simulator released was read, checked byte for byte and followed by its Sync
  (every delivered message received, no failures).
- The same over TLS 1.3 (wire.TlsStream: OpenSSL's socket BIO on the bare socket):
  the Parker reads a TLS answer where the socket turns readable; a TLS shard's every
  Ping answer is read by the poller, answers byte-checked, later connections resume
  the device's session (``session_reused``); a TLS peer that sends garbage, closes
  mid-answer or answers with no HTTP gives the device a recorded failure, not a hang.
"""
from __future__ import annotations

import functools
import socket
import ssl
import time

import pytest
import trio
import trustme

from seg_fast.sim import fleet as fleet_mod
from seg_fast.sim.fleet import Fleet, Go, Parked, Parker, PooledCorpus, ShardSpec
from seg_fast.sim import lean_serve
from seg_fast.sim.wire import SERVER_NAME, HttpConn, RawStream, TlsStream, WireError
from test_sizing_wire import _tls_pair


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


def _shard(corpus, devices: int, hold: float):
    """A fleet shard's simulator and devices in this process, time compressed 30x."""
    from seg_fast.sim.mailbox import MailboxSimulator

    spec = ShardSpec(devices=devices, seed=11, ramp=1.0, settle=1.0, hold=hold, drain=20.0,
                     rate_scale=30.0, source_hosts=["127.0.0.1"])
    sim = MailboxSimulator(password=spec.password, seed=spec.seed, corpus=corpus,
                           initial_messages=fleet_mod.INITIAL_MESSAGES)
    return sim, Fleet(spec, sim)


async def test_parked_devices_hold_no_task(corpus):
    sim, fleet = _shard(corpus, DEVICES, 8.0)
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
    assert fleet.parker.polled_pings == result["pings_changes"] + result["pings_idle"], result
    # when most of the fleet was parked there were far fewer fleet tasks than parked
    # devices (a task per parked Ping would make it at least as many); on a loaded
    # machine the ramp may still run at the end, hence "most", not "all"
    busiest = max(census)
    assert busiest[0] >= DEVICES // 2, census
    assert busiest[1] < busiest[0] // 2, census


# -- TLS ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(server context, client context, CA file) for the benchmark's server name."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    ca.issue_cert(SERVER_NAME).configure_cert(server)
    client = ssl.create_default_context()
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    ca.configure_trust(client)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server, client, str(ca_file)


async def test_parker_reads_tls_answers_and_their_failures():
    parker = Parker()
    pairs = [_tls_pair() for _ in range(3)]            # TLS 1.3 over socket pairs, handshaken
    devs = [_Dev() for _ in pairs]
    async with trio.open_nursery() as nursery:
        await nursery.start(parker.run, nursery)
        now = trio.current_time()
        parked = []
        for (client, _s, _a, _b), dev in zip(pairs, devs):
            p = Parked(dev, HttpConn(client), 3600, None, now, 0)
            parker.add(p)
            parked.append(p)
        # an answer in two records, the second a while later: read by the Parker, whole
        server = pairs[0][1]
        server.ssl.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        await trio.sleep(0.05)
        assert devs[0].answers == []
        server.ssl.write(b"cde")
        # bytes that are no TLS record; a TLS answer cut short by the peer's close
        pairs[1][3].send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        pairs[2][1].ssl.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nabc")
        pairs[2][3].close()
        for dev in devs:
            with trio.fail_after(10):
                await dev.event.wait()
        nursery.cancel_scope.cancel()
    assert [d.calls for d in devs] == [[], [], []]          # no waiting task for any
    (got_p, (status, _h, body), err), = devs[0].answers
    assert (got_p, status, body, err) == (parked[0], 200, b"abcde", None)
    (got_p, res, err), = devs[1].answers
    assert got_p is parked[1] and res is None and isinstance(err, ssl.SSLError)
    (got_p, res, err), = devs[2].answers
    assert got_p is parked[2] and res is None and isinstance(err, WireError)
    assert parker.by_fd == {}
    for _c, _s, a, b in pairs:
        a.close()
        b.close()


async def test_tls_shard_cycle_in_the_poller(corpus, tls):
    # the direct path's TLS: devices speak TLS 1.3 to the shard's simulator port
    devices = 60
    sim, fleet = _shard(corpus, devices, 6.0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(lean_serve.serve, sim, "127.0.0.1", 0,
                                                     ssl_context=tls[0]))
        t0 = time.time() + 0.2
        result = await fleet.run(Go(host="127.0.0.1", port=port, t0=t0, tls_ca=tls[2]))
        nursery.cancel_scope.cancel()
    assert result["failures"] == {}, result["failure_samples"]
    assert result["ready"] == devices and result["pings_changes"] > 10
    assert result["received"] == result["delivered"] and result["byte_checked"] > 0
    # every Ping answer (each one checked byte for byte) was read by the poller, none by
    # a waiting task; and most Syncs after them
    assert fleet.parker.polled_pings == result["pings_changes"] + result["pings_idle"], result
    assert result["polled"] > fleet.parker.polled_pings
    # one handshake per connection; the later ones (foreground work) resumed the
    # device's session: OpenSSL's own session_reused said so
    assert result["tls_handshakes"] > devices and result["tls_resumed"] > 0, result
    assert result["tls_resumed"] >= (result["tls_handshakes"] - devices) // 2, result


async def _hostile_tls_server(tls, bad: str, task_status=trio.TASK_STATUS_IGNORED):
    """Accepts one TLS connection, reads the request and then misbehaves."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    ls.setblocking(False)
    task_status.started(ls.getsockname()[1])
    try:
        await trio.lowlevel.wait_readable(ls)
        sock, _ = ls.accept()
        sock.setblocking(False)
        stream = TlsStream(sock, tls[0], server_side=True)
        got = b""
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some()
        if bad == "garbage":
            sock.send(bytes(range(7, 200)))                  # no TLS record
        elif bad == "cut":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nWBXML")
            sock.close()                                       # mid-answer, no close_notify
            return
        else:
            await stream.send_all(b"SMTP/1.0 250 hello\r\n\r\n")   # TLS fine, no HTTP
        await trio.sleep_forever()                             # and holds the connection open
    finally:
        ls.close()


@pytest.mark.parametrize("bad", ["garbage", "cut", "no-http"])
async def test_misbehaving_tls_peer_is_a_recorded_failure(tls, bad):
    from seg_fast.sim.mailbox import MailboxSimulator

    spec = ShardSpec(devices=1, seed=11, source_hosts=["127.0.0.1"])
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=0, require_provisioning=False)
    fleet = Fleet(spec, sim)
    dev = fleet.devices[0]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_hostile_tls_server, tls, bad)
        fleet.go = Go(host="127.0.0.1", port=port, t0=time.time(), tls_ca=tls[2])
        fleet.clock = fleet_mod.Clock(fleet.go.t0)
        fleet.strict, fleet.tls = True, tls[1]
        await nursery.start(fleet.parker.run, nursery)
        conn = await dev._connect("Ping")
        assert type(conn.stream) is TlsStream and fleet.stats.tls_handshakes == 1
        assert await dev.park(conn, 600)                       # sent, parked on the poller
        with trio.fail_after(20):                              # a failure, not a wait
            while not fleet.stats.failures:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert list(fleet.stats.failures) == ["Ping.connection"], fleet.stats.failure_samples
    assert not dev.alive and fleet.stats.parked == 0 and fleet.parker.by_fd == {}
    expected = {"garbage": "SSLError", "cut": "WireError", "no-http": "WireError"}[bad]
    assert expected in fleet.stats.failure_samples[0], fleet.stats.failure_samples


async def test_simulator_port_answered_in_the_pollers_step(corpus, monkeypatch):
    # a shard's simulator port (lean_serve.Reactor) joins the Parker's epoll set while the
    # fleet runs: its requests are answered in the poller's step, never by its own task
    # meanwhile; once the fleet stops the port is its own task's again and still answers
    where: list[tuple[str, bool]] = []
    step = lean_serve.Reactor.step

    def counted(self):
        where.append((trio.lowlevel.current_task().name.rsplit(".", 2)[-2], self.hooked is not None))
        return step(self)

    monkeypatch.setattr(lean_serve.Reactor, "step", counted)
    devices = 40
    sim, fleet = _shard(corpus, devices, 4.0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lean_serve.serve, sim, "127.0.0.1", 0)
        reactor, = sim.lean_reactors
        t0 = time.time() + 0.2
        result = await fleet.run(Go(host="127.0.0.1", port=port, t0=t0))
        assert result["failures"] == {}, result["failure_samples"]
        assert result["ready"] == devices and result["received"] == result["delivered"] > 0
        in_poller = [hooked for task, hooked in where if task == "Parker"]
        assert len(in_poller) > devices and all(in_poller)
        assert not [1 for task, hooked in where if task != "Parker" and hooked]
        # let go: the port's own task serves it again
        assert reactor.hooked is None and not fleet.parker.attached
        before = len(where)
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"OPTIONS /Microsoft-Server-ActiveSync HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 ")
            await stream.aclose()
        assert [task for task, _ in where[before:]] and "Parker" not in [task for task, _ in where[before:]]
        nursery.cancel_scope.cancel()
    assert sim.lean_reactors == []
