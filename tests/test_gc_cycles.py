"""No stop-the-world pauses: reference counting alone frees what a connection used.

A worker raises the generation-2 threshold so a full collection never runs in steady
state (proxy/gcpause.py); a reference cycle per request or per parked Ping would then
be memory that only a full collection could free. These tests run real traffic
through an in-process gateway with the collector off, then ask the collector (with
DEBUG_SAVEALL) what it would have had to free: nothing of seg_fast, h11 or trio.
The drain test parks a few thousand Pings and checks a sliced drain answers each.
"""
from __future__ import annotations

import collections
import gc

import h11
import trio

from proxy_helpers import Client, fixture_answer
from seg_fast.config import load_config
from seg_fast.hooks import AllowAll
from seg_fast.proxy import gcpause, ping
from seg_fast.proxy.gateway import Gateway
from seg_fast.proxy.looplag import LoopLag
from test_proxy import AUTH, EAS, QUERY, _env, _send_ping, gateway, upstream

OURS = ("seg_fast", "h11", "trio", "socket", "ssl")


def _describe(obj) -> str | None:
    """``module.type`` (code location for frames and coroutines) if it is one of ours."""
    code = getattr(obj, "f_code", None) or getattr(obj, "cr_code", None)
    if code is not None:
        where = code.co_filename
        return f"frame {where.rsplit('/', 2)[-2:]}:{code.co_name}" if any(
            f"/{m}/" in where for m in OURS) else None
    module = type(obj).__module__ or ""
    if module.split(".", 1)[0] in OURS:
        return f"{module}.{type(obj).__qualname__}"
    return None


class CyclicGarbage:
    """Collector off for the block; then what a collection would free, of ours."""

    def __enter__(self):
        gc.collect()
        gc.disable()
        return self

    def found(self) -> collections.Counter:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            kinds = collections.Counter(d for d in map(_describe, gc.garbage) if d)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        return kinds

    def __exit__(self, *exc):
        gc.enable()


async def _wait(predicate, timeout=20.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_requests_and_parked_pings_leave_no_cycles(tmp_path):
    n = 25
    release = trio.Event()

    async def handler(req, body):
        if b"DeviceId=Gone" in req.target:
            await trio.sleep_forever()
        if b"Cmd=Ping" in req.target:
            await release.wait()
        return fixture_answer("fsync")

    async with upstream(handler) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        warm = await Client.connect(gw.port)          # first-use caches are not per-connection objects
        await warm.request(b"POST", EAS + QUERY, [AUTH], b"x")
        await warm.aclose()
        await _wait(lambda: gw.active == 0)
        with CyclicGarbage() as garbage:
            for _ in range(n):                          # keep-alive requests on fresh connections
                dev = await Client.connect(gw.port)
                for _ in range(3):
                    resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
                    assert resp.status_code == 200 and body == fixture_answer("fsync")[2]
                await dev.aclose()
            answered = [await Client.connect(gw.port) for _ in range(n)]
            for i, dev in enumerate(answered):
                await _send_ping(dev, f"P{i}")
            gone = [await Client.connect(gw.port) for _ in range(n)]
            for i, dev in enumerate(gone):
                await _send_ping(dev, f"Gone{i}")
            await _wait(lambda: gw.parking.count == 2 * n)       # parked: no task holds them
            release.set()                                      # the mail server answers n of them
            for dev in answered:
                resp, _ = await dev.read_answer()
                assert resp.status_code == 200
                await dev.aclose()
            for dev in gone:                                   # the other n devices leave
                await dev.aclose()
            await _wait(lambda: gw.active == 0 and gw.parking.count == 0)
            await trio.sleep(0.05)                             # the closing tasks' last steps
            found = garbage.found()
    assert not found, found.most_common(20)


async def _error_traffic(tmp_path, send) -> collections.Counter:
    async def handler(req, body):
        if b"Cmd=Ping" in req.target:
            await trio.sleep_forever()
        return fixture_answer("fsync")

    async with upstream(handler) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                 timeouts_ping_margin="0.05",
                                                 timeouts_ping_default_heartbeat="0.05") as gw:
        warm = await Client.connect(gw.port)
        await warm.request(b"POST", EAS + QUERY, [AUTH], b"x")
        await warm.aclose()
        await _wait(lambda: gw.active == 0)
        with CyclicGarbage() as garbage:
            for i in range(10):
                await send(gw, i)
            await _wait(lambda: gw.active == 0 and gw.parking.count == 0)
            await trio.sleep(0.05)
            return garbage.found()


async def test_failed_requests_leave_no_cycles(tmp_path):
    # A parked Ping past its deadline (503) and a device that leaves in the middle of its head.
    async def send(gw, i):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
        await stream.aclose()
        dev = await Client.connect(gw.port)
        await _send_ping(dev, f"T{i}")
        resp, _ = await dev.read_answer()
        assert resp.status_code == 503
        await dev.aclose()

    found = await _error_traffic(tmp_path, send)
    assert not found, found.most_common(20)


async def test_malformed_requests_leave_no_cycles(tmp_path):
    async def send(gw, i):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 400 ")
        await stream.aclose()

    found = await _error_traffic(tmp_path, send)
    assert not found, found.most_common(20)


async def test_a_drained_gateway_leaves_no_cycles(tmp_path):
    async def park(req, body):
        await trio.sleep_forever()

    async with upstream(park) as up:
        config = load_config(None, env=_env(f"http://127.0.0.1:{up.port}", tmp_path / "tx.jsonl"))
        gw = Gateway(config, gatekeeper_factory=lambda c: AllowAll())
        with CyclicGarbage() as garbage:
            async with trio.open_nursery() as nursery:
                await nursery.start(gw.serve)
                devs = [await Client.connect(gw.port) for _ in range(20)]
                for i, dev in enumerate(devs):
                    await _send_ping(dev, f"D{i}")
                await _wait(lambda: gw.parking.count == 20)
                gw.drain()
                for dev in devs:
                    resp, body = await dev.read_answer()
                    assert resp.status_code == 200 and body == ping.HEARTBEAT_EXPIRED
                    await dev.aclose()
            # serve() returned by itself once drained.
            found = garbage.found()
    assert not found, found.most_common(20)


async def test_drain_of_thousands_of_parked_pings_answers_every_one(tmp_path):
    n = 1500
    answers = []

    async def park(req, body):
        await trio.sleep_forever()

    async def device(stream):
        conn = h11.Connection(h11.CLIENT)          # the Ping went out raw: put h11 where it would be
        conn.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"gw"), (b"Content-Length", b"0")]))
        conn.send(h11.EndOfMessage())
        status, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
            elif type(event) is h11.Response:
                status = event.status_code
            elif type(event) is h11.Data:
                body += event.data
            else:
                break
        answers.append((status, body))
        await stream.aclose()

    request = h11.Connection(h11.CLIENT).send(h11.Request(
        method=b"POST", target=EAS + b"?Cmd=Ping&User=test&DeviceId=D&DeviceType=B",
        headers=[(b"Host", b"gw"), AUTH, (b"Content-Length", b"0")]))
    old_threshold = gc.get_threshold()
    async with upstream(park) as up:
        config = load_config(None, env=_env(f"http://127.0.0.1:{up.port}", tmp_path / "tx.jsonl"))
        gw = Gateway(config, gatekeeper_factory=lambda c: AllowAll())
        gcpause.tune()                                 # as run_worker does after start-up
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(gw.serve)
                streams = []
                for _ in range(n):
                    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                    await stream.send_all(request)
                    streams.append(stream)
                await _wait(lambda: gw.parking.count == n, timeout=60)
                async with trio.open_nursery() as devices:
                    for stream in streams:
                        devices.start_soon(device, stream)
                    await trio.sleep(0.3)              # the devices' tasks now wait for their answers
                    gw.looplag.max_ms = 0.0            # from here: the drain's own steps
                    gw.drain()
            # serve() returned by itself: every parked Ping was handed back.
        finally:
            gc.unfreeze()
            gc.set_threshold(*old_threshold)
    assert len(answers) == n
    assert all(a == (200, ping.HEARTBEAT_EXPIRED) for a in answers)
    snap = gw.looplag.snapshot()
    print(f"\n{n} parked Pings drained in slices: loop lag max {snap['max_ms']:.1f} ms "
          f"during the drain; histogram {snap['histogram_ms']}; gc {snap['gc']}")


def test_gen2_threshold_and_freeze(monkeypatch):
    old = gc.get_threshold()
    try:
        gcpause.tune()
        assert gc.get_threshold()[2] == gcpause.GEN2_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)


async def test_refreeze_after_a_ramp_of_connections():
    class FakeGateway:
        reads = 0
        count = 0

        @property
        def active(self):
            self.reads += 1
            return self.count

    gw = FakeGateway()
    frozen = []
    gc_freeze = gc.freeze
    try:
        gc.freeze = lambda: frozen.append(gw.count)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: gcpause.refreeze_on_ramp(gw, every=0.001, min_interval=0.0,
                                                                min_connections=10))
            for count in (5, 12, 20, 24, 30, 60, 20, 25, 40):
                gw.count, seen = count, gw.reads
                await _wait(lambda: gw.reads >= seen + 2)      # the watcher has looked at it
            nursery.cancel_scope.cancel()
    finally:
        gc.freeze = gc_freeze
        gc.unfreeze()
    # Each time the count doubled since the last freeze, or since its low point after one.
    assert frozen == [12, 24, 60, 40]


async def test_loop_lag_sees_a_stalled_step():
    lag = LoopLag(interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(lag.run)
        await trio.sleep(0.05)
        import time
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.08:         # a task step that blocks the loop 80 ms
            pass
        await _wait(lambda: lag.max_ms >= 60)
        nursery.cancel_scope.cancel()
    snap = lag.snapshot()
    assert snap["max_ms"] >= 60 and sum(snap["histogram_ms"].values()) == snap["samples"]
    assert max(m for _, m in snap["max_per_second"]) == snap["max_ms"]


async def test_sigterm_to_a_running_serve_answers_every_parked_ping(tmp_path):
    """End to end: `seg-fast serve` (the worker runs gcpause.tune) with parked Pings; SIGTERM
    drains in slices and every device gets its Ping answered before the worker exits."""
    import signal

    from processes import start_serve
    from redis_server import free_port

    n = 300
    held = []

    async def silent(stream):              # a mail server that never answers: every Ping parks
        held.append(stream)
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass

    gw_port = free_port()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        up_port = listeners[0].socket.getsockname()[1]
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
                       f'[upstream]\nurl = "http://127.0.0.1:{up_port}"\n[admin]\nenabled = false\n'
                       f'[log]\ntransactions = ""\n[policy]\nallow_if_no_policies = true\n')
        proc = start_serve(cfg, tmp_path)
        try:
            request = h11.Connection(h11.CLIENT).send(h11.Request(
                method=b"POST", target=EAS + b"?Cmd=Ping&User=test&DeviceId=D&DeviceType=B",
                headers=[(b"Host", b"gw"), AUTH, (b"Content-Length", b"0")]))
            streams = []
            with trio.fail_after(20):
                while True:
                    try:
                        streams.append(await trio.open_tcp_stream("127.0.0.1", gw_port))
                        break
                    except OSError:
                        assert proc.poll() is None
                        await trio.sleep(0.1)
            while len(streams) < n:
                streams.append(await trio.open_tcp_stream("127.0.0.1", gw_port))
            for stream in streams:
                await stream.send_all(request)
            await _wait(lambda: len(held) >= n)          # every Ping is upstream (and parked)
            proc.send_signal(signal.SIGTERM)
            answers = []
            with trio.fail_after(30):
                for stream in streams:
                    data = b""
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                    answers.append(data)
                    await stream.aclose()
            with trio.fail_after(20):
                while proc.poll() is None:
                    await trio.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            nursery.cancel_scope.cancel()
    assert proc.returncode == 0, err
    assert all(a.startswith(b"HTTP/1.1 200 ") and a.endswith(ping.HEARTBEAT_EXPIRED) for a in answers), answers[:2]
    assert "Traceback" not in err, err
    lags = [line for line in err.splitlines() if '"loop_lag"' in line]
    print(f"\n{n} parked Pings answered on SIGTERM; loop-lag incidents logged (> 50 ms): {lags or 'none'}")
