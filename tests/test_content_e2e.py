"""Email security end to end: devices talk to the running gateway (its real policy
gatekeeper on SQLite) in front of the mailbox simulator, over loopback.

- Include mode: only links to the listed domains open in the secure browser.
- A managed device's PDF arrives encrypted and `seg-fast attachment decrypt` opens it.
- An unmanaged device's PNG is blocked with the configured message.
- An S/MIME signed message is left byte for byte as the server sent it.
"""
from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import os
import subprocess
import sys
from contextlib import asynccontextmanager

import trio

from conftest import REPO
from link_oracle import assert_include_mode, listed
from eas_helpers import managed_device, store_policies, sync_req
from seg_fast.config import load_config
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE, envelope_name
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.policy.model import PolicyDocument
from seg_fast.proxy.gateway import Gateway
from seg_fast.sim.client import EasClient
from seg_fast.sim.commands import file_reference
from seg_fast.sim.corpus import REWRITE_DOMAINS
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.state import INBOX, Item
from seg_fast.sim.tree import E, find, kids, text

PASSWORD = "secret"
UA = "Apple-iPhone15C2/2104.100"
BLOCK_MSG = "Images are blocked on this device."
POLICY = EmailSecurityPolicy(
    hyperlinks=HyperlinkPolicy(enabled=True, mode="include", domains=list(REWRITE_DOMAINS)),
    managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt", "docx": "encrypt", "zip": "encrypt"}),
    unmanaged_attachments=AttachmentPolicy(file_types={"png": "block"}, block_message=BLOCK_MSG),
    skip_smime=True,
)


def env_for(sim_port: int, tmp_path) -> dict:
    return {"SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0",
            "SEG_FAST_UPSTREAM_URL": f"http://127.0.0.1:{sim_port}",
            "SEG_FAST_LOG_TRANSACTIONS": str(tmp_path / "tx.jsonl"),
            "SEG_FAST_POLICY_SQLITE_PATH": str(tmp_path / "policy.db"),
            "SEG_FAST_SECURITY_MASTER_KEY_FILE": str(tmp_path / "master.key"),
            "SEG_FAST_SECURITY_KEY_STATE_FILE": str(tmp_path / "keys.json")}


@asynccontextmanager
async def running(tmp_path):
    await store_policies(tmp_path / "policy.db", PolicyDocument(security=POLICY), [managed_device()])
    sim = MailboxSimulator(password=PASSWORD, seed=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        gw = Gateway(load_config(None, env=env_for(sim.port, tmp_path)))
        await nursery.start(gw.serve)
        yield sim, gw
        nursery.cancel_scope.cancel()


def pick(sim, pred, limit=400) -> int:
    return next(i for i in range(limit) if pred(sim.corpus.message(i)))


def has(kind):
    return lambda m: (not m.signed and m.attachments and m.attachments[0][0].endswith("." + kind)
                      and len(m.attachments[0][2]) < 400_000)


async def device(gw, device_id) -> EasClient:
    c = EasClient("127.0.0.1", gw.port, "jdoe", PASSWORD, device_id, device_type="iPhone", version="14.1",
                  user_agent=UA)
    await c.provision()
    return c


async def sync_items(c, body_type) -> dict[str, object]:
    """ServerId -> ApplicationData of every Inbox item, bodies of ``body_type``."""
    r = await c.request("Sync", sync_req("0"))
    key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
    r = await c.request("Sync", sync_req(key, body_type))
    assert r.status == 200, r
    cmds = find(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Commands")
    return {text(a, "AirSync:ServerId"): find(a, "AirSync:ApplicationData") for a in kids(cmds, "AirSync:Add")}


async def test_email_security_through_the_gateway(tmp_path):
    async with running(tmp_path) as (sim, gw):
        with trio.fail_after(30):
            mbox = sim.mailbox("jdoe")
            links_i = pick(sim, lambda m: not m.signed and not m.attachments
                           and any(listed(u) for u in m.links) and not all(listed(u) for u in m.links))
            pdf_i, png_i = pick(sim, has("pdf")), pick(sim, has("png"))
            signed_i = pick(sim, lambda m: m.signed, limit=2000)
            sid = {name: mbox.add(INBOX, Item(i)) for name, i in
                   (("links", links_i), ("pdf", pdf_i), ("png", png_i), ("signed", signed_i))}

            # Include mode: links to listed domains rewritten, the others as they were.
            managed = await device(gw, "MANAGED1")
            items = await sync_items(managed, 2)
            html = text(items[sid["links"]], "AirSyncBase:Body", "AirSyncBase:Data")
            msg = sim.corpus.message(links_i)
            assert_include_mode(html, msg)

            # Managed device: the PDF is listed renamed, fetched encrypted, opened by the CLI.
            pdf_name, pdf_type, pdf = sim.corpus.message(pdf_i).attachments[0]
            att = find(items[sid["pdf"]], "AirSyncBase:Attachments", "AirSyncBase:Attachment")
            assert text(att, "AirSyncBase:DisplayName") == envelope_name(pdf_name)
            ref = text(att, "AirSyncBase:FileReference")
            r = await managed.request("ItemOperations", E("ItemOperations:ItemOperations", E(
                "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", ref))))
            props = find(r.doc, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Properties")
            assert text(props, "AirSyncBase:ContentType") == ENVELOPE_CONTENT_TYPE
            blob = base64.b64decode(text(props, "ItemOperations:Data"))
            assert pdf not in blob
            (tmp_path / "out").mkdir()
            (tmp_path / "att.segenc").write_bytes(blob)
            env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **{
                k: v for k, v in env_for(sim.port, tmp_path).items() if k.startswith("SEG_FAST_SECURITY")})
            done = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "seg_fast", "attachment", "decrypt", "--device", "MANAGED1",
                 "--user", "jdoe", str(tmp_path / "att.segenc")], env=env, cwd=tmp_path / "out",
                capture_output=True, text=True))
            assert done.returncode == 0, done.stderr
            opened = (tmp_path / "out" / pdf_name).read_bytes()
            assert hashlib.sha256(opened).digest() == hashlib.sha256(pdf).digest()

            # The signed message is exempt: its MIME arrives exactly as the server sent it.
            mime_items = await sync_items(await device(gw, "MANAGED1B"), 4)
            signed_mime = text(mime_items[sid["signed"]], "AirSyncBase:Body", "AirSyncBase:Data")
            assert signed_mime.encode() == sim.corpus.message(signed_i).mime

            # Unmanaged device: the PNG is removed from the MIME body, listed as removed,
            # and fetching it gives the block message.
            unmanaged = await device(gw, "UNMANAGED1")
            items = await sync_items(unmanaged, 4)
            png_name = sim.corpus.message(png_i).attachments[0][0]
            mime = text(items[sid["png"]], "AirSyncBase:Body", "AirSyncBase:Data")
            parsed = email.message_from_string(mime, policy=email.policy.default)
            assert not any(p.get_content_type() == "image/png" for p in parsed.walk())
            notes = [p.get_content() for p in parsed.walk() if p.get_content_type() == "text/plain"
                     and png_name in p.get_content()]
            assert len(notes) == 1 and BLOCK_MSG in notes[0]
            # Its only attachment blocked, the item lists none; a device that still asks
            # for it by its FileReference gets the note.
            assert find(items[sid["png"]], "AirSyncBase:Attachments") is None
            r = await unmanaged.request("GetAttachment", params={"AttachmentName": file_reference(sid["png"], 0)})
            assert r.status == 200 and BLOCK_MSG.encode() in r.body and b"\x89PNG" not in r.body
            assert r.headers["content-type"] == "text/plain; charset=utf-8"     # not image/png
            # The unmanaged policy leaves PDFs alone.
            att = find(items[sid["pdf"]], "AirSyncBase:Attachments", "AirSyncBase:Attachment")
            assert text(att, "AirSyncBase:DisplayName") == pdf_name
            for c in (managed, unmanaged):
                await c.aclose()


async def test_no_policy_blocks_attachments_through_the_gateway(tmp_path):
    # An empty store with allow_if_no_policies: devices pass, attachments do not
    # (the guide's "Block Attachments" with its default message).
    sim = MailboxSimulator(password=PASSWORD, seed=5)
    env = dict(env_for(0, tmp_path), SEG_FAST_POLICY_ALLOW_IF_NO_POLICIES="true",
               SEG_FAST_SECURITY_DEFAULT_BLOCK_MESSAGE="Attachments are off while policies load.")
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        env["SEG_FAST_UPSTREAM_URL"] = f"http://127.0.0.1:{sim.port}"
        gw = Gateway(load_config(None, env=env))
        await nursery.start(gw.serve)
        with trio.fail_after(20):
            pdf_i = pick(sim, has("pdf"))
            sid = sim.mailbox("jdoe").add(INBOX, Item(pdf_i))
            c = await device(gw, "ANY1")
            items = await sync_items(c, 2)
            assert find(items[sid], "AirSyncBase:Attachments") is None
            r = await c.request("GetAttachment", params={"AttachmentName": file_reference(sid, 0)})
            assert r.status == 200 and b"Attachments are off while policies load." in r.body
            assert not r.body.startswith(b"%PDF")
            assert r.headers["content-type"] == "text/plain; charset=utf-8"
            await c.aclose()
        nursery.cancel_scope.cancel()


async def test_protocol_25_device_through_the_gateway(tmp_path):
    # 2.5: Email:MIMEData bodies and Email:Attachments (AttName is the file reference).
    async with running(tmp_path) as (sim, gw):
        with trio.fail_after(20):
            png_i = pick(sim, has("png"))
            sid = sim.mailbox("jdoe").add(INBOX, Item(png_i))
            c = EasClient("127.0.0.1", gw.port, "jdoe", PASSWORD, "OLD25", device_type="PocketPC",
                          version="2.5", user_agent="OldClient/1.0")
            await c.provision()
            r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E(
                "AirSync:Collection", E("AirSync:Class", "Email"), E("AirSync:SyncKey", "0"),
                E("AirSync:CollectionId", INBOX)))))
            key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
            r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E(
                "AirSync:Collection", E("AirSync:Class", "Email"), E("AirSync:SyncKey", key),
                E("AirSync:CollectionId", INBOX), E("AirSync:GetChanges"),
                E("AirSync:Options", E("AirSync:MIMESupport", 2))))))
            assert r.status == 200, r
            cmds = find(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Commands")
            app = {text(a, "AirSync:ServerId"): find(a, "AirSync:ApplicationData")
                   for a in kids(cmds, "AirSync:Add")}[sid]
            msg = sim.corpus.message(png_i)
            mime = text(app, "Email:MIMEData")
            parsed = email.message_from_string(mime, policy=email.policy.default)
            # An unmanaged device: the PNG is gone, the listed links open in the secure browser.
            assert not any(p.get_content_type() == "image/png" for p in parsed.walk())
            html = [p for p in parsed.walk() if p.get_content_type() == "text/html"][0].get_content()
            included = [u for u in msg.links if listed(u)]
            assert included and all(("awbs" if u.startswith("https") else "awb") + u[u.index("://"):].replace(
                "&", "&amp;") in html for u in included)
            assert find(app, "Email:Attachments") is None        # its only attachment was blocked
            await c.aclose()
