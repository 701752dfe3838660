"""A device's TLS 1.3 connection carried on by tls13's Records once OpenSSL's object is freed.

The client is OpenSSL through Python's ssl (another implementation of the record layer);
records the test makes itself (tls13_device.py) are sealed with the ``cryptography`` package's
AEADs under keys derived from the client's keylog: so what Records reads and writes is checked
against two implementations that are not its own.
"""
from __future__ import annotations

import ctypes
import fcntl
import gc
import hashlib
import os
import socket
import ssl
import termios
import weakref
from functools import partial

import pytest
import trio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tls13_device import SUITES, Device, keylog_secret

from seg_fast import openssl
from seg_fast.proxy import _tls13, tls13
from seg_fast.proxy.gateway import server_tls_context
from seg_fast.proxy.tlsio import TLSStream
from seg_fast.sim.tlssession import _SSL_AT, _word

pytestmark = pytest.mark.skipif(not tls13.available(), reason="TLS 1.3 records need CPython's ssl on OpenSSL 3")



@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls13")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    for blob, name in ((issued.cert_chain_pems[0], "cert.pem"), (issued.private_key_pem, "key.pem")):
        blob.write_to_path(str(d / name))
    return ca, d


def _libssl():
    lib = openssl.libssl()
    for name, args in (("SSL_CTX_set_ciphersuites", [ctypes.c_void_p, ctypes.c_char_p]),
                       ("SSL_key_update", [ctypes.c_void_p, ctypes.c_int])):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ctypes.c_int
    return lib


def client_context(pki, suite=None, keylog=None, tls12=False):
    ca, _ = pki
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    if tls12:
        cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if suite is not None:
        ptr = openssl.ssl_ctx_of(cctx)
        assert ptr and _libssl().SSL_CTX_set_ciphersuites(ptr, suite.encode()) == 1
    if keylog is not None:
        cctx.keylog_filename = str(keylog)
    return cctx


def pair(pki, cctx, sctx=None, session=None):
    """(server TLSStream, client trio.SSLStream, the client's raw socket)."""
    _, d = pki
    sctx = sctx or server_tls_context(str(d / "cert.pem"), str(d / "key.pem"))
    a, b = trio.socket.socketpair()
    server = TLSStream(trio.SocketStream(a), sctx)
    client = trio.SSLStream(trio.SocketStream(b), cctx, server_hostname="localhost")
    if session is not None:
        client._ssl_object.session = session
    return server, client, b


async def handshake(server, client):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)


async def both(send, stream, n):
    """``send()`` while ``n`` bytes are read from ``stream`` (a socket's buffer holds less)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        return await read_exactly(stream, n)


async def read_exactly(stream, n):
    got = bytearray()
    with trio.fail_after(20):
        while len(got) < n:
            chunk = await stream.receive_some(65536)
            assert chunk, "EOF before the bytes"
            got += chunk
    return bytes(got)


@pytest.mark.parametrize("suite", sorted(SUITES))
async def test_each_suite_carries_bytes_both_ways_once_openssl_is_gone(pki, suite):
    server, client, _ = pair(pki, client_context(pki, suite))
    face = weakref.ref(server.ssl_object)
    await handshake(server, client)
    gc.disable()
    try:
        assert face() is None                       # OpenSSL's object freed at the hand-over
    finally:
        gc.enable()
    assert type(server._obj) is _tls13.Records
    assert server.cipher()[0] == suite and server.version() == "TLSv1.3"
    body = os.urandom(300_000)
    for size in (0, 1, 16383, 16384, 16385, 100_000):
        got = await both(partial(client.send_all, b"<" + body[:size] + b">"), server, size + 2)
        assert got == b"<" + body[:size] + b">"
    # small writes, a batched big one (several records per write(2)), and a mixed one
    await server.send_all(b"small")
    assert await read_exactly(client, 5) == b"small"
    got = await both(partial(server.send_parts, [b"HEAD", memoryview(body), b"TAIL"]), client, len(body) + 8)
    assert hashlib.sha256(got).digest() == hashlib.sha256(b"HEAD" + body + b"TAIL").digest()
    await client.send_all(b"bye")
    assert await read_exactly(server, 3) == b"bye"
    server.close()                                  # close_notify: the client sees a clean EOF
    with trio.fail_after(10):
        assert await client.receive_some(100) == b""


async def ping_pong(ours: TLSStream, theirs) -> None:
    """A few bytes each way: ours, then theirs."""
    await ours.send_all(b"ping")
    assert await read_exactly(theirs, 4) == b"ping"
    await theirs.send_all(b"pong")
    assert await read_exactly(ours, 4) == b"pong"


async def test_a_tls12_connection_keeps_openssl(pki):
    server, client, _ = pair(pki, client_context(pki, tls12=True))
    await handshake(server, client)
    assert server.version() == "TLSv1.2" and type(server._obj) is not _tls13.Records
    await ping_pong(server, client)
    server.close()


async def test_the_tickets_made_after_the_handshake_resume_the_next_connection(pki):
    _, d = pki
    sctx = server_tls_context(str(d / "cert.pem"), str(d / "key.pem"))
    cctx = client_context(pki)
    server, client, _ = pair(pki, cctx, sctx)
    await handshake(server, client)
    await server.send_all(b"answer")                # the tickets went out before it
    assert await read_exactly(client, 6) == b"answer"
    session = client._ssl_object.session
    assert session is not None and session.has_ticket
    server.close()
    server2, client2, _ = pair(pki, cctx, sctx, session=session)
    await handshake(server2, client2)
    assert client2._ssl_object.session_reused and server2.session_reused
    assert type(server2._obj) is _tls13.Records
    await client2.send_all(b"again")
    assert await read_exactly(server2, 5) == b"again"
    server2.close()


async def key_updates(ours: TLSStream, theirs: trio.SSLStream) -> None:
    """KeyUpdates from OpenSSL's side of the connection (``theirs``), asked for and not, then
    our own asking for theirs: data goes both ways under every new key."""
    lib = _libssl()
    ptr = _word(theirs._ssl_object._sslobj, _SSL_AT)
    assert ptr
    for requested in (0, 1, 1, 0):
        # OpenSSL moves its key on (and, asked, ours must answer with its own)
        assert lib.SSL_key_update(ptr, requested) == 1
        await theirs.send_all(b"after update %d" % requested)
        assert await read_exactly(ours, 14) == b"after update %d" % requested
        await ours.send_all(b"answer %d" % requested)
        assert await read_exactly(theirs, 8) == b"answer %d" % requested
    # our own, asking OpenSSL for one: both directions move on and still agree
    ours._obj.key_update(True)
    await ours.send_all(b"new keys")
    assert await read_exactly(theirs, 8) == b"new keys"
    await theirs.send_all(b"and back")             # OpenSSL answered with its KeyUpdate first
    assert await read_exactly(ours, 8) == b"and back"


async def test_key_updates_from_the_device_and_from_the_gateway(pki):
    server, client, _ = pair(pki, client_context(pki))
    await handshake(server, client)
    await key_updates(server, client)
    server.close()


# -- records the test makes itself -----------------------------------------------------------

async def crafted_pair(pki, tmp_path, suite="TLS_AES_128_GCM_SHA256"):
    keylog = tmp_path / f"keys-{os.urandom(4).hex()}.log"
    server, client, raw = pair(pki, client_context(pki, suite, keylog=keylog))
    await handshake(server, client)
    assert type(server._obj) is _tls13.Records
    return server, client, raw, Device(suite, keylog_secret(keylog, "CLIENT_TRAFFIC_SECRET_0"))


@pytest.mark.parametrize("suite", sorted(SUITES))
async def test_records_the_test_seals_are_read_padding_and_key_updates_included(pki, tmp_path, suite):
    server, client, raw, dev = await crafted_pair(pki, tmp_path, suite)
    raw._sock.send(dev.record(b"plain" + b"\x17"))
    raw._sock.send(dev.record(b"padded" + b"\x17" + bytes(300)))       # zero padding after the type
    raw._sock.send(dev.record(b"\x17"))                                   # empty application data
    assert await read_exactly(server, 11) == b"plainpadded"
    raw._sock.send(dev.record(bytes([24, 0, 0, 1, 1]) + b"\x16"))        # KeyUpdate, update requested
    dev.update()
    raw._sock.send(dev.record(b"after" + b"\x17"))
    assert await read_exactly(server, 5) == b"after"
    await server.send_all(b"answer")       # the gateway's KeyUpdate, then data under its new key:
    #                                        read by the client's OpenSSL (its read side is intact)
    assert await read_exactly(client, 6) == b"answer"
    whole = dev.record(b"byte by byte" + b"\x17")
    for i in range(len(whole)):            # a record arriving in pieces is read once it is whole
        raw._sock.send(whole[i:i + 1])
        if i < len(whole) - 1:
            assert server.read_now(100) is None
    assert await read_exactly(server, 12) == b"byte by byte"
    raw._sock.send(dev.record(bytes([1, 0]) + b"\x15"))                  # close_notify
    with trio.fail_after(10):
        assert await server.receive_some(100) == b""
    server.close()


@pytest.mark.parametrize("case, alert", [
    ("tampered", "bad record mac"),
    ("another handshake message", "unexpected message"),
    ("unknown content type", "unexpected message"),
    ("only padding", "unexpected message"),
    ("plaintext over 16 KiB", "record overflow"),
    ("ciphertext over the limit", "record overflow"),
    ("an unprotected handshake record", "unexpected message"),
    ("a change_cipher_spec", "unexpected message"),
    ("a malformed KeyUpdate", "decode error"),
    ("a KeyUpdate split", "unexpected message"),
    ("a protected record too short", "decode error"),
])
async def test_a_hostile_record_ends_the_connection_with_its_alert(pki, tmp_path, case, alert):
    server, client, raw, dev = await crafted_pair(pki, tmp_path)
    raw._sock.send(dev.record(b"fine\x17"))
    assert await read_exactly(server, 4) == b"fine"
    bad = {
        "tampered": lambda: dev.record(b"evil\x17", tamper=True),
        "another handshake message": lambda: dev.record(bytes([4, 0, 0, 4]) + b"abcd" + b"\x16"),
        "unknown content type": lambda: dev.record(b"what\x63"),
        "only padding": lambda: dev.record(bytes(20)),
        "plaintext over 16 KiB": lambda: dev.record(bytes(16385) + b"\x17"),
        "ciphertext over the limit": lambda: bytes([23, 3, 3]) + (16384 + 257).to_bytes(2, "big") + bytes(16641),
        "an unprotected handshake record": lambda: bytes([22, 3, 3, 0, 4, 24, 0, 0, 1]) + b"\x00",
        "a change_cipher_spec": lambda: bytes([20, 3, 3, 0, 1, 1]),
        "a malformed KeyUpdate": lambda: dev.record(bytes([24, 0, 0, 1, 2]) + b"\x16"),
        "a KeyUpdate split": lambda: dev.record(bytes([24, 0, 0]) + b"\x16"),
        "a protected record too short": lambda: bytes([23, 3, 3, 0, 8]) + bytes(8),
    }[case]()
    raw._sock.send(bad)
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await server.receive_some(100)
    with pytest.raises(trio.BrokenResourceError):   # and it stays broken
        await server.send_all(b"more")
    # the client's OpenSSL reads our fatal alert, sealed under the gateway's key
    with trio.fail_after(10), pytest.raises((ssl.SSLError, trio.BrokenResourceError)) as err:
        await client.receive_some(100)
    assert alert in str(err.value).lower().replace("_", " ") or alert in str(err.value.__cause__).lower().replace("_", " ")
    server.close()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 16384), min_size=1, max_size=6),
       pads=st.lists(st.integers(0, 200), min_size=6, max_size=6),
       cuts=st.lists(st.integers(1, 40000), max_size=8))
def test_any_records_in_any_pieces_read_back_whole(pki, tmp_path, sizes, pads, cuts):
    async def main():
        server, client, raw, dev = await crafted_pair(pki, tmp_path)
        data = os.urandom(sum(sizes))
        wire = bytearray()
        at = 0
        for size, pad in zip(sizes, pads):
            wire += dev.record(data[at:at + size] + b"\x17" + bytes(pad))
            at += size
        async with trio.open_nursery() as nursery:
            async def send():
                rest = memoryview(bytes(wire))
                for cut in cuts:
                    await trio.lowlevel.wait_writable(raw)
                    rest = rest[raw._sock.send(rest[:cut]):]
                    await trio.sleep(0)
                while rest:
                    await trio.lowlevel.wait_writable(raw)
                    rest = rest[raw._sock.send(rest):]
            nursery.start_soon(send)
            got = await read_exactly(server, len(data)) if data else b""
        assert got == data
        server.close()
        await client.aclose()
    trio.run(main)


def test_records_refuse_a_batch_for_another_socket():
    a, b = socket.socketpair()
    try:
        rec = _tls13.Records(a.fileno(), 0, bytes(32), bytes(32))
        with pytest.raises(ValueError):
            rec.seal(b.fileno(), [b"x"])
        assert len(rec.seal(a.fileno(), [b"x" * 20000])) == 20000 + 2 * (5 + 1 + 16)   # two records
    finally:
        a.close()
        b.close()


async def test_with_the_setting_off_openssl_keeps_the_connection_and_its_tickets(pki):
    # listener.tls13_records = false: the context is not prepared, OpenSSL sends its own tickets
    _, d = pki
    sctx = server_tls_context(str(d / "cert.pem"), str(d / "key.pem"), records=False)
    assert not tls13.prepared(sctx) and sctx.num_tickets == 2
    cctx = client_context(pki)
    server, client, _ = pair(pki, cctx, sctx)
    await handshake(server, client)
    assert type(server._obj) is not _tls13.Records and server.version() == "TLSv1.3"
    await server.send_all(b"answer")
    assert await read_exactly(client, 6) == b"answer"
    session = client._ssl_object.session
    server.close()
    server2, client2, _ = pair(pki, cctx, sctx, session=session)
    await handshake(server2, client2)
    assert server2.session_reused
    server2.close()


def test_the_context_pointer_is_proven_whatever_the_ticket_keys_state(pki, monkeypatch):
    # One proof (openssl.ssl_ctx_of) for the record layer and the ticket keys: a process whose
    # shared ticket keys could not be bound still prepares its contexts.
    from seg_fast.proxy import tickets
    _, d = pki
    monkeypatch.setitem(tickets._state, "lib", "the compiled module is not built")
    sctx = server_tls_context(str(d / "cert.pem"), str(d / "key.pem"))
    assert tls13.prepared(sctx) and sctx.num_tickets == 0
    ptr = openssl.ssl_ctx_of(sctx)
    assert ptr and ptr != openssl.ssl_ctx_of(server_tls_context(str(d / "cert.pem"), str(d / "key.pem")))

    class Other(ssl.SSLContext):
        pass
    # a subclass may lay its object out differently: not read, so not proven
    assert openssl.ssl_ctx_of(Other(ssl.PROTOCOL_TLS_SERVER)) == 0
    # the proof reads the context's settings back from OpenSSL at that address: a change made
    # through Python is seen there, and the pointer stays proven
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    assert openssl.ssl_ctx_of(sctx) == ptr


async def test_a_read_gathers_whole_records_but_a_bounded_number_of_them(pki):
    """A relay's read takes the records already whole after the first (tlsio.read_more,
    through sockio.receive), but at most GATHER_RECORDS more: a device sending one-byte
    records cannot have one read walk 64 Ki of them in one step. Every byte comes back."""
    from seg_fast.proxy import sockio, tlsio
    server, client, _ = pair(pki, client_context(pki))
    await handshake(server, client)
    for i in range(200):              # each send_all one record of one byte
        await client.send_all(bytes([i]))
    got, sizes = bytearray(), []
    with trio.fail_after(20):
        while len(got) < 200:
            data = await sockio.receive(server, None, 65536)
            assert data
            sizes.append(len(data))
            got += data
    assert bytes(got) == bytes(range(200))
    assert max(sizes) == 1 + tlsio.GATHER_RECORDS and len(sizes) < 200 // tlsio.GATHER_RECORDS + 3, sizes
    server.close()
    await client.aclose()


def _unread(sock) -> int:
    """Bytes the kernel holds for ``sock`` (FIONREAD)."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


async def test_a_record_is_read_with_the_next_header_and_nothing_past_it(pki, tmp_path):
    """A stream of records costs one read(2) each: a record's body comes with the next
    record's header, and nothing more leaves the socket, so a read that says "wait for the
    socket" holds nothing but part of a record (what the lane's and the pool's waits rely on)."""
    server, client, raw, dev = await crafted_pair(pki, tmp_path)
    recs = [dev.record(m + b"\x17") for m in (b"one", b"two", b"three")]
    raw._sock.send(b"".join(recs))
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(server.plain)
    assert server.read_now(100) == b"one"
    assert _unread(server.plain) == len(recs[1]) + len(recs[2]) - 5      # the next header came along
    assert server.read_now(100) == b"two"
    assert _unread(server.plain) == len(recs[2]) - 5
    assert server.read_now(100) == b"three"
    assert server.read_now(100) is None and server.waits_readable()
    four = dev.record(b"four\x17")
    raw._sock.send(four[:5])          # a header alone: part of a record, the socket waited for
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(server.plain)
    assert server.read_now(100) is None and server.waits_readable() and _unread(server.plain) == 0
    raw._sock.send(four[5:])
    with trio.fail_after(10):
        assert await read_exactly(server, 4) == b"four"
    # a header that came along and is bad (an alert of no length): the next read says so, not a wait
    raw._sock.send(dev.record(b"last\x17") + bytes([21, 3, 3, 0, 0]))
    with trio.fail_after(10):
        assert await read_exactly(server, 4) == b"last"
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await server.receive_some(100)
    server.close()
    await client.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 16384), min_size=1, max_size=8),
       size=st.one_of(st.integers(512, 70000), st.sampled_from([16384, 16385, 65536])),
       end=st.sampled_from(["open", "close_notify", "bad record", "key update"]))
def test_a_gathering_read_returns_every_byte_in_order_and_leaves_the_end_to_the_next_read(pki, tmp_path, sizes,
                                                                                          size, end):
    """A relay's read (sockio.receive: Records.gather after the first record) over records of
    any size, empty ones and a KeyUpdate among them: every byte once, in order, no read over its
    size; what ends the stream (close_notify, a record that does not verify) is said by the read
    after the data, never lost and never instead of it."""
    from seg_fast.proxy import sockio

    async def main():
        server, client, raw, dev = await crafted_pair(pki, tmp_path)
        data = os.urandom(sum(sizes))
        wire, at = bytearray(), 0
        for i, n in enumerate(sizes):
            if end == "key update" and i == len(sizes) // 2:
                wire += dev.record(bytes([24, 0, 0, 1, 0]) + b"\x16")
                dev.update()
            wire += dev.record(data[at:at + n] + b"\x17")
            at += n
        wire += {"close_notify": lambda: dev.record(bytes([1, 0]) + b"\x15"),
                 "bad record": lambda: dev.record(b"evil\x17", tamper=True)}.get(end, lambda: b"")()
        got = bytearray()

        async def send():
            rest = memoryview(bytes(wire))
            while rest:
                await trio.lowlevel.wait_writable(raw)
                rest = rest[raw._sock.send(rest):]

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while len(got) < len(data):
                    chunk = await sockio.receive(server, None, size)
                    assert chunk and len(chunk) <= size
                    got += chunk
            assert bytes(got) == data
            if end == "close_notify":
                assert await server.receive_some(100) == b""
            elif end == "bad record":
                with pytest.raises(trio.BrokenResourceError):
                    await server.receive_some(100)
            else:
                assert server.read_now(100) is None and server.waits_readable()
        server.close()
        await client.aclose()
    trio.run(main)
