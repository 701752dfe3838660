"""The email security policy document: shape, defaults and precise rejections."""
from __future__ import annotations

import msgspec
import pytest

from seg_fast.content.model import EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.errors import PolicyError


def test_document_round_trips_through_json():
    doc = {"hyperlinks": {"enabled": True, "mode": "include", "domains": ["example.com"]},
           "managed_attachments": {"file_types": {"pdf": "encrypt"}, "default": "allow"},
           "unmanaged_attachments": {"file_types": {"png": "block"}, "block_message": "No images."},
           "classification": {"enabled": True, "tags": [{"tag": "Confidential", "allowed_clients": ["Boxer*"]}]},
           "skip_smime": False}
    pol = msgspec.convert(doc, EmailSecurityPolicy)
    assert pol.attachments_for(True).action_for("pdf") == "encrypt"
    assert pol.attachments_for(False).action_for("png") == "block"
    assert pol.attachments_for(False).action_for("pdf") == "allow"
    assert msgspec.json.decode(msgspec.json.encode(pol), type=EmailSecurityPolicy) == pol
    assert pol.hyperlinks.scheme_map == {"http": "awb", "https": "awbs"}


@pytest.mark.parametrize("bad,match", [
    ({"hyperlinks": {"scheme_map": {"http": "https", "https": "awbs"}}}, "also a source"),
    ({"hyperlinks": {"scheme_map": {"ht tp": "awb"}}}, "not a URL scheme"),
    ({"hyperlinks": {"domains": ["a..b"]}}, "not a domain"),
    ({"hyperlinks": {"domains": ["http://x.org"]}}, "not a domain"),
    ({"classification": {"header": "X Bad:"}}, "not a header"),
])
def test_bad_documents_are_rejected_precisely(bad, match):
    with pytest.raises(PolicyError, match=match):
        msgspec.convert(bad, EmailSecurityPolicy)


def test_unknown_fields_and_actions_are_rejected():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"hyperlink": {}}, EmailSecurityPolicy)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"managed_attachments": {"file_types": {"pdf": "shred"}}}, EmailSecurityPolicy)
    assert HyperlinkPolicy(domains=["*.ok.com"]).domains == ["*.ok.com"]
