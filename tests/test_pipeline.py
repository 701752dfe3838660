"""Email security over EAS answers: Sync, ItemOperations (inline and multipart),
GetAttachment, Search; checked with libwbxml as the independent reader, the email
package for MIME bodies, and the envelope opening to the original bytes."""
from __future__ import annotations

import email
import email.policy
import gzip
import hashlib
import shutil
import subprocess
from email.message import EmailMessage

import pytest

from conftest import REAL_SERVER
from seg_fast.content import pipeline
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE, open_envelope
from seg_fast.content.keys import Keyring
from seg_fast.content.model import (AttachmentPolicy, ClassificationPolicy, ClassificationTag,
                                    EmailSecurityPolicy, HyperlinkPolicy)
from seg_fast.content.settings import ContentSettings
from seg_fast.eas.multipart import build_multipart, parse_multipart
from seg_fast.eas.request import EasRequest
from seg_fast.eas.wbxml import Element, decode, encode, scan
from seg_fast.errors import ContentError

WBXML2XML = shutil.which("wbxml2xml")
WB = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]
SYNC1 = (REAL_SERVER / "sync1.resp.wbxml").read_bytes()
IOFETCH = (REAL_SERVER / "iofetch.resp.wbxml").read_bytes()
MP = (REAL_SERVER / "mp.bin").read_bytes()
PDF = (REAL_SERVER / "attachment_itemops.bin").read_bytes()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
KEYS = Keyring(b"p" * 32)
ENCRYPT_PDF = AttachmentPolicy(file_types={"pdf": "encrypt"})
BLOCK_PNG = AttachmentPolicy(file_types={"png": "block"}, block_message="Images are not allowed.")


@pytest.fixture(autouse=True)
def runtime(tmp_path):
    pipeline.configure(ContentSettings(master_key_file=str(tmp_path / "m.key"),
                                       key_state_file=str(tmp_path / "k.json")), keys=KEYS)
    yield
    pipeline.configure(ContentSettings())


def req(command="Sync", agent="Apple-iPhone9C1/1602.99", **params):
    return EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command=command, user="test",
                      device_id="DEV1", user_agent=agent, params=params)


def transform(policy, body, command="Sync", headers=WB, managed=True, agent="Apple-iPhone9C1/1602.99", **params):
    (t,) = pipeline.transforms_for(policy, managed=managed, device_id="DEV1", user="test")
    assert command in t.commands
    return t.transform_answer(req(command, agent, **params), 200, headers, body)


def libwbxml(body: bytes, tmp_path) -> str:
    src, dst = tmp_path / "a.wbxml", tmp_path / "a.xml"
    src.write_bytes(body)
    subprocess.run([WBXML2XML, "-l", "ACTIVESYNC", "-o", str(dst), str(src)], check=True, capture_output=True)
    return dst.read_text()


def outside_spans(data: bytes, tags) -> list[bytes]:
    """The bytes between the tokens of the given elements (codec scan)."""
    out, pos = [], 0
    for sp in scan(data, tags):
        out.append(data[pos:sp.token_start])
        pos = sp.token_end
    return out + [data[pos:]]


def test_no_policy_document_means_no_transform():
    assert pipeline.transforms_for(None, managed=True, device_id="d", user="u") == ()
    assert pipeline.transforms_for(EmailSecurityPolicy(), managed=True, device_id="d", user="u") == ()


def test_sync_links_only_bodies_change(tmp_path):
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True))
    out = transform(pol, SYNC1)
    before, after = libwbxml(SYNC1, tmp_path), libwbxml(out, tmp_path)
    assert "awb://plain.example.com/page" in after and "awbs://phish.example.net/login?u=1&amp;amp;x=2" in after
    assert "awb://docs.example.com/a b?c=d" in after and "awb://new.example.com/" in after
    assert after.replace("awbs://", "https://").replace("awb://", "http://") == before
    # Every byte outside the rewritten Data tokens is as the server sent it.
    assert outside_spans(out, ["AirSyncBase:Data"]) == outside_spans(SYNC1, ["AirSyncBase:Data"])


def test_sync_include_mode(tmp_path):
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True, mode="include", domains=["example.com"]))
    after = libwbxml(transform(pol, SYNC1), tmp_path)
    assert "awb://plain.example.com/page" in after and "awb://docs.example.com" in after
    assert "https://phish.example.net/login" in after and "https://tracker.example.org/pixel.gif" in after


def test_sync_renames_then_itemoperations_fetch_encrypts(tmp_path):
    pol = EmailSecurityPolicy(managed_attachments=ENCRYPT_PDF)
    out = transform(pol, SYNC1)
    tree = decode(out)
    att = next(tree.iter("AirSyncBase:Attachment"))
    assert att.findtext("AirSyncBase:DisplayName") == "report.pdf.segenc"
    assert int(att.findtext("AirSyncBase:EstimatedDataSize")) > 604
    assert "report.pdf.segenc" in libwbxml(out, tmp_path)
    fetched = transform(pol, IOFETCH, command="ItemOperations")
    props = next(decode(fetched).iter("ItemOperations:Properties"))
    assert props.findtext("AirSyncBase:ContentType") == ENVELOPE_CONTENT_TYPE
    import base64
    blob = base64.b64decode(props.findtext("ItemOperations:Data"))
    name, ctype, plain = open_envelope(KEYS, "dev1", "test", blob)
    assert (name, ctype) == ("report.pdf", "application/pdf")
    assert hashlib.sha256(plain).digest() == hashlib.sha256(PDF).digest()


def test_fetch_without_a_prior_sync_goes_by_magic_bytes():
    pol = EmailSecurityPolicy(managed_attachments=ENCRYPT_PDF)
    fetched = transform(pol, IOFETCH, command="ItemOperations")
    props = next(decode(fetched).iter("ItemOperations:Properties"))
    assert props.findtext("AirSyncBase:ContentType") == ENVELOPE_CONTENT_TYPE


def test_multipart_fetch_encrypts_the_part():
    pol = EmailSecurityPolicy(managed_attachments=ENCRYPT_PDF)
    headers = [(b"Content-Type", b"application/vnd.ms-sync.multipart")]
    out = transform(pol, MP, command="ItemOperations", headers=headers)
    parts = parse_multipart(out)
    assert decode(bytes(parts[0])).find("ItemOperations:Response") is not None
    assert next(decode(bytes(parts[0])).iter("AirSyncBase:ContentType")).text == ENVELOPE_CONTENT_TYPE
    assert open_envelope(KEYS, "DEV1", "test", bytes(parts[1]))[2] == PDF


def test_getattachment_raw_answer():
    pol = EmailSecurityPolicy(managed_attachments=ENCRYPT_PDF)
    raw = (REAL_SERVER / "attachment_getatt.bin").read_bytes()
    out = transform(pol, raw, command="GetAttachment", headers=[(b"Content-Type", b"application/octet-stream")],
                    AttachmentName="f1394081:3:1")
    assert open_envelope(KEYS, "DEV1", "test", out)[2] == raw
    # An unmanaged device under an allow-all unmanaged policy gets it as it is.
    pol2 = EmailSecurityPolicy(managed_attachments=ENCRYPT_PDF, unmanaged_attachments=BLOCK_PNG)
    out2 = transform(pol2, raw, command="GetAttachment", managed=False,
                     headers=[(b"Content-Type", b"application/octet-stream")], AttachmentName="f1394081:3:1")
    assert out2 is raw


def mime_message(attachments=(), headers=None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg["Subject"] = "s"
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content("see http://docs.example.com/x\n")
    for name, data, mt, st in attachments:
        msg.add_attachment(data, maintype=mt, subtype=st, filename=name)
    return msg.as_bytes(policy=email.policy.SMTP)


def sync_answer(*items, version="14") -> bytes:
    adds = []
    for i, (mclass, body_type, data, atts) in enumerate(items):
        app = [Element("Email:Subject", text="s"), Element("Email:MessageClass", text=mclass)]
        if version == "2.5":
            app.append(Element("Email:MIMEData" if body_type == "4" else "Email:Body", text=data))
        else:
            app.append(Element("AirSyncBase:Body", [Element("AirSyncBase:Type", text=body_type),
                                                    Element("AirSyncBase:EstimatedDataSize", text=str(len(data))),
                                                    Element("AirSyncBase:Truncated", text="0"),
                                                    Element("AirSyncBase:Data", text=data)]))
        if atts:
            app.append(Element("AirSyncBase:Attachments", [
                Element("AirSyncBase:Attachment", [Element("AirSyncBase:DisplayName", text=n),
                                                   Element("AirSyncBase:FileReference", text=f"ref:{i}:{k}"),
                                                   Element("AirSyncBase:Method", text="1"),
                                                   Element("AirSyncBase:EstimatedDataSize", text="100")])
                for k, n in enumerate(atts)]))
        adds.append(Element("AirSync:Add", [Element("AirSync:ServerId", text=str(i)),
                                            Element("AirSync:ApplicationData", app)]))
    return encode(Element("AirSync:Sync", [Element("AirSync:Collections", [Element("AirSync:Collection", [
        Element("AirSync:SyncKey", text="1"), Element("AirSync:CollectionId", text="1"),
        Element("AirSync:Status", text="1"), Element("AirSync:Commands", adds)])])]))


def test_unmanaged_png_blocked_in_mime_body_and_list():
    mime = mime_message([("pic.png", PNG, "image", "png")]).decode()
    body = sync_answer(("IPM.Note", "4", mime, ["pic.png"]))
    pol = EmailSecurityPolicy(unmanaged_attachments=BLOCK_PNG)
    out = transform(pol, body, managed=False)
    tree = decode(out)
    msg = email.message_from_string(next(tree.iter("AirSyncBase:Data")).text, policy=email.policy.default)
    types = [m.get_content_type() for m in msg.walk()]
    assert "image/png" not in types
    notes = [m.get_content() for m in msg.walk() if m.get_content_type() == "text/plain"]
    assert any("pic.png" in n and "Images are not allowed." in n for n in notes)
    # Its only attachment blocked, the item's attachment list is gone (the note is in the body).
    assert list(tree.iter("AirSyncBase:Attachments")) == []
    body_el = next(tree.iter("AirSyncBase:Body"))
    assert int(body_el.findtext("AirSyncBase:EstimatedDataSize")) == len(body_el.findtext("AirSyncBase:Data").encode())
    # The device then fetching it gets the note, not the image.
    got = transform(pol, PNG, command="GetAttachment", managed=False, AttachmentName="ref:0:0")
    assert b"pic.png" in got and b"Images are not allowed." in got and b"PNG" not in got


def test_blocked_attachment_element_is_cut_from_the_list(tmp_path):
    # Type 2 body (no MIME): the list says what the device can fetch. The blocked PNG's
    # Attachment element is removed, the sealed PDF renamed, every other byte kept.
    body = sync_answer(("IPM.Note", "2", "<p>hi</p>", ["a.pdf", "pic.png", "b.txt"]),
                       ("IPM.Note", "2", "<p>two</p>", ["only.png"]))
    pol = EmailSecurityPolicy(managed_attachments=AttachmentPolicy(
        file_types={"pdf": "encrypt", "png": "block"}))
    out = transform(pol, body)
    want = decode(body)
    adds = list(want.iter("AirSync:Add"))
    first = adds[0].find("AirSync:ApplicationData").find("AirSyncBase:Attachments")
    del first.children[1]                                   # pic.png gone
    first.children[0].find("AirSyncBase:DisplayName").text = "a.pdf.segenc"
    size = first.children[0].find("AirSyncBase:EstimatedDataSize")
    app2 = adds[1].find("AirSync:ApplicationData")
    app2.children = [c for c in app2.children if c.tag != "AirSyncBase:Attachments"]   # all blocked
    got = decode(out)
    size.text = next(got.iter("AirSyncBase:Attachment")).findtext("AirSyncBase:EstimatedDataSize")
    assert int(size.text) > 100
    assert got == want
    if WBXML2XML:
        assert "pic.png" not in libwbxml(out, tmp_path) and "only.png" not in libwbxml(out, tmp_path)
        assert libwbxml(out, tmp_path).count("<Attachment>") == 2


def test_smime_signed_items_are_exempt():
    inner = mime_message([("report.pdf", PDF, "application", "pdf")])
    signed = (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="s"\r\n\r\n'
              b"--s\r\n" + inner + b"\r\n--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nAA==\r\n--s--\r\n")
    body = sync_answer(("IPM.Note.SMIME.MultipartSigned", "4", signed.decode(), ["report.pdf"]))
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True), managed_attachments=ENCRYPT_PDF)
    assert transform(pol, body) is body
    # Its attachment, fetched later, is not encrypted either.
    assert transform(pol, PDF, command="GetAttachment", AttachmentName="ref:0:0") is PDF


def test_classification_by_message_class_and_header():
    cls = ClassificationPolicy(enabled=True, tags=[ClassificationTag(
        tag="Confidential", allowed_clients=["Boxer*"], template="Read {tag} mail in Boxer.")])
    pol = EmailSecurityPolicy(classification=cls)
    html_item = ("IPM.Note.Confidential", "2", "<p>secret http://a.org</p>", [])
    mime_item = ("IPM.Note", "4", mime_message(headers={"X-Classification": "confidential"}).decode(), [])
    body = sync_answer(html_item, mime_item)
    out = decode(transform(pol, body, agent="Apple-iPhone9C1/1602.99"))
    datas = [d.text for d in out.iter("AirSyncBase:Data")]
    assert "secret" not in datas[0] and "Read Confidential mail in Boxer." in datas[0]
    m = email.message_from_string(datas[1], policy=email.policy.default)
    assert m.get_content().strip() == "Read Confidential mail in Boxer." and m["Subject"] == "s"
    assert transform(pol, body, agent="Boxer/5.1") is body


def test_truncated_body_not_corrupted():
    tree = decode(sync_answer(("IPM.Note", "1", "see http://exa", [])))
    next(tree.iter("AirSyncBase:Truncated")).text = "1"
    body = encode(tree)
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True))
    assert transform(pol, body) is body


def test_protocol_25_bodies():
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True))
    body = sync_answer(("IPM.Note", "1", "go http://a.org/x", []),
                       ("IPM.Note", "4", mime_message().decode(), []), version="2.5")
    out = decode(transform(pol, body))
    assert next(out.iter("Email:Body")).text == "go awb://a.org/x"
    assert "awb://docs.example.com/x" in next(out.iter("Email:MIMEData")).text


def test_search_results():
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True))
    body = encode(Element("Search:Search", [Element("Search:Status", text="1"), Element("Search:Response", [
        Element("Search:Store", [Element("Search:Status", text="1"), Element("Search:Result", [
            Element("Search:Properties", [Element("AirSyncBase:Body", [
                Element("AirSyncBase:Type", text="2"), Element("AirSyncBase:Data", text='<a href="https://x.org">x</a>')])])])])])]))
    out = decode(transform(pol, body, command="Search"))
    assert next(out.iter("AirSyncBase:Data")).text == '<a href="awbs://x.org">x</a>'


def test_gzip_answers_are_transformed():
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True))
    out = transform(pol, gzip.compress(SYNC1), headers=WB + [(b"Content-Encoding", b"gzip")])
    assert b"awb://plain.example.com" in gzip.decompress(out)


def test_malformed_answers_raise_content_error():
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True))
    with pytest.raises(ContentError):
        transform(pol, SYNC1[:-7])
    with pytest.raises(ContentError):
        transform(pol, b"\x00\x00", command="ItemOperations",
                  headers=[(b"Content-Type", b"application/vnd.ms-sync.multipart")])


def test_no_policy_blocks_attachments_per_settings():
    (t,) = pipeline.no_policy_transforms(managed=True, device_id="DEV1", user="test")
    out = t.transform_answer(req("GetAttachment", AttachmentName="x"), 200, [], PDF)
    assert out.startswith(b"Attachment removed")
    pipeline.configure(ContentSettings(block_attachments_without_policy=False))
    assert pipeline.no_policy_transforms(managed=True, device_id="DEV1", user="test") == ()


def test_ranged_fetch_of_an_encrypted_type_is_blocked_not_sealed():
    import base64
    body = encode(Element("ItemOperations:ItemOperations", [
        Element("ItemOperations:Status", text="1"), Element("ItemOperations:Response", [
            Element("ItemOperations:Fetch", [
                Element("ItemOperations:Status", text="1"), Element("AirSyncBase:FileReference", text="r:1"),
                Element("ItemOperations:Properties", [
                    Element("AirSyncBase:ContentType", text="application/pdf"),
                    Element("ItemOperations:Range", text="0-99"), Element("ItemOperations:Total", text="604"),
                    Element("ItemOperations:Data", text=base64.b64encode(PDF[:100]).decode())])])])]))
    out = decode(transform(EmailSecurityPolicy(managed_attachments=ENCRYPT_PDF), body, command="ItemOperations"))
    props = next(out.iter("ItemOperations:Properties"))
    assert props.findtext("AirSyncBase:ContentType") == "text/plain"
    assert base64.b64decode(props.findtext("ItemOperations:Data")).startswith(b"Attachment removed")


def test_attachment_list_follows_what_the_mime_body_transform_did():
    # "fake.pdf" is a ZIP: the MIME transform blocks it by its magic bytes, and the
    # list says so even though the name alone would have said "encrypt".
    zip_bytes = b"PK\x03\x04" + bytes(100)
    mime = mime_message([("fake.pdf", zip_bytes, "application", "pdf")]).decode()
    body = sync_answer(("IPM.Note", "4", mime, ["fake.pdf"]))
    pol = EmailSecurityPolicy(managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt", "zip": "block"}))
    tree = decode(transform(pol, body))
    assert list(tree.iter("AirSyncBase:Attachment")) == []
    # Its name calls for more than its bytes: the stricter wins (and a Type 1/2 list,
    # which has only the name, says the same).
    pol2 = EmailSecurityPolicy(managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt"}))
    tree2 = decode(transform(pol2, body))
    assert next(tree2.iter("AirSyncBase:DisplayName")).text == "fake.pdf.segenc"


def test_unreadable_master_key_fails_closed(tmp_path):
    (tmp_path / "bad.key").write_bytes(b"short")
    pipeline.configure(ContentSettings(master_key_file=str(tmp_path / "bad.key")))
    raw = (REAL_SERVER / "attachment_getatt.bin").read_bytes()
    out = transform(EmailSecurityPolicy(managed_attachments=ENCRYPT_PDF), raw, command="GetAttachment",
                    AttachmentName="x")
    assert out.startswith(b"Attachment removed") and b"%PDF" not in out


def test_multipart_item_fetch_body_part_is_transformed():
    # ItemOperations Fetch of a whole message with MS-ASAcceptMultiPart: the body is part 1.
    mime = mime_message([("report.pdf", PDF, "application", "pdf")])
    part0 = encode(Element("ItemOperations:ItemOperations", [
        Element("ItemOperations:Status", text="1"), Element("ItemOperations:Response", [
            Element("ItemOperations:Fetch", [
                Element("ItemOperations:Status", text="1"), Element("AirSync:ServerId", text="1:1"),
                Element("ItemOperations:Properties", [
                    Element("Email:MessageClass", text="IPM.Note"),
                    Element("AirSyncBase:Body", [Element("AirSyncBase:Type", text="4"),
                                                 Element("AirSyncBase:Truncated", text="0"),
                                                 Element("ItemOperations:Part", text="1")])])])])]))
    body = build_multipart([part0, mime])
    pol = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True), managed_attachments=ENCRYPT_PDF)
    out = transform(pol, body, command="ItemOperations",
                    headers=[(b"Content-Type", b"application/vnd.ms-sync.multipart")])
    parts = parse_multipart(out)
    assert bytes(parts[0]) == part0
    msg = email.message_from_bytes(bytes(parts[1]), policy=email.policy.default)
    assert "awb://docs.example.com/x" in [m for m in msg.walk() if m.get_content_type() == "text/plain"][0].get_content()
    env = [m for m in msg.walk() if m.get_content_type() == ENVELOPE_CONTENT_TYPE][0]
    assert open_envelope(KEYS, "DEV1", "test", env.get_payload(decode=True))[2] == PDF


def test_sync_responses_fetch_items():
    # Sync's Responses/Fetch carries a whole item too.
    body = encode(Element("AirSync:Sync", [Element("AirSync:Collections", [Element("AirSync:Collection", [
        Element("AirSync:SyncKey", text="2"), Element("AirSync:Responses", [Element("AirSync:Fetch", [
            Element("AirSync:ServerId", text="1"), Element("AirSync:Status", text="1"),
            Element("AirSync:ApplicationData", [Element("AirSyncBase:Body", [
                Element("AirSyncBase:Type", text="1"), Element("AirSyncBase:Data", text="go http://a.org")])])])])])])]))
    out = decode(transform(EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True)), body))
    assert next(out.iter("AirSyncBase:Data")).text == "go awb://a.org"


def test_classified_by_message_class_mime_body_keeps_its_headers():
    cls = ClassificationPolicy(enabled=True, tags=[ClassificationTag(tag="Restricted", template="No {tag}.")])
    body = sync_answer(("IPM.Note.Restricted", "4", mime_message([("r.pdf", PDF, "application", "pdf")]).decode(), []))
    out = decode(transform(EmailSecurityPolicy(classification=cls), body))
    m = email.message_from_string(next(out.iter("AirSyncBase:Data")).text, policy=email.policy.default)
    assert m["Subject"] == "s" and m["From"] == "a@example.org"
    assert m.get_content_type() == "text/plain" and m.get_content().strip() == "No Restricted."


def test_cuts_that_rely_on_each_other_fall_back_to_renaming():
    # An Attachment ending on another code page: cutting it relies on the SWITCH_PAGE
    # that starts the next one, so both cannot go; both are renamed instead.
    def att(name, k, extra=()):
        return Element("AirSyncBase:Attachment", [Element("AirSyncBase:DisplayName", text=name),
                                                  Element("AirSyncBase:FileReference", text=f"ref:0:{k}"),
                                                  Element("AirSyncBase:EstimatedDataSize", text="100"), *extra])
    body = encode(Element("AirSync:Sync", [Element("AirSync:Collections", [Element("AirSync:Collection", [
        Element("AirSync:Commands", [Element("AirSync:Add", [Element("AirSync:ServerId", text="0"),
            Element("AirSync:ApplicationData", [
                Element("AirSyncBase:Body", [Element("AirSyncBase:Type", text="1"),
                                             Element("AirSyncBase:Data", text="hi")]),
                Element("AirSyncBase:Attachments", [
                    att("a.png", 0, [Element("Email:Subject", text="odd")]), att("b.png", 1),
                    att("c.txt", 2)])])])])])])]))
    pol = EmailSecurityPolicy(managed_attachments=AttachmentPolicy(file_types={"png": "block"}))
    tree = decode(transform(pol, body))
    assert [a.findtext("AirSyncBase:DisplayName") for a in tree.iter("AirSyncBase:Attachment")] == \
        ["a.png (removed).txt", "b.png (removed).txt", "c.txt"]
    # Either one alone is cut.
    one = encode(Element("AirSync:Sync", [Element("AirSync:Add", [Element("AirSync:ServerId", text="0"),
        Element("AirSync:ApplicationData", [Element("AirSyncBase:Attachments", [att("b.png", 1), att("c.txt", 2)])])])]))
    tree = decode(transform(pol, one))
    assert [a.findtext("AirSyncBase:DisplayName") for a in tree.iter("AirSyncBase:Attachment")] == ["c.txt"]
