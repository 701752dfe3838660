"""tlsio.TLSStream's own contract, in process over socketpairs (a trio.SSLStream client):
what trio.SSLStream promised the gateway (errors, EOFs, close, the certificate), plus its
deadlines. The whole gateway over TLS is tests/test_tlsio.py."""
from __future__ import annotations

import gc
import hashlib
import os
import socket
import ssl
import types
import weakref

import pytest
import trio
import trustme

from seg_fast.proxy import _tls13, sockio, tlsio
from seg_fast.proxy.gateway import server_tls_context
from seg_fast.proxy.tlsio import TLSStream


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    device = ca.issue_cert("device@example.com")
    d = tmp_path_factory.mktemp("tlsio-stream")
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    return ca, device, d


def pair(pki, *, client_cert: bool = False):
    """(server TLSStream, client trio.SSLStream, the client's raw socket) over a socketpair."""
    ca, device, d = pki
    sctx = server_tls_context(str(d / "cert.pem"), str(d / "key.pem"))
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    if client_cert:
        sctx.verify_mode = ssl.CERT_OPTIONAL
        ca.configure_trust(sctx)
        device.configure_cert(cctx)
    a, b = trio.socket.socketpair()
    server = TLSStream(trio.SocketStream(a), sctx)
    client = trio.SSLStream(trio.SocketStream(b), cctx, server_hostname="localhost")
    return server, client, b


async def handshake(server, client):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)


async def test_bytes_both_ways_and_the_ssl_queries(pki):
    server, client, _ = pair(pki, client_cert=True)
    await handshake(server, client)
    assert server.version() == "TLSv1.3" and server.cipher()[1] == "TLSv1.3"
    # The client certificate, as kcd/clientcert.py reads it.
    der = server.getpeercert(binary_form=True)
    assert der == ssl.PEM_cert_to_DER_cert(pki[1].cert_chain_pems[0].bytes().decode())
    assert server.ssl_object.getpeercert(binary_form=True) == der
    server.seg_client_cert = "kept"                 # clientcert.py keeps its result on the stream
    assert server.seg_client_cert == "kept"
    assert weakref.ref(server)() is server          # pinning.py keys a WeakKeyDictionary by it
    assert server.socket is server.transport_stream.socket    # parking.socket_of finds it
    big = bytes(range(256)) * 4096                  # 1 MiB: several slices, several records
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_parts, [b"head:", big, b":tail"])
        got = bytearray()
        while len(got) < len(big) + 10:
            got += await client.receive_some(65536)
    assert bytes(got) == b"head:" + big + b":tail"
    await client.send_all(b"ping")
    assert await server.receive_some(100) == b"ping"
    await client.aclose()


async def test_close_notify_and_a_ragged_eof_both_read_as_eof(pki):
    server, client, _ = pair(pki)
    await handshake(server, client)
    await client.aclose()                           # trio's default: a close_notify, then close
    assert await server.receive_some(100) == b""
    server2, client2, raw = pair(pki)
    await handshake(server2, client2)
    raw.shutdown(socket.SHUT_RDWR)                  # the TCP connection ends with no close_notify
    assert await server2.receive_some(100) == b""   # https_compatible: a plain EOF
    server.close()
    server2.close()


async def test_after_close_closed_and_after_failure_broken(pki):
    server, client, _ = pair(pki)
    await handshake(server, client)
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some(10)
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    await server.aclose()                           # twice is fine
    # The client saw a close_notify (the server's graceful close).
    assert await client.receive_some(10) == b""


async def test_garbage_breaks_the_handshake(pki):
    server, _, raw = pair(pki)
    await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()
    assert server.handshake_started
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some(10)
    server.close()


async def test_a_connection_closed_before_its_first_byte_is_not_a_started_handshake(pki):
    server, _, raw = pair(pki)
    raw.close()
    with pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()
    assert not server.handshake_started             # not counted as a failed handshake
    server.close()


async def test_deadlines_handshake_and_read(pki):
    server, client, _ = pair(pki)
    with pytest.raises(trio.TooSlowError):          # the device says nothing
        await server.do_handshake(trio.current_time() + 0.2)
    server.close()
    server, client, _ = pair(pki)
    await handshake(server, client)
    assert await server.receive_by(100, trio.current_time() + 0.2) is None    # nothing came
    server.close()


async def test_read_now_never_waits(pki):
    server, client, _ = pair(pki)
    await handshake(server, client)
    assert server.read_now(100) is None             # nothing there: None, at once
    await client.send_all(b"request")
    with trio.fail_after(10):
        while (data := server.read_now(100)) is None:
            await trio.sleep(0.01)
    assert data == b"request"
    server.close()


@pytest.mark.parametrize("mode", ["records", "batched", "record-by-record"])
async def test_writes_retried_on_a_full_socket_arrive_intact(pki, monkeypatch, mode):
    """A device that takes its answer in small bites: the socket is full after almost every
    record, and the rest is retried until the device took it (record by record: OpenSSL
    holds the encrypted record and the retry passes the same bytes, its rule for
    non-blocking writes; batched: the batch's records wait in Python; records: the
    connection handed over to tls13's Records after the handshake, batched by it). 4 MiB
    of random bytes, a head joined to the body's first record, arrive whole and in order."""
    waits = []
    real = tlsio.wait_writable

    async def counted(fd):
        waits.append(fd)
        await real(fd)

    monkeypatch.setattr(tlsio, "wait_writable", counted)
    if mode != "records":
        monkeypatch.setattr(tlsio.tls13, "prepared", lambda ctx: False)
    if mode == "record-by-record":
        monkeypatch.setattr(tlsio.tlsbatch, "ssl_of", lambda obj, fd: 0)
    server, client, raw = pair(pki)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await handshake(server, client)
    body = os.urandom(4 * 1024 * 1024 + 7)
    pace = sockio.Pace(30.0, 1024.0, sockio.Unsent(64 * 1024 * 1024, 1024.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_parts, [b"HEAD", memoryview(body), b"TAIL"], pace)
        got = bytearray()
        while len(got) < len(body) + 8:
            got += await client.receive_some(1000)
    assert hashlib.sha256(got).digest() == hashlib.sha256(b"HEAD" + body + b"TAIL").digest()
    assert len(waits) > 50                          # it did wait on a full socket, many times
    assert (server._ssl > 0) is (mode == "batched")
    assert (type(server._obj) is _tls13.Records) is (mode == "records")
    assert pace.unsent.total == 0                   # what waited was counted, then released
    await client.send_all(b"after")                 # the stream is sound
    assert await server.receive_some(100) == b"after"
    server.close()


async def test_a_big_write_goes_out_a_batch_of_records_per_write(pki, monkeypatch):
    """A 1 MiB answer to a device that reads: its records made 256 KiB of plaintext at a time
    and written with one write(2) per batch (OpenSSL's socket BIO made one per 16 KiB record),
    read back by the client's own TLS whole and in order, then small exchanges both ways on
    the same stream (sequence numbers and keys went on as OpenSSL's own)."""
    writes = []
    real = tlsio.os.write

    def counted(fd, data):
        writes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(tlsio.os, "write", counted)
    server, client, raw = pair(pki)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    await handshake(server, client)
    body = os.urandom(1024 * 1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_parts, [b"HEAD", body[:100], body[100:], b"TAIL"])
        got = bytearray()
        while len(got) < len(body) + 8:
            got += await client.receive_some(65536)
    assert bytes(got) == b"HEAD" + body + b"TAIL"
    assert type(server._obj) is _tls13.Records     # TLS 1.3: its records made by tls13 (batched too)
    assert 4 <= len(writes) <= 24 and sum(writes) > len(body)     # not 64 writes of a record
    for i in range(3):
        await server.send_parts([b"small %d" % i, b"x" * 20000])   # two records, batched
        got = bytearray()
        while len(got) < 20007:
            got += await client.receive_some(65536)
        assert bytes(got) == b"small %d" % i + b"x" * 20000
        await client.send_all(b"ping %d" % i)
        assert await server.receive_some(100) == b"ping %d" % i
    await client.aclose()


async def test_a_batch_for_another_socket_is_refused_and_a_failed_one_leaves_nothing(pki, monkeypatch):
    """_tlsrecords.seal proves the SSL object's socket first: the wrong descriptor is refused
    before OpenSSL makes a record, and the stream goes on. A batch that fails part way (a
    part that is not a buffer) leaves none of its records behind for the next stream's.
    (Connections kept with OpenSSL's object: TLS 1.2's, or where tls13 cannot take over.)"""
    from seg_fast.proxy import _tlsrecords
    monkeypatch.setattr(tlsio.tls13, "prepared", lambda ctx: False)
    server, client, _ = pair(pki)
    await handshake(server, client)
    fd = server.plain.fileno()
    ptr = tlsio.tlsbatch.ssl_of(server._obj, fd)
    assert ptr
    assert tlsio.tlsbatch.ssl_of(server._obj, fd + 1) == 0
    # only CPython's own SSL object is read (a wrapper, as tests/test_big_answer_steps.py
    # puts in its place, has other memory at that offset: reading it crashed a worker)
    wrapper = types.SimpleNamespace(write=server._obj.write, read=server._obj.read)
    assert tlsio.tlsbatch.ssl_of(wrapper, fd) == 0
    assert tlsio.tlsbatch.ssl_of(object(), fd) == 0
    with pytest.raises(ValueError):
        _tlsrecords.seal(ptr, fd + 1, [b"x" * 100])
    await server.send_parts([b"z" * 40000])
    got = bytearray()
    while len(got) < 40000:
        got += await client.receive_some(65536)
    assert bytes(got) == b"z" * 40000
    with pytest.raises(TypeError):                  # a record of it was made, then dropped
        _tlsrecords.seal(ptr, fd, [b"x" * 20000, 7])
    server2, client2, _ = pair(pki)
    await handshake(server2, client2)
    await server2.send_parts([b"y" * 50000])
    got = bytearray()
    while len(got) < 50000:
        got += await client2.receive_some(65536)
    assert bytes(got) == b"y" * 50000
    await client2.aclose()
    server.close()


async def test_a_paced_write_to_a_device_that_stops_reading_times_out(pki):
    server, client, raw = pair(pki)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await handshake(server, client)
    with pytest.raises(TimeoutError):
        await server.send_parts([b"x" * (4 * 1024 * 1024)], sockio.Pace(0.3))
    with pytest.raises(trio.BrokenResourceError):   # a record may be half out: broken
        await server.send_all(b"more")
    server.close()


async def test_a_socket_closed_under_the_stream_is_never_used_again(pki):
    """parking.py closes a parked Ping's socket itself. OpenSSL keeps the descriptor's number,
    which the next socket reuses: the stream must not read or write it after that."""
    server, client, _ = pair(pki)
    await handshake(server, client)
    fd = server.socket.fileno()
    server.socket.close()
    c, d = socket.socketpair()                      # the lowest free descriptors: fd among them
    try:
        other = c if c.fileno() == fd else d
        assert other.fileno() == fd
        peer = d if other is c else c
        peer.sendall(b"not yours")
        assert server.read_now(100) is None
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some(100)
        with pytest.raises((trio.ClosedResourceError, trio.BrokenResourceError)):
            await server.send_all(b"x" * 100)
        server.close()
        other.setblocking(False)
        assert other.recv(100) == b"not yours"     # nothing taken from the new socket
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):        # nothing written to it either
            peer.recv(100)
    finally:
        c.close()
        d.close()


async def test_a_short_read_leaves_the_rest_of_the_record_for_the_next(pki):
    """OpenSSL holds what a small read left of a record (the socket shows nothing more): the
    next read returns it without waiting."""
    server, client, _ = pair(pki)
    await handshake(server, client)
    await client.send_all(b"0123456789")            # one record
    with trio.fail_after(10):
        assert await server.receive_some(4) == b"0123"
        assert server.pending() == 6
        assert server.read_now(100) == b"456789"
    server.close()


async def test_what_the_device_sent_before_its_answer_was_out_is_read(pki):
    """A device that said more before its answer was out (pipelining) is read at once after the
    send, by the awaited path and by read_now."""
    server, client, _ = pair(pki)
    await handshake(server, client)
    await client.send_all(b"first")
    await client.send_all(b"second")
    with trio.fail_after(10):
        while server.read_now(5) is None:           # the first request, polled
            await trio.sleep(0.01)
        await server.send_all(b"answer")
        await trio.lowlevel.wait_readable(server.socket)    # "second" is there already
        assert await sockio.receive(server, None, 100, trio.current_time() + 10) == b"second"
        assert await client.receive_some(100) == b"answer"
        await server.send_all(b"answer2")
        await client.send_all(b"third")
        while (data := server.read_now(100)) is None:
            await trio.sleep(0.01)
        assert data == b"third"
    server.close()


async def test_a_closed_stream_is_freed_by_reference_counting(pki):
    """No reference cycle per connection (issue 10: no gen-2 collections for parked devices):
    the stream, its SSLObject and OpenSSL's object go when the last reference does (a TLS 1.3
    connection's OpenSSL object as soon as the handshake is done: tls13.py)."""
    server, client, _ = pair(pki)
    openssl_face = weakref.ref(server.ssl_object)
    await handshake(server, client)
    gc.disable()
    try:
        assert openssl_face() is None
    finally:
        gc.enable()
    await client.send_all(b"ping")
    assert await server.receive_some(100) == b"ping"
    await server.send_all(b"pong")
    refs = [weakref.ref(server), weakref.ref(server.ssl_object)]
    server.close()
    gc.disable()
    try:
        del server
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()
    await client.aclose()
