"""An ItemOperations Fetch answer sealed while it streams (content/fetchstream.py,
pipeline.EmailSecurityTransform.stream_fetch) gives exactly the whole path's bytes: the
same answer transformed whole (pipeline.transform_answer_parts, joined) under a fixed nonce,
for the answer cut into pieces at every offset; the envelope opens by AES-GCM itself
(cryptography's AESGCM) to the file, and its base64 is what the standard library reads.
The decoder refuses what the whole path's strict decode refuses."""
from __future__ import annotations

import base64
import binascii
import os
import types

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st

from seg_fast.content import attachments, fetchstream, pipeline
from seg_fast.content import _gcm
from seg_fast.content._gcm import GcmStream, TextSeal
from seg_fast.content._mime import b64decode_lines
from seg_fast.content.attachments import parse_header
from seg_fast.content.keys import Keyring
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy
from seg_fast.content.settings import ContentSettings
from seg_fast.eas.wbxml import Element as E, encode

KEYS = Keyring(b"k" * 32)
WB = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]
POLICY = EmailSecurityPolicy(managed_attachments=AttachmentPolicy(
    file_types={"pdf": "encrypt", "png": "block", "txt": "allow"}, default="encrypt"))


@pytest.fixture(autouse=True)
def _runtime():
    pipeline.configure(ContentSettings(), KEYS)
    yield
    pipeline.configure(ContentSettings())


def fixed_nonce(monkeypatch):
    monkeypatch.setattr(attachments.os, "urandom", lambda n: b"\x07" * n)


def transform():
    (t,) = pipeline.transforms_for(POLICY, managed=True, device_id="DEV1", user="jdoe")
    return t


REQ = types.SimpleNamespace(command="ItemOperations", user="jdoe", user_agent="", params={})


def fetch_answer(blob: bytes, ctype: str | None = "application/pdf", ref: str = "ref:1", extra=()) -> bytes:
    props = ([E("AirSyncBase:ContentType", text=ctype)] if ctype is not None else []) + \
        [E("ItemOperations:Data", text=base64.b64encode(blob).decode())]
    return encode(E("ItemOperations:ItemOperations", [E("ItemOperations:Status", text="1"),
        E("ItemOperations:Response", [E("ItemOperations:Fetch", [
            E("ItemOperations:Status", text="1"), E("AirSyncBase:FileReference", text=ref),
            *extra, E("ItemOperations:Properties", props)])])]))


def whole(t, body: bytes) -> bytes:
    _, out = t.transform_answer_parts(REQ, 200, WB, body)
    return b"".join(map(bytes, out)) if type(out) is list else bytes(out)


def streamed(t, body: bytes, cuts):
    """What the streaming path makes of ``body`` arriving in pieces ending at ``cuts``:
    the bytes, pipeline.PASS, or None (the whole path's)."""
    lay = fetchstream.layout(body[:fetchstream.PREFIX_LIMIT], len(body))
    if lay is None or lay is fetchstream.NEED_MORE:
        return None
    need = lay.start + min(fetchstream.HEAD_CHARS, lay.data_len)
    plan = t.stream_fetch(REQ, 200, WB, body[:need], lay)
    if plan is None or plan == pipeline.PASS:
        return plan
    out = [plan.first]
    at = need
    text_end = lay.start + lay.data_len
    for cut in sorted(c for c in set(cuts) if need < c < text_end) + [text_end]:
        out.append(plan.step(body[at:cut]))
        at = cut
    out.append(plan.end(body[text_end:]))
    return b"".join(out)


def opened(answer: bytes) -> bytes:
    from seg_fast.eas.wbxml import scan

    (sp,) = [s for s in scan(answer, ["ItemOperations:Data"])]
    blob = base64.b64decode(answer[sp.offset:sp.offset + sp.length], validate=True)
    _v, kid, nonce, name, ctype, pos = parse_header(blob)
    return AESGCM(KEYS.key_for_id(kid, "DEV1", "jdoe")).decrypt(nonce, blob[pos:], blob[:pos])


def pdf(n: int) -> bytes:
    return (b"%PDF-1.4\n" + os.urandom(n))[:n] if n else b""


@pytest.mark.parametrize("size", [0, 1, 5, 3000, 3071, 3072, 3073, 4096, 4097, 70000, (1 << 20) + 7])
def test_streamed_is_the_whole_paths_bytes(size, monkeypatch):
    fixed_nonce(monkeypatch)
    t = transform()
    blob = pdf(size)
    body = fetch_answer(blob)
    want = whole(t, body)
    n = len(body)
    for cuts in ([], list(range(0, n, 65536)), list(range(0, n, 9973)), [n // 2, n // 2 + 1, n // 2 + 2]):
        assert streamed(t, body, cuts) == want
    if size:
        assert opened(want) == blob


@settings(max_examples=40, deadline=None, derandomize=True)
@given(size=st.integers(0, 20000), cuts=st.lists(st.integers(0, 30000), max_size=12),
       ctype=st.sampled_from(["application/pdf", None]))
def test_streamed_at_any_piece_boundaries(size, cuts, ctype):
    attachments_urandom = attachments.os.urandom
    attachments.os.urandom = lambda n: b"\x05" * n
    try:
        t = transform()
        body = fetch_answer(pdf(size), ctype)
        assert streamed(t, body, cuts) == whole(t, body)
    finally:
        attachments.os.urandom = attachments_urandom


def test_every_offset_small(monkeypatch):
    fixed_nonce(monkeypatch)
    t = transform()
    body = fetch_answer(pdf(200))
    want = whole(t, body)
    for c in range(len(body)):
        assert streamed(t, body, [c, c + 1, c + 3]) == want


def test_passed_and_whole_path_cases(monkeypatch):
    fixed_nonce(monkeypatch)
    t = transform()
    txt = b"hello, plain text\r\n" * 10
    pipeline._runtime.remember("jdoe", "ref:t", "notes.txt", share=False)
    body = fetch_answer(txt, "text/plain", ref="ref:t")
    assert streamed(t, body, []) == pipeline.PASS           # allowed: as it is, as the whole path
    assert whole(t, body) == body
    pipeline._runtime.remember("jdoe", "ref:x", "\0exempt\0a.pdf", share=False)
    body = fetch_answer(pdf(300), ref="ref:x")
    assert streamed(t, body, []) == pipeline.PASS and whole(t, body) == body   # an S/MIME item's
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(500)
    assert streamed(t, fetch_answer(png, "image/png"), []) is None             # blocked: whole path
    eml = b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
    assert streamed(t, fetch_answer(eml, "message/rfc822"), []) is None        # a message: whole path
    ranged = fetch_answer(pdf(100), extra=[E("ItemOperations:Total", text="100")])
    assert fetchstream.layout(ranged, len(ranged)) is None                     # not this path's
    two = encode(E("ItemOperations:ItemOperations", [E("ItemOperations:Response", [
        E("ItemOperations:Fetch", [E("AirSyncBase:FileReference", text="a")]),
        E("ItemOperations:Fetch", [E("AirSyncBase:FileReference", text="b"), E("ItemOperations:Properties", [
            E("ItemOperations:Data", text="QUFB")])])])]))
    assert fetchstream.layout(two, len(two)) is None
    body = fetch_answer(pdf(100))
    assert fetchstream.layout(body[:10], len(body)) is fetchstream.NEED_MORE
    # A Data string that starts past PREFIX_LIMIT: the whole path's.
    far = fetch_answer(pdf(100), ref="r" * (fetchstream.PREFIX_LIMIT + 10))
    assert fetchstream.layout(far[:fetchstream.PREFIX_LIMIT], len(far)) is None


def test_a_wrong_ending_is_refused(monkeypatch):
    fixed_nonce(monkeypatch)
    t = transform()
    body = fetch_answer(pdf(5000))
    lay = fetchstream.layout(body, len(body))
    plan = t.stream_fetch(REQ, 200, WB, body, lay)
    end = lay.start + lay.data_len
    plan.step(body[lay.start + fetchstream.HEAD_CHARS:end])
    with pytest.raises(ValueError):
        plan.end(body[end:-1] + b"\x02")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(text=st.binary(max_size=40).map(lambda b: base64.b64encode(b))
       | st.text(alphabet="AB=\r\n+/!", max_size=24).map(str.encode),
       cuts=st.lists(st.integers(0, 60), max_size=6))
def test_decoder_refuses_what_the_strict_decode_refuses(text, cuts):
    try:
        want = b64decode_lines(text)
    except ValueError:
        want = None
    dec = fetchstream._Decoder()
    out, at = [], 0
    try:
        for c in sorted(set(c for c in cuts if c < len(text))) + [len(text)]:
            out.append(dec.feed(text[at:c]))
            at = c
        if dec.carry or dec.cr:             # the text ended inside a quad, or with CR
            raise ValueError
        got = b"".join(out)
    except ValueError:
        got = None
    assert got == want
    if want is not None:        # and the standard library reads it the same
        assert want == binascii.a2b_base64(text.replace(b"\r\n", b"").replace(b"\n", b""), strict_mode=True)


@pytest.fixture(scope="module", params=[8, 12, 65536], ids=["chunk8", "chunk12", "chunk64k"])
def text_chunk(request):
    """TextSeal's chunk small, so its edges fall everywhere, and as it runs."""
    _gcm._set_text_chunk(request.param)
    yield request.param
    _gcm._set_text_chunk(65536)


def _pieces(data: bytes, cuts) -> list:
    at, out = 0, []
    for c in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
        out.append(data[at:c])
        at = c
    return out


@settings(max_examples=80, deadline=None, derandomize=True)
@given(raw=st.binary(max_size=300), head=st.binary(max_size=7), carry=st.integers(0, 3),
       cuts=st.lists(st.integers(0, 420), max_size=8))
def test_text_seal_is_decode_aesgcm_encode(text_chunk, raw, head, carry, cuts):
    """What TextSeal makes of base64 text in any pieces, with any quad carried in, is the
    base64 of ``head`` then the AES-GCM of the decoded bytes (cryptography's AESGCM)."""
    key, nonce, aad = b"\x01" * 32, b"\x02" * 12, b"aad"
    text = base64.b64encode(raw)
    carry = min(carry, len(text))
    seal = TextSeal(key, nonce, aad, text[:carry])
    out = [seal.encode(head)] + [seal.text(p) for p in _pieces(text[carry:], cuts)] + [seal.finish()]
    assert b"".join(out) == base64.b64encode(head + AESGCM(key).encrypt(nonce, raw, aad))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(plain=st.binary(max_size=200), text=st.binary(max_size=60).map(base64.b64encode),
       cuts=st.lists(st.integers(0, 300), max_size=5))
def test_text_seal_mixes_decoded_and_text(text_chunk, plain, text, cuts):
    """Bytes already decoded (``seal``) then text: one AES-GCM stream, one base64 stream."""
    key, nonce = b"\x03" * 16, b"\x04" * 12
    seal = TextSeal(key, nonce, b"")
    out = [seal.seal(p) for p in _pieces(plain, cuts)] + [seal.text(t) for t in _pieces(text, cuts)]
    want = base64.b64encode(AESGCM(key).encrypt(nonce, plain + base64.b64decode(text), b""))
    assert b"".join(out) + seal.finish() == want


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.text(alphabet="AB/+=!-_ ", max_size=28).map(str.encode)
       | st.binary(max_size=20).map(base64.b64encode),
       padded=st.booleans(), cuts=st.lists(st.integers(0, 30), max_size=6))
def test_text_seal_refuses_what_the_strict_decode_refuses(text_chunk, text, padded, cuts):
    """Accepted exactly when the strict decode of the text joined accepts it (after a quad
    with "=" when ``padded``: then nothing more may come)."""
    joined = (b"AA==" if padded else b"") + text
    try:
        want = base64.b64decode(joined, validate=True)
        want = want if len(joined) % 4 == 0 else None
    except binascii.Error:
        want = None
    key, nonce = b"\x05" * 32, b"\x06" * 12
    seal = TextSeal(key, nonce, b"", b"", padded)
    try:
        got = b"".join(seal.text(p) for p in _pieces(text, cuts)) + seal.finish()
    except ValueError:
        got = None
    if want is None:
        assert got is None
    else:
        assert got == base64.b64encode(AESGCM(key).encrypt(nonce, want[1 if padded else 0:], b""))


def test_text_seal_is_done_after_an_error_or_finish():
    seal = TextSeal(b"\x07" * 32, b"\x08" * 12, b"")
    with pytest.raises(ValueError):
        seal.text(b"AB!D")
    with pytest.raises(ValueError):
        seal.text(b"AAAA")                 # its state is part way: nothing more
    seal = TextSeal(b"\x07" * 32, b"\x08" * 12, b"", b"AA")
    with pytest.raises(ValueError, match="inside a quad"):
        seal.finish()
    seal = TextSeal(b"\x07" * 32, b"\x08" * 12, b"")
    seal.finish()
    with pytest.raises(ValueError):
        seal.text(b"AAAA")
    with pytest.raises(ValueError):
        TextSeal(b"\x07" * 32, b"\x08" * 12, b"", b"AAAA")


def test_gcm_stream_is_aesgcm():
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    data = os.urandom(300001)
    for step in (1, 7, 4096, 65536, len(data) + 1):
        g = GcmStream(key, nonce, aad)
        ct = b"".join(g.update(data[i:i + step]) for i in range(0, len(data), step)) + g.final()
        assert ct == AESGCM(key).encrypt(nonce, data, aad)
    g = GcmStream(key, nonce, aad)
    g.final()
    with pytest.raises(ValueError):
        g.update(b"x")


# -- GetAttachment: the body is the file ------------------------------------------------

def _get_req(ref="att:1"):
    return types.SimpleNamespace(command="GetAttachment", user="jdoe", user_agent="", params={"AttachmentName": ref})


def get_streamed(t, headers, body: bytes, cuts):
    """(headers, bytes) the streaming path makes, PASS, or None."""
    plan = t.stream_attachment(_get_req(), 200, headers, body[:4096], len(body))
    if plan is None or plan == pipeline.PASS:
        return plan
    new_headers, env_head, key = plan
    gcm = GcmStream(key, env_head[14:26], env_head)
    out, at = [env_head], 0
    for cut in sorted(c for c in set(cuts) if 0 < c < len(body)) + [len(body)]:
        out.append(gcm.update(body[at:cut]))
        at = cut
    out.append(gcm.final())
    return new_headers, b"".join(out)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(size=st.integers(1, 12000), cuts=st.lists(st.integers(0, 12000), max_size=8),
       named=st.booleans())
def test_get_attachment_streamed_is_the_whole_paths(size, cuts, named):
    saved = attachments.os.urandom
    attachments.os.urandom = lambda n: b"\x06" * n
    try:
        t = transform()
        headers = [(b"Content-Type", b"application/pdf")]
        if named:
            headers.append((b"Content-Disposition", b'attachment; filename="r\xc3\xa9port.pdf"'))
        body = pdf(size)
        want_headers, want = t.transform_answer_and_headers(_get_req(), 200, headers, body)
        got_headers, got = get_streamed(t, headers, body, cuts)
        assert got == want and got_headers == want_headers
        _v, kid, nonce, _name, _ctype, pos = parse_header(got)
        assert AESGCM(KEYS.key_for_id(kid, "DEV1", "jdoe")).decrypt(nonce, got[pos:], got[:pos]) == body
    finally:
        attachments.os.urandom = saved


def test_get_attachment_passed_or_whole():
    t = transform()
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(5000)
    headers = [(b"Content-Type", b"image/png")]
    assert get_streamed(t, headers, png, []) is None            # blocked: the whole path's
    pipeline._runtime.remember("jdoe", "att:1", "notes.txt", share=False)
    txt = b"plain words\r\n" * 500
    assert get_streamed(t, [(b"Content-Type", b"text/plain")], txt, []) == pipeline.PASS
    assert t.transform_answer_and_headers(_get_req(), 200, [(b"Content-Type", b"text/plain")], txt)[1] == txt
