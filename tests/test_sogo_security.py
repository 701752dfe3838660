"""Email security against SOGo's mail: a running `seg-fast serve` (policies in its SQLite
store) in front of SOGo 5.8, the messages delivered into dovecot as a mail server would.

The mail is shaped the ways a real server shows it and the simulator never does:
attachments of every policy type (real PDF/DOCX/ZIP/PNG structures from the corpus),
files whose names lie about their type, a forwarded message (message/rfc822) holding
attachments of its own, S/MIME signed (multipart/signed) and opaque (pkcs7-mime).
The oracles do not use the gateway's reading of MIME: Python's ``email`` parses what
the device got, the decrypt CLI opens encrypted files (their SHA-256 must match the
originals), and SOGo's own answer to a device that talks to it directly is the
reference for what must not change (links aside, S/MIME byte for byte).
"""
from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage

import pytest
import socket
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from conftest import REPO
from link_oracle import listed
from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE, envelope_name
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.policy.model import DeviceRecord, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.client import EasClient
from seg_fast.sim.corpus import ATTACHMENT_KINDS, REWRITE_DOMAINS, Corpus, signed_entity
from seg_fast.sim.smime import signer
from seg_fast.sim.tree import E, find, kids, text
from sogo_server import USERS

USER = "asmith"
BLOCK_MSG = "Images are blocked on this device."
POLICY = EmailSecurityPolicy(
    hyperlinks=HyperlinkPolicy(enabled=True, mode="include", domains=list(REWRITE_DOMAINS)),
    managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt", "docx": "encrypt", "zip": "encrypt"}),
    unmanaged_attachments=AttachmentPolicy(file_types={"png": "block"}, block_message=BLOCK_MSG),
    skip_smime=True,
)
MANAGED, UNMANAGED, DIRECT = "SOGOMANAGED1", "SOGOUNMANAGED1", "SOGOPLAIN1"


# -- the mail -------------------------------------------------------------------------------------

def _corpus_files() -> dict[str, tuple[str, bytes]]:
    """kind -> (name, bytes) of a small corpus attachment of each policy type."""
    corpus, out = Corpus(seed=5), {}
    for i in range(3000):
        m = corpus.message(i)
        size = m.attachment_size                 # known before the file is built
        if size and size < 100_000 and not m.signed:
            name, _ctype, data = m.attachments[0]
            kind = name.rsplit(".", 1)[1]
            if kind not in out:
                out[kind] = (name, data)
        if len(out) == len(ATTACHMENT_KINDS):
            return out
    raise AssertionError("the corpus should have a small attachment of every kind")


FILES = _corpus_files()


def _links_message():
    """A corpus message with links to listed and unlisted domains, no attachment."""
    corpus = Corpus(seed=5)
    for i in range(400):
        m = corpus.message(i)
        if not m.signed and not m.attachments and any(listed(u) for u in m.links) \
                and not all(listed(u) for u in m.links):
            return m
    raise AssertionError("no links message in the corpus")


LINKS = _links_message()


def _message(subject: str, msgid: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "Dana Sender <dana@example.org>"
    m["To"] = f"{USER}@sogo.test"
    m["Subject"] = subject
    m["Date"] = "Tue, 03 Nov 2026 09:00:00 +0000"
    m["Message-ID"] = f"<{msgid}@example.org>"
    m.set_content(f"{subject}\n")
    return m


def _attach(m: EmailMessage, name: str, ctype: str, data: bytes) -> None:
    maintype, subtype = ctype.split("/")
    m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)


def _bytes(m: EmailMessage) -> bytes:
    return m.as_bytes(policy=email.policy.SMTP)


def _all_types():
    m = _message("every policy type", "types")
    for kind, (name, data) in FILES.items():
        _attach(m, name, ATTACHMENT_KINDS[kind], data)
    return _bytes(m)


def _misleading():
    # Names that lie: a PNG called notes.txt, a PDF called photo.png (the stricter of
    # name and magic bytes decides).
    m = _message("misleading names", "misleading")
    _attach(m, "notes.txt", "text/plain", FILES["png"][1])
    _attach(m, "photo.png", "image/png", FILES["pdf"][1])
    return _bytes(m)


def _forwarded():
    inner = _message("the original, with files", "inner")
    _attach(inner, FILES["pdf"][0], "application/pdf", FILES["pdf"][1])
    _attach(inner, FILES["png"][0], "image/png", FILES["png"][1])
    outer = _message("Fwd: the original, with files", "forwarded")
    outer.add_attachment(inner)                  # message/rfc822
    return _bytes(outer)


def _signed():
    inner = EmailMessage()
    inner.set_content("signed, with a PDF\n")
    _attach(inner, FILES["pdf"][0], "application/pdf", FILES["pdf"][1])
    entity = inner.as_bytes(policy=email.policy.SMTP)
    entity = entity[entity.index(b"Content-Type:"):]          # the entity's own headers only
    head = (f"From: Dana Sender <dana@example.org>\r\nTo: {USER}@sogo.test\r\nSubject: signed\r\n"
            "Date: Tue, 03 Nov 2026 09:00:00 +0000\r\nMessage-ID: <signed@example.org>\r\n"
            "MIME-Version: 1.0\r\n").encode()
    return head + signed_entity(entity, "=_signed_b")


def _opaque():
    inner = EmailMessage()
    inner.set_content("opaque-signed, with a PDF\n")
    _attach(inner, FILES["pdf"][0], "application/pdf", FILES["pdf"][1])
    key, cert = signer()
    der = (pkcs7.PKCS7SignatureBuilder().set_data(inner.as_bytes(policy=email.policy.SMTP))
           .add_signer(cert, key, hashes.SHA256())
           .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoAttributes]))
    b64 = base64.encodebytes(der).replace(b"\n", b"\r\n")
    return (f"From: Dana Sender <dana@example.org>\r\nTo: {USER}@sogo.test\r\nSubject: opaque\r\n"
            "Date: Tue, 03 Nov 2026 09:00:00 +0000\r\nMessage-ID: <opaque@example.org>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: application/pkcs7-mime; smime-type=signed-data; name="smime.p7m"\r\n'
            "Content-Transfer-Encoding: base64\r\n"
            'Content-Disposition: attachment; filename="smime.p7m"\r\n\r\n').encode() + b64


MAIL = {"links": LINKS.mime, "types": _all_types(), "misleading": _misleading(), "forwarded": _forwarded(),
        "signed": _signed(), "opaque": _opaque()}
SUBJECTS = {"links": LINKS.subject, "types": "every policy type", "misleading": "misleading names",
            "forwarded": "Fwd: the original, with files", "signed": "signed", "opaque": "opaque"}


# -- the gateway in front of SOGo -------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(sogo, tmp_path_factory):
    """A running `seg-fast serve` in front of SOGo with POLICY; MANAGED is a managed device."""
    sogo.ensure_seeded(USER, list(MAIL.values()))
    d = tmp_path_factory.mktemp("sogo-gw")

    async def fill():
        store = SqliteStore(d / "policy.db")
        await store.open()
        managed = DeviceRecord(device_id=MANAGED, user=USER, managed=True, compliant=True, compromised=False,
                               encrypted=True, platform="Apple", model="iPhone 15", os="17.4",
                               last_checkin=time.time() - 60, eas_profile=True)
        await store.replace_all(PolicyDocument(security=POLICY), [managed])
        await store.aclose()
    trio.run(fill)
    port = free_port()
    cfg = d / "gw.toml"
    cfg.write_text(
        'workers = 1\n[admin]\nenabled = false\n[timeouts]\nshutdown_grace = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "{sogo.url}"\n'
        f'[log]\ntransactions = "{d / "tx.jsonl"}"\n'
        f'[policy]\nsqlite_path = "{d / "policy.db"}"\n'
        f'[security]\nmaster_key_file = "{d / "master.key"}"\nkey_state_file = "{d / "keys.json"}"\n')
    proc = start_serve(cfg, d)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.05)
        yield {"port": port, "dir": d}
    finally:
        stop_process(proc)


def client(port: int, device_id: str) -> EasClient:
    return EasClient("127.0.0.1", port, USER, USERS[USER], device_id, device_type="iPhone", version="14.1",
                     user_agent="Apple-iPhone15C2/2104.100")


_SYNCED: dict[tuple, dict] = {}


async def synced(port: int, device_id: str, body_type: int) -> tuple[EasClient, dict]:
    """A device that has synced the Inbox with ``body_type`` bodies: (client, subject -> Add).
    The mail does not change in this module, so each (device, body type) syncs once."""
    key = (port, device_id, body_type)
    if key not in _SYNCED:
        c, _SYNCED[key] = await _sync(port, device_id, body_type)
        await c.aclose()
    return client(port, device_id), _SYNCED[key]


async def _sync(port: int, device_id: str, body_type: int) -> tuple[EasClient, dict]:
    c = client(port, device_id)
    r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
    assert r.status == 200, r
    inbox = next(text(a, "FolderHierarchy:ServerId") for a in
                 kids(find(r.doc, "FolderHierarchy:Changes"), "FolderHierarchy:Add")
                 if text(a, "FolderHierarchy:DisplayName") == "INBOX")
    coll = ("AirSync:Collections", "AirSync:Collection")
    r = await c.request("Sync", E("AirSync:Sync", E(coll[0], E(coll[1], E("AirSync:SyncKey", "0"),
                                                               E("AirSync:CollectionId", inbox)))))
    key = text(r.doc, *coll, "AirSync:SyncKey")
    r = await c.request("Sync", E("AirSync:Sync", E(coll[0], E(coll[1], E(
        "AirSync:SyncKey", key), E("AirSync:CollectionId", inbox), E("AirSync:GetChanges"),
        E("AirSync:WindowSize", 100), E("AirSync:Options", E("AirSync:FilterType", 0),
                                        E("AirSync:MIMESupport", 2) if body_type == 4 else None,
                                        E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", body_type)))))))
    assert r.status == 200 and text(r.doc, *coll, "AirSync:Status") == "1", r
    adds = {text(a, "AirSync:ApplicationData", "Email:Subject"): a
            for a in kids(find(r.doc, *coll, "AirSync:Commands"), "AirSync:Add")}
    assert set(SUBJECTS.values()) <= set(adds), sorted(adds)
    return c, adds


async def together(*calls):
    """Run independent device sessions at once (SOGo has six workers); their results in order."""
    out = [None] * len(calls)

    async def one(i, fn, args):
        out[i] = await fn(*args)
    async with trio.open_nursery() as nursery:
        for i, (fn, *args) in enumerate(calls):
            nursery.start_soon(one, i, fn, args)
    return out


def body_data(add) -> str:
    return text(add, "AirSync:ApplicationData", "AirSyncBase:Body", "AirSyncBase:Data")


def listed_attachments(add) -> dict[str, str]:
    """DisplayName -> FileReference of an item's attachment list."""
    atts = find(add, "AirSync:ApplicationData", "AirSyncBase:Attachments")
    return {text(a, "AirSyncBase:DisplayName"): text(a, "AirSyncBase:FileReference")
            for a in kids(atts, "AirSyncBase:Attachment")}


async def fetch(c: EasClient, ref: str) -> tuple[str, bytes]:
    r = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E(
        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", ref))))
    props = find(r.doc, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Properties")
    return text(props, "AirSyncBase:ContentType"), base64.b64decode(text(props, "ItemOperations:Data"))


def decrypt(gw, blobs: dict[str, bytes], tmp_path) -> dict[str, bytes]:
    """`seg-fast attachment decrypt` (the CLI, another process) on each envelope: name -> bytes."""
    out = {}
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"),
               SEG_FAST_SECURITY_MASTER_KEY_FILE=str(gw["dir"] / "master.key"),
               SEG_FAST_SECURITY_KEY_STATE_FILE=str(gw["dir"] / "keys.json"))

    def one(i: int, label: str, blob: bytes) -> None:
        where = tmp_path / f"out{i}"
        where.mkdir()
        (tmp_path / f"{i}.segenc").write_bytes(blob)
        done = subprocess.run([sys.executable, "-m", "seg_fast", "attachment", "decrypt", "--device", MANAGED,
                               "--user", USER, str(tmp_path / f"{i}.segenc")], env=env, cwd=where,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        (opened,) = list(where.iterdir())
        out[label] = opened.read_bytes()

    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(one, i, label, blob) for i, (label, blob) in enumerate(blobs.items())]:
            f.result()
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leaves(mime: str | bytes) -> list:
    """Every non-multipart part, at every depth (walk() goes into message/rfc822)."""
    raw = mime.encode() if isinstance(mime, str) else mime
    return [p for p in email.message_from_bytes(raw, policy=email.policy.default).walk() if not p.is_multipart()]


# -- the tests ------------------------------------------------------------------------------------

async def test_links_rewritten_only_where_listed(sogo, gateway):
    with trio.fail_after(60):
        (d, direct), (c, via) = await together((synced, sogo.front_port, DIRECT, 2),
                                               (synced, gateway["port"], MANAGED, 2))
        await c.aclose()
        await d.aclose()
    mine, theirs = body_data(via[SUBJECTS["links"]]), body_data(direct[SUBJECTS["links"]])
    for url in LINKS.links:
        esc = url.replace("&", "&amp;")
        tail = esc[esc.index("://"):]
        if listed(url):
            assert ("awbs" if url.startswith("https") else "awb") + tail in mine
        else:
            assert esc in mine
    # Nothing but the listed links changed from what SOGo itself serves.
    assert mine != theirs
    assert mine.replace("awbs://", "https://").replace("awb://", "http://") == theirs


async def test_managed_device_gets_encrypted_files_that_decrypt_to_the_originals(sogo, gateway, tmp_path):
    with trio.fail_after(90):
        c, items = await synced(gateway["port"], MANAGED, 2)
        atts = listed_attachments(items[SUBJECTS["types"]])
        png_name = FILES["png"][0]
        # PDF, DOCX and ZIP are encrypted (listed renamed), the PNG (no managed rule) is not.
        expect = {envelope_name(FILES[k][0]) for k in ("pdf", "docx", "zip")} | {png_name}
        assert set(atts) == expect
        blobs = {}
        for kind in ("pdf", "docx", "zip"):
            ctype, blob = await fetch(c, atts[envelope_name(FILES[kind][0])])
            assert ctype == ENVELOPE_CONTENT_TYPE and FILES[kind][1] not in blob
            blobs[kind] = blob
        _, png = await fetch(c, atts[png_name])
        assert png == FILES["png"][1]
        # GetAttachment (the 12.x way to the same file) is sealed the same way.
        r = await c.request("GetAttachment", params={"AttachmentName": atts[envelope_name(FILES["pdf"][0])]})
        assert r.status == 200 and r.headers["content-type"] == ENVELOPE_CONTENT_TYPE
        assert FILES["pdf"][1] not in r.body
        blobs["pdf-getattachment"] = r.body
        # The PDF called photo.png is still a PDF: encrypted when fetched, by its magic bytes
        # (a Type 2 list shows names only, so it is listed by its name).
        mis = listed_attachments(items[SUBJECTS["misleading"]])
        ctype, blob = await fetch(c, mis["photo.png"])
        assert ctype == ENVELOPE_CONTENT_TYPE
        blobs["photo"] = blob
        await c.aclose()
    opened = await trio.to_thread.run_sync(decrypt, gateway, blobs, tmp_path)
    for kind in ("pdf", "docx", "zip"):
        assert sha(opened[kind]) == sha(FILES[kind][1])
    assert sha(opened["pdf-getattachment"]) == sha(FILES["pdf"][1])
    assert sha(opened["photo"]) == sha(FILES["pdf"][1])


async def test_unmanaged_device_never_gets_an_image(sogo, gateway):
    with trio.fail_after(60):
        c, items = await synced(gateway["port"], UNMANAGED, 4)
        # Asked for by reference (a Type 2 device's list, multipart ItemOperations, GetAttachment):
        # the block note, never the image.
        t2, listed = await synced(gateway["port"], UNMANAGED, 2)
        types = listed_attachments(listed[SUBJECTS["types"]])
        assert FILES["png"][0] not in types and FILES["pdf"][0] in types
        _, direct = await synced(sogo.front_port, DIRECT, 2)
        png_ref = listed_attachments(direct[SUBJECTS["types"]])[FILES["png"][0]]
        r = await t2.request("ItemOperations", E("ItemOperations:ItemOperations", E(
            "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", png_ref))),
            headers={"MS-ASAcceptMultiPart": "T"})
        assert r.status == 200 and FILES["png"][1] not in r.body and BLOCK_MSG.encode() in r.body
        r = await t2.request("GetAttachment", params={"AttachmentName": png_ref})
        assert r.status == 200 and BLOCK_MSG.encode() in r.body and b"\x89PNG" not in r.body
        # Search results carry attachment lists too.
        r = await t2.request("Search", E("Search:Search", E("Search:Store", E("Search:Name", "Mailbox"), E(
            "Search:Query", E("Search:And", E("AirSync:Class", "Email"), E("Search:FreeText", "policy"))),
            E("Search:Options", E("Search:Range", "0-9")))))
        assert r.status == 200 and b"every policy type" in r.body
        assert FILES["pdf"][0].encode() in r.body           # the list is there...
        assert FILES["png"][0].encode() not in r.body or (FILES["png"][0] + " (removed).txt").encode() in r.body
        for dev in (c, t2):
            await dev.aclose()
    png = FILES["png"][1]
    for key in ("types", "misleading", "forwarded"):
        parts = leaves(body_data(items[SUBJECTS[key]]))
        payloads = [p.get_payload(decode=True) or b"" for p in parts]
        assert png not in payloads, key
        assert not any(p.get_content_type() == "image/png" for p in parts), key
        notes = [p for p in parts if p.get_content_type() == "text/plain" and BLOCK_MSG in p.get_content()]
        assert notes, key
    # Every other file arrives as SOGo has it (the unmanaged policy leaves them alone),
    # the forwarded message's PDF included.
    types = [p.get_payload(decode=True) for p in leaves(body_data(items[SUBJECTS["types"]]))]
    for kind in ("pdf", "docx", "zip"):
        assert FILES[kind][1] in types, kind
    fwd = [p.get_payload(decode=True) for p in leaves(body_data(items[SUBJECTS["forwarded"]]))]
    assert FILES["pdf"][1] in fwd
    # The PDF named photo.png goes too: its name says image (the stricter reading wins).
    mis = leaves(body_data(items[SUBJECTS["misleading"]]))
    assert FILES["pdf"][1] not in [p.get_payload(decode=True) for p in mis]


async def test_forwarded_message_files_are_judged_inside_it(sogo, gateway, tmp_path):
    with trio.fail_after(90):
        # Type 4: the forwarded message's own PDF is encrypted inside the message/rfc822 part.
        c, items = await synced(gateway["port"], MANAGED, 4)
        parts = leaves(body_data(items[SUBJECTS["forwarded"]]))
        assert FILES["pdf"][1] not in [p.get_payload(decode=True) for p in parts]
        sealed = [p.get_payload(decode=True) for p in parts if p.get_content_type() == ENVELOPE_CONTENT_TYPE]
        assert len(sealed) == 1
        # Fetched whole (ItemOperations on email_2.eml), the message's PDF is sealed as well.
        _, direct_items = await synced(sogo.front_port, DIRECT, 2)
        ((eml_name, eml_ref),) = listed_attachments(direct_items[SUBJECTS["forwarded"]]).items()
        _, managed_eml = await fetch(c, eml_ref)
        inner_managed = leaves(managed_eml)
        assert FILES["pdf"][1] not in [p.get_payload(decode=True) for p in inner_managed]
        sealed += [p.get_payload(decode=True) for p in inner_managed if p.get_content_type() == ENVELOPE_CONTENT_TYPE]
        assert len(sealed) == 2
        await c.aclose()
        # Type 2 + ItemOperations: SOGo lists the forwarded message as email_2.eml; fetched
        # through the gateway, the message comes back with its files judged.
        u, items = await synced(gateway["port"], UNMANAGED, 2)
        assert listed_attachments(items[SUBJECTS["forwarded"]]) == {eml_name: eml_ref}
        ctype, eml = await fetch(u, eml_ref)
        await u.aclose()
    inner = leaves(eml)
    assert FILES["png"][1] not in [p.get_payload(decode=True) for p in inner]
    assert FILES["pdf"][1] in [p.get_payload(decode=True) for p in inner]
    opened = await trio.to_thread.run_sync(decrypt, gateway, {"mime": sealed[0], "fetched": sealed[1]}, tmp_path)
    assert sha(opened["mime"]) == sha(opened["fetched"]) == sha(FILES["pdf"][1])


async def test_smime_signed_and_opaque_are_left_byte_for_byte(sogo, gateway, tmp_path):
    with trio.fail_after(60):
        (d, direct), (c, via) = await together((synced, sogo.front_port, DIRECT, 4),
                                               (synced, gateway["port"], MANAGED, 4))
        await d.aclose()
        # The opaque message's smime.p7m attachment, fetched, is SOGo's bytes too.
        ref = listed_attachments(via[SUBJECTS["opaque"]])["smime.p7m"]
        ctype, blob = await fetch(c, ref)
        await c.aclose()
        d = client(sogo.front_port, DIRECT)
        dtype, dblob = await fetch(d, ref)
        await d.aclose()
    assert (ctype, blob) == (dtype, dblob)
    for key in ("signed", "opaque"):
        mine, theirs = body_data(via[SUBJECTS[key]]), body_data(direct[SUBJECTS[key]])
        # Both carry a PDF the managed policy would encrypt anywhere else.
        assert mine == theirs, f"{key}: the gateway changed an S/MIME message"
        # and the signature still verifies over what the device got (openssl, not our code)
        (tmp_path / f"{key}.eml").write_text(mine, newline="")
        done = subprocess.run(["openssl", "smime", "-verify", "-noverify", "-in", str(tmp_path / f"{key}.eml"),
                               "-out", str(tmp_path / f"{key}.out")], capture_output=True, text=True)
        assert done.returncode == 0, (key, done.stderr)
        assert FILES["pdf"][0].encode() in (tmp_path / f"{key}.out").read_bytes()
