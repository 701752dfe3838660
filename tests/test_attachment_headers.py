"""GetAttachment answers carry the headers of what the content pipeline made of them:
the envelope's content type and name for a sealed attachment, text/plain and the
note's name for a blocked one (Transform.transform_answer_and_headers, hooks.py),
unit-level and through the gateway against a mail server that names the file."""
from __future__ import annotations

import base64
import email.message
from urllib.parse import unquote
from contextlib import asynccontextmanager

import pytest
import trio

from proxy_helpers import Client, MiniUpstream
from seg_fast.config import load_config
from seg_fast.content import pipeline
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE, open_envelope
from seg_fast.content.keys import Keyring
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy
from seg_fast.content.settings import ContentSettings
from seg_fast.eas.request import EasRequest
from seg_fast.hooks import AllowAll, Decision
from seg_fast.proxy.gateway import Gateway

KEYS = Keyring(b"h" * 32)
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 4
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
POLICY = EmailSecurityPolicy(
    managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt", "png": "block"}, block_message="No images."))


@pytest.fixture(autouse=True)
def runtime(tmp_path):
    pipeline.configure(ContentSettings(master_key_file=str(tmp_path / "m.key"),
                                       key_state_file=str(tmp_path / "k.json")), keys=KEYS)
    yield
    pipeline.configure(ContentSettings(master_key_file=str(tmp_path / "m.key")))


def _req(ref: str) -> EasRequest:
    return EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command="GetAttachment", user="test",
                      device_id="DEV1", params={"AttachmentName": ref})


def _transform():
    (t,) = pipeline.transforms_for(POLICY, managed=True, device_id="DEV1", user="test")
    return t


def _filename(value: bytes) -> str:
    m = email.message.Message()
    m["Content-Disposition"] = value.decode("latin-1")
    return m.get_filename()


def test_sealed_attachment_gets_envelope_type_and_name():
    headers = [(b"Content-Type", b"application/pdf"), (b"X-Other", b"kept"),
               (b"Content-Disposition", b'attachment; filename="Q3 report.pdf"; size=1033')]
    new_headers, body = _transform().transform_answer_and_headers(_req("ref:1"), 200, headers, PDF)
    h = {k.lower(): v for k, v in new_headers}
    assert h[b"content-type"] == ENVELOPE_CONTENT_TYPE.encode()
    assert _filename(h[b"content-disposition"]) == "Q3 report.pdf.segenc"
    assert h[b"x-other"] == b"kept" and len(new_headers) == 3
    name, ctype, data = open_envelope(KEYS, "DEV1", "test", body)
    assert (name, ctype, data) == ("Q3 report.pdf", "application/pdf", PDF)


def test_blocked_attachment_gets_text_plain_and_note_name():
    headers = [(b"Content-Type", b"image/png"),
               (b"Content-Disposition", b"inline; filename*=UTF-8''%C3%A9t%C3%A9.png")]
    new_headers, body = _transform().transform_answer_and_headers(_req("ref:2"), 200, headers, PNG)
    h = dict(new_headers)
    assert h[b"Content-Type"] == b"text/plain; charset=utf-8"
    # RFC 6266: an ASCII filename for old clients, filename* (RFC 5987) with the real name.
    value = h[b"Content-Disposition"]
    assert _filename(value) == "_t_.png (removed).txt"
    assert unquote(value.split(b"filename*=UTF-8''", 1)[1].decode("ascii")) == "été.png (removed).txt"
    assert h[b"Content-Disposition"].startswith(b"inline;")
    assert "été.png" in body.decode() and "No images." in body.decode() and b"PNG" not in body


def test_allowed_attachment_keeps_headers_and_body():
    headers = [(b"Content-Type", b"text/csv"), (b"Content-Disposition", b'attachment; filename="a.csv"')]
    new_headers, body = _transform().transform_answer_and_headers(_req("ref:3"), 200, headers, b"a,b\n")
    assert new_headers is headers and body == b"a,b\n"


def test_no_disposition_none_added_and_body_only_api_still_works():
    headers = [(b"Content-Type", b"application/octet-stream")]
    new_headers, body = _transform().transform_answer_and_headers(_req("ref:4"), 200, headers, PNG)
    assert [k for k, _ in new_headers] == [b"Content-Type"]
    assert _transform().transform_answer(_req("ref:4"), 200, headers, PNG) == body


def test_header_injection_from_a_file_name_is_neutralised():
    headers = [(b"Content-Disposition", b'attachment; filename="x\\"\\r\\nSet-Cookie: a=b.png"')]
    new_headers, _ = _transform().transform_answer_and_headers(_req("ref:5"), 200, headers, PNG)
    value = dict(new_headers)[b"Content-Disposition"]
    assert b"\r" not in value and b"\n" not in value and value.count(b'"') == 2


class WithPolicy(AllowAll):
    def decide(self, req):
        return Decision(allowed=True, reason="allowed.test", transforms=_gate_transforms)


_gate_transforms: tuple = ()


@asynccontextmanager
async def through_gateway(handler, tmp_path):
    up = MiniUpstream(handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        config = load_config(None, env={"SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0",
                                        "SEG_FAST_LOG_TRANSACTIONS": "",
                                        "SEG_FAST_UPSTREAM_URL": f"http://127.0.0.1:{up.port}",
                                        "SEG_FAST_SECURITY_MASTER_KEY_FILE": str(tmp_path / "m.key")})
        gw = Gateway(config, gatekeeper_factory=lambda c: WithPolicy())
        pipeline.configure(config.security, keys=KEYS)      # Gateway() configured its own
        await nursery.start(gw.serve)
        yield gw
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("name,payload,want_type,want_name", [
    ("Q3.pdf", PDF, ENVELOPE_CONTENT_TYPE, "Q3.pdf.segenc"),
    ("cat.png", PNG, "text/plain; charset=utf-8", "cat.png (removed).txt"),
])
async def test_get_attachment_headers_through_the_gateway(tmp_path, name, payload, want_type, want_name):
    global _gate_transforms
    _gate_transforms = pipeline.transforms_for(POLICY, managed=True, device_id="DEV1", user="test")

    def handler(req, body):
        ctype = b"application/pdf" if name.endswith("pdf") else b"image/png"
        return 200, [(b"Content-Type", ctype), (b"Content-Disposition", f'attachment; filename="{name}"'.encode()),
                     (b"Content-Length", str(len(payload)).encode())], payload

    async with through_gateway(handler, tmp_path) as gw:
        dev = await Client.connect(gw.port)
        auth = (b"Authorization", b"Basic " + base64.b64encode(b"test:secret"))
        resp, body = await dev.request(
            b"POST", b"/Microsoft-Server-ActiveSync?Cmd=GetAttachment&AttachmentName=ref%3A9&User=test"
                     b"&DeviceId=DEV1&DeviceType=iPhone", [auth], b"")
        h = dict(resp.headers)
        assert resp.status_code == 200
        assert h[b"content-type"] == want_type.encode()
        assert _filename(h[b"content-disposition"]) == want_name
        assert int(h[b"content-length"]) == len(body) and payload not in body
        if want_type == ENVELOPE_CONTENT_TYPE:
            assert open_envelope(KEYS, "DEV1", "test", body)[2] == payload
