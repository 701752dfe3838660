"""The shards' simulator server (seg_fast.sim.lean_serve: bare non-blocking sockets)
against the simulator's own (trio listeners and SocketStreams): the same byte streams
(test_sim_http's cases: the fleet's requests, pipelined, split, and everything the
lean path hands to h11) sent over real sockets must get identical bytes back, plain
and over TLS; and the parked-Ping heartbeat still answers a Ping on a lean port.
The plain port is one epoll set for all connections (lean_serve.Reactor): a Ping
parked there holds no task; requests pipelined behind it wait for its answer and
are answered in order after it, as on the simulator's own server; a connection
closed while parked is forgotten once answered; an answer larger than the socket
takes is written in pieces as the socket drains, byte for byte. The TLS port is the
same reactor with each connection's TLS over OpenSSL's socket BIO: every case above
gives the own server's bytes over TLS too, a Ping parked there holds no task, a
device's session resumes, and a peer sending garbage instead of TLS is dropped while
the port serves on."""
from __future__ import annotations

import functools
import socket
import ssl

import pytest
import trio
import trustme

from seg_fast.sim import lean_serve
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, decode, encode, text
from seg_fast.sim.wire import SERVER_NAME, HttpConn, RawStream, TlsStream, connect
from test_sim_http import CASES, FOLDERSYNC, SYNC0, _exchange, post


def _sim() -> MailboxSimulator:
    return MailboxSimulator(password="secret", seed=5, initial_messages=4, require_provisioning=False,
                            max_body=4096)


async def test_same_bytes_as_the_simulators_own_server(nursery):
    ours, ref = _sim(), _sim()
    port = await nursery.start(lean_serve.serve, ours, "127.0.0.1", 0)
    await nursery.start(ref.serve, "127.0.0.1", 0)
    for name, pieces in CASES.items():
        a = await _exchange(port, pieces)
        b = await _exchange(ref.port, pieces)
        assert a == b, name
    assert ours.counts == ref.counts and ours.sent_count == ref.sent_count == 2
    assert ours.lean_answers >= 10


_CA = trustme.CA()
_SERVER_CTX = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
_CA.issue_cert(SERVER_NAME).configure_cert(_SERVER_CTX)
_CLIENT_CTX = ssl.create_default_context()
_CA.configure_trust(_CLIENT_CTX)


class _Tls:
    """A test client's TLS connection (wire.TlsStream) with a TCP half-close: the
    server reads a ragged EOF (as over plain TCP, the end of the requests) and the
    client still reads every answer."""

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream

    @classmethod
    async def open(cls, port: int, session=None) -> "_Tls":
        raw = await connect("127.0.0.1", port, None)
        stream = TlsStream(raw.socket, _CLIENT_CTX, server_hostname=SERVER_NAME, session=session)
        await stream.do_handshake()
        return cls(stream)

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_eof(self) -> None:
        self.stream.socket.shutdown(socket.SHUT_WR)

    async def receive_some(self, max_bytes=None) -> bytes:
        try:
            return await self.stream.receive_some(max_bytes)
        except ssl.SSLError:
            # what a server's TLS says after a ragged EOF (an alert) ends the stream,
            # from either server alike
            return b""

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _open(port: int, tls: bool):
    return await _Tls.open(port) if tls else await trio.open_tcp_stream("127.0.0.1", port)


async def _tls_exchange(port: int, pieces: list[bytes]) -> bytes:
    stream = await _Tls.open(port)
    got = bytearray()
    for piece in pieces:
        await stream.send_all(piece)
        await trio.sleep(0)
    await stream.send_eof()
    with trio.fail_after(20):
        while data := await stream.receive_some(65536):
            got += data
    await stream.aclose()
    return bytes(got)


async def test_tls_same_bytes_as_the_simulators_own_server(nursery):
    ours, ref = _sim(), _sim()
    port = await nursery.start(functools.partial(lean_serve.serve, ours, "127.0.0.1", 0,
                                                 ssl_context=_SERVER_CTX))
    ref_port = await nursery.start(functools.partial(ref.serve, "127.0.0.1", 0, ssl_context=_SERVER_CTX))
    for name, pieces in CASES.items():
        a = await _tls_exchange(port, pieces)
        b = await _tls_exchange(ref_port, pieces)
        assert a == b, name
    assert ours.counts == ref.counts and ours.sent_count == ref.sent_count == 2
    assert ours.lean_answers >= 10
    await _until(lambda: ours.connections == 0)


async def test_tls_session_resumed_and_garbage_dropped(nursery):
    sim = _sim()
    port = await nursery.start(functools.partial(lean_serve.serve, sim, "127.0.0.1", 0,
                                                 ssl_context=_SERVER_CTX))
    head, _, body = post(b"FolderSync", FOLDERSYNC).partition(b"\r\n\r\n")
    conn = HttpConn(await connect("127.0.0.1", port, None))
    conn.stream = TlsStream(conn.stream.socket, _CLIENT_CTX, server_hostname=SERVER_NAME)
    assert (await conn.request(head + b"\r\n\r\n", body))[0] == 200
    session = conn.stream.session                 # its ticket came with the answer
    assert not conn.stream.session_reused
    await conn.aclose()
    # a peer that speaks no TLS: its connection dropped, the port serves on
    bad = await connect("127.0.0.1", port, None)
    await bad.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    with trio.fail_after(20):                     # closed (an alert first, or a reset)
        try:
            while await bad.receive_some(65536):
                pass
        except ConnectionResetError:
            pass
    await bad.aclose()
    again = await _Tls.open(port, session)
    assert again.stream.session_reused            # resumed: no full handshake
    conn = HttpConn(again.stream)
    status, _h, answer = await conn.request(head + b"\r\n\r\n", body)
    assert status == 200 and text(decode(answer), "FolderHierarchy:Status") == "1"
    await conn.aclose()
    await _until(lambda: sim.connections == 0)


async def test_tls_same_answers(nursery):
    server, client = _SERVER_CTX, _CLIENT_CTX
    ours, ref = _sim(), _sim()
    port = await nursery.start(functools.partial(lean_serve.serve, ours, "127.0.0.1", 0, ssl_context=server))
    ref_port = await nursery.start(functools.partial(ref.serve, "127.0.0.1", 0, ssl_context=server))
    got = []
    for p in (port, ref_port):
        conn = await HttpConn.open("127.0.0.1", p, None, client)
        answers = []
        for req in (post(b"FolderSync", FOLDERSYNC), post(b"Settings", encode(E(
                "Settings:Settings", E("Settings:UserInformation", E("Settings:Get")))))):
            head, _, body = req.partition(b"\r\n\r\n")
            status, headers, answer = await conn.request(head + b"\r\n\r\n", body)
            answers.append((status, sorted(headers.items()), answer))
        await conn.aclose()
        got.append(answers)
    assert got[0] == got[1]
    assert got[0][0][0] == 200 and text(decode(got[0][0][2]), "FolderHierarchy:Status") == "1"


async def test_parked_ping_released_by_mail(nursery):
    # a Ping parked on a lean port: the simulator's connection task sleeps, and
    # deliver() wakes it through the same path as on its own server
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=0, require_provisioning=False)
    port = await nursery.start(lean_serve.serve, sim, "127.0.0.1", 0)
    conn = HttpConn(await connect("127.0.0.1", port, None))
    assert type(conn.stream) is RawStream

    async def req(cmd: bytes, body: bytes):
        head, _, b = post(cmd, body).partition(b"\r\n\r\n")
        return await conn.request(head + b"\r\n\r\n", b)

    assert (await req(b"FolderSync", FOLDERSYNC))[0] == 200
    assert (await req(b"Sync", SYNC0))[0] == 200
    ping = encode(E("Ping:Ping", E("Ping:HeartbeatInterval", 600),
                    E("Ping:Folders", E("Ping:Folder", E("Ping:Id", "1"), E("Ping:Class", "Email")))))
    answered = trio.Event()
    got = []

    async def park():
        got.append(await req(b"Ping", ping))
        answered.set()

    nursery.start_soon(park)
    with trio.fail_after(20):
        while sim.parked == 0:
            await trio.sleep(0.01)
    assert not answered.is_set()
    sim.deliver("jdoe")
    with trio.fail_after(20):
        await answered.wait()
    await conn.aclose()
    status, _, answer = got[0]
    assert status == 200 and text(decode(answer), "Ping:Status") == "2"


PING = encode(E("Ping:Ping", E("Ping:HeartbeatInterval", 600),
                E("Ping:Folders", E("Ping:Folder", E("Ping:Id", "1"), E("Ping:Class", "Email")))))


def _task_names() -> list[str]:
    todo, names = [trio.lowlevel.current_root_task()], []
    while todo:
        t = todo.pop()
        names.append(t.name)
        for n in t.child_nurseries:
            todo.extend(n.child_tasks)
    return names


async def _until(cond) -> None:
    with trio.fail_after(20):
        while not cond():
            await trio.sleep(0.01)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_pipelined_behind_a_parked_ping_same_bytes(nursery, tls):
    # FolderSync, Sync 0, Ping (parks: nothing pending), then FolderSync pipelined
    # behind it: no answer to the FolderSync until the mail releases the Ping, then
    # both, in order -- the same bytes as the simulator's own server gives
    got = []
    ctx = _SERVER_CTX if tls else None
    for server in ("reactor", "own"):
        sim = MailboxSimulator(password="secret", seed=5, initial_messages=0, require_provisioning=False)
        if server == "reactor":
            port = await nursery.start(functools.partial(lean_serve.serve, sim, "127.0.0.1", 0, ssl_context=ctx))
        else:
            port = await nursery.start(functools.partial(sim.serve, "127.0.0.1", 0, ssl_context=ctx))
        stream = await _open(port, tls)
        await stream.send_all(post(b"FolderSync", FOLDERSYNC) + post(b"Sync", SYNC0))
        await _until(lambda: sim.counts["Sync"] == 1)
        await stream.send_all(post(b"Ping", PING) + post(b"FolderSync", FOLDERSYNC))
        await _until(lambda: sim.parked == 1)
        # the reactor holds the parked Ping without a task; the own server has its
        # connection's task asleep
        assert any("_run_handler" in n for n in _task_names()) == (server == "own"), _task_names()
        before = bytearray()
        with trio.move_on_after(0.3):
            while True:
                before += await stream.receive_some(65536)
        assert before.count(b"HTTP/1.1 200") == 2         # FolderSync and Sync only
        sim.deliver("jdoe")
        await stream.send_eof()
        rest = bytearray()
        with trio.fail_after(20):
            while data := await stream.receive_some(65536):
                rest += data
        await stream.aclose()
        assert rest.count(b"HTTP/1.1 200") == 2 and sim.parked == 0
        await _until(lambda: sim.connections == 0)
        got.append(bytes(before + rest))
    assert got[0] == got[1]


async def test_parked_connection_closed_by_the_client(nursery):
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=0, require_provisioning=False)
    port = await nursery.start(lean_serve.serve, sim, "127.0.0.1", 0)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(post(b"Sync", SYNC0) + post(b"Ping", PING))
    await _until(lambda: sim.parked == 1)
    await stream.aclose()
    sim.deliver("jdoe")                # its answer goes nowhere; the connection is let go
    await _until(lambda: sim.parked == 0 and sim.connections == 0)
    # and the simulator serves on
    conn = HttpConn(await connect("127.0.0.1", port, None))
    head, _, body = post(b"FolderSync", FOLDERSYNC).partition(b"\r\n\r\n")
    assert (await conn.request(head + b"\r\n\r\n", body))[0] == 200
    await conn.aclose()


def test_a_large_answer_is_written_as_the_socket_drains():
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c = lean_serve._Conn(a, None)
    head, body = b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n", bytes(range(256)) * 11719
    c.out = [memoryview(head), memoryview(body[:3000000])]
    assert lean_serve.Reactor._flush(None, c) is False     # the socket took only part of it
    got = bytearray()
    flushes = 1
    while c.out:
        got += b.recv(1 << 20)
        lean_serve.Reactor._flush(None, c)
        flushes += 1
    b.setblocking(False)
    while True:
        try:
            got += b.recv(1 << 20)
        except BlockingIOError:
            break
    assert bytes(got) == head + body[:3000000] and flushes > 2
    a.close()
    b.close()
