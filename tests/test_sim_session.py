"""A whole device session against the running mailbox simulator over loopback.

Oracles: the corpus (the bytes the simulator must serve), Python's email package
for MIME, a hand-written multipart reader, libwbxml's wbxml2xml for every kind of
answer, and the real Z-Push captures for the shape of the answers.
"""
from __future__ import annotations

import base64
import email
import shutil
import struct
import subprocess

import pytest
import trio

from conftest import REAL_SERVER
from seg_fast.eas.wbxml import Element, decode, encode
from seg_fast.sim.client import EasClient
from seg_fast.sim.corpus import Corpus
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, find, kids, text

SEED = 7
CORPUS = Corpus(SEED)


@pytest.fixture
async def sim(nursery):
    s = MailboxSimulator(password="secret", seed=SEED)
    await nursery.start(s.serve, "127.0.0.1", 0)
    return s


def client(sim, user="jdoe", device="DEV1", version="14.1") -> EasClient:
    return EasClient("127.0.0.1", sim.port, user, "secret", device, version=version)


async def ready(sim, user="jdoe", device="DEV1", version="14.1") -> EasClient:
    c = client(sim, user, device, version)
    await c.provision()
    return c


def sync_req(key, cid="1", *options, window=None, commands=None, cls=None):
    return E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:Class", cls) if cls else None,
        E("AirSync:SyncKey", key), E("AirSync:CollectionId", cid),
        E("AirSync:GetChanges") if key != "0" else None,
        E("AirSync:WindowSize", window) if window else None,
        E("AirSync:Options", *options) if options else None,
        E("AirSync:Commands", *commands) if commands else None)))


def body_pref(t, trunc=None, all_or_none=False):
    return E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", t),
             E("AirSyncBase:TruncationSize", trunc) if trunc is not None else None,
             E("AirSyncBase:AllOrNone", 1) if all_or_none else None)


def collection(resp) -> Element:
    return find(resp.doc, "AirSync:Collections", "AirSync:Collection")


def adds(resp) -> list[Element]:
    return list(kids(find(collection(resp), "AirSync:Commands"), "AirSync:Add"))


async def initial_sync(c, cid="1") -> str:
    r = await c.request("Sync", sync_req("0", cid))
    assert r.status == 200
    assert text(collection(r), "AirSync:Status") == "1"
    return text(collection(r), "AirSync:SyncKey")


def first_index(pred, limit=400) -> int:
    return next(i for i in range(limit) if pred(CORPUS.message(i)))


def tag_paths(el: Element, prefix="") -> set[str]:
    here = f"{prefix}/{el.tag}"
    out = {here}
    for c in el.children:
        out |= tag_paths(c, here)
    return out


# -- HTTP basics, auth, OPTIONS --------------------------------------------------------------

async def test_auth_options_and_paths(sim):
    c = client(sim)
    r = await c.request("", method="GET", auth=False)
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Basic")
    r = await c.request("", method="POST", auth=False)
    assert r.status == 401
    bad = EasClient("127.0.0.1", sim.port, "jdoe", "wrong", "DEV1")
    assert (await bad.request("FolderSync", E("FolderHierarchy:FolderSync",
                                               E("FolderHierarchy:SyncKey", "0")))).status == 401
    r = await c.request("", method="OPTIONS")
    assert r.status == 200
    assert r.headers["ms-asprotocolversions"] == "2.5,12.0,12.1,14.0,14.1,16.0,16.1"
    cmds = r.headers["ms-asprotocolcommands"].split(",")
    for cmd in ("Sync", "SendMail", "Ping", "ItemOperations", "Provision", "GetAttachment"):
        assert cmd in cmds
    r = await c.send("POST", "/not-eas?Cmd=Sync&DeviceId=X", [("host", "x")], b"")
    assert r.status == 404
    # the path is case-insensitive
    r = await c.send("OPTIONS", "/microsoft-server-activesync",
                     [("host", "x"), ("authorization", "Basic " + base64.b64encode(b"a:secret").decode())], b"")
    assert r.status == 200


async def test_malformed_requests_get_400_and_server_lives(sim):
    c = await ready(sim)
    r = await c.request("Sync", b"\x03\x01\x6a\x00\x45\x5c")          # truncated WBXML
    assert r.status == 400
    r = await c.send("POST", "/Microsoft-Server-ActiveSync?%%%%", [("host", "x")], b"")
    assert r.status in (400, 401)
    auth = "Basic " + base64.b64encode(b"jdoe:secret").decode()
    r = await c.send("POST", "/Microsoft-Server-ActiveSync?AAAA", [("host", "x"), ("authorization", auth)], b"")
    assert r.status == 400
    # garbage on the wire: 400 and the connection closes; the server keeps serving
    s = await trio.open_tcp_stream("127.0.0.1", sim.port)
    await s.send_all(b"\x16\x03\x01 not http\r\n\r\n")
    got = b""
    with trio.fail_after(5):
        while True:
            chunk = await s.receive_some(1000)
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 400")
    r = await c.request("Settings", E("Settings:Settings", E("Settings:UserInformation", E("Settings:Get"))))
    assert r.status == 200


# -- Provision -------------------------------------------------------------------------------

async def test_provision_two_step_and_gate(sim):
    c = client(sim, version="14.1")
    fs = E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))
    r = await c.request("FolderSync", fs)
    assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "142"
    old = client(sim, device="OLD", version="12.1")
    assert (await old.request("FolderSync", fs)).status == 449

    # the real device's first Provision request (Z-Push capture), byte for byte
    r1 = await c.request("Provision", (REAL_SERVER / "prov1.req.wbxml").read_bytes())
    assert r1.status == 200
    real1 = decode((REAL_SERVER / "prov1.resp.wbxml").read_bytes())
    assert tag_paths(real1) <= tag_paths(r1.doc) | _extra_policy_paths(real1, r1.doc)
    temp = text(r1.doc, "Provision:Policies", "Provision:Policy", "Provision:PolicyKey")
    assert temp and text(r1.doc, "Provision:Status") == "1"
    assert find(r1.doc, "Provision:Policies", "Provision:Policy", "Provision:Data",
                "Provision:EASProvisionDoc") is not None
    # the temporary key does not open the mailbox
    c.policy_key = temp
    assert text((await c.request("FolderSync", fs)).doc, "FolderHierarchy:Status") == "144"

    req2 = decode((REAL_SERVER / "prov2.req.wbxml").read_bytes())
    find(req2, "Provision:Policies", "Provision:Policy", "Provision:PolicyKey").text = temp
    r2 = await c.request("Provision", req2)
    assert tag_paths(decode((REAL_SERVER / "prov2.resp.wbxml").read_bytes())) == tag_paths(r2.doc)
    final = text(r2.doc, "Provision:Policies", "Provision:Policy", "Provision:PolicyKey")
    assert final and final != temp
    # acknowledging with a wrong key: Policy Status 5
    r3 = await c.request("Provision", req2)
    assert text(r3.doc, "Provision:Policies", "Provision:Policy", "Provision:Status") == "5"
    c.policy_key = final
    r = await c.request("FolderSync", fs)
    assert text(r.doc, "FolderHierarchy:Status") == "1"


def _extra_policy_paths(real: Element, ours: Element) -> set[str]:
    # Z-Push's policy document lists two application lists we do not send.
    return {p for p in tag_paths(real) if p.endswith(("ApplicationList", "InROMApplicationList"))}


# -- FolderSync ------------------------------------------------------------------------------

async def test_folder_sync(sim):
    c = await ready(sim)
    r = await c.request("FolderSync", (REAL_SERVER / "fsync.req.wbxml").read_bytes())
    real = decode((REAL_SERVER / "fsync.resp.wbxml").read_bytes())
    assert tag_paths(real) == tag_paths(r.doc)
    folders = {text(a, "FolderHierarchy:DisplayName"): text(a, "FolderHierarchy:Type")
               for a in kids(find(r.doc, "FolderHierarchy:Changes"), "FolderHierarchy:Add")}
    assert folders == {"Inbox": "2", "Drafts": "3", "Deleted Items": "4", "Sent Items": "5",
                       "Outbox": "6", "Calendar": "8", "Contacts": "9", "Tasks": "7", "Notes": "10"}
    assert text(r.doc, "FolderHierarchy:Changes", "FolderHierarchy:Count") == "9"
    key = text(r.doc, "FolderHierarchy:SyncKey")
    again = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", key)))
    assert text(again.doc, "FolderHierarchy:Changes", "FolderHierarchy:Count") == "0"
    bad = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "77")))
    assert text(bad.doc, "FolderHierarchy:Status") == "9"


# -- Sync ------------------------------------------------------------------------------------

async def test_sync_body_types_and_attachments(sim):
    # deliver up to and including the first message with a small attachment
    att_i = first_index(lambda m: m.attachments and len(m.attachments[0][2]) < 400_000)
    sim.deliver("jdoe", count=att_i + 1)
    for btype in (1, 2, 4):
        c = await ready(sim, device=f"BT{btype}")
        key = await initial_sync(c)
        r = await c.request("Sync", sync_req(key, "1", body_pref(btype), window=100))
        items = adds(r)
        assert len(items) == att_i + 1
        for k, add in enumerate(items):
            msg = CORPUS.message(k)
            ad = find(add, "AirSync:ApplicationData")
            assert text(ad, "Email:Subject") == msg.subject
            body = find(ad, "AirSyncBase:Body")
            assert text(body, "AirSyncBase:Type") == str(btype)
            want = {1: msg.text.encode(), 2: msg.html.encode(), 4: msg.mime}[btype]
            assert text(body, "AirSyncBase:Data").encode() == want
            assert text(body, "AirSyncBase:EstimatedDataSize") == str(len(want))
            assert text(body, "AirSyncBase:Truncated") == "0"
            if btype == 4:
                parsed = email.message_from_bytes(want)
                assert parsed["Subject"] == msg.subject
            atts = list(kids(find(ad, "AirSyncBase:Attachments"), "AirSyncBase:Attachment"))
            assert len(atts) == len(msg.attachments)
            for a, (name, _ctype, blob) in zip(atts, msg.attachments):
                assert text(a, "AirSyncBase:DisplayName") == name
                assert text(a, "AirSyncBase:EstimatedDataSize") == str(len(blob))
                assert text(a, "AirSyncBase:Method") == "1"
                assert text(a, "AirSyncBase:FileReference")


async def test_sync_truncation_and_all_or_none(sim):
    sim.deliver("jdoe", count=1)
    c = await ready(sim)
    key = await initial_sync(c)
    r = await c.request("Sync", sync_req(key, "1", body_pref(2, trunc=100)))
    body = find(adds(r)[0], "AirSync:ApplicationData", "AirSyncBase:Body")
    assert text(body, "AirSyncBase:Truncated") == "1"
    assert text(body, "AirSyncBase:Data") == CORPUS.message(0).html[:100]
    assert text(body, "AirSyncBase:EstimatedDataSize") == str(len(CORPUS.message(0).html))
    c2 = await ready(sim, device="AON")
    key = await initial_sync(c2)
    r = await c2.request("Sync", sync_req(key, "1", body_pref(4, trunc=100, all_or_none=True)))
    body = find(adds(r)[0], "AirSync:ApplicationData", "AirSyncBase:Body")
    assert text(body, "AirSyncBase:Truncated") == "1"
    assert find(body, "AirSyncBase:Data") is None


async def test_sync_key_progression_window_and_retry(sim):
    sim.deliver("jdoe", count=3)
    c = await ready(sim)
    # the real SyncKey-0 request and the shape of the real answer
    req0 = decode((REAL_SERVER / "sync0.req.wbxml").read_bytes())
    find(req0, "AirSync:Collections", "AirSync:Collection", "AirSync:CollectionId").text = "1"
    r0 = await c.request("Sync", req0)
    assert tag_paths(r0.doc) == tag_paths(decode((REAL_SERVER / "sync0.resp.wbxml").read_bytes()))
    k1 = text(collection(r0), "AirSync:SyncKey")
    assert k1 == "1" and adds(r0) == []
    r = await c.request("Sync", sync_req(k1, "1", body_pref(1), window=2))
    coll = collection(r)
    assert len(adds(r)) == 2 and find(coll, "AirSync:MoreAvailable") is not None
    k2 = text(coll, "AirSync:SyncKey")
    assert k2 != k1
    first_ids = [text(a, "AirSync:ServerId") for a in adds(r)]
    # the device lost that answer and retries with the old key: same items again
    r = await c.request("Sync", sync_req(k1, "1", body_pref(1), window=2))
    assert [text(a, "AirSync:ServerId") for a in adds(r)] == first_ids
    assert text(collection(r), "AirSync:SyncKey") == k2
    r = await c.request("Sync", sync_req(k2, "1", body_pref(1), window=2))
    assert len(adds(r)) == 1 and find(collection(r), "AirSync:MoreAvailable") is None
    k3 = text(collection(r), "AirSync:SyncKey")
    # nothing new: still a fresh key, no Commands
    r = await c.request("Sync", sync_req(k3, "1", body_pref(1)))
    assert adds(r) == [] and text(collection(r), "AirSync:SyncKey") not in (k1, k2, k3)
    # a key from the past is refused
    r = await c.request("Sync", sync_req(k1, "1", body_pref(1)))
    assert text(collection(r), "AirSync:Status") == "3"
    # unknown collection
    r = await c.request("Sync", sync_req("0", "999"))
    assert text(collection(r), "AirSync:Status") == "8"


async def test_sync_client_delete_and_server_delete(sim):
    sim.deliver("jdoe", count=2)
    c = await ready(sim)
    key = await initial_sync(c)
    r = await c.request("Sync", sync_req(key, "1", body_pref(1)))
    ids = [text(a, "AirSync:ServerId") for a in adds(r)]
    key = text(collection(r), "AirSync:SyncKey")
    # the device deletes one (DeletesAsMoves: it goes to Deleted Items)
    r = await c.request("Sync", sync_req(key, "1", commands=[E("AirSync:Delete", E("AirSync:ServerId", ids[0]))]))
    assert text(collection(r), "AirSync:Status") == "1"
    assert len(sim.mailbox("jdoe").folder("3")) == 1
    key = text(collection(r), "AirSync:SyncKey")
    # another device moves the other one: this device sees a Delete
    other = await ready(sim, device="OTHER")
    mv = await other.request("MoveItems", E("Move:MoveItems", E(
        "Move:Move", E("Move:SrcMsgId", ids[1]), E("Move:SrcFldId", "1"), E("Move:DstFldId", "2"))))
    resp = find(mv.doc, "Move:Response")
    assert text(resp, "Move:Status") == "3" and text(resp, "Move:DstMsgId").startswith("2:")
    r = await c.request("Sync", sync_req(key, "1"))
    deletes = list(kids(find(collection(r), "AirSync:Commands"), "AirSync:Delete"))
    assert [text(d, "AirSync:ServerId") for d in deletes] == [ids[1]]
    bad = await other.request("MoveItems", E("Move:MoveItems", E(
        "Move:Move", E("Move:SrcMsgId", "1:999"), E("Move:SrcFldId", "1"), E("Move:DstFldId", "2"))))
    assert text(bad.doc, "Move:Response", "Move:Status") == "1"


async def test_sync_protocol_25(sim):
    i = first_index(lambda m: m.attachments)
    sim.deliver("jdoe", count=i + 1)
    c = await ready(sim, device="OLD25", version="2.5")
    key = await initial_sync(c)
    r = await c.request("Sync", sync_req(key, "1", E("AirSync:MIMESupport", 2),
                                         E("AirSync:MIMETruncation", 8), cls="Email", window=100))
    coll = collection(r)
    assert text(coll, "AirSync:Class") == "Email"
    ad = find(adds(r)[i], "AirSync:ApplicationData")
    assert text(ad, "Email:MIMEData").encode() == CORPUS.message(i).mime
    assert text(ad, "Email:MIMESize") == str(len(CORPUS.message(i).mime))
    att = find(ad, "Email:Attachments", "Email:Attachment")
    assert text(att, "Email:DisplayName") == CORPUS.message(i).attachments[0][0]
    c2 = await ready(sim, device="OLD25B", version="2.5")
    key = await initial_sync(c2)
    r = await c2.request("Sync", sync_req(key, "1", E("AirSync:Truncation", 1), cls="Email", window=1))
    ad = find(adds(r)[0], "AirSync:ApplicationData")
    full = CORPUS.message(0).text
    assert text(ad, "Email:Body") == full[:4096]
    assert text(ad, "Email:BodyTruncated") == "1" and text(ad, "Email:BodySize") == str(len(full))


# -- ItemOperations and GetAttachment --------------------------------------------------------

async def _synced_attachment(sim, c):
    i = first_index(lambda m: m.attachments and len(m.attachments[0][2]) < 400_000)
    sim.deliver(c.user, count=i + 1)
    key = await initial_sync(c)
    r = await c.request("Sync", sync_req(key, "1", body_pref(2), window=100))
    add = adds(r)[i]
    ref = text(add, "AirSync:ApplicationData", "AirSyncBase:Attachments", "AirSyncBase:Attachment",
               "AirSyncBase:FileReference")
    return CORPUS.message(i), ref, text(add, "AirSync:ServerId")


def parse_multipart(body: bytes) -> list[bytes]:
    (count,) = struct.unpack_from("<i", body, 0)
    pairs = [struct.unpack_from("<ii", body, 4 + 8 * k) for k in range(count)]
    return [body[o:o + n] for o, n in pairs]


async def test_item_operations_inline_multipart_and_get_attachment(sim):
    c = await ready(sim)
    msg, ref, sid = await _synced_attachment(sim, c)
    name, ctype, blob = msg.attachments[0]
    # inline: the real device's request with our FileReference
    req = decode((REAL_SERVER / "iofetch.req.wbxml").read_bytes())
    find(req, "ItemOperations:Fetch", "AirSyncBase:FileReference").text = ref
    r = await c.request("ItemOperations", req)
    real = decode((REAL_SERVER / "iofetch.resp.wbxml").read_bytes())
    assert tag_paths(real) == tag_paths(r.doc)
    props = find(r.doc, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Properties")
    assert text(props, "AirSyncBase:ContentType") == ctype
    assert base64.b64decode(text(props, "ItemOperations:Data")) == blob
    # multipart
    r = await c.request("ItemOperations", req, headers={"ms-asacceptmultipart": "T"})
    assert r.headers["content-type"] == "application/vnd.ms-sync.multipart"
    parts = parse_multipart(r.body)
    assert len(parts) == 2 and parts[1] == blob
    part0 = decode(parts[0])
    assert tag_paths(part0) == tag_paths(decode((REAL_SERVER / "mp.part0.wbxml").read_bytes()))
    assert text(part0, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Properties",
                "ItemOperations:Part") == "1"
    # a byte range
    rng = E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
            E("AirSyncBase:FileReference", ref), E("ItemOperations:Options", E("ItemOperations:Range", "10-109"))))
    props = find((await c.request("ItemOperations", rng)).doc, "ItemOperations:Response",
                 "ItemOperations:Fetch", "ItemOperations:Properties")
    assert base64.b64decode(text(props, "ItemOperations:Data")) == blob[10:110]
    assert text(props, "ItemOperations:Total") == str(len(blob))
    # the item itself, body as a part
    fetch_item = E("ItemOperations:ItemOperations", E("ItemOperations:Fetch",
                   E("ItemOperations:Store", "Mailbox"), E("AirSync:CollectionId", "1"),
                   E("AirSync:ServerId", sid), E("ItemOperations:Options", body_pref(4))))
    r = await c.request("ItemOperations", fetch_item, headers={"ms-asacceptmultipart": "T"})
    parts = parse_multipart(r.body)
    body = find(decode(parts[0]), "ItemOperations:Response", "ItemOperations:Fetch",
                "ItemOperations:Properties", "AirSyncBase:Body")
    assert text(body, "ItemOperations:Part") == "1" and parts[1] == msg.mime
    # GetAttachment: raw bytes with the content type
    r = await c.request("GetAttachment", params={"AttachmentName": ref})
    assert r.status == 200 and r.body == blob and r.headers["content-type"] == ctype
    assert (await c.request("GetAttachment", params={"AttachmentName": "1:999:0"})).status == 404
    # unknown FileReference in ItemOperations: Fetch Status 15
    find(req, "ItemOperations:Fetch", "AirSyncBase:FileReference").text = "1:999:0"
    r = await c.request("ItemOperations", req)
    assert text(r.doc, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Status") == "15"


async def test_base64_query_form(sim):
    c = await ready(sim)
    msg, ref, _ = await _synced_attachment(sim, c)
    r = await c.request("GetAttachment", params={"AttachmentName": ref}, base64_query=True)
    assert r.status == 200 and r.body == msg.attachments[0][2]
    r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")),
                        base64_query=True)
    assert text(r.doc, "FolderHierarchy:Status") == "1"
    # AcceptMultiPart as the Options bit of the base64 form
    req = E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
            E("AirSyncBase:FileReference", ref)))
    r = await c.request("ItemOperations", req, params={"Options": b"\x02"}, base64_query=True)
    assert parse_multipart(r.body)[1] == msg.attachments[0][2]
    # a wrong policy key inside the base64 query is refused
    c.policy_key = "12345"
    r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")),
                        base64_query=True)
    assert text(r.doc, "FolderHierarchy:Status") == "144"


# -- SendMail ----------------------------------------------------------------------------------

MIME = (b"From: jdoe@seg-fast.test\r\nTo: someone@example.com\r\nSubject: hello\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHi there.\r\n")


async def test_send_mail_both_forms(sim):
    c12 = await ready(sim, device="D12", version="12.1")
    r = await c12.request("SendMail", MIME, params={"SaveInSent": "T"},
                          headers={"content-type": "message/rfc822"})
    assert r.status == 200 and r.body == b""
    assert sim.sent[-1].mime == MIME and sim.sent[-1].command == "SendMail"
    assert len(sim.mailbox("jdoe").folder("4")) == 1
    c14 = await ready(sim, device="D14", version="14.1")
    r = await c14.request("SendMail", E("ComposeMail:SendMail", E("ComposeMail:ClientId", "c1"),
                                        E("ComposeMail:SaveInSentItems"), E("ComposeMail:Mime", MIME)))
    assert r.status == 200 and r.body == b""
    assert sim.sent[-1].mime == MIME and sim.sent_count == 2
    r = await c14.request("SmartReply", E("ComposeMail:SmartReply", E("ComposeMail:ClientId", "c2"),
                                          E("ComposeMail:Source", E("ComposeMail:ItemId", "1:1"),
                                            E("ComposeMail:FolderId", "1")),
                                          E("ComposeMail:Mime", MIME)))
    assert r.status == 200 and sim.sent[-1].command == "SmartReply"
    r = await c14.request("SendMail", E("ComposeMail:SendMail", E("ComposeMail:ClientId", "c3"),
                                        E("ComposeMail:Mime", b"not a message")))
    assert text(r.doc, "ComposeMail:Status") == "107"
    assert (await c12.request("SendMail", b"garbage", headers={"content-type": "message/rfc822"})).status == 400


# -- GetItemEstimate, Settings ---------------------------------------------------------------

async def test_get_item_estimate_and_settings(sim):
    sim.deliver("jdoe", count=4)
    c = await ready(sim)
    key = await initial_sync(c)
    est = E("GetItemEstimate:GetItemEstimate", E("GetItemEstimate:Collections", E(
        "GetItemEstimate:Collection", E("AirSync:SyncKey", key), E("GetItemEstimate:CollectionId", "1"))))
    r = await c.request("GetItemEstimate", est)
    resp = find(r.doc, "GetItemEstimate:Response")
    assert text(resp, "GetItemEstimate:Status") == "1"
    assert text(resp, "GetItemEstimate:Collection", "GetItemEstimate:Estimate") == "4"
    r = await c.request("Settings", E("Settings:Settings", E("Settings:Oof", E("Settings:Get",
                        E("Settings:BodyType", "Text"))), E("Settings:DeviceInformation", E("Settings:Set",
                        E("Settings:Model", "test"))), E("Settings:UserInformation", E("Settings:Get"))))
    assert text(r.doc, "Settings:Status") == "1"
    assert text(r.doc, "Settings:UserInformation", "Settings:Get", "Settings:Accounts", "Settings:Account",
                "Settings:EmailAddresses", "Settings:PrimarySmtpAddress") == "jdoe@seg-fast.test"
    assert text(r.doc, "Settings:DeviceInformation", "Settings:Status") == "1"


# -- Ping ----------------------------------------------------------------------------------

def ping_req(heartbeat=None, folders=("1",)):
    return E("Ping:Ping", E("Ping:HeartbeatInterval", heartbeat) if heartbeat else None,
             E("Ping:Folders", *[E("Ping:Folder", E("Ping:Id", f), E("Ping:Class", "Email"))
                                 for f in folders]) if folders else None)


async def wait_parked(sim, n):
    with trio.fail_after(10):
        while sim.parked != n:
            await trio.sleep(0.01)


async def test_ping_released_by_deliver(sim, nursery):
    c = await ready(sim)
    await initial_sync(c)
    assert text((await c.request("Ping", ping_req(folders=("1",)))).doc, "Ping:Status") == "3"
    result = {}

    async def ping():
        result["r"] = await c.request("Ping", ping_req(900))
    nursery.start_soon(ping)
    await wait_parked(sim, 1)
    ids = sim.deliver("jdoe")
    await wait_parked(sim, 0)
    with trio.fail_after(5):
        while "r" not in result:
            await trio.sleep(0.01)
    doc = result["r"].doc
    assert text(doc, "Ping:Status") == "2"
    assert [f.text for f in kids(find(doc, "Ping:Folders"), "Ping:Folder")] == ["1"]
    assert ids and ids[0].startswith("1:")
    # not synced yet: an empty Ping (cached heartbeat and folders) returns at once
    r = await c.request("Ping")
    assert text(r.doc, "Ping:Status") == "2"


async def test_ping_heartbeat_expiry(sim, autojump_clock):
    c = await ready(sim)
    await initial_sync(c)
    start = trio.current_time()
    r = await c.request("Ping", ping_req(600))
    assert text(r.doc, "Ping:Status") == "1"
    assert trio.current_time() - start >= 600
    # an empty Ping uses the cached heartbeat
    start = trio.current_time()
    r = await c.request("Ping")
    assert text(r.doc, "Ping:Status") == "1" and trio.current_time() - start >= 600
    r = await c.request("Ping", ping_req(99999))
    assert text(r.doc, "Ping:Status") == "5" and text(r.doc, "Ping:HeartbeatInterval") == "3540"
    r = await c.request("Ping", ping_req(60, folders=("42",)))
    assert text(r.doc, "Ping:Status") == "7"


async def test_a_ping_body_sent_again_is_not_read_again_but_a_new_one_is(sim, autojump_clock):
    # a phone sends the same Ping body every time: the simulator reads it once per
    # device (state.Device.ping_body) and takes any other body whole, as before
    c, d = await ready(sim), await ready(sim, user="other", device="DEV2")
    await initial_sync(c)
    await initial_sync(d)
    for hb in (600, 600, 700, 600):
        start = trio.current_time()
        r = await c.request("Ping", ping_req(hb))
        assert text(r.doc, "Ping:Status") == "1" and hb <= trio.current_time() - start < hb + 1
    dev = sim.mailbox("jdoe").device("DEV1")
    assert dev.heartbeat == 600 and dev.ping_body == encode(ping_req(600))
    await d.request("Ping", ping_req(600))
    assert sim.mailbox("other").device("DEV2").ping_body is dev.ping_body      # one object for all
    # a body the simulator refuses leaves nothing to reuse; the next is read whole
    r = await c.request("Ping", ping_req(99999))
    assert text(r.doc, "Ping:Status") == "5" and dev.ping_body is None
    r = await c.request("Ping", ping_req(600, folders=("42",)))
    assert text(r.doc, "Ping:Status") == "7"
    start = trio.current_time()
    r = await c.request("Ping", ping_req(600))
    assert text(r.doc, "Ping:Status") == "1" and trio.current_time() - start >= 600
    sim.deliver("jdoe")
    r = await c.request("Ping", ping_req(600))        # changes pending: answered at once
    assert text(r.doc, "Ping:Status") == "2"


async def test_many_parked_pings_released_per_user(sim, nursery):
    n = 60
    clients = []
    for k in range(n):
        c = await ready(sim, user=f"u{k}", device=f"D{k}")
        await initial_sync(c)
        clients.append(c)
    done = []

    async def ping(c):
        r = await c.request("Ping", ping_req(900))
        done.append((c.user, text(r.doc, "Ping:Status")))
    for c in clients:
        nursery.start_soon(ping, c)
    await wait_parked(sim, n)
    assert sim.connections >= n
    for c in clients[: n // 2]:
        sim.deliver(c.user)
    await wait_parked(sim, n - n // 2)
    with trio.fail_after(5):
        while len(done) < n // 2:
            await trio.sleep(0.01)
    assert sorted(done) == sorted((c.user, "2") for c in clients[: n // 2])


# -- libwbxml reads every kind of answer -------------------------------------------------------

@pytest.mark.skipif(shutil.which("wbxml2xml") is None, reason="libwbxml2-utils not installed")
async def test_answers_readable_by_libwbxml(sim, tmp_path):
    i = first_index(lambda m: m.attachments and len(m.attachments[0][2]) < 400_000)
    sim.deliver("jdoe", count=i + 1)
    answers = {}
    c = client(sim)
    answers["provision1"] = (await c.request("Provision", (REAL_SERVER / "prov1.req.wbxml").read_bytes())).body
    await c.provision()
    answers["foldersync"] = (await c.request("FolderSync", E("FolderHierarchy:FolderSync",
                                                             E("FolderHierarchy:SyncKey", "0")))).body
    for btype in (1, 2, 4):
        d = await ready(sim, device=f"LW{btype}")
        key = await initial_sync(d)
        answers[f"sync{btype}"] = (await d.request("Sync", sync_req(key, "1", body_pref(btype), window=100))).body
    msg, ref, _ = await _synced_attachment(sim, await ready(sim, user="other", device="LWA"))
    io = await ready(sim, user="other", device="LWB")
    answers["itemops"] = (await io.request("ItemOperations", E("ItemOperations:ItemOperations", E(
        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", ref))))).body
    answers["ping"] = (await c.request("Ping", ping_req(60))).body
    answers["settings"] = (await c.request("Settings", E("Settings:Settings", E("Settings:UserInformation",
                                                                               E("Settings:Get"))))).body
    for name, body in answers.items():
        src = tmp_path / f"{name}.wbxml"
        out = tmp_path / f"{name}.xml"
        src.write_bytes(body)
        proc = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["wbxml2xml", "-l", "ACTIVESYNC", "-m", "0", "-o", str(out), str(src)],
            capture_output=True, timeout=60))
        assert proc.returncode == 0, (name, proc.stderr)
        assert out.read_text().count("<") > 3, name
    assert CORPUS.message(0).subject in (tmp_path / "sync2.xml").read_text()
    assert "<Type>9</Type>" in (tmp_path / "foldersync.xml").read_text()


# -- TLS, a replaced Ping, the side door ---------------------------------------------------

async def test_over_tls_with_trustme(nursery):
    import ssl

    import trustme
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    s = MailboxSimulator(password="secret", seed=SEED)
    await nursery.start(lambda task_status: s.serve("127.0.0.1", 0, ssl_context=server_ctx,
                                                    task_status=task_status))
    c = EasClient("127.0.0.1", s.port, "jdoe", "secret", "TLS1", ssl_context=client_ctx)
    await c.provision()
    s.deliver("jdoe")
    key = await initial_sync(c)
    r = await c.request("Sync", sync_req(key, "1", body_pref(2)))
    assert text(find(adds(r)[0], "AirSync:ApplicationData", "AirSyncBase:Body", "AirSyncBase:Data")) \
        == CORPUS.message(0).html
    # a plain-HTTP client gets nothing useful from the TLS port
    plain = client(s)
    with pytest.raises((ConnectionError, trio.BrokenResourceError, OSError)):
        r = await plain.request("", method="OPTIONS")
        if r.status >= 400:
            raise ConnectionError(r.status)


async def test_second_ping_from_same_device_replaces_the_first(sim, nursery):
    c1 = await ready(sim)
    await initial_sync(c1)
    c2 = client(sim)                  # same user and device, another connection
    c2.policy_key = c1.policy_key
    got = []

    async def ping(c, hb):
        got.append(text((await c.request("Ping", ping_req(hb))).doc, "Ping:Status"))
    nursery.start_soon(ping, c1, 900)
    await wait_parked(sim, 1)
    nursery.start_soon(ping, c2, 900)
    with trio.fail_after(5):
        while not got:
            await trio.sleep(0.01)
    assert got == ["1"] and sim.parked == 1
    sim.deliver("jdoe")
    with trio.fail_after(5):
        while len(got) < 2:
            await trio.sleep(0.01)
    assert got == ["1", "2"] and sim.parked == 0


async def test_side_door_deliver_and_stats(sim):
    c = client(sim)
    r = await c.send("POST", "/sim/deliver?user=alice&count=3", [("host", "x")], b"")
    assert r.status == 200 and len(sim.mailbox("alice").folder("1")) == 3
    r = await c.send("POST", "/sim/deliver?prefix=dev&users=4", [("host", "x")], b"")
    assert r.status == 200 and all(len(sim.mailbox(f"dev{k}").folder("1")) == 1 for k in range(4))
    r = await c.send("GET", "/sim/stats", [("host", "x")], b"")
    import json
    st = json.loads(r.body)
    assert st["delivered"] == 7 and st["mailboxes"] == 5 and st["parked"] == 0
    # the same mailbox whatever the spelling of the user
    assert sim.mailbox("CORP\\Alice") is sim.mailbox("alice@seg-fast.test")


async def test_sync_answer_has_the_shape_of_the_real_server(sim):
    i = first_index(lambda m: m.attachments and len(m.attachments[0][2]) < 400_000)
    sim.deliver("jdoe", count=i + 1)
    c = await ready(sim)
    key = await initial_sync(c)
    # the real device's request, with our SyncKey and Inbox id
    req = decode((REAL_SERVER / "sync1.req.wbxml").read_bytes())
    coll = find(req, "AirSync:Collections", "AirSync:Collection")
    find(coll, "AirSync:SyncKey").text = key
    find(coll, "AirSync:CollectionId").text = "1"
    r = await c.request("Sync", req)
    real = decode((REAL_SERVER / "sync1.resp.wbxml").read_bytes())
    # Z-Push writes the flag status and Email2:LastVerbExecuted; Exchange sends an empty Flag
    optional = ("/Email:Flag/Email:Status", "/Email2:LastVerbExecuted")
    missing = {p for p in tag_paths(real) - tag_paths(r.doc) if not p.endswith(optional)}
    assert missing == set()
    assert len(adds(r)) == i + 1


async def test_ping_released_by_another_devices_move(sim, nursery):
    sim.deliver("jdoe", count=1)
    phone = await ready(sim, device="PHONE")
    tablet = await ready(sim, device="TABLET")
    sids = {}
    for c in (phone, tablet):
        key = await initial_sync(c)
        r = await c.request("Sync", sync_req(key, "1"))
        sids[c.device_id] = text(adds(r)[0], "AirSync:ServerId")
        await initial_sync(c, "3")          # Deleted Items
    got = []

    async def ping():
        r = await tablet.request("Ping", ping_req(900, folders=("1", "3")))
        got.append(r.doc)
    nursery.start_soon(ping)
    await wait_parked(sim, 1)
    mv = await phone.request("MoveItems", E("Move:MoveItems", E("Move:Move", E("Move:SrcMsgId", sids["PHONE"]),
                             E("Move:SrcFldId", "1"), E("Move:DstFldId", "3"))))
    assert text(mv.doc, "Move:Response", "Move:Status") == "3"
    with trio.fail_after(5):
        while not got:
            await trio.sleep(0.01)
    assert text(got[0], "Ping:Status") == "2"
    assert sorted(f.text for f in kids(find(got[0], "Ping:Folders"), "Ping:Folder")) == ["1", "3"]


async def test_older_protocols_provision_and_settings(sim):
    old = client(sim, device="WM25", version="2.5")
    r = await old.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
    assert r.status == 449
    await old.provision()                    # MS-WAP-Provisioning-XML for 2.5
    assert old.policy_key
    r = await old.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
    assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "1"
    c12 = await ready(sim, device="E2007", version="12.1")
    r = await c12.request("Settings", E("Settings:Settings", E("Settings:UserInformation", E("Settings:Get"))))
    assert text(r.doc, "Settings:UserInformation", "Settings:Get", "Settings:EmailAddresses",
                "Settings:SmtpAddress") == "jdoe@seg-fast.test"
    # 12.1 GetItemEstimate names the class and filter
    sim.deliver("jdoe", count=2)
    key = await initial_sync(c12)
    r = await c12.request("GetItemEstimate", E("GetItemEstimate:GetItemEstimate", E(
        "GetItemEstimate:Collections", E("GetItemEstimate:Collection", E("GetItemEstimate:Class", "Email"),
                                         E("AirSync:SyncKey", key), E("GetItemEstimate:CollectionId", "1"),
                                         E("AirSync:FilterType", 0)))))
    assert text(r.doc, "GetItemEstimate:Response", "GetItemEstimate:Collection", "GetItemEstimate:Estimate") == "2"
    # a stale key: Status 4
    r = await c12.request("GetItemEstimate", E("GetItemEstimate:GetItemEstimate", E(
        "GetItemEstimate:Collections", E("GetItemEstimate:Collection", E("AirSync:SyncKey", "77"),
                                         E("GetItemEstimate:CollectionId", "1")))))
    assert text(r.doc, "GetItemEstimate:Response", "GetItemEstimate:Status") == "4"
    r = await c12.request("GetItemEstimate", E("GetItemEstimate:GetItemEstimate", E(
        "GetItemEstimate:Collections", E("GetItemEstimate:Collection", E("AirSync:SyncKey", "1"),
                                         E("GetItemEstimate:CollectionId", "4")))))
    assert text(r.doc, "GetItemEstimate:Response", "GetItemEstimate:Status") == "3"
