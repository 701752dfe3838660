"""The simulator's lean HTTP/1.1 path (the compiled head parser, proxy/http1.py) against
h11 itself: the same byte streams sent over real sockets to a simulator reading
requests with the lean path and to one reading every request with h11
(``lean_http=False``); the bytes that come back must be identical, for the fleet's
well-formed requests and for what the lean path hands to h11 (chunked bodies, Expect,
HTTP/1.0, malformed heads, oversized bodies, truncated requests)."""
from __future__ import annotations

import base64

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_fast.eas.wbxml import encode
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E

AUTH = b"Authorization: Basic " + base64.b64encode(b"jdoe:secret") + b"\r\n"
EAS = b"/Microsoft-Server-ActiveSync?Cmd=%s&User=jdoe&DeviceId=DEV1&DeviceType=iPhone"


def post(cmd: bytes, body: bytes, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST " + EAS % cmd + b" " + version + b"\r\nHost: sim\r\n" + AUTH
            + b"MS-ASProtocolVersion: 14.1\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


FOLDERSYNC = encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
SYNC0 = encode(E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
               E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", "1")))))
SYNC1 = encode(E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
               E("AirSync:SyncKey", "1"), E("AirSync:CollectionId", "1"), E("AirSync:GetChanges"),
               E("AirSync:Options", E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", 2),
                                      E("AirSyncBase:TruncationSize", 4096)))))))
MIME = b"From: a@b.c\r\nTo: d@e.f\r\nSubject: x\r\n\r\nhello\r\n"
CHUNKED = (b"POST " + EAS % b"SendMail&SaveInSent=T" + b" HTTP/1.1\r\nHost: sim\r\n" + AUTH
           + b"MS-ASProtocolVersion: 12.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n" % len(MIME) + MIME + b"\r\n0\r\n\r\n")

# Each case: the byte pieces sent one after the other on one connection, then EOF.
CASES = {
    "options": [b"OPTIONS /Microsoft-Server-ActiveSync HTTP/1.1\r\nHost: sim\r\n" + AUTH + b"\r\n"],
    "foldersync": [post(b"FolderSync", FOLDERSYNC)],
    "pipelined": [post(b"FolderSync", FOLDERSYNC) + post(b"Sync", SYNC0) + post(b"Sync", SYNC1)],
    "split": [post(b"Sync", SYNC0)[:7], post(b"Sync", SYNC0)[7:60], post(b"Sync", SYNC0)[60:]],
    "close": [post(b"FolderSync", FOLDERSYNC, b"Connection: close\r\n") + post(b"FolderSync", FOLDERSYNC)],
    "header case and spaces": [post(b"FolderSync", FOLDERSYNC, b"x-FLEET-odd:   spaced value  \r\n")],
    "unauthorized": [post(b"FolderSync", FOLDERSYNC).replace(b"jdoe:secret"[:0] + AUTH, b"")],
    "wrong password": [post(b"FolderSync", FOLDERSYNC).replace(
        AUTH, b"Authorization: Basic " + base64.b64encode(b"jdoe:nope") + b"\r\n")],
    "not found": [b"GET /nothing HTTP/1.1\r\nHost: sim\r\n\r\n"],
    "stats": [b"GET /sim/stats HTTP/1.1\r\nHost: sim\r\n\r\n"],
    "sendmail raw": [post(b"SendMail&SaveInSent=T", MIME, b"", b"HTTP/1.1").replace(
        b"MS-ASProtocolVersion: 14.1", b"MS-ASProtocolVersion: 12.1")],
    "chunked": [CHUNKED, post(b"FolderSync", FOLDERSYNC)],
    "expect": [post(b"FolderSync", FOLDERSYNC, b"Expect: 100-continue\r\n")],
    "http 1.0": [post(b"FolderSync", FOLDERSYNC, b"", b"HTTP/1.0")],
    "head": [b"HEAD /sim/stats HTTP/1.1\r\nHost: sim\r\n\r\n"],
    "no host": [b"GET /sim/stats HTTP/1.1\r\n\r\n"],
    "two hosts": [b"GET /sim/stats HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"],
    "garbage": [b"\x16\x03\x01 not http\r\n\r\n"],
    "bad header": [b"GET /sim/stats HTTP/1.1\r\nHost: sim\r\nbad header\r\n\r\n"],
    "too big": [post(b"SendMail", b"x" * 5000)],
    "truncated body": [post(b"FolderSync", FOLDERSYNC)[:-3]],
    "truncated head": [post(b"FolderSync", FOLDERSYNC)[:40]],
    "good then bad": [post(b"FolderSync", FOLDERSYNC) + b"BAD\x00 / HTTP/1.1\r\n\r\n"],
    "empty": [],
}


async def _exchange(port: int, pieces: list[bytes]) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = bytearray()
    async with stream:
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(0)
        await stream.send_eof()
        with trio.fail_after(20):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return bytes(got)
                got += data


async def _pair(nursery):
    sims = []
    for lean in (True, False):
        sim = MailboxSimulator(password="secret", seed=5, initial_messages=4, require_provisioning=False,
                               max_body=4096, lean_http=lean)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        sims.append(sim)
    return sims


async def test_same_bytes_as_h11(nursery):
    lean, ref = await _pair(nursery)
    for name, pieces in CASES.items():
        a = await _exchange(lean.port, pieces)
        b = await _exchange(ref.port, pieces)
        assert a == b, name
        if name in ("foldersync", "pipelined", "split", "options"):
            assert a.startswith(b"HTTP/1.1 200 ") and a.count(b"HTTP/1.1 200 ") == b"".join(pieces).count(b"Host:")
    assert lean.counts == ref.counts and lean.sent_count == ref.sent_count == 2
    assert lean.lean_answers >= 10 and ref.lean_answers == 0     # the lean path did answer


@settings(max_examples=25, derandomize=True)
@given(cuts=st.lists(st.integers(min_value=1, max_value=2000), max_size=5))
def test_any_split_same_bytes_as_h11(cuts):
    stream = post(b"FolderSync", FOLDERSYNC) + post(b"Sync", SYNC0) + CHUNKED + post(b"Sync", SYNC1)
    bounds = sorted({c % len(stream) for c in cuts} | {0, len(stream)})
    pieces = [stream[x:y] for x, y in zip(bounds, bounds[1:]) if y > x]

    async def main():
        async with trio.open_nursery() as nursery:
            lean, ref = await _pair(nursery)
            a = await _exchange(lean.port, pieces)
            b = await _exchange(ref.port, pieces)
            nursery.cancel_scope.cancel()
        assert a == b and a.count(b"HTTP/1.1 200 ") == 4

    trio.run(main)
