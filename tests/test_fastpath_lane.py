"""The fast lane (exchange.fast) against the general path, through a running gateway: for
generated requests (hop-by-hop, forwarding and Connection-named headers, both query forms,
bodies) and generated mail-server answers (Content-Length or chunked, hop-by-hop headers,
Connection: close, the body in the head's read or after it, errors), the mail server
receives the same bytes, the device receives the same bytes and the transaction record
says the same, with the lane on as with it off. Cases come from a seeded generator
(the same every run), each sent once per path."""
from __future__ import annotations

import base64
import json
import random

import h11
import trio

from seg_fast.eas.request import encode_base64_query
from seg_fast.proxy import downstream, exchange
from test_proxy import gateway, upstream

EAS = b"/Microsoft-Server-ActiveSync"
QUERY = b"?Cmd=Sync&User=test&DeviceId=ABC123&DeviceType=SmartPhone"
AUTH = b"Basic " + base64.b64encode(b"test:secret")
CASES = 40


def _request_case(rnd: random.Random, i: int) -> bytes:
    body = bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 3, 103, 700])))
    query = rnd.choice([QUERY, QUERY + b"&CollectionId=7", b"?Cmd=FolderSync&User=test&DeviceId=D1&DeviceType=T",
                        b"?" + encode_base64_query(version="14.1", command="Sync", device_id=b"\x01\x02",
                                                   device_type="iPhone").encode()])
    headers = [(b"Host", b"gw.example"), (b"X-Case", str(i).encode())]
    optional = [(b"Authorization", AUTH), (b"MS-ASProtocolVersion", b"14.1"), (b"User-Agent", b"Apple-iPhone9C1"),
                (b"Content-Type", b"application/vnd.ms-sync.wbxml"), (b"X-Custom", b"one"), (b"Keep-Alive", b"300"),
                (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"), (b"X-Forwarded-For", b"203.0.113.9"),
                (b"Forwarded", b"for=203.0.113.9"), (b"X-Real-IP", b"203.0.113.9"), (b"Via", b"1.1 lb"),
                (b"Connection", rnd.choice([b"keep-alive", b"X-Custom", b"te, X-Custom", b"Keep-Alive"]))]
    headers += rnd.sample(optional, rnd.randrange(len(optional) + 1))
    rnd.shuffle(headers)
    if rnd.random() < 0.1:
        headers.append((b"Authorization", AUTH))        # twice: the gateway's own 400
    head = b"POST " + EAS + query + b" HTTP/1.1\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def _answer_case(rnd: random.Random) -> tuple[list[bytes], bool]:
    """(the pieces the mail server writes, whether it closes after them)."""
    status = rnd.choice([200, 200, 200, 404, 500, 503])
    body = bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 2, 64, 3000])))
    headers = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]
    optional = [(b"X-Custom", b"x"), (b"Keep-Alive", b"timeout=5"), (b"Proxy-Authenticate", b"Basic"),
                (b"Set-Cookie", b"a=b"), (b"Date", b"Sun, 29 Nov 2026 22:00:00 GMT"), (b"Trailer", b"X"),
                (b"Connection", rnd.choice([b"keep-alive", b"X-Custom", b"close"])), (b"Upgrade-Insecure", b"1")]
    headers += rnd.sample(optional, rnd.randrange(len(optional) + 1))
    chunked = rnd.random() < 0.3
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        headers.append((b"Content-Length", str(len(body)).encode()))
        payload = body
    head = b"HTTP/1.1 %d %s\r\n" % (status, rnd.choice([b"OK", b"Whatever"]))
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    split = rnd.random() < 0.3 and payload
    closes = any(k == b"Connection" and v == b"close" for k, v in headers)
    return ([head, payload] if split else [head + payload]), closes


def case_server(cases, received: dict, mode: dict):
    """A mail server for generated cases: it records the bytes of each request it got (by its
    X-Case header and ``mode["lane"]``) and answers with the case's pieces (the body in a later
    read when there are two), closing after it when the case says so."""
    async def server(stream):
        conn = h11.Connection(h11.SERVER)
        raw = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    raw += data
                    conn.receive_data(data)
                    continue
                if type(event) is h11.Request:
                    case = int(dict(event.headers)[b"x-case"])
                elif type(event) is h11.EndOfMessage:
                    used = len(raw) - len(conn.trailing_data[0])
                    received[(case, mode["lane"])] = raw[:used]
                    raw = raw[used:]
                    pieces, closes = cases[case][1], cases[case][2]
                    for piece in pieces:
                        await stream.send_all(piece)
                        if len(pieces) > 1:
                            await trio.sleep(0.005)     # the body in a later read than the head
                    if closes:
                        return
                    conn = h11.Connection(h11.SERVER)   # a fresh cycle: our answers are raw bytes
        finally:
            await trio.aclose_forcefully(stream)
    return server


async def case_answer(stream, request: bytes) -> bytes:
    """Send a case's request; the raw bytes of its whole answer."""
    await stream.send_all(request)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x"), (b"Content-Length", b"0")]))
    client.send(h11.EndOfMessage())
    with trio.fail_after(20):
        return await _read_message(stream, client)


async def _read_message(stream, client: h11.Connection) -> bytes:
    """Raw bytes of one whole answer (h11 finds its end)."""
    raw = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            raw += data
            client.receive_data(data)
            if not data:
                return raw
        elif type(event) in (h11.EndOfMessage, h11.ConnectionClosed):
            return raw


async def test_the_fast_lane_writes_what_the_general_path_writes(tmp_path, monkeypatch):
    rnd = random.Random(20261129)
    cases = [(_request_case(rnd, i), *_answer_case(rnd)) for i in range(CASES)]
    received: dict[tuple[int, bool], bytes] = {}
    lane = {"taken": 0}
    real_fast = exchange.fast

    async def counting_fast(gw, dev, head):
        result = await real_fast(gw, dev, head)
        if result is not exchange.NOT_FAST:
            lane["taken"] += 1
        return result

    monkeypatch.setattr(exchange, "fast", counting_fast)
    mode = {"lane": True}

    server = case_server(cases, received, mode)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, server, 0)
        port = listeners[0].socket.getsockname()[1]
        device = {}
        log = tmp_path / "tx.jsonl"
        async with gateway(f"http://127.0.0.1:{port}", tmp_path) as gw:
            for lane_on in (True, False):
                mode["lane"] = lane_on
                monkeypatch.setattr(exchange, "FAST_LANE", lane_on)
                for i, (request, _, _) in enumerate(cases):
                    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                    device[(i, lane_on)] = await case_answer(stream, request)
                    await stream.aclose()
                gw.log.flush()
        nursery.cancel_scope.cancel()
    assert lane["taken"] >= CASES // 4, lane       # the lane carried a good share of the cases
    for i in range(CASES):
        assert device[(i, True)] == device[(i, False)], (i, cases[i])
        assert received.get((i, True)) == received.get((i, False)), (i, cases[i])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 2 * CASES
    for rec in records:
        for key in ("ts", "total_ms", "upstream_ms"):
            rec.pop(key, None)
    assert records[:CASES] == records[CASES:]


async def test_after_an_answer_not_there_the_lane_waits_at_once_for_a_while(tmp_path, monkeypatch):
    """The lane yields once before reading the mail server's answer; a read that then finds
    nothing makes the next YIELD_BACKOFF requests wait for theirs at once (no yield, no
    read that would say EAGAIN), and the one after yields again. The mail server answers a
    request only once the gateway has made that choice for it (``gw.yield_skips`` as
    expected), so every read after a yield finds nothing, and the answers still arrive."""
    # The task's mechanism: held to the task (the keep-alive lane reads no answer after a yield).
    monkeypatch.setattr(downstream, "LANE", False)
    backoff = exchange.YIELD_BACKOFF
    # what yield_skips holds once request i (from 1) has been sent up
    expected = [backoff] + list(range(backoff - 1, -1, -1)) + [backoff]
    state = {"i": 0, "gw": None}

    async def handler(req, body):
        want = expected[state["i"]]
        with trio.fail_after(10):
            while state["gw"].yield_skips != want:
                await trio.sleep(0.001)
        state["i"] += 1
        body = b"answer %d" % state["i"]
        return 200, [(b"Content-Type", b"application/vnd.ms-sync.wbxml"),
                     (b"Content-Length", b"%d" % len(body))], body

    async with upstream(handler) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        state["gw"] = gw
        assert gw.yield_skips == 0
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        client = h11.Connection(h11.CLIENT)
        for i in range(1, len(expected) + 1):
            request = client.send(h11.Request(method=b"POST", target=EAS + QUERY, headers=[
                (b"Host", b"gw.example"), (b"Authorization", AUTH), (b"MS-ASProtocolVersion", b"14.1"),
                (b"Content-Type", b"application/vnd.ms-sync.wbxml"), (b"Content-Length", b"3")]))
            await stream.send_all(request + client.send(h11.Data(data=b"abc")) + client.send(h11.EndOfMessage()))
            with trio.fail_after(20):
                answer = await _read_message(stream, client)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"answer %d" % i), answer
            assert gw.yield_skips == expected[i - 1]
            client.start_next_cycle()
        await stream.aclose()
    assert state["i"] == len(expected)
    assert len(up.requests) == len(expected)
