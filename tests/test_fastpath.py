"""The compiled request cycle (exchange.py's fast path) against h11's own, on the same bytes.

Each property runs the gateway's real code twice over the same generated traffic:
once the way h11 carries it (the reference: h11 parses the device's body, writes the
mail-server request, parses the answer and writes it to the device), once on the
fast path (the compiled parser's body, write_request, parse_response, _stream_fast).
What the mail server receives, what the device receives (as an h11 client reads it),
whether the mail-server connection is kept, the device connection's h11 state after,
and the kind of error (when the answer is broken) must be the same. A pooled
connection that a server closed silently is resent once on a fresh connection (the
liveness probe is skipped for recently used connections; upstream.TRUST_IDLE).
"""
from __future__ import annotations

import h11
import pytest
import trio
from hypothesis import event, given, settings
from hypothesis import strategies as st

from seg_fast.config import load_config
from seg_fast.observe import Transaction
from seg_fast.proxy import downstream, exchange, http1
from seg_fast.proxy import headers as hdrs
from seg_fast.proxy.headers import TrustedProxies
from seg_fast.proxy.exchange import DeviceGone
from seg_fast.proxy.upstream import UpstreamConn, UpstreamError, UpstreamPool, origin_of

FAST = settings(derandomize=True, max_examples=120, deadline=None)
EAS = b"/Microsoft-Server-ActiveSync?Cmd=Sync&User=u&DeviceId=D1&DeviceType=T"
ORIGIN = origin_of("http://mail.example")


# -- fakes: streams that replay bytes and record writes; a gateway with what _finish uses -----

class FakeStream:
    """A stream (not a trio SocketStream, so sockio takes the stream path): reads replay
    ``pieces`` then EOF; writes are recorded."""

    def __init__(self, pieces=()):
        self.pieces = [p for p in pieces if p]
        self.written = bytearray()

    async def receive_some(self, size):
        await trio.lowlevel.checkpoint()
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > size:
            self.pieces.insert(0, piece[size:])
            piece = piece[:size]
        return piece

    async def send_all(self, data):
        await trio.lowlevel.checkpoint()
        self.written += data


class FakeSock:
    def __init__(self):
        self.fd = 99

    def fileno(self):
        return self.fd

    def close(self):
        self.fd = -1


class FakeGateway:
    def __init__(self):
        self.config = load_config(None, env={})
        self.pool = UpstreamPool(self.config.upstream, self.config.timeouts)
        self.device_pace = None
        self.upstream_pace = None
        self.trusted_proxies = TrustedProxies()


class Req:
    auth_scheme = None


# -- generated traffic -----------------------------------------------------------------------

_token = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)
_value = st.text("abcdefghijklmnopqrstuvwxyz0123456789 /;=,.-_", min_size=0, max_size=20).map(str.strip)
_extra_headers = st.lists(st.tuples(_token.filter(lambda t: t.lower() not in {
    "host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "te", "trailer",
    "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization"}), _value), max_size=5)


@st.composite
def device_requests(draw):
    """(bytes the device sends, method, whole body, the bytes of a pipelined next request)."""
    method = draw(st.sampled_from([b"POST", b"POST", b"GET", b"OPTIONS", b"HEAD"]))
    body = draw(st.binary(max_size=300)) if method == b"POST" else b""
    lines = [method + b" " + EAS + b" HTTP/1.1", b"Host: gw.example"]
    lines += [f"{k}: {v}".encode() for k, v in draw(_extra_headers)]
    if method == b"POST" or draw(st.booleans()):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    if draw(st.booleans()):
        lines.append(b"Connection: " + draw(st.sampled_from([b"close", b"keep-alive", b"Close"])))
    nxt = draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GE"]))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body + nxt, method, body, nxt


def _chunked(body: bytes, cuts: list[int], ext: bool, trailer: bool) -> bytes:
    out, start = bytearray(), 0
    for cut in sorted(set(c % (len(body) + 1) for c in cuts)) + [len(body)]:
        piece = body[start:cut]
        if piece:
            out += b"%x%s\r\n%s\r\n" % (len(piece), b";a=b" if ext else b"", piece)
        start = cut
    out += b"0\r\n" + (b"X-Sum: 1\r\n" if trailer else b"") + b"\r\n"
    return bytes(out)


@st.composite
def mail_server_answers(draw):
    """The mail server's bytes for one answer (sometimes broken), split into reads."""
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 449, 500, 503]))
    body = b"" if status in (204, 304) else draw(st.binary(max_size=400))
    lines = [f"HTTP/1.1 {status} {draw(st.sampled_from(['OK', '', 'Some Reason']))}".rstrip().encode()]
    lines += [f"{k}: {v}".encode() for k, v in draw(_extra_headers)]
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close"]))
    if status in (204, 304):
        framing = "none"
    payload = body
    if framing == "length":
        lines.append(b"Content-Length: " + str(len(body)).encode())
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = _chunked(body, draw(st.lists(st.integers(0, 400), max_size=4)), draw(st.booleans()),
                           draw(st.booleans()))
    if framing == "close" or draw(st.integers(0, 4)) == 0:
        lines.append(b"Connection: close")
    early = draw(st.sampled_from([b"", b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 102 Processing\r\n\r\n"]))
    data = early + b"\r\n".join(lines) + b"\r\n\r\n" + payload
    fault = draw(st.sampled_from(["none"] * 6 + ["truncate", "garbage-after", "bad-header", "bad-chunk"]))
    if fault == "truncate":
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    elif fault == "garbage-after":
        data += b"HTTP/1.1 200 OK\r\n"
    elif fault == "bad-header":
        data = data.replace(b"\r\n", b"\r\nBad Header: x\r\n", 1)
    elif fault == "bad-chunk" and framing == "chunked":
        data = data[:-5] + b"zz\r\n\r\n"
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
    pieces, start = [], 0
    for cut in cuts + [len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return pieces, (framing == "close") or fault != "none"


def _event(dev, head):
    """What downstream._loop makes of a compiled head the fast lane does not carry."""
    if type(head) is http1.RequestHead:
        head = dev._event = http1.request_event(head)
    return head


# -- the exchange, run on one path -----------------------------------------------------------

async def _device_request(gw, device_bytes: bytes, *, compiled: bool, closing: bool):
    """(device, request event, body) after the device's request was read the compiled way (head
    parsed, body taken: None when it could not be) or h11's way (head and body, as before the
    fast path)."""
    dev = downstream.Device(gw, FakeStream(), "192.0.2.1", b"http")
    dev.closing = closing
    if compiled:
        request = _event(dev, await downstream._read_head(gw, dev, device_bytes))
        return dev, request, dev.take_body()
    dev.conn.receive_data(device_bytes)
    request = dev.conn.next_event()
    body = bytearray()
    while True:
        event = dev.conn.next_event()
        if type(event) is h11.EndOfMessage:
            break
        body += event.data
    return dev, request, bytes(body)


def _run(device_bytes: bytes, answer_pieces: list[bytes], *, fast: bool, closing: bool):
    """Everything observable of one proxied exchange (after the device's head arrived)."""
    gw = FakeGateway()
    out = {}

    async def main():
        dev, request, body = await _device_request(gw, device_bytes, compiled=fast, closing=closing)
        if fast:
            out["took_body"] = body is not None
        head = hdrs.upstream_request_headers(hdrs.items(request.headers), host=ORIGIN.host_header,
                                             client_ip="192.0.2.1", proto=b"http", behind_proxy=False,
                                             framing=hdrs.content_length(len(body)) if body or request.method
                                             not in (b"GET", b"OPTIONS", b"HEAD") else [])
        up_stream = FakeStream(answer_pieces)
        up = UpstreamConn(ORIGIN, up_stream, FakeSock())
        if fast:
            up_stream.written += http1.write_request(
                request.method, request.target, head,
                http1.FRAMING_LENGTH if head[-1][1] == b"content-length" else http1.FRAMING_NONE, len(body)) + body
            up.sent = (request.method, request.target, head)
        else:
            up_stream.written += up.h11.send(hdrs.request_event(request.method, request.target, head))
            if body:
                up_stream.written += up.h11.send(h11.Data(data=body))
            up_stream.written += up.h11.send(h11.EndOfMessage())
        out["to_mail_server"] = bytes(up_stream.written)
        rec = Transaction(ts=0.0, method=request.method.decode())
        try:
            answer = await exchange._answer_head(up, 60.0)
            out["fast_head"] = type(answer) is http1.ResponseHead
            await exchange._finish(gw, dev, up, Req(), answer, (), rec, b"gw.example")
            out["error"] = None
        except (UpstreamError, DeviceGone) as exc:
            out["error"] = type(exc).__name__
        out["kept"] = up in gw.pool.idle.get(ORIGIN, [])
        out["device_states"] = (dev.conn.our_state, dev.conn.their_state)
        out["device"] = _as_device_reads(request.method, bytes(dev.stream.written))
        out["body"] = body

    streamed = []
    real = exchange._stream_fast

    async def spy(*args):
        streamed.append(True)
        return await real(*args)

    exchange._stream_fast = spy
    try:
        trio.run(main)
    finally:
        exchange._stream_fast = real
    out["streamed_fast"] = bool(streamed)
    return out


def _as_device_reads(method: bytes, data: bytes):
    """The answer as the device's h11 client reads it: status, reason, headers (framing and
    Connection apart, their order free), body, and whether the connection stays open."""
    if not data:
        return None
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    events, body = [], bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or type(event) is h11.EndOfMessage:
            break
        if type(event) is h11.Data:
            body += event.data
        else:
            events.append(event)
    response = events[0]
    plain = [(k, v) for k, v in response.headers if k not in (b"content-length", b"transfer-encoding", b"connection")]
    framing = sorted((k, v) for k, v in response.headers if k in (b"content-length", b"transfer-encoding",
                                                                   b"connection"))
    return (response.status_code, response.reason, plain, framing, bytes(body), event is h11.NEED_DATA,
            conn.our_state, conn.their_state)


# -- the properties --------------------------------------------------------------------------

@FAST
@given(device_requests(), mail_server_answers(), st.booleans())
def test_fast_path_exchange_is_h11s(request_case, answer_case, closing):
    device_bytes, method, body, nxt = request_case
    pieces, _ = answer_case
    ref = _run(device_bytes, pieces, fast=False, closing=closing)
    fast = _run(device_bytes, pieces, fast=True, closing=closing)
    # The compiled parser read a whole Content-Length body: h11 never saw it.
    assert fast["took_body"] and fast["body"] == body == ref["body"]
    assert fast["to_mail_server"] == ref["to_mail_server"]
    assert fast["error"] == ref["error"]
    assert fast["device"] == ref["device"]
    assert fast["kept"] == ref["kept"]
    event(f"streamed by _stream_fast {fast['streamed_fast']}, error {fast['error']}, kept {fast['kept']}")
    if ref["error"] is None:
        assert fast["device_states"] == ref["device_states"]


def test_the_fast_path_is_taken_and_keeps_the_connection():
    """The common case really runs compiled: a Content-Length answer, kept alive."""
    device = b"POST " + EAS + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc"
    answer = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe", b"llo"]
    fast = _run(device, answer, fast=True, closing=False)
    assert fast["fast_head"] and fast["kept"] and fast["error"] is None
    assert fast["device"][4] == b"hello"
    assert fast["device_states"] == (h11.DONE, h11.DONE)
    chunked = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n", b"2\r\nlo\r\n0\r\n\r\n"]
    fast = _run(device, chunked, fast=True, closing=False)
    assert fast["fast_head"] and fast["kept"] and fast["device"][4] == b"hello"
    assert (b"transfer-encoding", b"chunked") in fast["device"][3]


@pytest.mark.parametrize("answer, error", [
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe"], "DeviceGone"),          # body cut short
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n"], "DeviceGone"),
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhel\r\n0\r\n\r\n"], "DeviceGone"),
    ([b"HTTP/1.1 200 OK\r\nContent-Le"], "UpstreamError"),                        # head cut short
    ([b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n"], "UpstreamError"),
    ([], "UpstreamError"),                                                         # closed at once
])
def test_broken_answers_fail_the_same_way(answer, error):
    device = b"POST " + EAS + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\nx"
    fast = _run(device, answer, fast=True, closing=False)
    ref = _run(device, answer, fast=False, closing=False)
    assert fast["error"] == ref["error"] == error
    assert fast["device"] == ref["device"] and not fast["kept"] and not ref["kept"]


@pytest.mark.parametrize("answer, kept", [
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"], False),   # bytes after it
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"], False),
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], True),
])
def test_what_follows_the_answer_decides_reuse(answer, kept):
    device = b"POST " + EAS + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"
    assert _run(device, answer, fast=True, closing=False)["kept"] is kept
    assert _run(device, answer, fast=False, closing=False)["kept"] is kept


@FAST
@given(device_requests(), st.integers(0, 40))
def test_take_body_leaves_h11_where_its_own_reading_would(request_case, cut):
    """take_body() (no h11 reading) vs h11 reading head and body: the same body, states and
    buffered next request; a body not whole in the first read stays h11's."""
    device_bytes, method, body, nxt = request_case
    gw = FakeGateway()

    async def main():
        ref = downstream.Device(gw, FakeStream(), "192.0.2.1", b"http")
        ref.conn.receive_data(device_bytes)
        events = []
        while True:
            event = ref.conn.next_event()
            events.append(event)
            if type(event) is h11.EndOfMessage:
                break
        ref_body = b"".join(e.data for e in events if type(e) is h11.Data)

        short = len(device_bytes) - len(nxt) - min(cut, len(body))
        first = device_bytes[:short] if cut and body else device_bytes
        dev = downstream.Device(gw, FakeStream(), "192.0.2.1", b"http")
        request = _event(dev, await downstream._read_head(gw, dev, first))
        assert request == events[0]
        taken = dev.take_body()
        if cut and body:
            assert taken is None          # not all there: h11 reads it, as before
            return
        assert taken == ref_body == body
        assert (dev.conn.our_state, dev.conn.their_state) == (ref.conn.our_state, ref.conn.their_state)
        assert dev.conn.trailing_data == ref.conn.trailing_data

    trio.run(main)


def test_upstream_request_bytes_match_h11_for_every_framing():
    for method, body, framing in [(b"POST", b"abc", http1.FRAMING_LENGTH), (b"POST", b"", http1.FRAMING_LENGTH),
                                  (b"GET", b"", http1.FRAMING_NONE), (b"OPTIONS", b"", http1.FRAMING_NONE)]:
        full = [(b"Host", b"host", b"mail"), (b"User-Agent", b"user-agent", b"x")]
        if framing == http1.FRAMING_LENGTH:
            full += hdrs.content_length(len(body))
        conn = h11.Connection(h11.CLIENT)
        ref = conn.send(hdrs.request_event(method, EAS, full))
        if body:
            ref += conn.send(h11.Data(data=body))
        ref += conn.send(h11.EndOfMessage())
        assert http1.write_request(method, EAS, full, framing, len(body)) + body == ref


# -- answers the gateway makes itself (transformed, refused, errors): Device.answer ----------------

@st.composite
def gateway_answers(draw):
    """(status, headers, body) as exchange._answer hands them to Device.answer: the body bytes
    or a transform's parts; sometimes a stale Content-Length (replaced) or a Connection header
    of the caller's own (h11 reads keep-alive from it: left to h11)."""
    status = draw(st.sampled_from([200, 200, 400, 403, 404, 413, 449, 500, 503]))
    headers = [(k.encode(), v.encode()) for k, v in draw(_extra_headers)]
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (b"Content-Length", b"999"))
    if draw(st.integers(0, 5)) == 0:
        headers.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive"]))))
    parts = draw(st.lists(st.binary(max_size=200), max_size=4))
    return status, headers, parts if draw(st.booleans()) else b"".join(parts)


def _answered(device_bytes: bytes, answer, *, compiled: bool, closing: bool, ask_h11: bool = False):
    """Device.answer after the request was read the compiled way (head parsed, body taken) or
    h11's way: the bytes written, the error, h11's states after the answer (``ask_h11``: asked
    before the next cycle, so a compiled exchange is told to h11 first), whether h11 had been
    told before that, and what the next cycle decides."""
    status, headers, body = answer
    gw = FakeGateway()
    out = {}

    async def main():
        dev, _, body_read = await _device_request(gw, device_bytes, compiled=compiled, closing=closing)
        assert body_read is not None
        try:
            await dev.answer(status, list(headers), list(body) if type(body) is list else body)
            out["error"] = None
        except (DeviceGone, h11.LocalProtocolError) as exc:
            out["error"] = type(exc).__name__
        out["written"] = bytes(dev.stream.written)
        out["h11_untold"] = dev._head is not None
        if ask_h11:
            out["states"] = (dev.conn.our_state, dev.conn.their_state)
        if out["error"] is None:
            out["next_cycle"] = downstream._next_cycle(dev)
            out["pending"] = dev.pending or dev.conn.trailing_data[0]

    trio.run(main)
    return out


@FAST
@given(device_requests(), gateway_answers(), st.booleans())
def test_gateway_answers_are_h11s_bytes_on_the_compiled_path(request_case, answer, closing):
    """Device.answer on a compiled exchange writes what h11 writes, byte for byte, leaves the
    connection kept or closed as h11 does, and tells h11 (when asked) the states its own
    writing would have left; a POST's answer goes out without h11."""
    device_bytes, method, _, _ = request_case
    ref = _answered(device_bytes, answer, compiled=False, closing=closing, ask_h11=True)
    fast = _answered(device_bytes, answer, compiled=True, closing=closing)
    told = _answered(device_bytes, answer, compiled=True, closing=closing, ask_h11=True)
    assert fast["error"] == told["error"] == ref["error"]
    assert fast["written"] == told["written"] == ref["written"]
    assert fast.get("next_cycle") == told.get("next_cycle") == ref.get("next_cycle")
    assert fast.get("pending") == told.get("pending") == ref.get("pending")
    assert told["states"] == ref["states"]
    has_connection = any(k.lower() == b"connection" for k, _ in answer[1])
    if method != b"HEAD" and not has_connection:
        assert fast["h11_untold"] and fast["error"] is None
    event(f"{method.decode()}, compiled {fast['h11_untold']}, error {fast['error']}, kept {fast.get('next_cycle')}")


def test_a_transformed_answer_on_a_kept_alive_compiled_exchange():
    """The common case with email security on: a parts answer, h11 never told, kept alive;
    on HTTP/1.0-style close or a draining worker, Connection: close and the cycle ends."""
    device = b"POST " + EAS + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc"
    answer = (200, [(b"Content-Type", b"application/vnd.ms-sync.wbxml")], [b"he", memoryview(b"llo")])
    fast = _answered(device, answer, compiled=True, closing=False)
    assert fast["h11_untold"] and fast["next_cycle"] is True
    assert fast["written"] == (b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
                               b"Content-Length: 5\r\n\r\nhello")
    closing = _answered(device, answer, compiled=True, closing=True)
    assert closing["written"].endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert closing["next_cycle"] is False


# -- a pooled connection the server closed silently: resent once --------------------------------

async def test_silently_closed_pooled_connection_is_resent_on_a_fresh_one(tmp_path, monkeypatch):
    """The mail server answers keep-alive and then closes the idle connection without a word.
    Reused unprobed (within TRUST_IDLE), the write goes into the dead connection and the
    read finds EOF: the gateway resends the whole request once on a new connection."""
    from proxy_helpers import Client
    from test_proxy import AUTH, QUERY, gateway

    probes = []
    real_probe = UpstreamConn.looks_alive
    monkeypatch.setattr(UpstreamConn, "looks_alive", lambda self: probes.append(self) or real_probe(self))

    connections, got = [], []

    async def server(stream):
        connections.append(stream)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if type(event) is h11.Request:
                    got.append(event.target)
                if type(event) is h11.EndOfMessage:
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"2")]))
                                          + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                    return            # and close, without Connection: close
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, server, 0)
        port = listeners[0].socket.getsockname()[1]
        async with gateway(f"http://127.0.0.1:{port}", tmp_path) as gw:
            client = await Client.connect(gw.port)
            for i in range(3):
                resp, body = await client.request(b"POST", b"/Microsoft-Server-ActiveSync" + QUERY, [AUTH], b"x")
                assert resp.status_code == 200 and body == b"ok"
                # The server's close must have reached the pooled socket before the next request.
                await _until(lambda: _pooled_dead(gw))
            await client.aclose()
        nursery.cancel_scope.cancel()
    # Each request reached the server once, each on its own connection; requests 2 and 3
    # first went into the dead pooled one, unprobed, and were sent again.
    assert len(got) == 3 and len(connections) == 3
    assert probes == []


def _pooled_dead(gw) -> bool:
    import select

    conns = [c for idle in gw.pool.idle.values() for c in idle]
    poller = select.poll()
    for c in conns:
        poller.register(c.sock.fileno(), select.POLLIN)
    return len(conns) == 1 and len(poller.poll(0)) == 1


async def _until(cond, timeout: float = 10.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


# -- whole connections through a gateway: pipelining, close, the gateway's own answers ----------

async def test_pipelined_and_closing_requests_on_the_compiled_path(tmp_path):
    """Three requests in one write (each whole in it: the compiled path takes each body and
    hands the next head on without h11), a 404 the gateway makes between them, then a
    request asking Connection: close: every answer right, in order, then the close."""
    from test_proxy import AUTH, QUERY, gateway, upstream

    def echo(req, body):
        return 200, [(b"Content-Type", b"application/octet-stream")], b"got:" + body

    def post(body: bytes, path=b"/Microsoft-Server-ActiveSync" + QUERY, extra=b""):
        return (b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\n" + AUTH[0] + b": " + AUTH[1] + b"\r\n" + extra
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    async with upstream(echo) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await stream.send_all(post(b"one") + post(b"x", path=b"/nowhere") + post(b"two") + post(b"three"))
        client = h11.Connection(h11.CLIENT)
        answers = []
        for _ in range(4):
            client.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x"), (b"Content-Length", b"0")]))
            client.send(h11.EndOfMessage())
            answer = []
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(10):
                        client.receive_data(await stream.receive_some(65536))
                elif type(event) is h11.Response:
                    answer = [event.status_code, b""]
                elif type(event) is h11.Data:
                    answer[1] += event.data
                elif type(event) is h11.EndOfMessage:
                    break
            answers.append(answer)
            client.start_next_cycle()
        assert answers == [[200, b"got:one"], [404, b"not found\n"], [200, b"got:two"], [200, b"got:three"]]
        await stream.send_all(post(b"last", extra=b"Connection: close\r\n"))
        client.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x"), (b"Content-Length", b"0"),
                                                                       (b"Connection", b"close")]))
        client.send(h11.EndOfMessage())
        data = bytearray()
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk             # ends when the gateway closes
        client.receive_data(bytes(data))
        response = client.next_event()
        assert response.status_code == 200 and (b"connection", b"close") in list(response.headers)
        assert client.next_event().data == b"got:last"
        await stream.aclose()
    assert [body for _, body in up.requests] == [b"one", b"two", b"three", b"last"]


async def test_an_unanswered_request_on_a_kept_alive_connection_names_the_connection(tmp_path):
    """The mail server answers once, then never again on the same connection: the 503's
    record says which connection it was (kept-alive, the request's number on it, how long
    it sat idle, its age), what a soak's log needs to tell a wedged pooled connection from
    a server that answers nothing."""
    import json

    from test_proxy import AUTH, QUERY, gateway, upstream

    served = []

    async def once(req, body):
        served.append(body)
        if len(served) > 1:
            await trio.sleep_forever()
        return 200, [(b"Content-Type", b"text/plain")], b"ok"

    async with upstream(once) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                               timeouts_upstream_read="0.5") as gw:
        from proxy_helpers import Client

        client = await Client.connect(gw.port)
        with trio.fail_after(10):
            assert (await client.request(b"POST", b"/Microsoft-Server-ActiveSync" + QUERY, [AUTH], b"a"))[0] \
                .status_code == 200
            assert (await client.request(b"POST", b"/Microsoft-Server-ActiveSync" + QUERY, [AUTH], b"b"))[0] \
                .status_code == 503
        await client.aclose()
    lines = [json.loads(x) for x in (tmp_path / "tx.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == [200, 503]
    error = lines[1]["error"]
    assert error.startswith("mail server did not answer within 0.5 s (kept-alive connection: request 2 on it, idle ")
    assert up.connections == 1


async def test_a_sync_long_poll_waits_as_long_as_it_asked(tmp_path):
    """A Sync with Wait (minutes) or HeartbeatInterval (seconds) is held by the mail server
    until something changes, like a Ping: timeouts.upstream_read alone would answer it
    503 "mail server did not answer within 60 s". A plain Sync keeps upstream_read."""
    from seg_fast.eas.wbxml import Element as E, encode
    from proxy_helpers import Client
    from test_proxy import AUTH, gateway, upstream

    def sync(*extra):
        return encode(E("AirSync:Sync", children=[E("AirSync:Collections", children=[
            E("AirSync:Collection", children=[E("AirSync:SyncKey", text="1"),
                                              E("AirSync:CollectionId", text="5")])]), *extra]))

    async def slow(req, body):
        await trio.sleep(1.0)         # longer than upstream_read below, far shorter than the Wait
        return 200, [(b"Content-Type", b"application/vnd.ms-sync.wbxml")], b"changes"

    target = b"/Microsoft-Server-ActiveSync?Cmd=Sync&User=test&DeviceId=ABC123&DeviceType=SmartPhone"
    async with upstream(slow) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                               timeouts_upstream_read="0.3") as gw:
        for body, status in [(sync(E("AirSync:Wait", text="1")), 200),
                             (sync(E("AirSync:HeartbeatInterval", text="300")), 200),
                             (sync(), 503)]:
            client = await Client.connect(gw.port)
            with trio.fail_after(10):
                resp, answer = await client.request(b"POST", target, [AUTH], body)
            assert resp.status_code == status
            if status == 200:
                assert answer == b"changes"
            await client.aclose()


def test_sync_wait_reads_only_the_syncs_own_wait():
    from seg_fast.eas.wbxml import Element as E, encode
    from seg_fast.proxy.exchange import sync_wait

    assert sync_wait(encode(E("AirSync:Sync", children=[E("AirSync:Wait", text="59")]))) == 59 * 60
    assert sync_wait(encode(E("AirSync:Sync", children=[E("AirSync:Wait", text="60")]))) is None   # out of range
    assert sync_wait(encode(E("AirSync:Sync", children=[E("AirSync:HeartbeatInterval", text="59")]))) is None
    assert sync_wait(encode(E("AirSync:Sync", children=[E("AirSync:HeartbeatInterval", text="3540")]))) == 3540
    assert sync_wait(b"\x03\x01j\x00\x45\x64") is None          # truncated WBXML
    assert sync_wait(b"") is None


def test_read_nb_is_os_read_without_the_exception():
    """sockio's optimistic reads: None where os.read raises BlockingIOError, bytes (at most
    the size asked, at most 64 KiB) otherwise, b"" at EOF, OSError for anything else."""
    import os
    import socket

    from seg_fast.proxy._http1 import read_nb

    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            os.read(a.fileno(), 10)
        assert read_nb(a.fileno(), 10) is None
        b.sendall(b"x" * 70_000)
        got = bytearray()
        while len(got) < 70_000:
            piece = read_nb(a.fileno(), 100_000)
            if piece is None:
                continue
            assert 0 < len(piece) <= 65536
            got += piece
        assert got == b"x" * 70_000
        b.sendall(b"abc")
        assert read_nb(a.fileno(), 2) == b"ab"
        b.close()
        assert read_nb(a.fileno(), 10) == b"c"
        assert read_nb(a.fileno(), 10) == b""
    finally:
        a.close()
    with pytest.raises(OSError):
        read_nb(a.fileno(), 10)           # closed: fileno() is -1, EBADF
