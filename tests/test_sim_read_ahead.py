"""The load side's TLS read-ahead (sim/tlssession.read_ahead): a context so set reads
what the socket holds in one go, and the records read ahead (in the SSL object, where
neither the socket's readiness nor SSLObject.pending() shows them) are still found by
the fleet's readers: wire.read_tls reads the whole answer, HttpConn.buffered says an
answer is there, so the Parker does not wait on a socket that will not get readable.
(The fleet turns it on only when asked: SEG_FAST_FLEET_READ_AHEAD=1, see fleet.READ_AHEAD.)"""
from __future__ import annotations

import os
import select
import socket
import ssl

import pytest

from seg_fast.proxy.tlsio import socket_bio
from seg_fast.sim import tlssession
from seg_fast.sim.wire import FALLBACK, TLS_DRAINED, HttpConn, TlsStream, read_tls
from tls_contexts import server_and_client

NAME = "mail.seg-fast.test"


@pytest.fixture
def pair():
    """(client TlsStream over a read-ahead context, the server's SSL object), handshaken
    over loopback TCP; the server's first bytes (TLS 1.3 tickets) read already."""
    server, client = server_and_client(NAME)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    if not tlssession.read_ahead(client):
        pytest.skip("read-ahead needs CPython's _ssl layout (tlssession.setter)")
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    ls.close()
    for sock in (c, s):
        sock.setblocking(False)
    stream = TlsStream(c, client, server_hostname=NAME)
    srv = socket_bio(server, s, True)
    done = [False, False]
    for _ in range(1000):
        for i, obj in enumerate((stream.ssl, srv)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
        if all(done):
            break
    assert all(done)
    # the server's tickets and one byte, read by the client: nothing left behind
    srv.write(b"!")
    got = b""
    for _ in range(1000):
        select.select([c], [], [], 5)
        try:
            got += stream.ssl.read(100)
        except ssl.SSLWantReadError:
            continue
        if got:
            break
    assert got == b"!"
    yield stream, srv
    c.close()                                   # (TlsStream.close tells trio: no trio here)
    s.close()


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], 10)[0], "the server's records never arrived"


def test_read_ahead_is_on():
    _server, client = server_and_client(NAME)
    if not tlssession.read_ahead(client):
        pytest.skip("read-ahead needs CPython's _ssl layout (tlssession.setter)")
    lib = tlssession._state["lib"]
    ctx = tlssession._word(client, tlssession._CTX_AT)
    assert lib.SSL_CTX_ctrl(ctx, tlssession._SSL_CTRL_GET_READ_AHEAD, 0, None) == 1
    assert tlssession.has_pending() is not None


def test_answer_read_whole_from_records_read_ahead(pair):
    """Head and body sent as separate records (the simulator writes a big answer's head
    and body apart): the head's short record is not the end while the body's records
    sit read ahead in the SSL object."""
    stream, srv = pair
    body = bytes(range(256)) * 160                  # 40 KB: three records
    srv.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    srv.write(body)
    wait_readable(stream.socket)
    conn = HttpConn(stream)
    conn.reusable = False                           # as after the request was sent
    res = conn.poll_answer()
    assert res is not None and res is not FALLBACK
    status, headers, got = res
    assert status == 200 and got == body
    assert not readable(stream.socket)              # one read took the socketful


def test_short_record_then_more_read_ahead(pair):
    """read_tls past a short record when the next one was read ahead."""
    stream, srv = pair
    srv.write(b"a" * 100)
    srv.write(b"b" * 100)
    wait_readable(stream.socket)
    parts: list[bytes] = []
    n, state = read_tls(stream.ssl, parts)
    assert state == TLS_DRAINED
    assert b"".join(parts) == b"a" * 100 + b"b" * 100 and n == 200
    assert not readable(stream.socket)


def test_buffered_sees_records_read_ahead(pair):
    """One record handed out, the next held read ahead: the socket is not readable, yet
    the connection has an answer waiting (Parker.add must not park it)."""
    stream, srv = pair
    srv.write(b"a" * 100)
    srv.write(b"b" * 100)
    wait_readable(stream.socket)
    assert stream.ssl.read(16384) == b"a" * 100     # one record per read
    assert stream.ssl.pending() == 0                # CPython's view: nothing more
    assert not readable(stream.socket)
    conn = HttpConn(stream)
    assert conn.buffered()
    assert stream.ssl.read(16384) == b"b" * 100
    assert not conn.buffered()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SEG_FAST_SLOW"), reason="slow: SEG_FAST_SLOW=1 runs it")
def test_fleet_over_tls_with_read_ahead(monkeypatch):
    """The whole fleet with read-ahead on (SEG_FAST_FLEET_READ_AHEAD, inherited by the
    shards): every answer checked, none lost or late (a record left read ahead would be
    a Ping or Sync that never completes: a timeout failure)."""
    import importlib.util
    import test_sizing_tls

    monkeypatch.setenv("SEG_FAST_FLEET_READ_AHEAD", "1")
    paths = ["direct"]
    if importlib.util.find_spec("seg_fast.proxy.server") is not None:
        paths.append("gateway")
    test_sizing_tls._check(paths)
