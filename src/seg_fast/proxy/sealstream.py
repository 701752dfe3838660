"""An ItemOperations Fetch (or GetAttachment) answer sealed while it streams, not read whole first.

The whole path (exchange._whole_body, then the transform, then the write) makes the device
wait for the read, the seal and the write one after the other: for a 10 MB fetch some
150-300 ms more than the direct path's one overlapped transfer. Here the answer's first
bytes are read (up to where its one inline Data string starts, and 4 KB of the file), the
pipeline decides what the whole path would (content/fetchstream.py,
EmailSecurityTransform.stream_fetch), and a sealed file then goes to the device as its
base64 arrives: each read decoded, encrypted (AES-GCM) and encoded on the loop (well under
a millisecond for the reads' 256 KB at most) and written, chunked (its length is not
known in advance). The envelope is the whole path's byte for byte
(tests/test_fetch_stream_seal.py). An answer the pipeline would leave as it is streams
as it came (exchange._stream_fast); anything else (blocked, a message to rebuild, a
ranged or multipart fetch, several Data, an unusual document) goes on to the whole path
with what was read.

Once the device's head went out, an error (Data not strict base64, the mail server closing
or falling silent, an answer that does not end as its start said) closes the device's
connection without the last chunk: the device sees an incomplete answer, never a complete
wrong one; the reason goes to the transaction log and the incident log (never content).
A file whose stream broke for a reason of its own (not strict base64, an unusual ending)
is read whole the next time it is fetched (the whole path decodes leniently).

A GetAttachment answer is the file itself: the envelope (header, AES-GCM of the body as it
arrives, tag) goes out with the Content-Length it will have, the new Content-Type and file
name as the whole path writes them.

``security.stream_seal = false`` in the config turns this off (every such answer whole).
"""
from __future__ import annotations

from collections import OrderedDict

import h11

from seg_fast import dx
from seg_fast.content import fetchstream
from seg_fast.content._gcm import HAVE_TEXT_SEAL, GcmStream
from seg_fast.proxy import headers as hdrs
from seg_fast.proxy import http1, sockio
from seg_fast.proxy.upstream import UpstreamError

# Smaller answers are sealed whole on the loop in about a millisecond: nothing to gain.
MIN_BYTES = 256 * 1024
# What is sealed and written at once while streaming: a read and what the socket already
# holds after it, up to this (its seal is inline: ~0.1 ms for 256 KB here). The loop is let
# go where the reads and the device's records are counted (sockio/tlsio.FAIR_EVERY).
READ_BYTES = 256 * 1024
# (user, FileReference) whose stream broke on the file itself: fetched whole next time.
_WHOLE_NEXT: OrderedDict = OrderedDict()
_WHOLE_NEXT_MAX = 1024
PASS = fetchstream.PASS
_COMMANDS = ("ItemOperations", "GetAttachment")


class StreamBroken(Exception):
    """The answer cannot be finished after its head went out: the device connection closes."""


def candidate(gw, dev, head, req, answer_tx) -> bool:
    """Whether this answer may be sealed as it streams (else the whole path as before)."""
    security = gw.config.security
    limit = security.max_transform_bytes
    if not security.stream_seal or req.command not in _COMMANDS or len(answer_tx) != 1 or dx.PENDING:
        return False
    if not HAVE_TEXT_SEAL:
        return False                  # no libcrypto or libbase64 to be found: the whole path
    if not hasattr(answer_tx[0], "stream_fetch"):
        return False
    if head.framing != http1.FRAMING_LENGTH or not MIN_BYTES <= head.length <= limit:
        return False
    if dev.compiled_answer():
        return True
    conn = dev.conn                   # the device must take a chunked answer (HTTP/1.1)
    return conn.our_state is h11.SEND_RESPONSE and conn.their_http_version == b"1.1" \
        and (conn.their_state is h11.DONE or conn.their_state is h11.MUST_CLOSE)


async def carry(gw, dev, up, head, req, status: int, headers, reason: bytes, answer_tx, rec):
    """Carry the answer: its status (the device answered, or its connection to be closed by
    the DeviceGone raised), or None: the whole path goes on, what was read put back in
    ``up.rest``."""
    from seg_fast.proxy import exchange as ex

    if req.command == "GetAttachment":
        return await _attachment(ex, gw, dev, up, head, req, status, headers, reason, answer_tx[0], rec)
    length = head.length
    timeout = gw.config.timeouts.upstream_read
    buf, up.rest = up.rest, b""
    # -- the answer's first bytes: where its Data string starts, and 4 KB of the file --
    try:
        while True:
            lay = fetchstream.layout(buf[:fetchstream.PREFIX_LIMIT], length)
            if lay is not fetchstream.NEED_MORE:
                break
            buf += await _read(ex, up, timeout, min(length - len(buf), fetchstream.PREFIX_LIMIT))
        if lay is None:
            up.rest = buf
            return None
        need = lay.start + min(fetchstream.HEAD_CHARS, lay.data_len)
        while len(buf) < need:
            buf += await _read(ex, up, timeout, need - len(buf))
    except UpstreamError as exc:
        await ex._unavailable(gw, dev, rec, str(exc))
        return rec.status
    try:
        plan = answer_tx[0].stream_fetch(req, status, hdrs.pairs(headers), buf[:need], lay, _WHOLE_NEXT)
    except ValueError:
        plan = None                   # not strict base64 from the start: the whole path decides
    if plan is None or plan == PASS:
        return await _unsealed(ex, gw, dev, up, head, req, status, headers, reason, rec, plan, buf)
    await _sealed(ex, gw, dev, up, head, req, status, headers, reason, rec, plan, lay, buf, need)
    return status


async def _unsealed(ex, gw, dev, up, head, req, status: int, headers, reason: bytes, rec, plan, buf: bytes):
    """``plan`` None (the whole path goes on: None) or PASS (the answer goes on as it came:
    its status); what was read goes back first either way."""
    up.rest = buf
    if plan is None:
        return None
    gw.stats.transform(req.command, head.length, head.length)
    await ex._stream_fast(gw, dev, up, head, status, headers, rec, reason)
    return status


def _device_head(dev, status: int, reason: bytes, headers, framing: int, length: int):
    """(the device's answer head, written as _stream_fast writes one; the h11 connection
    told of it, or None when the compiled path carries the exchange)."""
    conn = None if dev.compiled_answer() else dev.conn
    if conn is None:
        out = http1.write_response(status, reason, headers, framing, length, dev.keeps_open())
        dev.answer_written(status, headers, reason)
    else:
        keep = not dev.closing and conn.their_state is h11.DONE
        out = http1.write_response(status, reason, headers, framing, length, keep)
        http1.sent(conn, hdrs.response_event(status, headers, reason))
    return out, conn


def _device_done(ex, dev, conn) -> None:
    if conn is None:
        dev.answer_done()
    else:
        http1.sent(conn, ex.END)


def _broken(ex, gw, dev, rec, why: str):
    """The DeviceGone that closes the device's connection, its answer cut off; logged."""
    rec.error = (why + "; the device's answer was cut off")[:200]
    gw.incidents.note("stream_seal_broken", client_ip=dev.client_ip, reason=why[:200])
    return ex.DeviceGone(why)


async def _read(ex, up, timeout: float, size: int) -> bytes:
    data = await ex._up_read(up, timeout, max(1, min(size, READ_BYTES)))
    if not data:
        raise UpstreamError("mail server closed the connection mid-answer")
    return data


async def _sealed(ex, gw, dev, up, head, req, status, headers, reason, rec, plan, lay, buf: bytes,
                  need: int) -> None:
    length = head.length
    text_end = lay.start + lay.data_len
    out, conn = _device_head(dev, status, reason, headers, http1.FRAMING_CHUNKED, 0)
    rec.status = status
    size_out = 0
    tail = b""
    pending = [out]

    def put(*parts: bytes) -> None:
        """One chunk of ``parts`` (uncopied)."""
        nonlocal size_out
        n = 0
        for part in parts:
            n += len(part)
        if n:
            pending.append(b"%x\r\n" % n)
            pending.extend(parts)
            pending.append(b"\r\n")
            size_out += n

    def take(piece, at: int) -> bytes:
        """Body bytes ``piece`` from offset ``at``: the Data string's sealed (returned), the rest kept."""
        nonlocal tail
        cut = max(0, min(len(piece), text_end - at))
        if cut < len(piece):
            tail += piece[cut:]
        return plan.step(piece[:cut] if cut < len(piece) else piece) if cut else b""

    timeout = gw.config.timeouts.upstream_read
    why = None
    try:
        put(plan.first)
        at = need
        if len(buf) > need:
            put(take(buf[need:], need))
            at = len(buf)
        del buf
        while at < length:
            await dev.send_parts(pending)
            pending.clear()
            try:
                piece = await _read(ex, up, timeout, length - at)
            except UpstreamError as exc:
                why = str(exc)
                raise StreamBroken(why) from None
            outs = []
            for piece in _ready_after(up, piece, length - at):
                outs.append(take(piece, at))
                at += len(piece)
            put(*outs)
        put(plan.end(tail))
    except ValueError as exc:
        why = f"ItemOperations Data could not be sealed as it streamed: {exc}"
        _whole_next(plan)
    except StreamBroken:
        pass
    if why is not None:
        rec.bytes_out = size_out
        raise _broken(ex, gw, dev, rec, why)
    # Read to its Content-Length: bytes beyond it would be read as the next request's answer.
    up.reusable = head.keep_alive and up.looks_alive()
    pending.append(b"0\r\n\r\n")
    _device_done(ex, dev, conn)
    rec.bytes_out = size_out
    gw.stats.transform(req.command, length, size_out)
    await dev.send_parts(pending)


def _ready_after(up, piece: bytes, left: int) -> list:
    """``piece`` and what the mail server's socket already holds after it, up to READ_BYTES
    (and ``left``) in all: sealed and written as one chunk of full records, not one per
    64 KiB read. Each pass of a streamed answer had cost a device write, a short last
    record and a chunk of its own, and the loop was let go every 512 KB besides the reads'
    and records' own checkpoints: beside other devices' requests a 10 MB fetch waited for
    some 60 of their batches (benchmarks/big_fetch_tail.py --security on --load 3)."""
    pieces = [piece]
    room = min(left, READ_BYTES) - len(piece)
    tls = up.tls if up.plain is None else None     # (an https:// mail server: its whole records)
    while room > 0:
        more = sockio.read_now(up.plain, room) if tls is None else tls.read_now(room)
        if not more:
            break                     # nothing yet (or the EOF, which the next read reports)
        pieces.append(more)
        room -= len(more)
    return pieces


def _whole_next(plan) -> None:
    key = (plan.user.lower(), plan.ref)
    _WHOLE_NEXT[key] = True
    _WHOLE_NEXT.move_to_end(key)
    while len(_WHOLE_NEXT) > _WHOLE_NEXT_MAX:
        _WHOLE_NEXT.popitem(last=False)


async def _attachment(ex, gw, dev, up, head, req, status: int, headers, reason: bytes, t, rec):
    """GetAttachment: the body is the file; its envelope's length is known from the
    Content-Length, so the device's answer keeps one (an answer cut off is short of it)."""
    length = head.length
    timeout = gw.config.timeouts.upstream_read
    buf, up.rest = up.rest, b""
    want = min(length, 4096)
    try:
        while len(buf) < want:
            buf += await _read(ex, up, timeout, want - len(buf))
    except UpstreamError as exc:
        await ex._unavailable(gw, dev, rec, str(exc))
        return rec.status
    plan = t.stream_attachment(req, status, hdrs.pairs(headers), buf[:want], length)
    if plan is None or plan == PASS:
        return await _unsealed(ex, gw, dev, up, head, req, status, headers, reason, rec, plan, buf)
    new_headers, env_head, key = plan
    new_headers = [(k, k.lower(), v) for k, v in new_headers]     # Connection: close kept if there
    size_out = len(env_head) + length + 16
    out, conn = _device_head(dev, status, reason, new_headers, http1.FRAMING_LENGTH, size_out)
    rec.status = status
    gcm = GcmStream(key, env_head[14:26], env_head)
    pending = [out, env_head, gcm.update(buf)]
    at = len(buf)
    del buf
    while at < length:
        await dev.send_parts(pending)
        try:
            piece = await _read(ex, up, timeout, length - at)
        except UpstreamError as exc:
            raise _broken(ex, gw, dev, rec, str(exc)) from None
        pending = []
        for piece in _ready_after(up, piece, length - at):
            pending.append(gcm.update(piece))
            at += len(piece)
    pending.append(gcm.final())
    up.reusable = head.keep_alive and up.looks_alive()
    _device_done(ex, dev, conn)
    rec.bytes_out = size_out
    gw.stats.transform(req.command, length, size_out)
    await dev.send_parts(pending)
    return status
