"""The one-pass, GIL-free passes a sealed attachment goes through (content/_mime.pyx,
content/attachments.py), each against an independent oracle: the standard library's
base64/binascii, pybase64 as the code before them used it, AES-GCM decryption, Python's
own UTF-8 decoder and its email package."""
from __future__ import annotations

import base64
import binascii
import email
import hashlib
import os
import re
import threading
from email import policy as email_policy

import pybase64
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, strategies as st

from seg_fast.content import _mime, attachments
from seg_fast.content._mime import (b64decode_lines, b64decode_lines_into, b64encode_lines, decoded_room,
                                    strip_breaks, utf8_text, utf8_text_parts, walk, writable_bytes)
from seg_fast.content.attachments import (decoded_scratch, open_envelope, parse_header, seal,
                                          sealed_base64)
from seg_fast.content.keys import Keyring

KEYS = Keyring(b"k" * 32)
# Chunk sizes of the base64 passes: tiny ones put a chunk edge at every position.
CHUNKS = (4, 8, 12, 76, 1 << 16)


@pytest.fixture(autouse=True)
def _default_chunk():
    yield
    _mime._set_b64_chunk(1 << 16)


def test_libbase64_is_used():
    # The fallback (no libbase64 symbols in pybase64) is correct but slow: this machine's
    # pybase64 must give the fast one, or the figures in benchmarks/README.md mean nothing.
    assert _mime.HAVE_LIBBASE64


def wrapped(data: bytes, width: int, eol: bytes) -> bytes:
    text = base64.b64encode(data)
    if not width:
        return text
    return eol.join(text[i:i + width] for i in range(0, len(text), width))


@given(st.binary(max_size=700), st.sampled_from([0, 4, 8, 64, 76, 3, 5, 77]),
       st.sampled_from([b"\r\n", b"\n"]), st.sampled_from(CHUNKS))
def test_encode_lines_is_base64_wrapped(data, width, eol, chunk):
    _mime._set_b64_chunk(chunk)
    assert b64encode_lines(data, width, eol) == wrapped(data, width, eol)


def stripped(text: bytes) -> bytes:
    """What strip_breaks removes, said independently: LF, the CR just before one, a CR ending the text."""
    return re.sub(rb"\r?\n|\r\Z", b"", text)


def old_decode(text: bytes):
    """The code this replaces: strip_breaks, then pybase64's strict decode."""
    try:
        return pybase64.b64decode(strip_breaks(text), validate=True)
    except (binascii.Error, ValueError):
        return None


def new_decode(text: bytes):
    try:
        return b64decode_lines(text)
    except ValueError:
        return None


# Base64 text in lines, then damaged: padding, breaks and foreign bytes put anywhere.
_noise = st.sampled_from([b"=", b"==", b"\r", b"\n", b"\r\n", b" ", b"-", b"A", b"\x00", b"\xff"])


@st.composite
def base64_lines(draw):
    data = draw(st.binary(max_size=300))
    text = bytearray(wrapped(data, draw(st.sampled_from([4, 8, 76, 5, 64])), draw(st.sampled_from([b"\r\n", b"\n"]))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text[at:at] = draw(_noise)
    if draw(st.booleans()):
        text += draw(st.sampled_from([b"\r\n", b"\n", b"\r", b""]))
    return data, bytes(text)


@given(base64_lines(), st.sampled_from(CHUNKS))
def test_decode_lines_is_the_strict_decode_of_the_stripped_text(case, chunk):
    data, text = case
    _mime._set_b64_chunk(chunk)
    got = new_decode(text)
    assert got == old_decode(text)
    # The standard library agrees on what both accept (it also takes some non-canonical
    # padding bits pybase64 takes too, so the comparison runs one way).
    if got is not None:
        assert got == base64.b64decode(stripped(text), validate=True)
    if text == wrapped(data, 76, b"\r\n"):
        assert got == data
    # into a buffer: the same bytes, nothing written past them
    out = bytearray(b"\xaa" * (decoded_room(len(text)) + 4))
    try:
        n = b64decode_lines_into(text, out)
    except ValueError:
        assert got is None
    else:
        assert bytes(out[:n]) == got and out[-4:] == b"\xaa" * 4


def test_decode_lines_edges():
    for text, want in [(b"", b""), (b"\r\n", b""), (b"aGVsbG8=", b"hello"), (b"aGVs\r\nbG8=\r\n", b"hello"),
                       (b"aGVsbG8", None), (b"aGVsbG8=aGVs", None), (b"aGVsbG8=\r\naGVs", None),
                       (b"aGVs\rbG8=", None), (b"aGVsbA==\r\n\r\n", b"hell")]:
        for chunk in CHUNKS:
            _mime._set_b64_chunk(chunk)
            assert new_decode(text) == want == old_decode(text), (text, chunk)
    with pytest.raises(ValueError):
        b64decode_lines_into(b"aGVsbG8=", bytearray(3))          # no room


def test_megabytes_round_trip():
    data = os.urandom(3 * 1024 * 1024 + 7)
    text = b64encode_lines(data)
    assert text == wrapped(data, 76, b"\r\n")
    assert b64decode_lines(text) == data
    assert b64decode_lines(wrapped(data, 76, b"\n")) == data


def test_utf8_text_long_runs_agree_with_pythons_decoder():
    # The 8-bytes-at-a-time ASCII path: a non-ASCII byte or a NUL at every offset of a run.
    def python(b: bytes) -> bool:
        try:
            return "\0" not in b.decode("utf-8")
        except UnicodeDecodeError:
            return False

    base = b"QUJD" * 10
    for piece in (b"\x00", b"\xc3\xa9", b"\xc3", b"\xe2\x82\xac", b"\xe2\x82", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80",
                  b"\x80", b"\xff"):
        for at in range(len(base) + 1):
            b = base[:at] + piece + base[at:]
            assert utf8_text(b) == python(b), (piece, at)
    assert utf8_text(wrapped(os.urandom(100000), 76, b"\r\n"))


def test_writable_bytes():
    data, view = writable_bytes(5)
    view[:] = b"hello"
    view.release()
    assert type(data) is bytes and data == b"hello" and hash(data) == hash(b"hello")


def fixed_nonce(monkeypatch):
    monkeypatch.setattr(attachments.os, "urandom", lambda n: b"\x07" * n)


@pytest.mark.parametrize("size", [0, 1, 57, 1000, (1 << 20) - 1, (1 << 20) + 5, 3 * (1 << 20) + 1])
def test_sealed_base64_is_the_envelope_in_base64(size, monkeypatch):
    fixed_nonce(monkeypatch)
    data = os.urandom(size)
    text = sealed_base64(KEYS, "DEV1", "u1", "a.pdf", "application/pdf", data, 76, b"\r\n")
    envelope = seal(KEYS, "DEV1", "u1", "a.pdf", "application/pdf", data)
    assert text == wrapped(envelope, 76, b"\r\n")
    assert sealed_base64(KEYS, "DEV1", "u1", "a.pdf", "application/pdf", data) == base64.b64encode(envelope)
    # ... and opens, by AES-GCM itself, to the data
    blob = base64.b64decode(text.replace(b"\r\n", b""))
    _v, _kid, nonce, _name, _ctype, pos = parse_header(blob)
    key = KEYS.key_for_id(_kid, "DEV1", "u1")
    assert AESGCM(key).decrypt(nonce, blob[pos:], blob[:pos]) == data
    assert open_envelope(KEYS, "DEV1", "u1", blob) == ("a.pdf", "application/pdf", data)


def test_scratch_buffers_are_reused_safely():
    # big, small, big again, and decoded text sealed from the scratch it was decoded into
    sizes = [2 << 20, 10, 5 << 20, 100, 1 << 20]
    for size in sizes:
        data = os.urandom(size)
        with decoded_scratch(wrapped(data, 76, b"\r\n")) as plain:
            assert hashlib.sha256(plain).digest() == hashlib.sha256(data).digest()
            text = sealed_base64(KEYS, "D", "u", "x.bin", "application/octet-stream", plain, 76, b"\n")
        assert open_envelope(KEYS, "D", "u", base64.b64decode(text.replace(b"\n", b"")))[2] == data
    with pytest.raises(ValueError):
        decoded_scratch(b"not base64!")


def test_scratch_is_per_thread():
    results = {}

    def work(k):
        data = bytes([k]) * (1 << 20) + os.urandom(k)
        for _ in range(5):
            with decoded_scratch(base64.b64encode(data)) as plain:
                ok = bytes(plain) == data
            text = sealed_base64(KEYS, "D", "u", "x", "application/octet-stream", data)
            ok = ok and open_envelope(KEYS, "D", "u", base64.b64decode(text))[2] == data
            results.setdefault(k, []).append(ok)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: [True] * 5 for k in range(1, 4)}


def test_walk_finds_boundaries_among_dashes():
    # The delimiter search skips to each "-": text full of dashes and near-miss delimiters
    # (more than the 32 false candidates after which memmem takes over), parts as email reads them.
    dashes = b"\r\n".join([b"-" * 70, b"--boun", b"--bound", b"x--boundary", b"- - -"] * 20)
    att = wrapped(os.urandom(30000), 76, b"\r\n")
    msg = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"boundary\"\r\n\r\n"
           b"--boundary\r\nContent-Type: text/plain\r\n\r\n" + dashes + b"\r\n"
           b"--boundary\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
           b"Content-Disposition: attachment; filename=\"a.pdf\"\r\n\r\n" + att + b"\r\n"
           b"--boundary\r\nContent-Type: text/plain\r\n\r\n" + dashes + b"\r\n--boundary--\r\n")
    parts = walk(msg)
    leaves = [p for p in parts if not p.multipart]
    oracle = [p for p in email.message_from_bytes(msg, policy=email_policy.compat32).walk()
              if not p.is_multipart()]
    assert len(leaves) == len(oracle) == 3
    for p, o in zip(leaves, oracle):
        assert msg[p.body_start:p.end] == o.get_payload(decode=False).encode("latin-1")


@given(st.lists(st.sampled_from([b"a", b"\x00", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80",
                                 b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\x80", b"\xc3", b"QUJDREVGR0g="]), max_size=12),
       st.lists(st.integers(0, 60), max_size=4))
def test_utf8_text_parts_is_utf8_text_of_the_join(pieces, cuts):
    # split anywhere, inside characters too
    whole = b"".join(pieces)
    try:
        want = "\0" not in whole.decode("utf-8")
    except UnicodeDecodeError:
        want = False
    bounds = sorted({min(c, len(whole)) for c in cuts} | {0, len(whole)})
    chunks = [whole[a:b] for a, b in zip(bounds, bounds[1:])]
    assert utf8_text(whole) == want
    assert utf8_text_parts(chunks) == want
    assert utf8_text_parts([memoryview(c) for c in chunks] + [b""]) == want


def test_gathered_message_is_the_joined_one(monkeypatch):
    # transform_mime(gather=True): chunks (views of the message where unchanged) that join
    # to exactly what the whole-bytes call returns; a sealed PDF and a rewritten link.
    from seg_fast.content.message import ContentPlan, transform_mime
    from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy

    fixed_nonce(monkeypatch)
    pdf = b"%PDF-1.4\n" + os.urandom(600000)
    big = wrapped(os.urandom(400000), 76, b"\r\n")
    msg = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
           b"--b1\r\nContent-Type: text/plain\r\n\r\nsee http://intranet.example.com/x\r\n"
           b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
           b"Content-Disposition: attachment; filename=\"keep.bin\"\r\n\r\n" + big + b"\r\n"
           b"--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
           b"Content-Disposition: attachment; filename=\"a.pdf\"\r\n\r\n" + wrapped(pdf, 76, b"\r\n") + b"\r\n--b1--\r\n")
    pol = EmailSecurityPolicy(
        hyperlinks=HyperlinkPolicy(enabled=True, mode="include", domains=["intranet.example.com"]),
        managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt"}))
    plan = ContentPlan(pol, managed=True, device_id="D", user="u", keys=KEYS)
    whole, out1 = transform_mime(msg, plan)
    chunks, out2 = transform_mime(memoryview(msg), plan, gather=True)
    assert type(chunks) is list and 1 < len(chunks) < 8
    assert b"".join(chunks) == whole and out1.attachments == out2.attachments and out1.links == out2.links == 1
    assert any(type(c) is memoryview and len(c) >= len(big) for c in chunks)   # the kept attachment: not copied
    sealed = email.message_from_bytes(whole).get_payload()[2]
    assert sealed.get_filename() == "a.pdf.segenc"
    assert open_envelope(KEYS, "D", "u", sealed.get_payload(decode=True))[2] == pdf


def test_known_text_chunks_are_not_read_but_still_separate_their_neighbours():
    # pipeline._as_kind checks a rebuilt message's chunks as UTF-8 with each known base64
    # chunk (Outcome.texts) standing as one ASCII byte: the verdict is the joined bytes'.
    from types import SimpleNamespace

    from seg_fast.content.pipeline import _as_kind, _Text

    sp = SimpleNamespace(kind="str")
    text = b"QUJD" * 20000
    for before, after in [(b"x\xc3", b"\xa9y"), (b"x\xc3\xa9", b"y"), (b"x\x00", b"y"), (b"x", b"y")]:
        chunks = [before, text, after]
        want = utf8_text(b"".join(chunks))
        got = _as_kind(sp, chunks, texts=[text])
        assert (type(got) is _Text) == want, (before, after)
        assert (type(_as_kind(sp, chunks)) is _Text) == want
    assert type(_as_kind(sp, [b"x\xc3", text, b"\xa9y"], texts=[text])) is bytes   # written as OPAQUE


def test_fallbacks_give_the_same_bytes(monkeypatch):
    # Without libbase64's symbols (pybase64 passes) and without libcrypto (cryptography):
    # slower, the same bytes and the same refusals.
    fixed_nonce(monkeypatch)
    data = os.urandom((1 << 20) + 11)
    text = wrapped(data, 76, b"\r\n")
    fast = (b64encode_lines(data), b64encode_lines(data, 0), b64decode_lines(text),
            sealed_base64(KEYS, "D", "u", "x.pdf", "application/pdf", data, 76, b"\n"),
            seal(KEYS, "D", "u", "x.pdf", "application/pdf", data))
    _mime._use_libbase64(False)
    try:
        out = bytearray(decoded_room(len(text)))
        n = b64decode_lines_into(text, out)
        assert bytes(out[:n]) == data
        for bad in (b"aGVsbG8=aGVs", b"aGVs\rbG8="):
            with pytest.raises(ValueError):
                b64decode_lines(bad)
        monkeypatch.setattr(attachments, "HAVE_LIBCRYPTO", False)
        slow = (b64encode_lines(data), b64encode_lines(data, 0), b64decode_lines(text),
                sealed_base64(KEYS, "D", "u", "x.pdf", "application/pdf", data, 76, b"\n"),
                seal(KEYS, "D", "u", "x.pdf", "application/pdf", data))
    finally:
        _mime._use_libbase64(True)
    assert slow == fast
    assert fast[0] == text and fast[1] == base64.b64encode(data) and fast[2] == data


def test_nested_scratch_use_gets_its_own_buffer():
    # a block inside another's (an attached message sealing its attachments while the
    # fetched file's bytes are held) must not overwrite what the outer one still reads
    outer = os.urandom(7000)
    inner = os.urandom(5000)          # smaller: the kept buffer would fit it
    with decoded_scratch(base64.b64encode(outer)) as a:
        with decoded_scratch(base64.b64encode(inner)) as b:
            assert bytes(b) == inner
            text = sealed_base64(KEYS, "D", "u", "x", "application/octet-stream", b)
        assert bytes(a) == outer
    assert open_envelope(KEYS, "D", "u", base64.b64decode(text))[2] == inner
    with decoded_scratch(base64.b64encode(inner)) as c:      # the kept buffer, free again
        assert bytes(c) == inner
