"""tlsio.TLSStream's multi-record writes over real TCP (loopback): the answer arrives whole
and in order, and nothing is held back after it, whether the kernel took it at once or the
write had to wait for a slow reader; a write cut by its pace leaves the stream broken."""
from __future__ import annotations

import socket
import ssl

import pytest
import trio
import trustme

from seg_fast.proxy import sockio
from seg_fast.proxy.gateway import server_tls_context
from seg_fast.proxy.tlsio import RECORD, TLSStream

@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    d = tmp_path_factory.mktemp("tlsio-tcp")
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    sctx = server_tls_context(str(d / "cert.pem"), str(d / "key.pem"))
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    return sctx, cctx


async def tcp_pair(contexts, rcvbuf: int = 0):
    sctx, cctx = contexts
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client_sock = trio.socket.socket()
    if rcvbuf:
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await client_sock.connect(listener.getsockname())
    server_sock, _ = await listener.accept()
    listener.close()
    server_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as the gateway's
    server = TLSStream(trio.SocketStream(server_sock), sctx)
    client = trio.SSLStream(trio.SocketStream(client_sock), cctx, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client, server_sock


async def receive_exactly(client, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = await client.receive_some(65536)
        assert data, "EOF before the whole answer"
        got += data
    return bytes(got)


async def test_a_multi_record_answer_arrives_whole(contexts):
    server, client, sock = await tcp_pair(contexts)
    body = bytes(range(256)) * 120                  # 30,720 bytes: two records
    assert len(body) > RECORD
    await server.send_parts([b"HTTP/1.1 200 OK\r\n\r\n", body])
    assert await receive_exactly(client, 19 + len(body)) == b"HTTP/1.1 200 OK\r\n\r\n" + body
    # A one-record answer right after is not held back.
    await server.send_parts([b"small"])
    with trio.fail_after(10):
        assert await receive_exactly(client, 5) == b"small"
    await client.aclose()
    server.close()


async def test_a_write_that_waits_for_a_slow_reader_arrives_whole(contexts):
    server, client, sock = await tcp_pair(contexts, rcvbuf=4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = bytes(range(251)) * 8000                 # ~2 MB: the socket fills, the write waits
    got = []
    pace = sockio.Pace(60.0, 1024.0, sockio.Unsent(0))

    async def read_slowly():
        data = bytearray()
        while len(data) < len(body):
            data += await client.receive_some(8192)
            await trio.sleep(0)
        got.append(bytes(data))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            await server.send_parts([body], pace)
    assert got == [body]
    await client.aclose()
    server.close()


async def test_a_write_cut_by_its_pace_leaves_the_stream_broken(contexts):
    server, client, sock = await tcp_pair(contexts, rcvbuf=4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pace = sockio.Pace(0.2, 0.0, None)              # the device reads nothing: cut after 0.2 s
    with trio.fail_after(20):
        with pytest.raises(TimeoutError):
            await server.send_parts([b"x" * (4 * 1024 * 1024)], pace)
    with pytest.raises(trio.BrokenResourceError):
        await server.send_parts([b"more"])
    server.close()
    await client.aclose()
