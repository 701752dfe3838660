"""The MIME walker and the whole-message transform, checked against Python's email
package: same structure, text identical but for the rewritten links, encrypted
attachments decrypt to the original bytes, and nothing crashes on mutated input."""
from __future__ import annotations

import email
import email.policy
import hashlib
import random
from email.message import EmailMessage

import pytest
from hypothesis import given, strategies as st

from conftest import REAL_SERVER
from seg_fast.content._mime import parse_header_value, walk
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE, open_envelope
from seg_fast.content.keys import Keyring
from seg_fast.content.message import ContentPlan, transform_mime
from seg_fast.content.model import (AttachmentPolicy, ClassificationPolicy, ClassificationTag,
                                    EmailSecurityPolicy, HyperlinkPolicy)
from seg_fast.errors import MIMEError

PDF = (REAL_SERVER / "attachment_getatt.bin").read_bytes()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
ZIP = b"PK\x03\x04" + bytes(range(200))
KEYS = Keyring(b"k" * 32)

TEXT = "Hello,\nsee http://docs.example.com/a?b=1 and https://other.org/x.\nmailto:a@b.org\n"
HTML = ('<html><body><p>Hi <a href="https://docs.example.com/login?u=1&amp;x=2">log in</a> '
        "<a href='http://news.other.org/a b'>news</a> <img src=\"cid:logo\"> "
        "bare http://sub.docs.example.com/ too</p></body></html>\n")


def make_message(*, attachments=(), html_cte=None, text_cte=None, headers=None, nested=False) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "test"
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(TEXT, cte=text_cte) if text_cte else msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html", cte=html_cte) if html_cte else msg.add_alternative(HTML, subtype="html")
    for name, data, maintype, subtype in attachments:
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    if nested:
        inner = EmailMessage()
        inner["Subject"] = "inner"
        inner.set_content("inner http://inner.example.com/")
        inner.add_attachment(PNG, maintype="image", subtype="png", filename="inner.png")
        msg.add_attachment(inner)
    return msg.as_bytes(policy=email.policy.SMTP)


def plan(*, links=True, mode="all", domains=(), managed=None, unmanaged=None, classification=None,
         managed_device=True, skip_smime=True):
    pol = EmailSecurityPolicy(
        hyperlinks=HyperlinkPolicy(enabled=links, mode=mode, domains=list(domains)),
        managed_attachments=managed or AttachmentPolicy(),
        unmanaged_attachments=unmanaged or AttachmentPolicy(),
        classification=classification or ClassificationPolicy(),
        skip_smime=skip_smime,
    )
    return ContentPlan(pol, managed=managed_device, device_id="DEV1", user="alice", keys=KEYS,
                       default_message="Blocked by policy.")


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def unrewrite(s: str) -> str:
    return s.replace("awbs://", "https://").replace("awb://", "http://")


def test_walker_agrees_with_email_package():
    data = make_message(attachments=[("report.pdf", PDF, "application", "pdf"),
                                     ("pic.png", PNG, "image", "png")], nested=True)
    ours = walk(data)
    theirs = list(parse(data).walk())
    assert [p.content_type for p in ours] == [m.get_content_type() for m in theirs]
    assert [p.filename for p in ours] == [m.get_filename() or "" for m in theirs]
    for p, m in zip(ours, theirs):
        if not p.multipart and not p.children:
            body = data[p.body_start:p.end]
            if p.cte == "base64":
                import base64
                assert base64.b64decode(body) == m.get_payload(decode=True)


def test_header_params():
    assert parse_header_value('attachment; filename="a \\"b\\".pdf"; size=3') == (
        "attachment", {"filename": 'a "b".pdf', "size": "3"})
    assert parse_header_value("attachment; filename*0*=utf-8''%E2%82%AC; filename*1=.pdf")[1] == {
        "filename": "\u20ac.pdf"}
    assert parse_header_value('image/png; name="=?utf-8?B?w6l0w6kucG5n?="')[1] == {"name": "\u00e9t\u00e9.png"}
    assert parse_header_value("text/plain") == ("text/plain", {})


@pytest.mark.parametrize("text_cte,html_cte", [(None, None), ("quoted-printable", "base64"),
                                               ("base64", "quoted-printable"), ("8bit", "7bit")])
def test_links_rewritten_in_every_transfer_encoding(text_cte, html_cte):
    data = make_message(text_cte=text_cte, html_cte=html_cte)
    out, res = transform_mime(data, plan())
    assert res.links == 5
    before, after = parse(data), parse(out)
    for a, b in zip(before.walk(), after.walk()):
        assert a.get_content_type() == b.get_content_type()
        if a.get_content_maintype() == "text":
            new = b.get_content()
            assert "http://docs" not in new and "https://docs" not in new
            assert unrewrite(new) == a.get_content()


def test_include_mode_in_mime():
    data = make_message()
    out, res = transform_mime(data, plan(mode="include", domains=["docs.example.com"]))
    html = [m for m in parse(out).walk() if m.get_content_type() == "text/html"][0].get_content()
    assert "awbs://docs.example.com/login?u=1&amp;x=2" in html
    assert "http://news.other.org/a b" in html
    assert "awb://sub.docs.example.com/" in html
    assert res.links == 3


def test_managed_encrypts_and_envelope_decrypts_to_the_original():
    data = make_message(attachments=[("report.pdf", PDF, "application", "pdf"),
                                     ("fake.pdf", ZIP, "application", "pdf"),
                                     ("pic.png", PNG, "image", "png")])
    p = plan(links=False, managed=AttachmentPolicy(file_types={"pdf": "encrypt", "zip": "encrypt"}))
    out, res = transform_mime(data, p)
    assert [(a, b) for a, b, _ in res.attachments] == [("report.pdf", "encrypt"), ("fake.pdf", "encrypt")]
    msg = parse(out)
    envs = [m for m in msg.walk() if m.get_content_type() == ENVELOPE_CONTENT_TYPE]
    assert [m.get_filename() for m in envs] == ["report.pdf.segenc", "fake.pdf.segenc"]
    for m, orig, kind in zip(envs, (PDF, ZIP), ("application/pdf", "application/zip")):
        name, ctype, plain = open_envelope(KEYS, "dev1", "ALICE", m.get_payload(decode=True))
        assert hashlib.sha256(plain).digest() == hashlib.sha256(orig).digest()
        assert ctype == kind          # what the bytes are (the same however it is fetched)
    # The PNG and the text parts are untouched byte for byte.
    png = [m for m in msg.walk() if m.get_content_type() == "image/png"][0]
    assert png.get_payload(decode=True) == PNG
    assert [m.get_content_type() for m in msg.walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html",
        ENVELOPE_CONTENT_TYPE, ENVELOPE_CONTENT_TYPE, "image/png"]


def test_unmanaged_png_blocked_with_message():
    data = make_message(attachments=[("pic.png", PNG, "image", "png"), ("report.pdf", PDF, "application", "pdf")])
    p = plan(links=False, managed_device=False,
             unmanaged=AttachmentPolicy(file_types={"png": "block"}, block_message="PNG not allowed here."))
    out, res = transform_mime(data, p)
    assert res.attachments == [("pic.png", "block", "")]
    parts = list(parse(out).walk())
    notes = [m for m in parts if m.get_content_type() == "text/plain" and "pic.png" in m.get_content()]
    assert len(notes) == 1 and "PNG not allowed here." in notes[0].get_content()
    assert not any(m.get_content_type() == "image/png" for m in parts)
    assert [m for m in parts if m.get_content_type() == "application/pdf"][0].get_payload(decode=True) == PDF


def test_bytes_outside_changed_parts_are_unchanged():
    data = make_message(attachments=[("report.pdf", PDF, "application", "pdf")])
    p = plan(links=False, managed=AttachmentPolicy(file_types={"pdf": "encrypt"}))
    out, _ = transform_mime(data, p)
    att = [q for q in walk(data) if q.filename == "report.pdf"][0]
    assert out[:att.start] == data[:att.start]
    assert out.endswith(data[att.end:])


def test_nested_message_attachments_are_reached():
    data = make_message(nested=True)
    p = plan(links=False, managed=AttachmentPolicy(file_types={"png": "block"}))
    out, res = transform_mime(data, p)
    assert res.attachments == [("inner.png", "block", "")]
    assert not any(m.get_content_type() == "image/png" for m in parse(out).walk())


def test_smime_signed_is_left_alone_when_exempt():
    inner = make_message(attachments=[("report.pdf", PDF, "application", "pdf")])
    signed = (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="sig"\r\n'
              b"From: a@b.org\r\n\r\n--sig\r\n" + inner + b"\r\n--sig\r\n"
              b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n\r\nAAAA\r\n--sig--\r\n")
    p = plan(managed=AttachmentPolicy(file_types={"pdf": "encrypt"}))
    out, res = transform_mime(signed, p)
    assert out is signed and res.smime_skipped
    p2 = plan(managed=AttachmentPolicy(file_types={"pdf": "encrypt"}), skip_smime=False)
    out2, res2 = transform_mime(signed, p2)
    assert out2 != signed and res2.attachments and res2.links


def test_classification_blocks_other_clients_with_template():
    data = make_message(headers={"X-Classification": "Confidential"})
    cls = ClassificationPolicy(enabled=True, tags=[ClassificationTag(
        tag="confidential", allowed_clients=["Boxer*", "*AirWatch Inbox*"],
        template="Classified {tag}: open it in Boxer.")])
    p = plan(links=True, classification=cls)
    blocked, res = transform_mime(data, p, client="Apple-iPhone9C1/1602.99")
    assert res.classification_blocked
    msg = parse(blocked)
    assert msg.get_content_type() == "text/plain" and msg["Subject"] == "test"
    assert msg.get_content().strip() == "Classified confidential: open it in Boxer."
    allowed, res2 = transform_mime(data, p, client="Boxer/4.2 (iOS)")
    assert not res2.classification_blocked and res2.links == 5
    untagged, res3 = transform_mime(make_message(), p, client="Apple-iPhone9C1/1602.99")
    assert not res3.classification_blocked


def test_no_policy_blocks_attachments_by_default():
    data = make_message(attachments=[("report.pdf", PDF, "application", "pdf")])
    p = ContentPlan(None, managed=True, device_id="d", user="u", keys=None, default_message="No policy.")
    out, res = transform_mime(data, p)
    assert res.attachments == [("report.pdf", "block", "")] and b"No policy." in out
    p2 = ContentPlan(None, managed=True, device_id="d", user="u", keys=None, no_policy_block=False)
    assert transform_mime(data, p2)[0] is data


def test_truncated_message_never_encrypts_a_cut_attachment():
    data = make_message(attachments=[("report.pdf", PDF, "application", "pdf")])
    cut = data[: len(data) - 200]
    p = plan(links=False, managed=AttachmentPolicy(file_types={"pdf": "encrypt"}))
    out, res = transform_mime(cut, p, truncated=True)
    assert res.attachments == [("report.pdf", "block", "")]


def test_lf_only_message_keeps_lf():
    data = make_message(attachments=[("report.pdf", PDF, "application", "pdf")]).replace(b"\r\n", b"\n")
    p = plan(managed=AttachmentPolicy(file_types={"pdf": "encrypt"}))
    out, res = transform_mime(data, p)
    assert b"\r\n" not in out and res.attachments
    env = [m for m in parse(out).walk() if m.get_content_type() == ENVELOPE_CONTENT_TYPE][0]
    assert open_envelope(KEYS, "DEV1", "alice", env.get_payload(decode=True))[2] == PDF


def test_limits_raise_precise_errors():
    deep = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(40))
    with pytest.raises(MIMEError, match="deeper"):
        walk(deep)
    many = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\nx\r\n" * 3000 + b"--b--\r\n"
    with pytest.raises(MIMEError, match="parts"):
        walk(many)


BASE = make_message(attachments=[("report.pdf", PDF, "application", "pdf"), ("pic.png", PNG, "image", "png")],
                    nested=True, html_cte="base64")
FUZZ_PLAN = plan(managed=AttachmentPolicy(file_types={"pdf": "encrypt", "png": "block"}))


@given(st.lists(st.tuples(st.integers(0, len(BASE)), st.integers(0, 40), st.binary(max_size=12)), max_size=8),
       st.booleans())
def test_mutated_messages_never_crash_and_output_is_bounded(edits, truncated):
    data = bytearray(BASE)
    for pos, dele, ins in edits:
        data[pos:pos + dele] = ins
    data = bytes(data)
    try:
        parts = walk(data)
        out, _ = transform_mime(data, FUZZ_PLAN, truncated=truncated)
    except MIMEError:
        return
    assert len(out) <= 2 * len(data) + 1024 * len(parts)
    parse(out)  # the email package reads what we wrote


@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data):
    try:
        transform_mime(data, FUZZ_PLAN)
    except MIMEError:
        pass


@given(st.binary(max_size=600), st.sampled_from([b"\r\n", b"\n"]))
def test_qp_encode_roundtrips_with_the_stdlib(data, eol):
    import binascii
    from seg_fast.content._mime import qp_encode

    enc = qp_encode(data, eol)
    norm = data.replace(b"\r\n", b"\n").replace(b"\n", eol)
    assert binascii.a2b_qp(enc) == norm
    assert all(len(line) <= 76 for line in enc.split(eol))


def test_magic_bytes_decide_over_the_name_in_mime():
    # A ".pdf" that is a ZIP is a ZIP: blocked by the zip rule, not encrypted as a pdf.
    data = make_message(attachments=[("fake.pdf", ZIP, "application", "pdf"),
                                     ("real.pdf", PDF, "application", "pdf")])
    p = plan(links=False, managed=AttachmentPolicy(file_types={"pdf": "encrypt", "zip": "block"}))
    _, res = transform_mime(data, p)
    assert [(a, b) for a, b, _ in res.attachments] == [("fake.pdf", "block"), ("real.pdf", "encrypt")]


@given(st.binary(max_size=400))
def test_qp_decode_and_locate_agree(enc):
    import binascii
    from seg_fast.content._mime import qp_decode, qp_locate

    dec = qp_decode(enc)
    # Well-formed input decodes as the stdlib does.
    clean = binascii.b2a_qp(enc)
    assert qp_decode(clean) == binascii.a2b_qp(clean)
    # Each decoded byte's encoding, read back alone, is that byte.
    locs = qp_locate(enc, list(range(len(dec))))
    for k, (s, e) in enumerate(locs):
        piece = enc[s:e]
        assert qp_decode(piece) == dec[k:k + 1] or (piece == b"=" and dec[k:k + 1] == b"=")
    assert qp_locate(enc, [len(dec)]) == [(-1, -1)]


def test_qp_part_changes_only_scheme_bytes():
    import binascii

    html = ("<p>" + "word " * 14 + '<a href="https://docs.example.com/x">d</a> ' + "more " * 30 + "</p>\n") * 3
    msg = EmailMessage()
    msg["Subject"] = "qp"
    msg.set_content(html, subtype="html", cte="quoted-printable")
    data = msg.as_bytes(policy=email.policy.SMTP)
    out, res = transform_mime(data, plan())
    assert res.links == 3
    # Same bytes but the schemes (soft breaks inside a scheme may go).
    assert out.replace(b"awbs", b"https") == data or \
        binascii.a2b_qp(out.split(b"\r\n\r\n", 1)[1]).replace(b"awbs", b"https") == \
        binascii.a2b_qp(data.split(b"\r\n\r\n", 1)[1])
    assert parse(out).get_content().replace("awbs://", "https://") == parse(data).get_content()


def test_message_past_the_walker_limits_is_withheld_not_passed():
    deep = (b"Subject: deep\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(40)))
    out, res = transform_mime(deep, plan(managed=AttachmentPolicy(file_types={"pdf": "encrypt"})))
    assert res.unreadable and b"could not be checked" in out
    assert parse(out)["Subject"] == "deep"
    # Links only: nothing to withhold, the message passes as it is.
    assert transform_mime(deep, plan())[0] is deep


def test_classification_applies_to_signed_mail_too():
    inner = make_message()
    signed = (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="sig"\r\n'
              b"X-Classification: Confidential\r\n\r\n--sig\r\n" + inner + b"\r\n--sig--\r\n")
    cls = ClassificationPolicy(enabled=True, tags=[ClassificationTag(tag="Confidential", allowed_clients=["Boxer*"])])
    out, res = transform_mime(signed, plan(classification=cls), client="Apple-iPhone")
    assert res.classification_blocked and not res.smime_skipped
    out2, res2 = transform_mime(signed, plan(classification=cls), client="Boxer/1")
    assert out2 is signed and res2.smime_skipped
