"""A fetch sealed as it streams (proxy/sealstream.py) takes what the mail server's socket
already holds with each read, up to READ_BYTES, and seals and writes it as one chunk: not
a chunk, a device write and a short last TLS record per 64 KiB read. Driven in the loop
with the mail server's reads scripted (sealstream's own I/O calls stood in for) and the
device's writes recorded; the bytes are the whole path's under a fixed nonce either way."""
from __future__ import annotations

import types

import pytest
import trio

from seg_fast.content import attachments
from seg_fast.proxy import exchange, http1, sealstream, sockio
from test_fetch_stream_seal import REQ, fetch_answer, pdf, transform, whole

PIECE = 64 * 1024                     # what one read of the mail server's socket gives at most
WB_FULL = [(b"Content-Type", b"content-type", b"application/vnd.ms-sync.wbxml")]


class _Device:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closing = False

    def compiled_answer(self) -> bool:
        return True

    def keeps_open(self) -> bool:
        return True

    def answer_written(self, *_args) -> None:
        pass

    def answer_done(self) -> None:
        pass

    async def send_parts(self, parts) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append(b"".join(bytes(p) for p in parts))


def _carry(body: bytes, ready: bool, monkeypatch) -> tuple[bytes, _Device]:
    """The device's answer to ``body`` (head and chunked body) and the device; the mail
    server's socket holds the whole rest of the answer at every read if ``ready``, else
    only the one 64 KiB piece each read waits for."""
    left = [body]

    def next_piece(size: int) -> bytes:
        piece, left[0] = left[0][:min(size, PIECE)], left[0][min(size, PIECE):]
        return piece

    async def up_read(_up, _timeout, size):
        await trio.lowlevel.checkpoint()
        return next_piece(size)

    monkeypatch.setattr(exchange, "_up_read", up_read)
    monkeypatch.setattr(sockio, "read_now", lambda _sock, size: (next_piece(size) or None) if ready else None)
    dev = _Device()
    up = types.SimpleNamespace(rest=b"", plain=None, tls=None, reusable=False, looks_alive=lambda: True)
    gw = types.SimpleNamespace(
        config=types.SimpleNamespace(timeouts=types.SimpleNamespace(upstream_read=5.0)),
        stats=types.SimpleNamespace(transform=lambda *_a: None),
        incidents=types.SimpleNamespace(note=lambda *_a, **_k: None))
    head = types.SimpleNamespace(length=len(body), framing=http1.FRAMING_LENGTH, keep_alive=True)
    rec = types.SimpleNamespace(status=0, bytes_out=0, error=None)

    async def main():
        return await sealstream.carry(gw, dev, up, head, REQ, 200, WB_FULL, b"OK", [transform()], rec)

    assert trio.run(main) == 200 and not rec.error and not left[0]
    return b"".join(dev.writes), dev


def _chunks(answer: bytes) -> list[bytes]:
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    out, at = [], 0
    while True:
        eol = rest.index(b"\r\n", at)
        size = int(rest[at:eol], 16)
        if not size:
            assert rest[eol:] == b"\r\n\r\n"
            return out
        out.append(rest[eol + 2:eol + 2 + size])
        assert rest[eol + 2 + size:eol + 4 + size] == b"\r\n"
        at = eol + 4 + size


@pytest.mark.parametrize("ready", [True, False])
def test_what_the_socket_holds_is_sealed_and_written_at_once(ready, monkeypatch):
    monkeypatch.setattr(attachments.os, "urandom", lambda n: b"\x07" * n)
    body = fetch_answer(pdf(2 << 20))                     # 2.8 MB: 43 reads of 64 KiB
    answer, dev = _carry(body, ready, monkeypatch)
    chunks = _chunks(answer)
    assert b"".join(chunks) == whole(transform(), body)   # the whole path's bytes either way
    reads = -(-len(body) // PIECE)
    if ready:
        # One chunk (and one device write) per READ_BYTES of the answer, not per read.
        batches = -(-len(body) // sealstream.READ_BYTES)
        assert len(chunks) <= batches + 3 < reads // 2
        assert len(dev.writes) <= batches + 2
        assert max(len(c) for c in chunks) > 2 * PIECE
    else:
        assert len(chunks) >= reads - 2                   # nothing more to take: a chunk per read
