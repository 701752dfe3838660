"""The parking lot's descriptors (proxy/parking.py): found without trio's attribute forwarding,
and a Ping parked over real trio sockets (a plain SocketStream and an SSLStream over one) is
handed back for its answer and for its device leaving, each on the right descriptor."""
from __future__ import annotations

import socket
import ssl

import pytest
import trio
import trustme

from seg_fast.proxy import parking
from seg_fast.proxy.parking import ANSWER, DEVICE_GONE, Parked, PingPark


def test_fileno_of_trio_and_stdlib_sockets():
    a, b = socket.socketpair()
    t = trio.socket.from_stdlib_socket(a)
    assert parking.fileno(t) == t.fileno() == a.fileno() >= 0
    assert parking.fileno(b) == b.fileno() >= 0
    a.close()                        # (a trio socket's own close wants a running trio)
    b.close()
    assert parking.fileno(t) == -1 and parking.fileno(b) == -1


def _device_stream(kind: str, sock: socket.socket):
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    if kind == "plain":
        return stream
    cert = trustme.CA().issue_cert("localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return trio.SSLStream(stream, ctx, server_side=True)      # never handshakes: parking reads its socket


@pytest.mark.parametrize("kind", ["plain", "tls"])
async def test_parked_ping_handed_back_on_its_descriptors(kind):
    released: list = []
    got = trio.Event()

    def spawn(p, why):
        released.append((p, why))
        got.set()

    park = PingPark(spawn)
    pairs = []
    parked = []
    for _ in range(2):
        up_local, up_peer = socket.socketpair()
        dev_local, dev_peer = socket.socketpair()
        pairs.append((up_local, up_peer, dev_local, dev_peer))
        up = type("Up", (), {})()
        up.sock = trio.socket.from_stdlib_socket(up_local)
        parked.append(Parked(_device_stream(kind, dev_local), "127.0.0.1", b"http", False, up, None, None,
                             None, b"gw", trio.current_time() + 3600, 0.0, 0.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(park.run)
        for p, (up_local, _, dev_local, _) in zip(parked, pairs):
            park.park(p)
            assert p.fds == (up_local.fileno(), dev_local.fileno())
        assert park.count == 2
        pairs[0][1].send(b"HTTP/1.1 200 OK\r\n")      # the mail server answers the first
        with trio.fail_after(10):
            await got.wait()
        assert released == [(parked[0], ANSWER)]
        got = trio.Event()
        pairs[1][3].close()                              # the second's device goes away
        with trio.fail_after(10):
            await got.wait()
        assert released[1:] == [(parked[1], DEVICE_GONE)] and park.count == 0
        nursery.cancel_scope.cancel()
    for s in (s for four in pairs for s in four):
        s.close()
