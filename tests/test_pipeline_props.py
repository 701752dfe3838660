"""Properties of the Sync answer transform: only the Data strings of bodies change,
and only in their link schemes; every other byte is as the server sent it."""
from __future__ import annotations

import re

from hypothesis import given, strategies as st

from seg_fast.content import pipeline
from seg_fast.content.keys import Keyring
from seg_fast.content.model import EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.content.settings import ContentSettings
from seg_fast.eas.request import EasRequest
from seg_fast.eas.wbxml import Element, decode, encode, scan

WB = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]
REQ = EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command="Sync", user="u", device_id="d")

words = st.sampled_from(["hello", "http://a.example.com/x?y=1&amp;z", "https://b.org", "mailto:x@y.org",
                         "<a href=\"http://c.net/p\">c</a>", "caf\u00e9", "\u2603", "HTTP://D.ORG", "cid:1", " "])
body_text = st.lists(words, max_size=12).map(" ".join)
item = st.tuples(st.sampled_from(["1", "2"]), body_text, st.sampled_from(["0", "1"]), st.booleans())


def answer(items) -> bytes:
    adds = []
    for i, (btype, data, truncated, with_subject) in enumerate(items):
        app = [Element("Email:Subject", text="see http://subject.example.com")] if with_subject else []
        app.append(Element("AirSyncBase:Body", [Element("AirSyncBase:Type", text=btype),
                                                Element("AirSyncBase:Truncated", text=truncated),
                                                Element("AirSyncBase:Data", text=data)]))
        adds.append(Element("AirSync:Add", [Element("AirSync:ServerId", text=str(i)),
                                            Element("AirSync:ApplicationData", app)]))
    return encode(Element("AirSync:Sync", [Element("AirSync:Collections", [Element("AirSync:Collection", [
        Element("AirSync:SyncKey", text="1"), Element("AirSync:Commands", adds)])])]))


def unrewrite(s: str) -> str:
    return s.replace("awbs://", "https://").replace("awb://", "http://")


def lower_schemes(s: str) -> str:
    # The rewriter maps HTTP:// to awb:// too; undoing it gives the lower-case scheme.
    return re.sub(r"(?i)https?://", lambda m: m.group(0).lower(), s)


@given(st.lists(item, min_size=1, max_size=5))
def test_only_body_data_schemes_change(items):
    pipeline.configure(ContentSettings(), keys=Keyring(b"x" * 32))
    (t,) = pipeline.transforms_for(EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True)),
                                   managed=True, device_id="d", user="u")
    raw = answer(items)
    out = t.transform_answer(REQ, 200, WB, raw)
    before, after = decode(raw), decode(out)
    datas_before = [d.text for d in before.iter("AirSyncBase:Data")]
    datas_after = [d.text for d in after.iter("AirSyncBase:Data")]
    assert [lower_schemes(unrewrite(d)) for d in datas_after] == [lower_schemes(d) for d in datas_before]
    for (btype, data, truncated, _), new in zip(items, datas_after):
        if truncated == "0":
            assert "http://" not in new.lower() and "https://" not in new.lower()
    # Subjects and everything else: the same tree; bytes outside the Data tokens equal.
    for d in after.iter("AirSyncBase:Data"):
        d.text = lower_schemes(unrewrite(d.text))
    for d in before.iter("AirSyncBase:Data"):
        d.text = lower_schemes(d.text)
    assert after == before

    def outside(doc):
        chunks, pos = [], 0
        for sp in scan(doc, ["AirSyncBase:Data"]):
            chunks.append(doc[pos:sp.token_start])
            pos = sp.token_end
        return chunks + [doc[pos:]]
    assert outside(out) == outside(raw)
    assert t.transform_answer(REQ, 200, WB, out) == out  # idempotent


def _real(name):
    from conftest import REAL_SERVER
    return (REAL_SERVER / name).read_bytes()


FUZZ_BASES = [("Sync", WB, "sync1.resp.wbxml"), ("ItemOperations", WB, "iofetch.resp.wbxml"),
              ("ItemOperations", [(b"Content-Type", b"application/vnd.ms-sync.multipart")], "mp.bin")]


@given(st.sampled_from(FUZZ_BASES),
       st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 8), st.binary(max_size=6)), max_size=6))
def test_mutated_answers_raise_content_error_or_transform(base, edits):
    from seg_fast.content.model import AttachmentPolicy
    from seg_fast.errors import ContentError

    command, headers, name = base
    data = bytearray(_real(name))
    for pos, dele, ins in edits:
        pos %= len(data) + 1
        data[pos:pos + dele] = ins
    pipeline.configure(ContentSettings(), keys=Keyring(b"x" * 32))
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True),
                              managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt"}))
    (t,) = pipeline.transforms_for(pol, managed=True, device_id="d", user="u")
    req = EasRequest(method="POST", path="/x", command=command, user="u", device_id="d")
    try:
        out = t.transform_answer(req, 200, headers, bytes(data))
    except ContentError:
        return
    assert len(out) <= 4 * len(data) + 4096
