"""Issue 9, "Mail content that slips past the attachment policy": each attack against
a running `seg-fast serve` (its own worker process) in front of a mail server that
serves the crafted answer, with independent oracles for what the device receives
(Python's ``email`` for MIME, SHA-256 of what `seg-fast attachment decrypt` opens).
"""
from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import shutil
import subprocess
import time
from email import encoders
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import trio
from conftest import REAL_SERVER

from processes import start_serve, stop_process
from proxy_helpers import MiniUpstream
from redis_server import free_port
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE, open_envelope
from seg_fast.content.keys import Keyring, load_master_key
from seg_fast.content.message import MAX_NESTED_MESSAGES
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.eas.wbxml import decode, encode, from_xml
from seg_fast.policy.model import DeviceRecord, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.proxy import forked
from seg_fast.sim.client import EasClient
from seg_fast.sim.tree import E, text

WBXML = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]


def hostile_sync(spans: int, depth: int = 60) -> bytes:
    """A Sync answer of nested Adds holding ``spans`` AirSyncBase:Type strings at
    ``depth``: what a hostile mail server sends to make the scanner list every one."""
    out = bytearray(b"\x03\x01\x6a\x00\x45" + b"\x47" * (depth - 2) + b"\x00\x11")
    out += b"\x46\x031\x00\x01" * spans
    out += b"\x01" * (depth - 1)
    return bytes(out)


def ok_sync() -> bytes:
    return encode(E("AirSync:Sync", E("AirSync:Status", "1")))


async def write_policy(state: Path, document: PolicyDocument, devices=()) -> None:
    state.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(state / "seg-fast-policy.db")
    await store.open()
    try:
        await store.replace_all(document, list(devices))
    finally:
        await store.aclose()


def worker_pids(parent: int) -> set[int]:
    return set(forked.worker_pids(parent))


def serve_config(tmp_path: Path, upstream_port: int, **security) -> tuple[Path, int]:
    port = free_port()
    cfg = tmp_path / "gw.toml"
    extra = "".join(f"{k} = {v}\n" for k, v in security.items())
    cfg.write_text(
        f'workers = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{upstream_port}"\n'
        f'[admin]\nenabled = false\n'
        f'[log]\ntransactions = ""\n'
        f'[security]\n{extra}')
    return cfg, port


async def wait_serving(port: int, proc, client: EasClient):
    """The first answer of a worker that is up (connection refused until then)."""
    with trio.fail_after(20):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                return await client.request("FolderSync", E("FolderHierarchy:FolderSync",
                                                             E("FolderHierarchy:SyncKey", "0")))
            except OSError:
                await client.aclose()
                await trio.sleep(0.1)


def sync_request() -> object:
    return E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", "1"), E("AirSync:CollectionId", "1"))))


class Gateway:
    """A running `seg-fast serve` (one worker) in front of a MiniUpstream, policy preset."""

    def __init__(self, tmp_path: Path, handler, document: PolicyDocument, devices=(), **security):
        self.tmp_path, self.document, self.devices, self.security = tmp_path, document, devices, security
        self.up = MiniUpstream(handler)

    async def __aenter__(self):
        await write_policy(self.tmp_path / "state", self.document, self.devices)
        self._nursery_cm = trio.open_nursery()
        self.nursery = await self._nursery_cm.__aenter__()
        await self.nursery.start(self.up.serve)
        cfg, self.port = serve_config(self.tmp_path, self.up.port, **self.security)
        self.proc = start_serve(cfg, self.tmp_path)
        return self

    def client(self, device_id: str, **kw) -> EasClient:
        return EasClient("127.0.0.1", self.port, "jdoe", "secret", device_id, **kw)

    async def __aexit__(self, *exc):
        stop_process(self.proc)
        self.nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)


def command_of(req) -> bytes:
    query = req.target.split(b"?", 1)[1] if b"?" in req.target else b""
    return dict(p.split(b"=", 1) for p in query.split(b"&") if b"=" in p).get(b"Cmd", b"")


class _Attrs(HTMLParser):
    """Every (tag, attribute, value) of an HTML text: the oracle for link rewriting."""

    def __init__(self, html: str):
        super().__init__()
        self.seen: list[tuple[str, str, str]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.seen += [(tag, k, v) for k, v in attrs]


async def _real_server_links(tmp_path, **security) -> tuple[str, str]:
    """(HTML body, plain body) of the real Z-Push Sync answer as a device gets them
    through the gateway under an "all links" policy."""
    answer = (REAL_SERVER / "sync1.resp.wbxml").read_bytes()
    policy = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True, mode="all"))
    async with Gateway(tmp_path, lambda req, body: (200, WBXML, answer),
                       PolicyDocument(security=policy), **security) as gw:
        c = gw.client("LINKS1")
        try:
            await wait_serving(gw.port, gw.proc, c)
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
        finally:
            await c.aclose()
    assert r.status == 200
    bodies = [a.findtext("AirSyncBase:Data") for a in r.doc.iter("AirSyncBase:Body")]
    return next(b for b in bodies if "<html>" in b), next(b for b in bodies if "plain.example.com" in b)


async def test_remote_images_keep_loading_and_hyperlinks_are_rewritten(tmp_path):
    """Issue 9: Z-Push's HTML mail with a tracking image: the <img src> stays https
    (it loads), href and bare text links open in the secure browser."""
    original = decode((REAL_SERVER / "sync1.resp.wbxml").read_bytes())
    html_in = next(b.findtext("AirSyncBase:Data") for b in original.iter("AirSyncBase:Body")
                   if "<html>" in b.findtext("AirSyncBase:Data"))
    before = _Attrs(html_in).seen
    assert ("img", "src", "https://tracker.example.org/pixel.gif") in before
    assert any(t == "a" and k == "href" and v.startswith("http") for t, k, v in before)

    html, plain = await _real_server_links(tmp_path)
    after = _Attrs(html).seen
    assert len(after) == len(before)
    for (tag, key, value), (_, _, new) in zip(before, after):
        if key == "href" and value.startswith(("http://", "https://")):
            assert new == value.replace("https://", "awbs://", 1).replace("http://", "awb://", 1)
        else:
            assert new == value, (tag, key)
    assert "awb://plain.example.com/page" in plain


async def test_image_links_rewritten_when_configured(tmp_path):
    html, _ = await _real_server_links(tmp_path, link_attributes='["href", "src"]')
    assert ("img", "src", "awbs://tracker.example.org/pixel.gif") in _Attrs(html).seen


async def test_hostile_span_count_gets_a_status_and_the_worker_serves_on(tmp_path):
    """5 MB of 999k strings at depth 60: the worker stops at security.max_spans, the
    device gets Sync Status 5 (server error) instead of unchecked content, and the same
    worker answers the next request."""
    hostile = hostile_sync(999_000)
    assert len(hostile) > 4_900_000
    served = []

    def handler(req, body):
        cmd = dict(p.split(b"=", 1) for p in req.target.split(b"?", 1)[1].split(b"&")).get(b"Cmd")
        served.append(cmd)
        if cmd == b"Sync":
            return 200, WBXML, hostile if served.count(b"Sync") == 1 else ok_sync()
        return 200, WBXML, encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", "1")))

    up = MiniUpstream(handler)
    policy = EmailSecurityPolicy(unmanaged_attachments=AttachmentPolicy(file_types={"pdf": "block"}))
    await write_policy(tmp_path / "state", PolicyDocument(security=policy))
    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        cfg, port = serve_config(tmp_path, up.port)
        proc = start_serve(cfg, tmp_path)
        c = EasClient("127.0.0.1", port, "jdoe", "secret", "HOSTILE1")
        try:
            r = await wait_serving(port, proc, c)
            assert r.status == 200
            workers = worker_pids(proc.pid)
            assert len(workers) == 1
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
            assert r.status == 200 and r.headers["content-type"] == "application/vnd.ms-sync.wbxml"
            assert text(r.doc, "AirSync:Status") == "5" and len(r.body) < 100
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
            assert r.status == 200 and r.body == ok_sync()
            assert worker_pids(proc.pid) == workers and proc.poll() is None
            assert served.count(b"Sync") == 2
        finally:
            await c.aclose()
            stop_process(proc)
            nursery.cancel_scope.cancel()


# -- attachments at every depth of forwarded messages --------------------------------------

PDF = (REAL_SERVER / "attachment_getatt.bin").read_bytes()        # Z-Push's 604-byte PDF
NESTED_POLICY = EmailSecurityPolicy(
    managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt"}),
    unmanaged_attachments=AttachmentPolicy(file_types={"pdf": "block"}, block_message="PDFs stay on the server."))


def forwarded(depth: int, encode_as: str | None = None) -> bytes:
    """A message holding a message ... ``depth`` levels down to one with the PDF;
    ``encode_as``: the transfer encoding of the outermost attached message."""
    m = EmailMessage()
    m["Subject"] = "inner"
    m.set_content("The report is attached.")
    m.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    for level in range(1, depth + 1):
        outer = EmailMessage()
        outer["Subject"] = f"Fwd {level}"
        outer.set_content("Forwarded as an attachment.")
        outer.add_attachment(m, filename=f"inline_{level}.eml")
        m = outer
    if encode_as:
        encoded(m.get_payload()[1], encode_as)
    return m.as_bytes(policy=email.policy.SMTP)


def encoded(part, cte: str) -> None:
    """The attached message ``part`` written base64 or quoted-printable (RFC 2046 asks
    for 7bit; mail clients do it anyway)."""
    raw = part.get_payload()[0].as_bytes()
    del part["Content-Transfer-Encoding"]
    part.set_payload(raw)
    (encoders.encode_base64 if cte == "base64" else encoders.encode_quopri)(part)


def leaves(raw: bytes) -> list[tuple[str, str | None, bytes]]:
    """(content type, file name, decoded bytes) of every leaf at every depth, as Python's
    email package reads them (an attached message encoded base64 is decoded and read too)."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    out = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            out.append((ctype, part.get_filename(), b""))
            if part.get("Content-Transfer-Encoding", "").lower() == "base64":
                # the parser read the base64 text as a header-less message: its body is that text
                out += leaves(base64.b64decode(part.get_payload(0).get_payload()))
            continue
        if not part.is_multipart():
            out.append((ctype, part.get_filename(), part.get_payload(decode=True)))
    return out


def nested_upstream(messages: dict[str, bytes]):
    """A mail server with one Inbox item whose Type 4 body forwards ``messages["outer"]``,
    listing its attached messages; ItemOperations and GetAttachment fetch them."""
    def handler(req, body):
        cmd = command_of(req)
        if cmd == b"Sync":
            atts = [E("AirSyncBase:Attachment", E("AirSyncBase:DisplayName", f"inline_{k}.eml"),
                      E("AirSyncBase:FileReference", f"att:{k}"), E("AirSyncBase:Method", "5"),
                      E("AirSyncBase:EstimatedDataSize", str(len(messages[f"att:{k}"]))))
                    for k in (1, 2)]
            return 200, WBXML, encode(E("AirSync:Sync", E("AirSync:Collections", E(
                "AirSync:Collection", E("AirSync:SyncKey", "2"), E("AirSync:CollectionId", "1"),
                E("AirSync:Status", "1"), E("AirSync:Commands", E(
                    "AirSync:Add", E("AirSync:ServerId", "1:1"), E(
                        "AirSync:ApplicationData", E("Email:Subject", "Fwd"),
                        E("AirSyncBase:Body", E("AirSyncBase:Type", "4"),
                          E("AirSyncBase:EstimatedDataSize", str(len(messages["outer"]))),
                          E("AirSyncBase:Data", messages["outer"].decode())),
                        E("AirSyncBase:Attachments", *atts))))))))
        if cmd == b"ItemOperations":
            ref = decode(body).find("ItemOperations:Fetch").findtext("AirSyncBase:FileReference")
            return 200, WBXML, encode(E("ItemOperations:ItemOperations", E("ItemOperations:Status", "1"), E(
                "ItemOperations:Response", E(
                    "ItemOperations:Fetch", E("ItemOperations:Status", "1"), E("AirSyncBase:FileReference", ref),
                    E("ItemOperations:Properties", E("AirSyncBase:ContentType", "message/rfc822"),
                      E("ItemOperations:Data", base64.b64encode(messages[ref]).decode()))))))
        if cmd == b"GetAttachment":
            ref = unquote(req.target.decode().split("AttachmentName=", 1)[1].split("&", 1)[0])
            return 200, [(b"Content-Type", b"message/rfc822"),
                         (b"Content-Disposition", b'attachment; filename="inline.eml"')], messages[ref]
        return 200, WBXML, encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", "1")))
    return handler


def opened(keys: Keyring, device: str, leaf: tuple) -> bytes:
    name, ctype, data = open_envelope(keys, device, "jdoe", leaf[2])
    assert name == "report.pdf" and ctype == "application/pdf"
    return data


async def test_attachments_of_forwarded_messages_follow_the_policy_at_every_depth(tmp_path):
    messages = {"att:1": forwarded(1), "att:2": forwarded(2, "base64")}
    outer = EmailMessage()
    outer["Subject"] = "Fwd"
    outer.set_content("Two forwards and one too deep to check.")
    for name, raw in (("inline_1.eml", forwarded(1)), ("inline_2.eml", forwarded(2))):
        outer.add_attachment(email.message_from_bytes(raw, policy=email.policy.default), filename=name)
    outer.add_attachment(email.message_from_bytes(forwarded(MAX_NESTED_MESSAGES + 2), policy=email.policy.default),
                         filename="deep.eml")
    encoded(outer.get_payload()[2], "base64")
    messages["outer"] = outer.as_bytes(policy=email.policy.SMTP)
    assert b"Content-Transfer-Encoding: base64" in messages["outer"]
    assert sum(1 for t, _, d in leaves(messages["outer"]) if d == PDF) == 3
    for raw in messages.values():
        assert PDF in b"".join(d for _, _, d in leaves(raw))

    managed = DeviceRecord(device_id="MANAGED1", user="jdoe", managed=True, compliant=True, compromised=False,
                           encrypted=True, platform="Apple", model="iPhone 15", os="17.4",
                           last_checkin=time.time() - 60, eas_profile=True)
    async with Gateway(tmp_path, nested_upstream(messages), PolicyDocument(security=NESTED_POLICY),
                       [managed]) as gw:
        keys = None
        for device in ("MANAGED1", "UNMANAGED1"):
            c = gw.client(device, version="14.1")
            try:
                await wait_serving(gw.port, gw.proc, c)
                with trio.fail_after(20):
                    r = await c.request("Sync", sync_request())
                    mime = r.doc.find("AirSync:Collections").find("AirSync:Collection").find(
                        "AirSync:Commands").find("AirSync:Add").find("AirSync:ApplicationData").find(
                        "AirSyncBase:Body").findtext("AirSyncBase:Data").encode()
                    fetched = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E(
                        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                        E("AirSyncBase:FileReference", "att:1"))))
                    got = await c.request("GetAttachment", params={"AttachmentName": "att:2"})
            finally:
                await c.aclose()
            props = fetched.doc.find("ItemOperations:Response").find("ItemOperations:Fetch").find(
                "ItemOperations:Properties")
            assert props.findtext("AirSyncBase:ContentType") == "message/rfc822"
            eml1 = base64.b64decode(props.findtext("ItemOperations:Data"))
            assert got.status == 200 and got.headers["content-type"] == "message/rfc822"
            # the listed attached messages stay listed as messages
            names = [a.findtext("AirSyncBase:DisplayName") for a in r.doc.iter("AirSyncBase:Attachment")]
            assert names == ["inline_1.eml", "inline_2.eml"]
            if keys is None:
                keys = Keyring(load_master_key(tmp_path / "state" / "seg-fast-master.key"))
            for what, raw, sealed in (("Sync", mime, 2), ("ItemOperations", eml1, 1), ("GetAttachment", got.body, 1)):
                found = leaves(raw)
                assert PDF not in raw and not any(d == PDF or t == "application/pdf" for t, _, d in found), what
                envelopes = [leaf for leaf in found if leaf[0] == ENVELOPE_CONTENT_TYPE]
                notes = [d for t, _, d in found if t == "text/plain" and b"Attachment removed" in d]
                if device == "MANAGED1":
                    assert [n for _, n, _ in envelopes] == ["report.pdf.segenc"] * sealed, what
                    for leaf in envelopes:
                        assert hashlib.sha256(opened(keys, device, leaf)).digest() == hashlib.sha256(PDF).digest()
                else:
                    assert not envelopes
                    assert sum(b"report.pdf" in n and b"PDFs stay on the server." in n for n in notes) == sealed, what
            # deep.eml is message 1, inline_10 message 2 ... inline_3 message MAX_NESTED_MESSAGES + 1:
            # removed whole (the levels above it stay messages)
            kept = [n for t, n, _ in leaves(mime) if t == "message/rfc822"]
            assert "inline_4.eml" in kept and "inline_3.eml" not in kept
            deep = [d for t, _, d in leaves(mime) if t == "text/plain" and b"Attachment removed: inline_3.eml" in d]
            assert len(deep) == 1


def _plan(managed: bool, file_types: dict, keys=None):
    from seg_fast.content.message import ContentPlan

    policy = EmailSecurityPolicy(managed_attachments=AttachmentPolicy(file_types=file_types),
                                 unmanaged_attachments=AttachmentPolicy(file_types=file_types))
    return ContentPlan(policy, managed=managed, device_id="D1", user="jdoe",
                       keys=keys or Keyring(b"\x07" * 32))


def _qp_body(raw: bytes, name: str) -> bytes:
    """The decoded body of the quoted-printable attached message ``name`` (found by
    the outer boundary Python's email reads; the parser cannot read such a part itself)."""
    import binascii

    boundary = email.message_from_bytes(raw, policy=email.policy.default).get_boundary().encode()
    for chunk in raw.split(b"--" + boundary):
        if name.encode() in chunk.split(b"\r\n\r\n", 1)[0]:
            return binascii.a2b_qp(chunk.split(b"\r\n\r\n", 1)[1])
    raise AssertionError(f"{name} not found")


def test_quoted_printable_attached_message_is_decoded_checked_and_encoded_again():
    from seg_fast.content.message import transform_mime

    raw = forwarded(2, "quoted-printable")
    assert PDF in b"".join(d for _, _, d in leaves(email.message_from_bytes(
        _qp_body(raw, "inline_2.eml")).as_bytes()))
    new, out = transform_mime(raw, _plan(False, {"pdf": "block"}))
    inner = _qp_body(new, "inline_2.eml")
    found = leaves(inner)
    assert not any(t == "application/pdf" for t, _, _ in found) and PDF not in inner
    assert any(t == "text/plain" and b"Attachment removed: report.pdf" in d for t, _, d in found)
    assert out.attachments == [("report.pdf", "block", "")]


def test_an_eml_rule_takes_the_attached_message_whole_and_allow_never_skips_its_attachments():
    from seg_fast.content.message import transform_mime

    raw = forwarded(1)
    keys = Keyring(b"\x07" * 32)
    new, _ = transform_mime(raw, _plan(True, {"eml": "encrypt"}, keys))
    (env,) = [leaf for leaf in leaves(new) if leaf[0] == ENVELOPE_CONTENT_TYPE]
    assert env[1] == "inline_1.eml.segenc"
    name, ctype, data = open_envelope(keys, "D1", "jdoe", env[2])
    assert (name, ctype) == ("inline_1.eml", "message/rfc822")
    assert PDF in [d for _, _, d in leaves(data)]
    new, _ = transform_mime(raw, _plan(True, {"eml": "allow", "pdf": "block"}))
    assert PDF not in new and any(t == "message/rfc822" for t, _, _ in leaves(new))


# -- misleading names: lists agree with what is fetched --------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
ZIP = b"PK\x03\x04" + b"holiday photos, really a zip " * 40
FILES = {"r:zip": ("holiday.png", ZIP), "r:pdf": ("report.pdf", PDF), "r:scan": ("scan", PNG),
         "r:png": ("photo.png", PNG)}
NAMES_POLICY = EmailSecurityPolicy(managed_attachments=AttachmentPolicy(file_types={"zip": "encrypt", "pdf": "encrypt"}))


def names_upstream(body_type: dict):
    """Sync: one item listing FILES (a Type 2 body, or the MIME with them when the device
    asks Type 4); ItemOperations and GetAttachment: each file's bytes."""
    mime = EmailMessage()
    mime["Subject"] = "Holiday"
    mime.set_content("Photos attached.")
    for ref, (name, data) in FILES.items():
        mime.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    mime = mime.as_bytes(policy=email.policy.SMTP).decode()

    def handler(req, body):
        cmd = command_of(req)
        if cmd == b"Sync":
            four = body_type["type"] == "4"
            atts = [E("AirSyncBase:Attachment", E("AirSyncBase:DisplayName", name),
                      E("AirSyncBase:FileReference", ref), E("AirSyncBase:Method", "1"),
                      E("AirSyncBase:EstimatedDataSize", str(len(data))))
                    for ref, (name, data) in FILES.items()]
            return 200, WBXML, encode(E("AirSync:Sync", E("AirSync:Collections", E(
                "AirSync:Collection", E("AirSync:SyncKey", "2"), E("AirSync:CollectionId", "1"),
                E("AirSync:Status", "1"), E("AirSync:Commands", E(
                    "AirSync:Add", E("AirSync:ServerId", "1:1"), E(
                        "AirSync:ApplicationData", E("Email:Subject", "Holiday"),
                        E("AirSyncBase:Body", E("AirSyncBase:Type", "4" if four else "2"),
                          E("AirSyncBase:EstimatedDataSize", str(len(mime) if four else 30)),
                          E("AirSyncBase:Data", mime if four else "<p>Photos attached.</p>")),
                        E("AirSyncBase:Attachments", *atts))))))))
        if cmd == b"ItemOperations":
            ref = decode(body).find("ItemOperations:Fetch").findtext("AirSyncBase:FileReference")
            return 200, WBXML, encode(E("ItemOperations:ItemOperations", E("ItemOperations:Status", "1"), E(
                "ItemOperations:Response", E(
                    "ItemOperations:Fetch", E("ItemOperations:Status", "1"), E("AirSyncBase:FileReference", ref),
                    E("ItemOperations:Properties", E("AirSyncBase:ContentType", "application/octet-stream"),
                      E("ItemOperations:Data", base64.b64encode(FILES[ref][1]).decode()))))))
        if cmd == b"GetAttachment":
            ref = unquote(req.target.decode().split("AttachmentName=", 1)[1].split("&", 1)[0])
            # a mail server's own idea of the type: must not change how the file is sealed
            return 200, [(b"Content-Type", b"image/png")], FILES[ref][1]
        return 200, WBXML, encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", "1")))
    return handler


def listed(doc) -> dict[str, tuple[str, int]]:
    return {a.findtext("AirSyncBase:FileReference"): (a.findtext("AirSyncBase:DisplayName"),
                                                      int(a.findtext("AirSyncBase:EstimatedDataSize")))
            for a in doc.iter("AirSyncBase:Attachment")}


async def test_attachment_lists_name_and_size_files_as_they_are_fetched(tmp_path):
    body_type = {"type": "2"}
    managed = DeviceRecord(device_id="MANAGED2", user="jdoe", managed=True, compliant=True, compromised=False,
                           encrypted=True, platform="Apple", model="iPhone 15", os="17.4",
                           last_checkin=time.time() - 60, eas_profile=True)
    async with Gateway(tmp_path, names_upstream(body_type), PolicyDocument(security=NAMES_POLICY),
                       [managed]) as gw:
        c = gw.client("MANAGED2")
        try:
            await wait_serving(gw.port, gw.proc, c)
            with trio.fail_after(30):
                first = listed((await c.request("Sync", sync_request())).doc)
                fetched = {}
                for ref in FILES:
                    r = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E(
                        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                        E("AirSyncBase:FileReference", ref))))
                    props = next(r.doc.iter("ItemOperations:Properties"))
                    g = await c.request("GetAttachment", params={"AttachmentName": ref})
                    fetched[ref] = (props.findtext("AirSyncBase:ContentType"),
                                    base64.b64decode(props.findtext("ItemOperations:Data")), g)
                again = listed((await c.request("Sync", sync_request())).doc)
                body_type["type"] = "4"
                mime_list = listed((await c.request("Sync", sync_request())).doc)
        finally:
            await c.aclose()
    keys = Keyring(load_master_key(tmp_path / "state" / "seg-fast-master.key"))
    for ref, (name, data) in FILES.items():
        ctype, item_ops, get = fetched[ref]
        sealed = ref in ("r:zip", "r:pdf", "r:scan")    # a ZIP whatever its name; a name that tells nothing
        if not sealed:
            assert item_ops == data and get.body == data and first[ref][0] == name
            continue
        # both ways of fetching give an envelope of the same file type and name
        assert ctype == ENVELOPE_CONTENT_TYPE and get.headers["content-type"] == ENVELOPE_CONTENT_TYPE
        opened_i = open_envelope(keys, "MANAGED2", "jdoe", item_ops)
        opened_g = open_envelope(keys, "MANAGED2", "jdoe", get.body)
        assert opened_i == opened_g and opened_i[0] == name and opened_i[2] == data
        assert hashlib.sha256(opened_g[2]).digest() == hashlib.sha256(data).digest()
        # the type of what decided: its bytes (a ZIP), its name (nothing said: sealed as
        # bytes, so a list that has only the name knows the envelope's size)
        assert opened_i[1] == {"r:zip": "application/zip", "r:pdf": "application/pdf",
                               "r:scan": "application/octet-stream"}[ref]
        # the lists name it as fetched, and its size is the envelope's, to the byte
        for seen in (again, mime_list) + ((first,) if ref != "r:zip" else ()):
            assert seen[ref] == (name + ".segenc", len(item_ops)), (ref, seen[ref])
    # the first Type 2 list could only go by the name "holiday.png"; once the bytes were
    # seen (the fetch, or a Type 4 body) every list says what the fetch gives
    assert first["r:zip"] == ("holiday.png", len(ZIP))


# -- a cut never leaves a dangling SWITCH_PAGE ------------------------------------------------

def switch_heavy_sync() -> bytes:
    """A Sync answer whose last attachment (blocked for unmanaged devices) follows a run
    of redundant SWITCH_PAGEs, as the issue's ``03016a00 45 0000 0000 47 ...``."""
    from seg_fast.eas.wbxml import scan

    doc = encode(E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", "2"), E("AirSync:CollectionId", "1"), E("AirSync:Status", "1"),
        E("AirSync:Commands", E("AirSync:Add", E("AirSync:ServerId", "1:1"), E(
            "AirSync:ApplicationData", E("Email:Subject", "Pictures"),
            E("AirSyncBase:Body", E("AirSyncBase:Type", "1"), E("AirSyncBase:Data", "Two files.")),
            E("AirSyncBase:Attachments",
              *(E("AirSyncBase:Attachment", E("AirSyncBase:DisplayName", name),
                  E("AirSyncBase:FileReference", f"r:{name}"), E("AirSyncBase:Method", "1"),
                  E("AirSyncBase:EstimatedDataSize", "100")) for name in ("notes.txt", "photo.png"))),
            E("Email:Read", "0"))))))))
    last = [s for s in scan(doc, [], elements=["AirSyncBase:Attachment"])][-1]
    assert doc[last.offset - 2] != 0       # canonical: no switch before it yet
    return doc[:last.offset] + b"\x00\x11\x00\x11" + doc[last.offset:]


async def test_a_blocked_attachment_after_a_switch_page_run_leaves_a_decodable_answer(tmp_path):
    answer = switch_heavy_sync()
    tree = decode(answer)                  # a valid document, as the mail server sent it
    policy = EmailSecurityPolicy(unmanaged_attachments=AttachmentPolicy(file_types={"png": "block"}))
    async with Gateway(tmp_path, lambda req, body: (200, WBXML, answer) if command_of(req) == b"Sync"
                       else (200, WBXML, ok_sync()), PolicyDocument(security=policy)) as gw:
        c = gw.client("SWITCHES1")
        try:
            await wait_serving(gw.port, gw.proc, c)
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
        finally:
            await c.aclose()
    assert r.status == 200 and r.headers["content-type"] == "application/vnd.ms-sync.wbxml"
    got = decode(r.body)
    # the tree the mail server sent, less the blocked attachment, and nothing else
    atts = next(tree.iter("AirSyncBase:Attachments"))
    atts.children = [a for a in atts.children if a.findtext("AirSyncBase:DisplayName") != "photo.png"]
    assert got == tree
    assert b"\x00\x11\x00\x11" not in r.body and len(r.body) < len(answer)
    if shutil.which("wbxml2xml"):
        # libwbxml (the independent decoder) reads the device's answer as the same tree
        (tmp_path / "got.wbxml").write_bytes(r.body)
        run = subprocess.run(["wbxml2xml", "-l", "ACTIVESYNC", "-m", "0", "-k", "-o", str(tmp_path / "got.xml"),
                              str(tmp_path / "got.wbxml")], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stdout + run.stderr
        assert from_xml((tmp_path / "got.xml").read_bytes(), dialect="libwbxml") == tree


def test_past_max_spans_links_alone_pass_and_attachment_policies_refuse():
    from seg_fast.content import pipeline
    from seg_fast.content.settings import ContentSettings
    from seg_fast.eas.request import EasRequest

    doc = hostile_sync(500, depth=10)
    request = EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command="Sync", user="jdoe",
                         device_id="D1", user_agent="x", params={})
    links = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True))
    blocks = EmailSecurityPolicy(unmanaged_attachments=AttachmentPolicy(file_types={"pdf": "block"}))
    try:
        for limit, passes in ((1000, True), (499, False)):
            pipeline.configure(ContentSettings(max_spans=limit), keys=Keyring(b"\x01" * 32))
            (t,) = pipeline.transforms_for(links, managed=False, device_id="D1", user="jdoe")
            assert t.transform_answer_and_headers(request, 200, WBXML, doc)[1] == doc
            (t,) = pipeline.transforms_for(blocks, managed=False, device_id="D1", user="jdoe")
            headers, body = t.transform_answer_and_headers(request, 200, WBXML, doc)
            if passes:
                assert body == doc
            else:
                assert text(decode(body), "AirSync:Status") == "5"
                assert dict(headers)[b"Content-Type"] == b"application/vnd.ms-sync.wbxml"
    finally:
        pipeline.configure(ContentSettings())
