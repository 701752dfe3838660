"""The gateway's connection to an https:// mail server carried on by tls13's Records once
OpenSSL's object is freed (tlsio.TLSStream with a server_hostname: the client side).

The mail server is OpenSSL through Python's ssl (trio.SSLStream over memory BIOs, another use
of another record layer); records the test makes itself are sealed with the ``cryptography``
package's AEADs (tls13_device.py) under keys derived from the server's keylog.
"""
from __future__ import annotations

import gc
import hashlib
import os
import ssl
import weakref
from functools import partial

import pytest
import trio
import trustme
from tls13_device import SUITES, Device, keylog_secret

from seg_fast import openssl
from seg_fast.proxy import _tls13, tls13
from seg_fast.proxy.tlsio import TLSStream
from seg_fast.proxy.upstream import client_tls_context
from test_tls13_records import _libssl, both, key_updates, ping_pong, read_exactly

pytestmark = pytest.mark.skipif(not tls13.available(), reason="TLS 1.3 records need CPython's ssl on OpenSSL 3")


def write_pki(d):
    """A CA (ca.pem) and the mail server's certificate for "localhost" (cert.pem, key.pem) in ``d``."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    issued = ca.issue_cert("localhost")
    for blob, name in ((issued.cert_chain_pems[0], "cert.pem"), (issued.private_key_pem, "key.pem")):
        blob.write_to_path(str(d / name))
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("tls13c"))


def mail_context(pki, suite=None, keylog=None, tls12=False, tickets=2):
    """The mail server's: Python's ssl, its own session tickets sent after the handshake."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(pki / "cert.pem"), str(pki / "key.pem"))
    if tls12:
        sctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if suite is not None:
        ptr = openssl.ssl_ctx_of(sctx)
        assert ptr and _libssl().SSL_CTX_set_ciphersuites(ptr, suite.encode()) == 1
    if keylog is not None:
        sctx.keylog_filename = str(keylog)
    sctx.num_tickets = tickets
    return sctx


def gateway_context(pki, records=True):
    cctx = client_tls_context(True, str(pki / "ca.pem"))       # verified, as upstream.ca_file makes it
    if records:
        assert tls13.prepare(cctx)
    return cctx


def pair(pki, sctx, cctx=None):
    """(the gateway's client TLSStream, the mail server's trio.SSLStream, its raw socket)."""
    a, b = trio.socket.socketpair()
    client = TLSStream(trio.SocketStream(a), cctx or gateway_context(pki), server_hostname="localhost")
    server = trio.SSLStream(trio.SocketStream(b), sctx, server_side=True)
    return client, server, b


async def handshake(client, server):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)


@pytest.mark.parametrize("suite", sorted(SUITES))
async def test_each_suite_carries_bytes_both_ways_past_the_servers_tickets(pki, suite):
    client, server, _ = pair(pki, mail_context(pki, suite))
    face = weakref.ref(client.ssl_object)
    await handshake(client, server)
    gc.disable()
    try:
        assert face() is None                       # OpenSSL's object freed at the hand-over
    finally:
        gc.enable()
    assert type(client._obj) is _tls13.Records and client._obj.client
    assert client.cipher()[0] == suite and client.version() == "TLSv1.3"
    assert not client.ssl_object.server_side and client.ssl_object.server_hostname == "localhost"
    assert client.getpeercert()["subject"]                # the verified certificate, kept
    body = os.urandom(300_000)
    # the request first: the server's two tickets arrive before its answer and are passed over
    await client.send_all(b"POST / HTTP/1.1\r\n\r\n")
    assert await read_exactly(server, 19) == b"POST / HTTP/1.1\r\n\r\n"
    for size in (0, 1, 16383, 16384, 16385, 100_000):
        got = await both(partial(server.send_all, b"<" + body[:size] + b">"), client, size + 2)
        assert got == b"<" + body[:size] + b">"
    got = await both(partial(client.send_parts, [b"HEAD", memoryview(body), b"TAIL"]), server, len(body) + 8)
    assert hashlib.sha256(got).digest() == hashlib.sha256(b"HEAD" + body + b"TAIL").digest()
    client.close()                                  # close_notify: the server sees a clean EOF
    with trio.fail_after(10):
        assert await server.receive_some(100) == b""


async def test_connections_to_one_mail_server_share_its_certificate(pki):
    sctx = mail_context(pki)
    pairs = [pair(pki, sctx) for _ in range(2)]
    for client, server, _ in pairs:
        await handshake(client, server)
    (a, _, _), (b, _, _) = pairs
    assert a.getpeercert()["subject"] and a.getpeercert() is b.getpeercert()
    assert a.getpeercert(binary_form=True) is b.getpeercert(binary_form=True)
    for client, _, _ in pairs:
        client.close()


async def test_a_tls12_mail_server_keeps_openssl(pki):
    client, server, _ = pair(pki, mail_context(pki, tls12=True))
    await handshake(client, server)
    assert client.version() == "TLSv1.2" and type(client._obj) is not _tls13.Records
    await ping_pong(client, server)
    client.close()


async def test_with_the_setting_off_openssl_keeps_the_mail_server_connection(pki):
    client, server, _ = pair(pki, mail_context(pki), gateway_context(pki, records=False))
    await handshake(client, server)
    assert client.version() == "TLSv1.3" and type(client._obj) is not _tls13.Records
    await server.send_all(b"answer")
    assert await read_exactly(client, 6) == b"answer"
    client.close()


async def test_key_updates_from_the_mail_server_and_from_the_gateway(pki):
    client, server, _ = pair(pki, mail_context(pki))
    await handshake(client, server)
    await key_updates(client, server)
    client.close()


# -- records the test makes as the mail server -------------------------------------------------

async def crafted_pair(pki, tmp_path, suite="TLS_AES_128_GCM_SHA256"):
    keylog = tmp_path / f"keys-{os.urandom(4).hex()}.log"
    client, server, raw = pair(pki, mail_context(pki, suite, keylog=keylog, tickets=0))
    await handshake(client, server)
    assert type(client._obj) is _tls13.Records
    return client, server, raw, Device(suite, keylog_secret(keylog, "SERVER_TRAFFIC_SECRET_0"))


def ticket(size: int) -> bytes:
    return bytes([4]) + size.to_bytes(3, "big") + os.urandom(size)


async def test_tickets_in_one_record_and_in_records_of_their_own_are_passed_over(pki, tmp_path):
    client, server, raw, srv = await crafted_pair(pki, tmp_path)
    raw._sock.send(srv.record(ticket(180) + ticket(2000) + b"\x16"))   # two in one record
    raw._sock.send(srv.record(ticket(0) + b"\x16"))
    assert client.read_now(100) is None            # the tickets read and passed over: no data yet
    raw._sock.send(srv.record(b"HTTP/1.1 200 OK\r\n" + b"\x17"))
    assert await read_exactly(client, 17) == b"HTTP/1.1 200 OK\r\n"
    raw._sock.send(srv.record(ticket(64) + bytes([24, 0, 0, 1, 0]) + b"\x16"))   # a ticket, then a KeyUpdate
    srv.update()
    raw._sock.send(srv.record(b"after" + b"\x17"))
    assert await read_exactly(client, 5) == b"after"
    client.close()


@pytest.mark.parametrize("case, alert", [
    ("another handshake message", "unexpected message"),
    ("a ticket split across records", "unexpected message"),
    ("a ticket head split", "unexpected message"),
    ("tampered", "bad record mac"),
    ("a malformed KeyUpdate", "decode error"),
])
async def test_a_hostile_mail_server_record_ends_the_connection_with_its_alert(pki, tmp_path, case, alert):
    client, server, raw, srv = await crafted_pair(pki, tmp_path)
    raw._sock.send(srv.record(b"fine\x17"))
    assert await read_exactly(client, 4) == b"fine"
    bad = {
        "another handshake message": lambda: srv.record(bytes([13, 0, 0, 4]) + b"abcd" + b"\x16"),  # CertificateRequest
        "a ticket split across records": lambda: srv.record(ticket(100)[:50] + b"\x16"),
        "a ticket head split": lambda: srv.record(bytes([4, 0]) + b"\x16"),
        "tampered": lambda: srv.record(b"evil\x17", tamper=True),
        "a malformed KeyUpdate": lambda: srv.record(bytes([24, 0, 0, 1, 2]) + b"\x16"),
    }[case]()
    raw._sock.send(bad)
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as broke:
        await client.receive_some(100)
    assert str(broke.value).startswith("TLS failed")
    with pytest.raises(trio.BrokenResourceError):   # and it stays broken
        await client.send_all(b"more")
    # the server's OpenSSL reads our fatal alert, sealed under the gateway's key
    with trio.fail_after(10), pytest.raises((ssl.SSLError, trio.BrokenResourceError)) as err:
        await server.receive_some(100)
    assert alert in str(err.value).lower().replace("_", " ") or alert in str(err.value.__cause__).lower().replace("_", " ")
    client.close()


async def test_a_flood_of_records_without_data_is_passed_over_a_bounded_number_at_a_time(pki, tmp_path):
    # A peer sending only tickets (or empty records, or KeyUpdates) cannot hold a worker in one
    # read: after _tls13.SKIP_PER_READ of them the read yields, the socket still readable.
    client, server, raw, srv = await crafted_pair(pki, tmp_path)
    raw._sock.send(b"".join(srv.record(ticket(16) + b"\x16") for _ in range(150)) + srv.record(b"data\x17"))
    assert client.read_now(100) is None and client.read_now(100) is None     # 64, then 128 passed over
    assert await read_exactly(client, 4) == b"data"
    raw._sock.send(b"".join(srv.record(b"\x17") for _ in range(100)) + srv.record(b"more\x17"))  # empty records
    assert client.read_now(100) is None
    assert await read_exactly(client, 4) == b"more"
    client.close()
