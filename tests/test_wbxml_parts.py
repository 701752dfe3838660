"""Gather output: encode_parts and splice_parts give the bytes encode and splice give, as a
list of parts whose long unchanged runs point into the document instead of copying it; the
gateway sends a transformed Sync answer that way (writev), checked through `seg-fast serve`."""
from __future__ import annotations

import random

import pytest
import trio
from conftest import REAL_SERVER
from test_hostile_content import WBXML, Gateway, _Attrs, sync_request, wait_serving

from seg_fast.content import pipeline
from seg_fast.content.model import EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.content.settings import ContentSettings
from seg_fast.eas.request import EasRequest
from seg_fast.eas.wbxml import (DEFAULT_MAX_REFS, DEFAULT_MIN_REF, Element, decode, encode, encode_parts, scan,
                                splice, splice_parts)
from seg_fast.policy.model import PolicyDocument


def _item(n: int, body: str, blob: bytes = b"") -> Element:
    app = [Element("Email:Subject", text=f"item {n}"),
           Element("AirSyncBase:Body", [Element("AirSyncBase:Type", text="2"),
                                        Element("AirSyncBase:Data", text=body)])]
    if blob:
        app.append(Element("Email2:ConversationIndex", opaque=blob))
    return Element("AirSync:Add", [Element("AirSync:ServerId", text=f"1:{n}"),
                                   Element("AirSync:ApplicationData", app)])


def _sync(items: list[Element]) -> bytes:
    return encode(Element("AirSync:Sync", [Element("AirSync:Collections", [Element("AirSync:Collection", [
        Element("AirSync:SyncKey", text="2"), Element("AirSync:CollectionId", text="1"),
        Element("AirSync:Commands", items)])])]))


def _big_html(rng: random.Random, size: int, links: bool) -> str:
    out, n = ["<html><body>"], 0
    while sum(map(len, out)) < size:
        n += 1
        out.append(f'<p>paragraph {n} <a href="https://www.contoso.com/p/{rng.randrange(10**6)}">more</a></p>\r\n'
                   if links else f"<p>paragraph {n} of a long plain letter, nothing to rewrite here.</p>\r\n")
    return "".join(out) + "</body></html>"


def _documents() -> list[bytes]:
    rng = random.Random(13)
    docs = [p.read_bytes() for p in sorted(REAL_SERVER.glob("*.wbxml"))]
    docs.append(_sync([_item(i, _big_html(rng, rng.choice((500, 40_000, 90_000)), i % 2 == 0),
                             rng.randbytes(rng.choice((16, 50_000)))) for i in range(12)]))
    return docs


@pytest.mark.parametrize("min_ref, max_refs", [(DEFAULT_MIN_REF, DEFAULT_MAX_REFS), (1, 10**6), (100, 2)])
def test_encode_parts_joins_to_encode(min_ref, max_refs):
    for data in _documents():
        for built in (False, True):           # a lazy tree (unread subtrees) and a fully built one
            tree = decode(data)
            if built:
                list(tree.iter())
            parts = encode_parts(tree, min_ref=min_ref, max_refs=max_refs)
            assert b"".join(parts) == encode(tree) == data
            views = [p for p in parts if type(p) is memoryview]
            assert len(views) <= max_refs
            # a view points into the document (nothing copied) and is at least min_ref long
            assert all(v.obj is data and len(v) >= min_ref for v in views)
            assert all(type(p) in (bytes, memoryview) and len(p) for p in parts)


def test_encode_parts_of_a_changed_tree_and_of_assigned_bytes():
    data = _documents()[-1]
    tree = decode(data)
    blob = bytes(range(256)) * 200                 # 51 KB assigned: a view of this very object
    adds = list(tree.iter("AirSync:Add"))
    adds[0].find("AirSync:ApplicationData").children.append(Element("Email2:ConversationIndex", opaque=blob))
    adds[1].find("AirSync:ApplicationData").find("Email:Subject").text = "changed"
    del tree.find("AirSync:Collections").find("AirSync:Collection").find("AirSync:Commands").children[3]
    parts = encode_parts(tree, min_ref=1024)
    assert b"".join(parts) == encode(tree)
    assert decode(b"".join(parts)) == tree
    assert any(type(p) is memoryview and p.obj is blob for p in parts)


def test_splice_parts_joins_to_splice():
    for data in _documents():
        spans = scan(data, ["AirSyncBase:Data", "Email:Subject", "Email2:ConversationIndex"])
        rng = random.Random(len(data))
        edits = [(sp, "x" * rng.choice((1, 70_000)) if sp.kind == "str" else rng.randbytes(rng.choice((3, 40_000))))
                 for sp in spans if rng.random() < 0.4]
        whole = splice(data, edits)
        for min_ref, max_refs in ((DEFAULT_MIN_REF, DEFAULT_MAX_REFS), (1, 10**6), (64, 1)):
            parts = splice_parts(data, edits, min_ref=min_ref, max_refs=max_refs)
            assert b"".join(parts) == whole
            views = [p for p in parts if type(p) is memoryview]
            assert len(views) <= max_refs and all(len(v) >= min_ref for v in views)
            assert all(v.obj is data or any(v.obj is value for _, value in edits) for v in views)
    # a document that could change under the views is copied, never pointed at
    data = bytearray(_documents()[-1])
    sp = scan(data, ["Email:Subject"])[0]
    parts = splice_parts(data, [(sp, "new")], min_ref=1)
    assert all(type(p) is bytes for p in parts)
    assert b"".join(parts) == splice(bytes(data), [(sp, "new")])


async def test_transformed_sync_answer_goes_out_as_parts_through_the_gateway(tmp_path):
    """A body-heavy Sync answer under an "all links" policy, through a running gateway:
    the bodies with links are rewritten (HTMLParser oracle), the long ones without links and
    the opaque blobs arrive byte for byte, and the whole answer is what the contiguous
    splice would have sent (same Content-Length, same bytes)."""
    rng = random.Random(5)
    items = [_item(i, _big_html(rng, 60_000 if i % 2 else 3_000, links=i % 3 == 0), rng.randbytes(40_000))
             for i in range(8)]
    answer = _sync(items)
    policy = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True, mode="all"))
    async with Gateway(tmp_path, lambda req, body: (200, WBXML, answer), PolicyDocument(security=policy)) as gw:
        c = gw.client("PARTS1")
        try:
            await wait_serving(gw.port, gw.proc, c)
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
        finally:
            await c.aclose()
    assert r.status == 200
    got = list(r.doc.iter("AirSync:Add"))
    want = list(decode(answer).iter("AirSync:Add"))
    assert len(got) == len(want) == 8
    rewritten = 0
    for g, w in zip(got, want):
        gb, wb = g.find("AirSync:ApplicationData"), w.find("AirSync:ApplicationData")
        assert gb.findtext("Email:Subject") == wb.findtext("Email:Subject")
        assert gb.find("Email2:ConversationIndex").opaque == wb.find("Email2:ConversationIndex").opaque
        before = _Attrs(wb.find("AirSyncBase:Body").findtext("AirSyncBase:Data")).seen
        after = _Attrs(gb.find("AirSyncBase:Body").findtext("AirSyncBase:Data")).seen
        assert len(after) == len(before)
        for (_, key, value), (_, _, new) in zip(before, after):
            assert new == (value.replace("https://", "awbs://", 1) if key == "href" else value)
        rewritten += before != after
    assert rewritten == 3                         # items 0, 3 and 6 had links
    # the bytes the device got are exactly what the contiguous transform makes in-process,
    # and that transform's gather output joins to them
    pipeline.configure(ContentSettings())
    (t,) = pipeline.transforms_for(policy, managed=False, device_id="PARTS1", user="jdoe")
    request = EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command="Sync", user="jdoe",
                         device_id="PARTS1", user_agent="", params={})
    whole = t.transform_answer(request, 200, WBXML, answer)
    _, parts = t.transform_answer_parts(request, 200, WBXML, answer)
    assert type(parts) is list and b"".join(parts) == whole == r.body
    # what the gateway left alone went out as views of the mail server's answer, not copies
    assert sum(len(p) for p in parts if type(p) is memoryview and p.obj is answer) > len(answer) // 2
