"""The fleet's HTTP/1.1 client (seg_fast.sim.wire) held to h11: answers h11 writes
are read back exactly (Content-Length, chunked, close-delimited, keep-alive or not);
framing h11 would refuse is refused; the request head it writes parses in h11 as
the same request. The poller's reader (``HttpConn.poll_answer``, no waiting: it is
called each time the socket is readable) is held to the waiting reader on the same
bytes in the same pieces: the same answer, or FALLBACK and then the waiting reader
gives it from what was buffered, or the same refusal. The same holds over TLS 1.3
(``TlsStream``: OpenSSL's socket BIO on the bare socket, each piece its own record),
where a peer that sends garbage or closes mid-answer gives an error, never a wait;
and an answer the poller began is finished by the waiting reader."""
from __future__ import annotations

import select
import socket
import ssl

import h11
import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_fast.sim.wire import SERVER_NAME, FALLBACK, HttpConn, RawStream, TlsStream, WireError, request_head

CONST = b"Host: mail.seg-fast.test\r\nMS-ASProtocolVersion: 14.1\r\nAuthorization: Basic dTpw\r\n"


def _answer(status: int, headers: list, body: bytes, chunks: list[bytes] | None = None) -> bytes:
    srv = h11.Connection(h11.SERVER)
    srv.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    srv.next_event(), srv.next_event()
    out = srv.send(h11.Response(status_code=status, headers=headers))
    for c in (chunks if chunks is not None else [body]):
        if c:
            out += srv.send(h11.Data(data=c))
    return out + srv.send(h11.EndOfMessage())


def _wire(body: bytes, chunked: bool, cuts: int, extra: list | None = None) -> bytes:
    """A 200 answer carrying ``body``: chunked in ``cuts`` chunks, or with a
    Content-Length (and the ``extra`` header lines)."""
    if chunked:
        step = max(1, len(body) // cuts)
        chunks = [body[k:k + step] for k in range(0, len(body), step)]
        return _answer(200, [("Transfer-Encoding", "chunked")], body, chunks)
    return _answer(200, [("Content-Length", str(len(body))), *(extra or [])], body)


async def _read(wire: bytes, pieces: int = 7, close: bool = False):
    """The client's reading of ``wire`` delivered in small pieces."""
    a, b = trio.testing.memory_stream_pair()
    conn = HttpConn(a)
    error = []
    async with trio.open_nursery() as n:
        async def serve():
            await b.receive_some(65536)
            step = max(1, len(wire) // pieces)
            for k in range(0, len(wire), step):
                await b.send_all(wire[k:k + step])
            if close:
                await b.aclose()
        n.start_soon(serve)
        try:
            out = await conn.request(request_head(b"/x", CONST, b"0", None, 0), b"")
        except WireError as exc:       # raised outside the nursery, not in a group
            error.append(exc)
            n.cancel_scope.cancel()
    if error:
        raise error[0]
    return out, conn.reusable


@settings(max_examples=40, deadline=None)
@given(body=st.binary(max_size=3000), chunked=st.booleans(), cuts=st.integers(1, 5), pieces=st.integers(1, 9))
def test_reads_what_h11_writes(body, chunked, cuts, pieces):
    wire = _wire(body, chunked, cuts)
    (status, headers, got), reusable = trio.run(_read, wire, pieces)
    assert (status, got, reusable) == (200, body, True)


def test_close_delimited_and_connection_close():
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nall of it"
    (status, headers, got), reusable = trio.run(_read, wire, 3, True)
    assert (status, got, reusable) == (200, b"all of it", False)
    wire = _answer(503, [("Content-Length", "2"), ("Connection", "close")], b"no")
    (status, headers, got), reusable = trio.run(_read, wire)
    assert (status, got, reusable, headers[b"connection"]) == (503, b"no", False, b"close")


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 200\r\nContent-Length: 1x\r\n\r\n",                       # not digits
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\n Folded: x\r\nContent-Length: 0\r\n\r\n",       # obs-fold
    b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",              # cut before the end
])
def test_refuses_what_h11_refuses(wire):
    cli = h11.Connection(h11.CLIENT)
    cli.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    cli.send(h11.EndOfMessage())
    cli.receive_data(wire)
    cli.receive_data(b"")
    with pytest.raises(h11.RemoteProtocolError):
        while cli.next_event() is not h11.EndOfMessage:
            pass
    with pytest.raises(WireError):
        trio.run(_read, wire, 3, True)


def test_request_head_is_the_request_h11_reads():
    head = request_head(b"/Microsoft-Server-ActiveSync?Cmd=Sync&User=u1", CONST, b"3141592653",
                        b"Sync.17", 5)
    srv = h11.Connection(h11.SERVER)
    srv.receive_data(head + b"hello")
    req = srv.next_event()
    assert req.method == b"POST" and req.target == b"/Microsoft-Server-ActiveSync?Cmd=Sync&User=u1"
    h = dict(req.headers)
    assert h[b"x-ms-policykey"] == b"3141592653" and h[b"x-fleet-seq"] == b"Sync.17"
    assert h[b"authorization"] == b"Basic dTpw" and h[b"content-length"] == b"5"
    assert srv.next_event().data == b"hello"


def _poll(wire: bytes, pieces: int = 7, close: bool = False):
    """``wire`` read by poll_answer as it arrives in pieces over a real socket pair;
    a FALLBACK is finished by the waiting reader (as the Parker's resume does)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    conn = HttpConn(RawStream(a))
    conn.reusable = False                   # as after a request was sent
    step = max(1, len(wire) // pieces)
    chunks = [wire[k:k + step] for k in range(0, len(wire), step)]
    try:
        while chunks:
            b.sendall(chunks.pop(0))
            if not chunks and close:
                b.shutdown(socket.SHUT_WR)
            res = conn.poll_answer()
            if res is FALLBACK:
                for c in chunks:
                    b.sendall(c)
                if close:
                    b.shutdown(socket.SHUT_WR)
                return trio.run(conn.answer), conn.reusable, True
            if res is not None:
                return res, conn.reusable, False
        if close:
            res = conn.poll_answer()
            if res is FALLBACK:
                return trio.run(conn.answer), conn.reusable, True
            if res is not None:
                return res, conn.reusable, False
        return None, conn.reusable, False   # still waiting for more
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@settings(max_examples=30, deadline=None)
@given(body=st.binary(max_size=40000), chunked=st.booleans(), cuts=st.integers(1, 5),
       pieces=st.integers(1, 9))
def test_poll_reads_what_the_waiting_reader_reads(tls, body, chunked, cuts, pieces):
    # over TLS each piece is a record, or several past 16 KiB
    wire = _wire(body, chunked, cuts, [("X-A", "1"), ("x-a", "2")])
    (status, headers, got), reusable, fell_back = (_tls_poll if tls else _poll)(wire, pieces)
    assert (status, got, reusable) == (200, body, True)
    assert fell_back == chunked             # Content-Length answers are the poller's own
    assert ((status, headers, got), reusable) == trio.run(_read, wire, pieces)


def test_poll_close_delimited_connection_close_and_what_follows():
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nall of it"
    assert _poll(wire, 3, True)[:2] == trio.run(_read, wire, 3, True)
    wire = _answer(503, [("Content-Length", "2"), ("Connection", "close")], b"no")
    (status, headers, got), reusable, fell_back = _poll(wire)
    assert (status, got, reusable, fell_back) == (503, b"no", False, False)
    # bytes after the answer stay buffered for the next one (buffered() says so)
    a, b = socket.socketpair()
    a.setblocking(False)
    conn = HttpConn(RawStream(a))
    b.sendall(_answer(200, [("Content-Length", "3")], b"one") + b"HTTP/1.1 200 OK\r\n")
    assert conn.poll_answer()[2] == b"one" and conn.buffered()
    b.sendall(b"Content-Length: 3\r\n\r\ntwo")
    assert conn.poll_answer()[2] == b"two" and not conn.buffered()
    assert conn.poll_answer() is None       # nothing more: still waiting
    a.close()
    b.close()


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 200\r\nContent-Length: 1x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\n Folded: x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
])
def test_poll_refuses_what_the_waiting_reader_refuses(wire):
    with pytest.raises(WireError):
        _poll(wire, 3, True)


def test_poll_answer_begun_is_finished_by_the_waiting_reader():
    # the poller read the head and part of the body; the waiting reader takes over
    # from there (as when TLS wants to write before it reads on) and gives the same
    a, b = socket.socketpair()
    a.setblocking(False)
    conn = HttpConn(RawStream(a))
    wire = _answer(200, [("Content-Length", "2000")], bytes(range(250)) * 8)
    b.sendall(wire[:300])
    assert conn.poll_answer() is None and conn.want == 2000
    b.sendall(wire[300:])
    status, headers, got = trio.run(conn.answer)
    assert (status, got, conn.reusable, conn.want, conn.parts) == (200, bytes(range(250)) * 8, True, -1, [])
    a.close()
    b.close()


# -- the same over TLS 1.3 (OpenSSL's socket BIO on the bare socket) ---------------------
_CA = trustme.CA()
_SERVER_CTX = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
_CA.issue_cert(SERVER_NAME).configure_cert(_SERVER_CTX)
_CLIENT_CTX = ssl.create_default_context()
_CA.configure_trust(_CLIENT_CTX)
_CLIENT_CTX.minimum_version = ssl.TLSVersion.TLSv1_3


def _handshake(*objs) -> None:
    """Both ends of a socket pair's TLS, stepped without waiting until both are done."""
    todo = list(objs)
    for _ in range(1000):
        for o in list(todo):
            try:
                o.do_handshake()
                todo.remove(o)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
        if not todo:
            return
    raise AssertionError("handshake did not finish")


def _tls_pair(session=None):
    """(client TlsStream, server TlsStream, client socket, server socket), handshaken."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    client = TlsStream(a, _CLIENT_CTX, server_hostname=SERVER_NAME, session=session)
    server = TlsStream(b, _SERVER_CTX, server_side=True)
    _handshake(client.ssl, server.ssl)
    return client, server, a, b


def _tls_poll(wire: bytes, pieces: int = 7, close: str = ""):
    """``wire`` sent by a TLS server in pieces (a record each) and read by poll_answer
    as they arrive; a FALLBACK is finished by the waiting reader. ``close``: after the
    last piece the server says close_notify ("clean") or just closes ("ragged")."""
    client, server, a, b = _tls_pair()
    conn = HttpConn(client)
    conn.reusable = False
    step = max(1, len(wire) // pieces)
    chunks = [wire[k:k + step] for k in range(0, len(wire), step)]

    def closing():
        if close == "clean":
            try:
                server.ssl.shutdown()
            except ssl.SSLWantReadError:
                pass
        if close:
            b.shutdown(socket.SHUT_WR)

    try:
        while chunks:
            server.ssl.write(chunks.pop(0))
            if not chunks:
                closing()
            # polled as epoll would call it: while the socket is readable
            while select.select([a], [], [], 0)[0]:
                res = conn.poll_answer()
                if res is FALLBACK:
                    for c in chunks:
                        server.ssl.write(c)
                    closing()
                    return trio.run(conn.answer), conn.reusable, True
                if res is not None:
                    return res, conn.reusable, False
        return None, conn.reusable, False
    finally:
        a.close()
        b.close()


def test_tls_close_delimited_and_what_follows():
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nall of it"
    for close in ("clean", "ragged"):        # both end a close-delimited body (https_compatible)
        (status, _h, got), reusable, fell_back = _tls_poll(wire, 3, close)
        assert (status, got, reusable, fell_back) == (200, b"all of it", False, True)
    # an answer and the start of the next in one record: the rest stays buffered
    client, server, a, b = _tls_pair()
    conn = HttpConn(client)
    server.ssl.write(_answer(200, [("Content-Length", "3")], b"one") + b"HTTP/1.1 200 OK\r\n")
    assert conn.poll_answer()[2] == b"one" and conn.buffered()
    server.ssl.write(b"Content-Length: 3\r\n\r\ntwo")
    assert conn.poll_answer()[2] == b"two" and not conn.buffered()
    assert conn.poll_answer() is None       # nothing more: still waiting
    a.close()
    b.close()


@pytest.mark.parametrize("close", ["clean", "ragged"])
def test_tls_closed_mid_answer_is_an_error(close):
    wire = _answer(200, [("Content-Length", "10")], b"0123456789")[:-4]
    with pytest.raises(WireError, match="closed before the answer ended"):
        _tls_poll(wire, 2, close)
    with pytest.raises(WireError, match="closed before the answer ended"):
        _tls_poll(wire[:20], 1, close)       # mid-head


def test_tls_garbage_is_an_error_not_a_wait():
    # bytes that are no TLS record: an SSLError (an OSError, which the fleet counts)
    client, server, a, b = _tls_pair()
    conn = HttpConn(client)
    b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")      # plain text on a TLS connection
    with pytest.raises(ssl.SSLError):
        conn.poll_answer()
    a.close()
    b.close()
    # and the waiting reader says the same
    client, server, a, b = _tls_pair()
    conn = HttpConn(client)
    b.send(bytes(range(256)))
    with pytest.raises(ssl.SSLError):
        trio.run(conn.answer)
    a.close()
    b.close()


def test_tls_write_retried_whole_and_session_resumed():
    # a request larger than the socket takes: send_nowait says so, and send_all with
    # the same bytes (OpenSSL's rule) finishes it while the server reads
    client, server, a, b = _tls_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 4000
    assert client.send_nowait(data) is False
    got = bytearray()

    async def both():
        async with trio.open_nursery() as n:
            n.start_soon(client.send_all, data)
            while len(got) < len(data):
                got.extend(await server.receive_some())
    trio.run(both)
    assert bytes(got) == data
    # the session (its TLS 1.3 ticket came with the server's first data) resumes
    server.ssl.write(b"x")
    assert trio.run(client.receive_some) == b"x"
    session = client.session
    assert not client.session_reused
    a.close()
    b.close()
    client2, _server2, a2, b2 = _tls_pair(session)
    assert client2.session_reused
    a2.close()
    b2.close()
