"""A parked Ping's answer goes out by the compiled path (exchange.resume: the device's exchange
resumes as one the compiled parser read, the answer head parsed by _http1), h11 only for
what it defers. h11 is the oracle: for mail-server answers in every framing, split anyhow,
with or without a 1xx first, the device's h11 client reads the mail server's status, end-to-end
headers and body, and the connection then goes on (keep-alive) or closes (the device asked),
as h11's path did; a malformed answer is a 502/503, never passed on."""
from __future__ import annotations

import h11
import pytest
import trio

from proxy_helpers import Client
from seg_fast.proxy import exchange
from seg_fast.testing.rawhttp import stream_requests
from test_proxy import AUTH, EAS, _end_to_end, _send_ping, gateway

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WB = b"Content-Type: application/vnd.ms-sync.wbxml\r\n"
BODY = bytes(range(256)) * 40 + b"end"           # 10 KiB: more than one read's worth is fine too

ANSWERS = {
    "length": [b"HTTP/1.1 200 OK\r\n" + WB + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY],
    "length-split-head": [b"HTTP/1.1 200 OK\r\n" + WB, b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY[:5],
                          BODY[5:]],
    "chunked": [b"HTTP/1.1 200 OK\r\n" + WB + b"Transfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % 1000 + BODY[:1000] + b"\r\n", b"%x\r\n" % (len(BODY) - 1000) + BODY[1000:]
                + b"\r\n0\r\n\r\n"],
    "1xx-first": [b"HTTP/1.1 100 Continue\r\n\r\n",
                  b"HTTP/1.1 200 OK\r\n" + WB + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY],
    "obs-fold": [b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY],
    "status-449": [b"HTTP/1.1 449 Retry With\r\nContent-Length: 0\r\n\r\n"],
    "no-content": [b"HTTP/1.1 204 No Content\r\n\r\n"],
}
# Whose answer h11 never parses or writes (the rest it does: a head in parts, a 1xx, obs-fold, 204).
COMPILED = {"length", "chunked", "status-449"}


def oracle(parts: list[bytes]):
    """What h11 itself reads from the mail server's bytes: (status, end-to-end headers, body)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x"), (b"Content-Length", b"0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"".join(parts))
    resp, body = None, b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Response):
            resp = ev
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            break
    headers = [(k, v) for k, v in _end_to_end(resp.headers.raw_items()) if k != b"content-length"]
    return resp.status_code, headers, body


def mail_server(answer: list[bytes], parked: trio.Event, seen: list | None = None, other: bytes = OK):
    """The Ping's answer (its parts written apart) once the test says the Ping is parked;
    any other request gets ``other``. With ``seen``: each request's raw bytes (head and
    Content-Length body) are recorded."""
    async def serve(stream):
        async for head, body in stream_requests(stream):
            if seen is not None:
                seen.append(head + b"\r\n\r\n" + body)
            if b"Cmd=Ping" in head:
                await parked.wait()
                for part in answer:
                    await stream.send_all(part)
                    await trio.sleep(0.02)        # apart: the gateway reads each on its own
            else:
                await stream.send_all(other)
    return serve


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "close"])
@pytest.mark.parametrize("name", list(ANSWERS))
async def test_a_parked_pings_answer_reads_as_h11_reads_the_mail_servers(tmp_path, monkeypatch, name, close):
    by_h11 = []
    h11_path = exchange._stream_answer

    async def counted(*args, **kw):
        by_h11.append(1)
        return await h11_path(*args, **kw)

    monkeypatch.setattr(exchange, "_stream_answer", counted)
    answer = ANSWERS[name]
    status, headers, body = oracle(answer)
    parked = trio.Event()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, mail_server(answer, parked), listeners)
        async with gateway(f"http://127.0.0.1:{port}", tmp_path, timeouts_ping_default_heartbeat="20") as gw:
            dev = await Client.connect(gw.port)
            extra = [(b"Connection", b"close")] if close else []
            await dev.stream.send_all(dev.conn.send(h11.Request(
                method=b"POST", target=EAS + b"?Cmd=Ping&User=test&DeviceId=R1&DeviceType=B",
                headers=[(b"Host", b"gw"), AUTH, (b"Content-Length", b"0")] + extra))
                + dev.conn.send(h11.EndOfMessage()))
            with trio.fail_after(10):
                while gw.parking.count < 1:
                    await trio.sleep(0.01)
            parked.set()
            with trio.fail_after(10):
                resp, got = await dev.read_answer()
            assert resp.status_code == status
            assert got == body
            assert (by_h11 == []) == (name in COMPILED)
            seen = _end_to_end(resp.headers.raw_items())
            assert [(k, v) for k, v in seen if k != b"content-length"] == headers
            if close:
                assert (b"connection", b"close") in [(k.lower(), v.lower()) for k, v in resp.headers.raw_items()]
                with trio.fail_after(10):
                    assert await dev.stream.receive_some(100) == b""      # the gateway closed it
            else:
                with trio.fail_after(10):
                    again, again_body = await dev.request(b"POST", EAS + b"?Cmd=FolderSync&User=test&DeviceId=R1"
                                                          b"&DeviceType=B", [AUTH], b"x")
                assert again.status_code == 200 and again_body == b"ok"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
], ids=["two-lengths", "bad-status", "bad-name", "unknown-coding"])
async def test_a_malformed_answer_to_a_parked_ping_is_not_passed_on(tmp_path, bad):
    with pytest.raises(h11.RemoteProtocolError):
        oracle([bad])                               # h11 rejects it too
    parked = trio.Event()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, mail_server([bad], parked), listeners)
        async with gateway(f"http://127.0.0.1:{port}", tmp_path, timeouts_ping_default_heartbeat="20") as gw:
            dev = await Client.connect(gw.port)
            await _send_ping(dev)
            with trio.fail_after(10):
                while gw.parking.count < 1:
                    await trio.sleep(0.01)
            parked.set()
            with trio.fail_after(10):
                resp, got = await dev.read_answer()
            assert resp.status_code in (502, 503)
            assert b"hello" not in got
        nursery.cancel_scope.cancel()


def recording_mail_server(seen: list, parked: trio.Event):
    """Records each request's raw bytes; every request, a parked Ping once the test says
    so, gets the same Sync answer."""
    full = b"HTTP/1.1 200 OK\r\n" + WB + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
    return mail_server([full], parked, seen, other=full)


PING_BODY = bytes.fromhex("03016a000d45480336300001")    # <Ping><HeartbeatInterval>60</...>


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "close"])
async def test_a_ping_on_the_fast_lane_parks_and_matches_the_general_path(tmp_path, monkeypatch, close):
    """The same Ping through the compiled lane and (FAST_LANE off) through h11's path: the mail
    server gets the same bytes, the device the same answer, the log one record, and it parks."""
    results = {}
    forward = exchange._forward
    for lane in (True, False):
        monkeypatch.setattr(exchange, "FAST_LANE", lane)
        general = []

        async def counted(*args, **kw):
            general.append(1)
            return await forward(*args, **kw)

        monkeypatch.setattr(exchange, "_forward", counted)
        seen, parked = [], trio.Event()
        log = tmp_path / f"lane-{lane}"
        log.mkdir()
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, recording_mail_server(seen, parked), listeners)
            async with gateway(f"http://127.0.0.1:{port}", log, timeouts_ping_default_heartbeat="20") as gw:
                dev = await Client.connect(gw.port)
                extra = [(b"Connection", b"close")] if close else []
                await dev.stream.send_all(dev.conn.send(h11.Request(
                    method=b"POST", target=EAS + b"?Cmd=Ping&User=test&DeviceId=R2&DeviceType=B",
                    headers=[(b"Host", b"gw"), AUTH, (b"Content-Length", b"%d" % len(PING_BODY))] + extra))
                    + dev.conn.send(h11.Data(data=PING_BODY)) + dev.conn.send(h11.EndOfMessage()))
                with trio.fail_after(10):
                    while gw.parking.count < 1:
                        await trio.sleep(0.01)
                parked.set()
                with trio.fail_after(10):
                    resp, got = await dev.read_answer()
                gw.log.flush()
            nursery.cancel_scope.cancel()
        lines = [x for x in (log / "tx.jsonl").read_text().splitlines() if '"Ping"' in x]
        assert len(lines) == 1 and '"status":200' in lines[0]
        assert (general == []) == lane                # the lane carried it, or h11's path did
        seen = [x.replace(b"127.0.0.1:%d" % port, b"MAIL") for x in seen]     # each run its own port
        results[lane] = (seen, resp.status_code, _end_to_end(resp.headers.raw_items()), got,
                         [(k.lower(), v) for k, v in resp.headers.raw_items() if k.lower() == b"connection"])
    assert results[True] == results[False]
    assert results[True][0][0].endswith(PING_BODY) and results[True][3] == BODY
