"""Attachment actions and links rewritten, counted by the content pipeline in the worker,
through a running `seg-fast serve` in front of the mailbox simulator: /metrics, the
dashboard and its last-24-hours history move with what devices really got, and the
history survives a restart of the gateway without counting anything twice.

Oracles: the links are counted in the answers the device received (awb:// and awbs://
do not occur in the simulator's mail); each attachment's fate is read from what the
device fetched (the envelope's content type, the block note, the original bytes).
"""
from __future__ import annotations

import base64
import json

import trio

from http_client import request
from redis_server import free_port
from eas_helpers import store_policies, sync_req
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.policy.model import DeviceRecord, PolicyDocument
from seg_fast.sim.client import EasClient
from seg_fast.sim.commands import file_reference
from seg_fast.sim.corpus import REWRITE_DOMAINS
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.oracle import listed
from seg_fast.sim.state import INBOX, Item
from seg_fast.sim.tree import E, find, kids, text
from processes import start_serve, stop_process

PASSWORD = "pw-history-7"
TOKEN = "history-token"
POLICY = EmailSecurityPolicy(
    hyperlinks=HyperlinkPolicy(enabled=True, mode="include", domains=list(REWRITE_DOMAINS)),
    managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt"}),          # png: allowed
    unmanaged_attachments=AttachmentPolicy(file_types={"png": "block"}),
)


def pick(sim, pred, limit=400) -> int:
    return next(i for i in range(limit) if pred(sim.corpus.message(i)))


def has(kind):
    return lambda m: (not m.signed and m.attachments and len(m.attachments) == 1
                      and m.attachments[0][0].endswith("." + kind) and len(m.attachments[0][2]) < 400_000)


async def device(port, device_id) -> EasClient:
    c = EasClient("127.0.0.1", port, "jdoe", PASSWORD, device_id, device_type="iPhone", version="14.1",
                  user_agent="Apple-iPhone15C2/2104.100")
    await c.provision()
    return c


async def fetch(c, ref: str):
    r = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E(
        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", ref))))
    props = find(r.doc, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Properties")
    return text(props, "AirSyncBase:ContentType"), base64.b64decode(text(props, "ItemOperations:Data"))


def metric(body: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def admin_json(port, path):
    status, _, body = await request(port, "GET", path, token=TOKEN)
    assert status == 200, body
    return json.loads(body)


async def until_metrics(port, want: dict, timeout=20.0) -> str:
    """/metrics once every figure in ``want`` ({(name, action or None): value}) is reached."""
    with trio.fail_after(timeout):
        while True:
            status, _, raw = await request(port, "GET", "/metrics")
            body = raw.decode()
            got = {k: metric(body, k[0], **({"action": k[1]} if k[1] else {})) for k in want}
            if status == 200 and got == want:
                return body
            await trio.sleep(0.2)


async def until_up(proc, port):
    with trio.fail_after(20):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                status, _, _ = await request(port, "GET", "/seg/stats", token=TOKEN)
                if status == 200 and (await admin_json(port, "/seg/stats"))["workers"]:
                    return
            except OSError:
                pass
            await trio.sleep(0.2)


async def test_counters_dashboard_and_history_through_serve(tmp_path):
    await store_policies(tmp_path / "policy.db", PolicyDocument(security=POLICY),
                         [DeviceRecord(device_id="MANAGED1", user="jdoe", managed=True, compliant=True,
                                       compromised=False, platform="Apple")])
    sim = MailboxSimulator(password=PASSWORD, seed=5)
    mbox = sim.mailbox("jdoe")
    pdf_i, png_i = pick(sim, has("pdf")), pick(sim, has("png"))
    links_i = pick(sim, lambda m: not m.signed and not m.attachments and any(listed(u) for u in m.links))
    sid = {name: mbox.add(INBOX, Item(i)) for name, i in (("pdf", pdf_i), ("png", png_i), ("links", links_i))}
    gw_port, admin_port = free_port(), free_port()
    cfg = tmp_path / "gw.toml"
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg.write_text(
            f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n'
            f'[log]\ntransactions = ""\n'
            f'[policy]\nsqlite_path = "{tmp_path / "policy.db"}"\n'
            f'[security]\nmaster_key_file = "{tmp_path / "mk"}"\nkey_state_file = "{tmp_path / "ks.json"}"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            await until_up(proc, admin_port)
            # A managed device: Sync with HTML bodies (links rewritten in the answer), then
            # the PDF (encrypted) and the PNG (allowed for managed devices) fetched.
            managed = await device(gw_port, "MANAGED1")
            r = await managed.request("Sync", sync_req("0"))
            key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
            r = await managed.request("Sync", sync_req(key, 2))
            cmds = find(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Commands")
            items = {text(a, "AirSync:ServerId"): find(a, "AirSync:ApplicationData") for a in kids(cmds, "AirSync:Add")}
            assert set(sid.values()) <= set(items)
            bodies = [text(app, "AirSyncBase:Body", "AirSyncBase:Data") or "" for app in items.values()]
            links = sum(b.count("awb://") + b.count("awbs://") for b in bodies)
            assert links >= 1
            refs = {name: text(find(items[sid[name]], "AirSyncBase:Attachments", "AirSyncBase:Attachment"),
                               "AirSyncBase:FileReference") for name in ("pdf", "png")}
            ctype, blob = await fetch(managed, refs["pdf"])
            assert ctype == ENVELOPE_CONTENT_TYPE and sim.corpus.message(pdf_i).attachments[0][2] not in blob
            ctype, blob = await fetch(managed, refs["png"])
            assert blob == sim.corpus.message(png_i).attachments[0][2]            # allowed: as it came
            await managed.aclose()
            # An unmanaged device asks for the PNG: blocked (the note in its place).
            unmanaged = await device(gw_port, "UNMANAGED1")
            got = await unmanaged.request("GetAttachment", params={"AttachmentName": file_reference(sid["png"], 0)})
            assert got.status == 200 and b"\x89PNG" not in got.body
            await unmanaged.aclose()

            want = {("seg_fast_attachments_total", "encrypt"): 1.0, ("seg_fast_attachments_total", "allow"): 1.0,
                    ("seg_fast_attachments_total", "block"): 1.0, ("seg_fast_links_rewritten_total", None): float(links)}
            await until_metrics(admin_port, want)
            dash = await admin_json(admin_port, "/seg/console/dashboard")
            assert dash["attachments"] == {"encrypt": 1, "block": 1, "allow": 1}
            assert dash["links_rewritten"] == links
            # The history: the same figures in the current bucket; the devices counted.
            view = await admin_json(admin_port, "/seg/console/series?hours=24")
            assert view["buckets"] == 288 and view["step"] == 300
            s = view["series"]
            assert {a: sum(v) for a, v in s["attachments"].items()} == {"encrypt": 1, "block": 1, "allow": 1}
            assert sum(s["links_rewritten"]["links"]) == links
            assert sum(s["requests_by_command"]["Sync"]) == 2
            assert sum(s["requests_by_command"]["ItemOperations"]) == 2
            assert s["requests_by_status"]["200"][-1] >= 6
            assert max(v for v in s["devices_by_status"]["allowed"] if v is not None) >= 1
            assert (await request(admin_port, "GET", "/seg/console/series?hours=48", token=TOKEN))[0] == 400
            assert (await request(admin_port, "GET", "/seg/console/series"))[0] == 401
        finally:
            stop_process(proc)

        # Restarted: the history is read back; the new worker's counts add to it, never twice.
        proc = start_serve(cfg, tmp_path)
        try:
            await until_up(proc, admin_port)
            s = (await admin_json(admin_port, "/seg/console/series"))["series"]
            assert sum(s["attachments"]["encrypt"]) == 1 and sum(s["links_rewritten"]["links"]) == links
            managed = await device(gw_port, "MANAGED1")
            assert (await fetch(managed, refs["pdf"]))[0] == ENVELOPE_CONTENT_TYPE
            await managed.aclose()
            await until_metrics(admin_port, {("seg_fast_attachments_total", "encrypt"): 1.0})   # this run's worker
            s = (await admin_json(admin_port, "/seg/console/series"))["series"]
            assert sum(s["attachments"]["encrypt"]) == 2
            assert sum(s["attachments"]["block"]) == 1 and sum(s["links_rewritten"]["links"]) == links
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()
