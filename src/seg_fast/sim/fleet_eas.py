"""What a fleet device says in ActiveSync 14.1, and how it checks each answer.

Request bodies are built with the codec (``seg_fast.sim.tree.E``; Sync's from a
template with the SyncKey patched in); answers arrive already compared byte for byte
with what the simulator sent (``Device.call``), or, with email security on, are
checked by ``seg_fast.sim.oracle``; then they are checked against what the device
knows to be true (the messages it was delivered, the attachment sizes it was told).
Sync and Fetch answers are checked through their facts (facts.py): the record the
simulator made as it built a byte-checked answer (one in ``CROSSCHECK_EVERY`` also
decoded, and required to give that record), else the same facts taken from the
decoded answer. Any mismatch is a recorded failure: this is the "every request
answered correctly" of the sizing benchmark.
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from seg_fast.errors import SegFastError
from seg_fast.sim import checks, facts, oracle
from seg_fast.sim.commands import find_attachment
from seg_fast.sim.tree import E, decode, encode, find, kids, text

if TYPE_CHECKING:
    from seg_fast.sim.fleet import Device, HttpConn

INBOX = "1"
WINDOW = 25
SETUP_TRUNCATION = 4096       # the first download: headers and the start of each body
FOLDERS_EXPECTED = 9          # the simulator's hierarchy (Inbox .. Notes)
SEND_BYTES = 20 * 1024        # BENCH-PROFILE: 20 KB MIME outbound
# One in this many answers checked by the simulator's record is decoded as well and
# must give the same facts (a simulator whose bytes and record disagree fails the run)
CROSSCHECK_EVERY = 16
_PING_CACHE: dict[int, bytes] = {}
_SEND_TEXT: dict[int, bytes] = {}


def _decode(dev: "Device", cmd: str, answer: bytes):
    try:
        return decode(answer)
    except SegFastError as exc:
        dev.fleet.stats.fail(f"{cmd}.wbxml", f"{dev.device_id} undecodable answer: {exc}")
        return None


def _status(dev: "Device", cmd: str, got: str | None, want: str = "1") -> bool:
    if got != want:
        dev.fleet.stats.fail(f"{cmd}.status", f"{dev.device_id} Status {got!r}, expected {want}")
        return False
    return True


# -- Provision ------------------------------------------------------------------------

async def provision(dev: "Device", conn: "HttpConn") -> tuple[bool, str]:
    body = encode(E("Provision:Provision", E("Provision:Policies", E(
        "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML")))))
    root = await _call(dev, conn, "Provision", body, None)
    if root is None or not _status(dev, "Provision", text(root, "Provision:Status")):
        return False, ""
    temp = text(root, "Provision:Policies", "Provision:Policy", "Provision:PolicyKey")
    if not temp:
        dev.fleet.stats.fail("Provision.key", f"{dev.device_id} no temporary PolicyKey")
        return False, ""
    dev.policy_key = temp
    body = encode(E("Provision:Provision", E("Provision:Policies", E(
        "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"),
        E("Provision:PolicyKey", temp), E("Provision:Status", 1)))))
    root = await _call(dev, conn, "Provision", body, None)
    if root is None or not _status(dev, "Provision", text(root, "Provision:Status")):
        return False, ""
    final = text(root, "Provision:Policies", "Provision:Policy", "Provision:PolicyKey")
    if not final:
        dev.fleet.stats.fail("Provision.key", f"{dev.device_id} no final PolicyKey")
        return False, ""
    return True, final


async def _call(dev: "Device", conn: "HttpConn", cmd: str, body: bytes, key: str | None,
                extra: list | None = None):
    res = await dev.call(conn, cmd, body, key)
    answer = dev.check_http(cmd, res)
    if answer is None:
        return None
    return _decode(dev, cmd, answer)


# -- FolderSync -----------------------------------------------------------------------

async def folder_sync(dev: "Device", conn: "HttpConn", key: str | None) -> bool:
    initial = dev.folder_key == "0"
    body = encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", dev.folder_key)))
    root = await _call(dev, conn, "FolderSync", body, key)
    if root is None or not _status(dev, "FolderSync", text(root, "FolderHierarchy:Status")):
        return False
    new_key = text(root, "FolderHierarchy:SyncKey")
    changes = find(root, "FolderHierarchy:Changes")
    adds = list(kids(changes, "FolderHierarchy:Add"))
    if initial and len(adds) != FOLDERS_EXPECTED:
        dev.fleet.stats.fail("FolderSync.folders", f"{dev.device_id} {len(adds)} folders, expected {FOLDERS_EXPECTED}")
        return False
    if not initial and adds:
        dev.fleet.stats.fail("FolderSync.changes", f"{dev.device_id} folder changes out of nowhere")
        return False
    if not new_key:
        dev.fleet.stats.fail("FolderSync.key", f"{dev.device_id} no SyncKey")
        return False
    dev.folder_key = new_key
    return True


# -- Sync -----------------------------------------------------------------------------

def sync_tree(sync_key: str, body_type: int, truncation: int | None = None):
    if sync_key == "0":
        coll = E("AirSync:Collection", E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", INBOX))
    else:
        options = [E("AirSync:FilterType", 0)]
        if body_type == 4:
            options.append(E("AirSync:MIMESupport", 2))
        options.append(E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", body_type),
                         E("AirSyncBase:TruncationSize", truncation)))
        coll = E("AirSync:Collection", E("AirSync:SyncKey", sync_key),
                 E("AirSync:CollectionId", INBOX), E("AirSync:DeletesAsMoves", 1),
                 E("AirSync:GetChanges"), E("AirSync:WindowSize", WINDOW),
                 E("AirSync:Options", *options))
    return E("AirSync:Sync", E("AirSync:Collections", coll))


_SYNC_KEY_MARK = "\u2603SYNCKEY\u2603"
_SYNC_TEMPLATES: dict[tuple[int, int | None], tuple[bytes, bytes]] = {}


def sync_body(dev: "Device", truncation: int | None = None) -> bytes:
    """The Sync request, encoded once per (body type, truncation) with a marker for
    the SyncKey (an inline string) and patched per request."""
    if dev.sync_key == "0":
        return encode(sync_tree("0", dev.body_type))
    tmpl = _SYNC_TEMPLATES.get((dev.body_type, truncation))
    if tmpl is None:
        pre, _, post = encode(sync_tree(_SYNC_KEY_MARK, dev.body_type, truncation)).partition(
            _SYNC_KEY_MARK.encode())
        tmpl = _SYNC_TEMPLATES[(dev.body_type, truncation)] = (pre, post)
    return tmpl[0] + dev.sync_key.encode() + tmpl[1]


async def sync(dev: "Device", conn: "HttpConn", key: str) -> bool:
    initial = dev.sync_key == "0"
    before = dev.delivered
    first_download = not initial and not dev.seen
    body = sync_body(dev, SETUP_TRUNCATION if first_download else None)
    res = await dev.call(conn, "Sync", body, None if (initial or first_download) else key)
    return sync_answer(dev, res, initial, first_download, before)


def sync_answer(dev: "Device", res, initial: bool, first_download: bool, before: int) -> bool:
    """A Sync answer (already byte-checked by ``Device.checked``; None: failed on the
    way) against what the device knows: also called by the shard's poller, which sends
    steady-state Syncs without a task (fleet.Parker)."""
    st = dev.fleet.stats
    answer = dev.check_http("Sync", res)
    if answer is None:
        return False
    got, raws, _root = _facts_of(dev, "Sync", res, facts.sync_of)
    if got is None:
        return False
    if got.top is not None:
        return _status(dev, "Sync", got.top)
    if not got.collection:
        st.fail("Sync.shape", f"{dev.device_id} no Collection in the answer")
        return False
    if not _status(dev, "Sync", got.status):
        return False
    new_key = got.sync_key
    if not new_key or new_key == dev.sync_key:
        st.fail("Sync.key", f"{dev.device_id} SyncKey {new_key!r} after {dev.sync_key!r}")
        return False
    dev.sync_key = new_key
    adds = got.adds
    if initial:
        if adds:
            st.fail("Sync.initial", f"{dev.device_id} items in the SyncKey 0 answer")
            return False
        return True
    seen = dev.seen
    for k, (sid, item) in enumerate(adds):
        if not sid or sid in seen:
            st.fail("Sync.duplicate", f"{dev.device_id} ServerId {sid!r} again or missing")
            return False
        seen.add(sid)
        if not check_item(dev, sid, item, raws[k] if raws is not None else None, first_download):
            return False
    dev.received += len(adds)
    # Never more than was delivered when the answer was built; at least one new item
    # unless the Sync was a retry with nothing pending.
    if dev.received > dev.delivered:
        st.fail("Sync.phantom", f"{dev.device_id} {dev.received} messages, {dev.delivered} delivered")
        return False
    if not adds and dev.received < before and not got.more:
        st.fail("Sync.missing", f"{dev.device_id} nothing new though {before - dev.received} pending")
        return False
    return True


def _facts_of(dev: "Device", cmd: str, res, read, decode: bool = False):
    """(facts, what ``read`` gives beside them, the decoded answer or None) of a
    checked answer ``res``: the simulator's record when it made one (``res[3]``: the
    answer arrived byte for byte as it sent it), one in ``CROSSCHECK_EVERY`` decoded
    as well and required to give the same facts; else (or ``decode``) read from the
    decoded answer by ``read(root) -> (facts, extra)``. facts None: a recorded failure."""
    st = dev.fleet.stats
    got = res[3]
    if got is not None and not decode and not dev.fleet.crosscheck():
        st.facts_checked += 1
        return got, None, None
    root = _decode(dev, cmd, res[2])
    if root is None:
        return None, None, None
    decoded, extra = read(root)
    if got is not None:
        st.facts_crosschecked += 1
        if decoded != got:
            st.fail(f"{cmd}.facts", f"{dev.device_id} the answer decodes to other facts than the simulator recorded")
            return None, None, None
    return decoded, extra, root


def _number(value: str | None) -> int:
    return int(value) if value is not None and value.isdigit() else -1


def check_item(dev: "Device", sid: str, item: facts.Item, raw: bytes | None, truncated_ok: bool) -> bool:
    """One Sync item's facts against what the device asked; ``raw`` (its body, when the
    answer was decoded) for the email-security oracle."""
    st = dev.fleet.stats
    strict = dev.fleet.strict
    if not item.body or item.data_len < 0 or (strict and item.body_type != str(dev.body_type)):
        st.fail("Sync.body", f"{dev.device_id} Body Type {item.body_type!r}, asked {dev.body_type}")
        return False
    size = item.estimated
    truncated = item.truncated
    if truncated and not truncated_ok:
        st.fail("Sync.truncated", f"{dev.device_id} body truncated though the whole was asked")
        return False
    want = min(_number(size), SETUP_TRUNCATION) if truncated else _number(size)
    if item.data_len != want:
        st.transformed += 1        # evidence that email security rewrote this body
        if strict:
            st.fail("Sync.size", f"{dev.device_id} body {item.data_len} bytes, EstimatedDataSize {size}")
            return False
    if strict and dev.body_type == 4 and not item.mime_head:
        st.fail("Sync.mime", f"{dev.device_id} Type 4 body without a MIME header block")
        return False
    for ref, size, _name in item.attachments:
        if ref and size and size.isdigit():
            dev.attachments.append((ref, int(size)))
    if dev.fleet.security and not truncated:
        if raw is None:
            st.fail("Sync.security", f"{dev.device_id} item {sid} not decoded: the oracle cannot check it")
            return False
        why = security_item(dev, sid, raw, [name for _r, _s, name in item.attachments])
        if why:
            st.fail("Sync.security", f"{dev.device_id} {why}")
            return False
    return True


def security_item(dev: "Device", sid: str, raw: bytes, names: list[str]) -> str | None:
    """Email security on: this Sync item against the message the simulator sent."""
    found = dev.fleet.sim.mailbox(dev.user).find(sid)
    if found is None:
        return f"ServerId {sid} is not in the mailbox"
    msg = dev.fleet.sim.corpus.message(found[1].msg)
    managed = dev.managed
    why = oracle.attachment_list_ok(names, msg, managed)
    if why:
        return why
    st = dev.fleet.stats
    if dev.body_type == 2:
        st.checked_bodies += 1
        if msg.signed:     # S/MIME is exempt: the body as the server sent it
            return None if raw == msg.html.encode() else "S/MIME message's body changed (it is exempt)"
        return oracle.body_ok(raw, msg.html)
    why = oracle.mime_cheap_ok(raw, msg, managed)
    if why or not oracle.sampled(dev.device_id, sid):
        return why
    st.checked_bodies += 1
    # parsed with the email package in the oracle's thread (sim/checks.py)
    dev.fleet.checks.run("Sync.security", dev.device_id, oracle.mime_full_ok, raw, msg, managed, dev.opener)
    return None


# -- Ping -----------------------------------------------------------------------------

def ping_body(heartbeat: int) -> bytes:
    body = _PING_CACHE.get(heartbeat)
    if body is None:
        body = _PING_CACHE[heartbeat] = encode(E(
            "Ping:Ping", E("Ping:HeartbeatInterval", heartbeat),
            E("Ping:Folders", E("Ping:Folder", E("Ping:Id", INBOX), E("Ping:Class", "Email")))))
    return body


# The simulator's Ping answers are a handful of fixed documents: after the byte check
# (the answer is what the simulator sent) the known ones are told by comparison alone.
_PING_KNOWN = {encode(E("Ping:Ping", E("Ping:Status", 1))): 1,
               encode(E("Ping:Ping", E("Ping:Status", 2), E("Ping:Folders", E("Ping:Folder", INBOX)))): 2}


def ping_status(answer: bytes) -> int:
    known = _PING_KNOWN.get(answer)
    if known is not None:
        return known
    try:
        return int(text(decode(answer), "Ping:Status") or -1)
    except (SegFastError, ValueError):
        return -1


# -- foreground work --------------------------------------------------------------------

def _send_mime(dev: "Device", n: str) -> bytes:
    """A 20 KB reply: the head names this send, the text comes from a corpus message
    of the shard's pool (built already; its 20 KB cut kept per pool slot)."""
    corpus = dev.fleet.sim.corpus
    slot = zlib.crc32(n.encode()) % corpus.pool
    msg = corpus.message(slot)
    head = (f"From: {dev.user}@seg-fast.test\r\nTo: {msg.sender}\r\n"
            f"Subject: Re: {msg.subject}\r\nMessage-ID: <{n}.{dev.device_id}@fleet>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n").encode()
    text_ = _SEND_TEXT.get(slot)
    if text_ is None:
        text_ = msg.text.replace("\n", "\r\n").encode()
        while len(text_) < SEND_BYTES:
            text_ += text_
        text_ = _SEND_TEXT[slot] = text_[:SEND_BYTES]
    return head + text_[:SEND_BYTES - len(head)]


async def send_mail(dev: "Device", conn: "HttpConn", key: str) -> bool:
    body = encode(E("ComposeMail:SendMail", E("ComposeMail:ClientId", key.replace(":", "-")),
                    E("ComposeMail:SaveInSentItems"), E("ComposeMail:Mime", _send_mime(dev, key))))
    res = await dev.call(conn, "SendMail", body, key)
    if res is None:
        return False
    status, answer = res[0], res[2]
    if status != 200:
        dev.fleet.stats.fail(f"SendMail.http{status}", f"{dev.device_id} HTTP {status}")
        return False
    if answer:  # success is an empty body; a body carries a failure Status
        root = _decode(dev, "SendMail", answer)
        return root is not None and _status(dev, "SendMail", text(root, "ComposeMail:Status"), "1")
    return True


async def fetch(dev: "Device", conn: "HttpConn", key: str) -> bool:
    st = dev.fleet.stats
    if not dev.attachments:
        st.fetch_skipped += 1     # nothing to fetch yet: counted, not faked
        return True
    # the newest attachment not opened yet, else one opened before (users do)
    if dev.fetched < len(dev.attachments):
        ref, size = dev.attachments[dev.fetched]
        dev.fetched += 1
    else:
        ref, size = dev.attachments[zlib.crc32(key.encode()) % len(dev.attachments)]
    st.fetch_sizes[key] = size
    body = encode(E("ItemOperations:ItemOperations", E(
        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
        E("AirSyncBase:FileReference", ref))))
    res = await dev.call(conn, "ItemOperations", body, key)
    if dev.check_http("ItemOperations", res) is None:
        return False
    security = dev.fleet.security
    # with email security on the oracle needs the attachment itself: always decoded
    got, _, root = _facts_of(dev, "ItemOperations", res, lambda r: (facts.fetch_of(r), None), security)
    if got is None:
        return False
    if not _status(dev, "ItemOperations", got.status) or not _status(dev, "ItemOperations", got.fetch_status):
        return False
    if got.data_len < 0:
        st.fail("ItemOperations.data", f"{dev.device_id} no Data for {ref}")
        return False
    n = got.data_len
    if security:
        # the attachment itself, for the oracle (sealed or passed, compared byte for byte)
        d = find(root, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Properties",
                 "ItemOperations:Data")
        found = find_attachment(dev.fleet.sim.mailbox(dev.user), dev.fleet.sim, ref)
        if found is None:
            st.fail("ItemOperations.ref", f"{dev.device_id} {ref} names no attachment")
            return False
        sid = ref.rpartition(":")[0]
        item = dev.fleet.sim.mailbox(dev.user).find(sid)
        exempt = item is not None and dev.fleet.sim.corpus.message(item[1].msg).signed
        if len(res[2]) >= checks.BIG:
            # decoded, opened and compared in the oracle's thread (sim/checks.py)
            n = len(d.opaque) if d.opaque is not None else facts.base64_len(d.text or "")
            dev.fleet.checks.run("ItemOperations.security", dev.device_id, _fetched_why, st, d, found,
                                 dev.managed, dev.opener, exempt)
        else:
            raw = _data_of(d)
            n = len(raw)
            why = oracle.fetched_ok(raw, found[0], found[2], dev.managed, dev.opener, exempt)
            if why:
                st.fail("ItemOperations.security", f"{dev.device_id} {why}")
                return False
            if raw.startswith(oracle.ENVELOPE_MAGIC):
                st.envelope_opened()
    if n != size:
        st.transformed += 1
        if dev.fleet.strict or not n:
            st.fail("ItemOperations.size", f"{dev.device_id} {n} bytes for {ref}, expected {size}")
            return False
    return True


def _data_of(d) -> bytes:
    return d.opaque if d.opaque is not None else checks.b64decode(d.text or "")


def _fetched_why(st, d, found, managed: bool, opener, exempt: bool) -> str | None:
    raw = _data_of(d)
    why = oracle.fetched_ok(raw, found[0], found[2], managed, opener, exempt)
    if why is None and raw.startswith(oracle.ENVELOPE_MAGIC):
        st.envelope_opened()
    return why


_MISC = ("FolderSync", "GetItemEstimate", "Settings")


async def misc(dev: "Device", conn: "HttpConn", key: str) -> bool:
    which = _MISC[(dev.idx + int(key.rsplit("m", 1)[1])) % len(_MISC)]
    if which == "FolderSync":
        return await folder_sync(dev, conn, key)
    if which == "Settings":
        body = encode(E("Settings:Settings", E("Settings:UserInformation", E("Settings:Get"))))
        root = await _call(dev, conn, "Settings", body, key)
        return root is not None and _status(dev, "Settings", text(root, "Settings:Status"))
    async with dev.sync_lock:
        # The lock may come from a Sync that was abandoned (the device gave up after a
        # failure, or the run stopped and cancelled it) after the simulator answered
        # it: the device's SyncKey is then one behind, and a GetItemEstimate naming it
        # gets Status 4. A phone that is gone or switched off sends nothing more.
        if dev.sync_key == "0" or not dev.alive or dev.fleet.stopping:
            return True
        body = encode(E("GetItemEstimate:GetItemEstimate", E("GetItemEstimate:Collections", E(
            "GetItemEstimate:Collection", E("AirSync:SyncKey", dev.sync_key),
            E("GetItemEstimate:CollectionId", INBOX)))))
        root = await _call(dev, conn, "GetItemEstimate", body, key)
    if root is None:
        return False
    r = find(root, "GetItemEstimate:Response")
    return _status(dev, "GetItemEstimate", text(r, "GetItemEstimate:Status"))
