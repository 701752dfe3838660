"""The content pipeline on the BENCH-PROFILE corpus, with the corpus's own link list
and attachments as oracles and the email package reading what we wrote."""
from __future__ import annotations

import email
import email.policy
import hashlib

import pytest
from link_oracle import listed

from seg_fast.content._links import LinkRewriter
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE, envelope_name, open_envelope
from seg_fast.content.keys import Keyring
from seg_fast.content.message import ContentPlan, transform_mime
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.sim.corpus import REWRITE_DOMAINS, Corpus

CORPUS = Corpus(7)
KEYS = Keyring(b"c" * 32)


def expected_html(msg) -> str:
    out = msg.html
    for url in set(msg.links):
        if listed(url):
            esc = url.replace("&", "&amp;")
            new = ("awbs" if url.startswith("https") else "awb") + esc[esc.index("://"):]
            out = out.replace(esc, new)
    return out


@pytest.mark.parametrize("i", range(12))
def test_html_bodies_rewrite_exactly_the_included_links(i):
    msg = CORPUS.message(i)
    r = LinkRewriter({"http": "awb", "https": "awbs"}, "include", list(REWRITE_DOMAINS))
    out, n = r.rewrite(msg.html.encode())
    assert out.decode() == expected_html(msg)
    assert n == sum(1 for u in msg.links if listed(u))


def test_corpus_messages_through_the_managed_policy():
    pol = EmailSecurityPolicy(
        hyperlinks=HyperlinkPolicy(enabled=True, mode="include", domains=list(REWRITE_DOMAINS)),
        managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt", "docx": "encrypt",
                                                        "zip": "encrypt", "png": "block"}))
    plan = ContentPlan(pol, managed=True, device_id="dev", user="user", keys=KEYS)
    seen = {"signed": 0, "encrypt": 0, "block": 0, "links": 0}
    for i in range(80):
        msg = CORPUS.message(i)
        data = msg.mime
        out, res = transform_mime(data, plan)
        if msg.signed:
            assert out is data and res.smime_skipped
            seen["signed"] += 1
            continue
        parsed = email.message_from_bytes(out, policy=email.policy.default)
        html = [p for p in parsed.walk() if p.get_content_type() == "text/html"][0].get_content()
        assert html.replace("\r\n", "\n") == expected_html(msg)
        seen["links"] += res.links
        for name, ctype, blob in msg.attachments:
            kind = name.rsplit(".", 1)[1]
            if kind == "png":
                assert res.attachments == [(name, "block", "")]
                assert not any(p.get_content_type() == "image/png" for p in parsed.walk())
                seen["block"] += 1
            else:
                env = [p for p in parsed.walk() if p.get_content_type() == ENVELOPE_CONTENT_TYPE]
                assert [p.get_filename() for p in env] == [envelope_name(name)]
                got_name, got_type, plain = open_envelope(KEYS, "dev", "user", env[0].get_payload(decode=True))
                assert (got_name, got_type) == (name, ctype)
                assert hashlib.sha256(plain).digest() == hashlib.sha256(blob).digest()
                seen["encrypt"] += 1
    assert seen["encrypt"] and seen["block"] and seen["links"], seen
