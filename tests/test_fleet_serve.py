"""The shards' simulator server (seg_fast.sim.lean_serve: bare non-blocking sockets)
against the simulator's own (trio listeners and SocketStreams): the same byte streams
(test_sim_http's cases: the fleet's requests, pipelined, split, and everything the
lean path hands to h11) sent over real sockets must get identical bytes back, plain
and over TLS; and the parked-Ping heartbeat still answers a Ping on a lean port."""
from __future__ import annotations

import functools
import ssl

import trio
import trustme

from seg_fast.sim import lean_serve
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, decode, encode, text
from seg_fast.sim.wire import HttpConn, RawStream, connect
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


async def test_tls_same_answers(nursery):
    ca = trustme.CA()
    cert = ca.issue_cert("mail.seg-fast.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
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
