"""The keep-alive lane (proxy/lane.py) through a running gateway: a kept-alive connection
waits in the parking lot without a task, and its next request is carried by the lot's step.

The oracle is the same gateway with the lane off (downstream.LANE): for generated requests
and answers the mail server and the device receive the same bytes and the log says the
same. The lot's counters (``carried``, ``handed``) show which way each went, so a test
cannot pass with the lane never taking anything. Deadlines, a device leaving mid-exchange,
a mail server closing a kept-alive connection, TLS, pipelining and a drain are attacked on
connections the lot holds. Nothing waits a fixed time: the lot is polled, with a bound."""
from __future__ import annotations

import json
from functools import partial
import random
import ssl

import h11
import pytest
import trio
import trustme

from proxy_helpers import Client
from seg_fast.proxy import _tls13, downstream, parking
from test_fastpath_lane import EAS, QUERY, AUTH, _answer_case, _request_case, case_answer, case_server
from test_proxy import gateway, upstream
from test_outbound_proxy import ConnectProxy

CASES = 40
WARM = b"GET /nowhere HTTP/1.1\r\nHost: gw.example\r\n\r\n"     # the gateway's own 404: nothing goes up


def _sync(body: bytes = b"abc", extra: bytes = b"", cmd: bytes = b"Sync") -> bytes:
    return (b"POST " + EAS + b"?Cmd=" + cmd + b"&User=test&DeviceId=ABC123&DeviceType=SmartPhone HTTP/1.1\r\n"
            b"Host: gw.example\r\nAuthorization: " + AUTH + b"\r\nMS-ASProtocolVersion: 14.1\r\n" + extra
            + b"Content-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def _held(gw, kind) -> list:
    return [p for p in set(gw.parking._by_fd.values()) if type(p) is kind]


async def _until(predicate, bound: float = 10.0) -> None:
    with trio.fail_after(bound):
        while not predicate():
            await trio.sleep(0.002)


class Answers:
    """The answers on a raw stream, one after another, read by h11 (the independent reader);
    bytes of a next answer read with one stay for it."""

    def __init__(self, stream):
        self.stream = stream
        self.client = h11.Connection(h11.CLIENT)

    async def next(self) -> tuple[h11.Response, bytes]:
        client = self.client
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        client.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x"), (b"Content-Length", b"0")]))
        client.send(h11.EndOfMessage())
        head, body = None, b""
        with trio.fail_after(20):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await self.stream.receive_some(65536))
                elif type(event) is h11.Response:
                    head = event
                elif type(event) is h11.Data:
                    body += event.data
                else:
                    return head, body


async def _answer(stream) -> tuple[h11.Response, bytes]:
    """The one answer a stream has coming."""
    return await Answers(stream).next()


async def test_the_lot_carries_what_a_task_would_and_says_the_same(tmp_path, monkeypatch):
    """Each generated case goes on a kept-alive connection the lot holds (after a 404 the
    gateway answers itself), once with the lane on and once off: the same bytes reach the
    mail server and the device, the same records are logged, and with the lane on the lot
    answered a good share of them in its own step."""
    rnd = random.Random(20261204)
    cases = [(_request_case(rnd, i), *_answer_case(rnd)) for i in range(CASES)]
    received: dict[tuple[int, bool], bytes] = {}
    mode = {"lane": True}

    server = case_server(cases, received, mode)

    device, counts = {}, {}
    log = tmp_path / "tx.jsonl"
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, server, 0)
        port = listeners[0].socket.getsockname()[1]
        async with gateway(f"http://127.0.0.1:{port}", tmp_path) as gw:
            for lane_on in (True, False):
                mode["lane"] = lane_on
                monkeypatch.setattr(downstream, "LANE", lane_on)
                before = (gw.parking.carried, gw.parking.handed)
                for i, (request, _, _) in enumerate(cases):
                    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                    await stream.send_all(WARM)
                    assert (await _answer(stream))[0].status_code == 404
                    if lane_on:
                        await _until(lambda: len(_held(gw, parking.Idle)) == 1)
                    device[(i, lane_on)] = await case_answer(stream, request)
                    await stream.aclose()
                    await _until(lambda: gw.active == 0)
                counts[lane_on] = (gw.parking.carried - before[0], gw.parking.handed - before[1])
                gw.log.flush()
        nursery.cancel_scope.cancel()
    assert counts[False] == (0, 0)
    carried, handed = counts[True]
    # Whole answers to requests the fast lane takes, answered in the lot's step (8 of the 40
    # here); the rest (split, chunked, closing answers, requests it leaves to h11) on a task.
    assert carried >= CASES // 8 and handed >= CASES // 4, counts
    for i in range(CASES):
        assert device[(i, True)] == device[(i, False)], (i, cases[i])
        assert received.get((i, True)) == received.get((i, False)), (i, cases[i])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 4 * CASES
    for rec in records:
        for key in ("ts", "total_ms", "upstream_ms"):
            rec.pop(key, None)
    assert records[:2 * CASES] == records[2 * CASES:]


WBXML = (b"Content-Type", b"application/vnd.ms-sync.wbxml")


def _framed(body: bytes) -> list:
    return [WBXML, (b"Content-Length", b"%d" % len(body))]


def _answers(sizes: dict):
    async def handler(req, body):
        n = sizes.get(body, 5)
        body = (body * (n // len(body) + 1))[:n]
        return 200, _framed(body), body
    return handler


@pytest.mark.parametrize("tls", [False, True])
async def test_one_connection_many_requests_small_and_large(tmp_path, tls):
    """Forty requests on one connection: small answers go out in the lot's step (one TLS
    record, or one writev), large ones (several records, more than a socket takes at once)
    on a task; every answer whole and in order, the connection kept throughout."""
    sizes = {b"big%d" % i: 200_000 + i for i in range(5)}
    ctx = client_ctx = None
    if tls:
        ca = trustme.CA()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(ctx)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
    async with upstream(_answers(sizes)) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path, tls=ctx) as gw:
        dev = await Client.connect(gw.port, client_ctx)
        bodies = [b"big%d" % (i // 8) if i % 8 == 7 else b"small%d" % i for i in range(40)]
        for body in bodies:
            resp, got = await dev.request(b"POST", EAS + QUERY, [(b"Authorization", AUTH)], body)
            n = sizes.get(body, 5)
            assert resp.status_code == 200 and got == (body * (n // len(body) + 1))[:n]
        assert up.connections == 1
        assert gw.parking.carried >= 30, (gw.parking.carried, gw.parking.handed)
        await dev.stream.aclose()
        await _until(lambda: gw.active == 0)


async def test_pipelined_requests_on_a_held_connection_are_answered_in_order(tmp_path):
    async with upstream(_answers({})) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await stream.send_all(WARM)
        assert (await _answer(stream))[0].status_code == 404
        await _until(lambda: len(_held(gw, parking.Idle)) == 1)
        await stream.send_all(_sync(b"one") + _sync(b"two") + b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" + _sync(b"3"))
        answers = Answers(stream)
        got = [await answers.next() for _ in range(4)]
        assert [(r.status_code, b) for r, b in got] == [(200, b"oneon"), (200, b"twotw"), (404, b"not found\n"),
                                                        (200, b"33333")]
        await stream.aclose()


async def test_deadlines_hold_on_connections_the_lot_holds(tmp_path):
    """Held connections: one idles past timeouts.idle_keepalive and is closed; one starts a
    head and stops (408 when timeouts.request_head passes); one sends garbage (400); one an
    oversized head (431). The lot closes or hands each on; no connection stays counted."""
    async with upstream(_answers({})) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                     timeouts_idle_keepalive="1", timeouts_request_head="0.5",
                                                     limits_max_header_bytes="4096") as gw:
        streams = []
        for _ in range(4):
            s = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await s.send_all(_sync(b"warm"))
            assert (await _answer(s))[0].status_code == 200
            streams.append(s)
        await _until(lambda: len(_held(gw, parking.Idle)) == 4)
        idle, slow, garbage, huge = streams
        await slow.send_all(b"POST " + EAS + b"?Cmd=Sync HTTP/1.1\r\nHost: x\r\n")
        await garbage.send_all(b"\x16\x03\x01 not http\r\n\r\n")
        await huge.send_all(b"POST / HTTP/1.1\r\nX: " + b"a" * 8000)
        assert (await _answer(slow))[0].status_code == 408
        assert (await _answer(garbage))[0].status_code == 400
        assert (await _answer(huge))[0].status_code == 431
        with trio.fail_after(10):
            assert await idle.receive_some(10) == b""       # closed at the idle deadline
        await _until(lambda: gw.active == 0)
        assert not gw.parking._by_fd


async def _held_connection(gw):
    """A device connection whose first exchange was answered, now held idle by the lot."""
    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
    await stream.send_all(_sync(b"warm"))
    assert (await _answer(stream))[0].status_code == 200
    await _until(lambda: len(_held(gw, parking.Idle)) == 1)
    return stream


async def test_a_device_leaving_with_its_ping_in_flight_frees_the_mail_server_connection(tmp_path):
    """A Ping the lot sent up and holds: the device hangs up, the gateway closes the mail-server
    connection (it is never pooled with an answer still owed), logs 499 and counts the
    connection closed."""
    async def handler(req, body):
        if b"Cmd=Ping" in req.target:
            await trio.sleep_forever()
        return 200, _framed(b"ok"), b"ok"

    async with upstream(handler) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                timeouts_ping_default_heartbeat="60") as gw:
        stream = await _held_connection(gw)
        await stream.send_all(_sync(b"", cmd=b"Ping"))
        await _until(lambda: len(_held(gw, parking.Inflight)) == 1)
        assert gw.parking.count == 1                  # counted as a parked Ping
        assert gw.pool.open == 1
        await stream.aclose()
        # pool.open counts mail-server connections open, idle or busy: 0 once it was closed.
        await _until(lambda: gw.active == 0 and gw.pool.open == 0 and gw.parking.count == 0)
        gw.log.flush()
    records = [json.loads(line) for line in (tmp_path / "tx.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == [200, 499]


@pytest.mark.parametrize("close", [False, True])
async def test_a_held_ping_keeps_what_a_parked_one_keeps_and_is_answered_whole(tmp_path, close):
    """While the lot holds a Ping (minutes, for every device at once) it keeps neither the
    parsed head nor h11's state nor the body, as a parked Ping keeps none (exchange.shed,
    Device._h11), only its Host for a redirect; its answer still comes whole, with the
    device's keep-alive."""
    release = trio.Event()

    async def handler(req, body):
        if b"Cmd=Ping" in req.target:
            await release.wait()
            return 200, _framed(b"pong"), b"pong"
        return 200, _framed(b"ok"), b"ok"

    async with upstream(handler) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                timeouts_ping_default_heartbeat="60") as gw:
        stream = await _held_connection(gw)
        (held,) = _held(gw, parking.Idle)
        assert held.dev._conn is None                  # an idle connection: no h11 state
        extra = b"Connection: close\r\n" if close else b""
        await stream.send_all(_sync(b"\x03\x01j\x00", extra=extra, cmd=b"Ping"))
        await _until(lambda: len(_held(gw, parking.Inflight)) == 1)
        (f,) = _held(gw, parking.Inflight)
        assert f.dev._conn is None and f.plan.body == b"" and f.plan.host == b"gw.example"
        assert f.plan.head is f.dev._head and len(f.plan.head.headers) <= 2     # the shared head
        release.set()
        resp, body = await _answer(stream)
        assert (resp.status_code, body) == (200, b"pong")
        assert ((b"connection", b"close") in list(resp.headers)) is close
        if close:
            with trio.fail_after(10):
                assert await stream.receive_some(10) == b""
        else:
            await stream.send_all(_sync(b"again"))
            assert (await _answer(stream))[0].status_code == 200
        await stream.aclose()
        await _until(lambda: gw.active == 0)
        assert gw.parking.carried >= 1                 # the Ping's answer went out in the lot's step


async def _serve_h11(stream, answer) -> None:
    """One mail-server connection: each request answered 200 with the body ``await answer(n)``
    gives (n: its number on this connection, from 1); None closes the connection unanswered
    (``answer`` may have written last bytes of its own)."""
    conn = h11.Connection(h11.SERVER)
    n = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                break
            conn.receive_data(data)
        elif type(event) is h11.EndOfMessage:
            n += 1
            body = await answer(n)
            if body is None:
                break
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                (b"Content-Length", str(len(body)).encode())])) + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()
    await trio.aclose_forcefully(stream)


async def test_a_kept_alive_mail_server_connection_closed_under_the_lane_is_resent_once(tmp_path):
    """The mail server closes its kept-alive connection as the lane's request arrives: the
    request goes again on a new connection and the device gets its answer."""
    state = {"n": 0}

    async def server(stream):
        state["n"] += 1
        first = state["n"] == 1

        async def answer(n):
            # the second request on the first connection: closed unanswered
            return None if first and n == 2 else b"ok"
        await _serve_h11(stream, answer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, server, 0)
        port = listeners[0].socket.getsockname()[1]
        async with gateway(f"http://127.0.0.1:{port}", tmp_path) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            for _ in range(3):
                await _until(lambda: len(_held(gw, parking.Idle)) == 1 or state["n"] == 0)
                await stream.send_all(_sync(b"x"))
                resp, body = await _answer(stream)
                assert (resp.status_code, body) == (200, b"ok")
            assert state["n"] == 2
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_drain_closes_held_connections_and_answers_held_pings(tmp_path):
    async def handler(req, body):
        if b"Cmd=Ping" in req.target:
            await trio.sleep_forever()
        return 200, _framed(b"ok"), b"ok"

    async with upstream(handler) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                timeouts_ping_default_heartbeat="600") as gw:
        idle, pinger = [await trio.open_tcp_stream("127.0.0.1", gw.port) for _ in range(2)]
        for s in (idle, pinger):
            await s.send_all(_sync(b"warm"))
            assert (await _answer(s))[0].status_code == 200
        await _until(lambda: len(_held(gw, parking.Idle)) == 2)
        await pinger.send_all(_sync(b"", cmd=b"Ping"))
        await _until(lambda: len(_held(gw, parking.Inflight)) == 1)
        gw.drain()
        resp, body = await _answer(pinger)
        assert resp.status_code == 200 and body.startswith(b"\x03\x01j\x00")      # heartbeat expired
        assert (b"connection", b"close") in list(resp.headers)
        with trio.fail_after(10):
            assert await idle.receive_some(10) == b""
        await _until(lambda: gw.active == 0)


def _tls_pair():
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return ctx, client_ctx


async def _slow_reader(port: int, client_ctx):
    """A TLS device whose receive window is small: a big answer does not fit the socket."""
    import socket as _socket
    sock = trio.socket.socket()
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SSLStream(trio.SocketStream(sock), client_ctx, server_hostname="localhost")
    await stream.do_handshake()
    return stream


async def _fill_until_handed(gw, stream, sizes) -> int:
    """Ask for 60 KB answers on a held connection without reading them, each once the last one
    was written in the lot's step (the connection held again), until one does not fit the
    socket and goes to a task: how many were asked."""
    lot = gw.parking
    handed = lot.handed
    for n in range(1, 200):
        sizes[b"x%d" % n] = 60_000
        carried = lot.carried
        await stream.send_all(_sync(b"x%d" % n))
        await _until(lambda: lot.handed > handed or lot.carried > carried)
        if lot.handed > handed:
            return n
    raise AssertionError("the socket took every answer")


async def test_tls_answers_of_several_records_go_out_in_the_lots_step_and_a_task_writes_what_waits(tmp_path):
    """60 KB answers (several TLS records, one read of the mail server's) on a held TLS
    connection whose device reads nothing: each is sealed in one batch and written in the
    lot's step while the socket takes them whole; the first it does not take goes on from a
    task (the rest of its records, with the write's pace). Then the device reads: every
    answer whole, in order, and the connection is kept."""
    ctx, client_ctx = _tls_pair()
    sizes = {}
    async with upstream(_answers(sizes)) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path, tls=ctx) as gw:
        stream = await _slow_reader(gw.port, client_ctx)
        answers = Answers(stream)
        await stream.send_all(_sync(b"warm"))
        assert (await answers.next())[0].status_code == 200
        await _until(lambda: len(_held(gw, parking.Idle)) == 1)
        carried = gw.parking.carried
        asked = await _fill_until_handed(gw, stream, sizes)
        assert gw.parking.carried - carried == asked - 1 >= 2
        for n in range(1, asked + 1):
            resp, body = await answers.next()
            key = b"x%d" % n
            assert resp.status_code == 200 and body == (key * 60_000)[:60_000], n
        await stream.send_all(_sync(b"after"))
        assert (await answers.next())[1] == b"after"
        await stream.aclose()
        await _until(lambda: gw.active == 0)


async def test_a_device_that_stops_reading_is_cut_at_the_write_deadline(tmp_path):
    ctx, client_ctx = _tls_pair()
    sizes = {}
    async with upstream(_answers(sizes)) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path, tls=ctx,
                                                        timeouts_device_write="0.5") as gw:
        stream = await _slow_reader(gw.port, client_ctx)
        await stream.send_all(_sync(b"warm"))
        assert (await _answer(stream))[0].status_code == 200
        await _until(lambda: len(_held(gw, parking.Idle)) == 1)
        await _fill_until_handed(gw, stream, sizes)             # and never read
        await _until(lambda: gw.active == 0)
        assert gw.incidents.counts.get("device_write_timeout", 0) >= 1
        await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "http-proxy"])
async def test_the_lane_carries_exchanges_to_an_https_mail_server_and_a_broken_one_is_not_answered_from(
        tmp_path, through_proxy):
    """An https:// mail server (as Exchange or Office 365 is reached), directly or through an
    http:// outbound proxy's CONNECT tunnel: its kept-alive connection is tlsio's, carried on
    by the record layer, and the lot writes the request and reads the answer there as it does
    a plain one. The mail server then answers with bytes that are not TLS records: that
    exchange is not answered from them (the request goes once more, on a new connection, as
    for a kept-alive connection closed under it)."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(sctx)       # (its two session tickets follow the handshake)
    state = {"conns": 0, "requests": 0}

    async def server(stream):
        state["conns"] += 1

        async def answer(n):
            state["requests"] += 1
            if state["requests"] == 6:
                await stream.transport_stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nnot a TLS record")
                return None
            return b"ok%d" % state["requests"]
        await _serve_h11(stream, answer)

    proxy = ConnectProxy(None)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, server, 0, sctx, host="127.0.0.1"))
        port = listeners[0].transport_listener.socket.getsockname()[1]
        extra = {}
        if through_proxy:
            await nursery.start(proxy.serve)
            extra["upstream_proxy_url"] = f"http://127.0.0.1:{proxy.port}"
        async with gateway(f"https://localhost:{port}", tmp_path, upstream_ca_file=str(ca_file), **extra) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            for i in range(1, 6):
                await _until(lambda: len(_held(gw, parking.Idle)) == 1 or i == 1)
                await stream.send_all(_sync(b"x"))
                resp, body = await _answer(stream)
                assert (resp.status_code, body) == (200, b"ok%d" % i)
            assert gw.parking.carried == 4, (gw.parking.carried, gw.parking.handed)   # all but the first
            (up,) = [c for conns in gw.pool.idle.values() for c in conns]
            assert type(up.tls._obj) is _tls13.Records and up.tls._obj.client     # OpenSSL's object gone
            assert state["conns"] == 1
            await _until(lambda: len(_held(gw, parking.Idle)) == 1)
            await stream.send_all(_sync(b"x"))
            resp, body = await _answer(stream)
            assert (resp.status_code, body) == (200, b"ok7") and state["conns"] == 2
            # through the proxy: a tunnel per connection, a ClientHello the first bytes of each
            assert proxy.targets == ([f"localhost:{port}"] * 2 if through_proxy else [])
            assert len(proxy.first_bytes) == len(proxy.targets) and all(b[:1] == b"\x16" for b in proxy.first_bytes)
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_big_answer_from_an_https_mail_server_is_relayed_in_passes_of_what_is_whole(tmp_path, monkeypatch):
    """An https:// mail server's 1 MiB answer (64 records, written at once): each relay pass
    takes the records already whole, up to exchange.RELAY_SIZE (256 KiB), not one 16 KiB record
    per pass and device write (64 passes before read_more, 16 or more at a plain read's 64 KiB).
    The bytes arrive intact."""
    from seg_fast.proxy import exchange
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(sctx)
    body = random.Random(7).randbytes(1 << 20)
    reads = []
    real = exchange._up_body_read

    async def counted(*args, **kw):
        data = await real(*args, **kw)
        reads.append(len(data))
        return data
    monkeypatch.setattr(exchange, "_up_body_read", counted)

    async def server(stream):
        async def answer(n):
            return body
        await _serve_h11(stream, answer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, server, 0, sctx, host="127.0.0.1"))
        port = listeners[0].transport_listener.socket.getsockname()[1]
        async with gateway(f"https://localhost:{port}", tmp_path, upstream_ca_file=str(ca_file)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(_sync(b"x"))
            resp, got = await _answer(stream)
            assert resp.status_code == 200 and got == body
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert sum(reads) + 64 * 1024 >= len(body) and reads, reads
    assert max(reads) > 64 * 1024 and len(reads) <= 8, reads
