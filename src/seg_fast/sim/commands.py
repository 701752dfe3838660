"""The simulator's EAS command handlers (sans-IO): request tree in, answer out.

Each handler takes a ``Ctx`` (the mailbox, the device, the protocol version, the
decoded request) and returns an ``Answer``. Ping's waiting is done by the I/O
shell in mailbox.py; here are only its parsing and its answers.
"""
from __future__ import annotations

import base64
import functools
import random
from typing import TYPE_CHECKING, NamedTuple

from seg_fast.eas.multipart import build_multipart
from seg_fast.sim import facts
from seg_fast.sim.corpus import Message
from seg_fast.sim.splice import HOLE, Splices, Template
from seg_fast.sim.state import DELETED, FOLDER_IDS, FOLDERS, SENT, Item, Mailbox, SyncState
from seg_fast.sim.tree import E, Element, data, encode, find, kids, text

if TYPE_CHECKING:
    from seg_fast.sim.mailbox import MailboxSimulator
    from seg_fast.sim.query import Query

WBXML_TYPE = b"application/vnd.ms-sync.wbxml"
MULTIPART_TYPE = b"application/vnd.ms-sync.multipart"
MAX_WINDOW = 512
# Ping heartbeat bounds (seconds). Exchange allows 60-3540; the simulator lets
# tests use short ones.
MIN_HEARTBEAT, MAX_HEARTBEAT = 1, 3540
MAX_PING_FOLDERS = 300
# 2.5 Truncation / MIMETruncation codes (MS-ASCMD) -> characters (bytes: the corpus is
# ASCII); None = the whole body
TRUNCATION_CODES = {0: 0, 1: 4096, 2: 5120, 3: 7168, 4: 10240, 5: 20480, 6: 51200,
                    7: 102400, 8: None}


class Answer(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # what a device's check reads from the body (facts.Sync / facts.Fetch), recorded
    # as it was built; None where nobody recorded them
    facts: object = None


class Ctx:
    __slots__ = ("sim", "mbox", "dev", "version", "query", "doc", "raw", "multipart", "splices")

    def __init__(self, sim: "MailboxSimulator", mbox: Mailbox, dev, version: int,
                 query: "Query", doc: Element | None, raw: bytes, multipart: bool):
        self.sim = sim
        self.mbox = mbox
        self.dev = dev
        self.version = version      # 25, 120, 121, 140, 141, 160, 161
        self.query = query
        self.doc = doc
        self.raw = raw
        self.multipart = multipart
        # Cached subtrees this answer puts back (splice.py); None: build every tree
        self.splices = Splices() if sim.splice_cache is not None else None


def wbxml(el: Element, ctx: Ctx | None = None, recorded=None) -> Answer:
    if ctx is not None and ctx.splices is not None:
        return Answer(200, [(b"content-type", WBXML_TYPE)], ctx.splices.encode(el), recorded)
    return Answer(200, [(b"content-type", WBXML_TYPE)], encode(el), recorded)


def empty() -> Answer:
    return Answer(200, [], b"")


def version_number(version: str) -> int:
    major, _, minor = version.partition(".")
    return int(major) * 10 + int(minor or 0)


# -- provisioning ----------------------------------------------------------------------

# The command's own root element, for Status 142 answers (protocol 14.0+).
ROOTS = {
    "Sync": "AirSync:Sync", "FolderSync": "FolderHierarchy:FolderSync", "Ping": "Ping:Ping",
    "ItemOperations": "ItemOperations:ItemOperations", "SendMail": "ComposeMail:SendMail",
    "SmartReply": "ComposeMail:SmartReply", "SmartForward": "ComposeMail:SmartForward",
    "GetItemEstimate": "GetItemEstimate:GetItemEstimate", "MoveItems": "Move:MoveItems",
    "Settings": "Settings:Settings", "Search": "Search:Search",
    "FolderCreate": "FolderHierarchy:FolderCreate", "FolderDelete": "FolderHierarchy:FolderDelete",
    "FolderUpdate": "FolderHierarchy:FolderUpdate",
    "ResolveRecipients": "ResolveRecipients:ResolveRecipients",
    "ValidateCert": "ValidateCert:ValidateCert", "MeetingResponse": "MeetingResponse:MeetingResponse",
}


def provisioning_required(command: str, version: int, sent_key: str | None) -> Answer:
    """HTTP 449 for 12.1 and older; Status 142 (no key) / 144 (wrong key) for 14.0+."""
    root = ROOTS.get(command)
    if version < 140 or root is None:
        return Answer(449, [], b"")
    return wbxml(E(root, E(root.split(":")[0] + ":Status", 142 if sent_key in (None, "", "0") else 144)))


POLICY = (  # EASProvisionDoc settings, in the spec's order: a permissive demo policy
    ("DevicePasswordEnabled", 0), ("AlphanumericDevicePasswordRequired", 0),
    ("PasswordRecoveryEnabled", 0), ("RequireStorageCardEncryption", 0),
    ("AttachmentsEnabled", 1), ("MinDevicePasswordLength", 4),
    ("MaxInactivityTimeDeviceLock", 900), ("MaxDevicePasswordFailedAttempts", 8),
    ("MaxAttachmentSize", 0), ("AllowSimpleDevicePassword", 1),
    ("DevicePasswordExpiration", 0), ("DevicePasswordHistory", 0),
    ("AllowStorageCard", 1), ("AllowCamera", 1), ("RequireDeviceEncryption", 0),
    ("AllowUnsignedApplications", 1), ("AllowUnsignedInstallationPackages", 1),
    ("MinDevicePasswordComplexCharacters", 1), ("AllowWiFi", 1), ("AllowTextMessaging", 1),
    ("AllowPOPIMAPEmail", 1), ("AllowBluetooth", 2), ("AllowIrDA", 1),
    ("RequireManualSyncWhenRoaming", 0), ("AllowDesktopSync", 1), ("MaxCalendarAgeFilter", 0),
    ("AllowHTMLEmail", 1), ("MaxEmailAgeFilter", 0), ("MaxEmailBodyTruncationSize", -1),
    ("MaxEmailHTMLBodyTruncationSize", -1), ("RequireSignedSMIMEMessages", 0),
    ("RequireEncryptedSMIMEMessages", 0), ("RequireSignedSMIMEAlgorithm", 0),
    ("RequireEncryptionSMIMEAlgorithm", 0), ("AllowSMIMEEncryptionAlgorithmNegotiation", 2),
    ("AllowSMIMESoftCerts", 1), ("AllowBrowser", 1), ("AllowConsumerEmail", 1),
    ("AllowRemoteDesktop", 1), ("AllowInternetSharing", 1),
)
WAP_POLICY = ('<wap-provisioningdoc><characteristic type="SecurityPolicy">'
              '<parm name="4131" value="1"/><parm name="4133" value="1"/>'
              "</characteristic></wap-provisioningdoc>")


def provision(ctx: Ctx) -> Answer:
    doc, dev = ctx.doc, ctx.dev
    if doc is None or doc.tag != "Provision:Provision":
        return wbxml(E("Provision:Provision", E("Provision:Status", 2)))
    out = [E("Provision:Status", 1)]
    if find(doc, "Settings:DeviceInformation") is not None:
        out.append(E("Settings:DeviceInformation", E("Settings:Status", 1)))
    if find(doc, "Provision:RemoteWipe") is not None:      # wipe acknowledged: nothing to do
        out.append(E("Provision:RemoteWipe"))
    policy = find(doc, "Provision:Policies", "Provision:Policy")
    if policy is not None:
        ptype = text(policy, "Provision:PolicyType", default="")
        key = text(policy, "Provision:PolicyKey")
        if ptype not in ("MS-EAS-Provisioning-WBXML", "MS-WAP-Provisioning-XML"):
            reply = [E("Provision:PolicyType", ptype), E("Provision:Status", 3)]
        elif key in (None, "", "0"):
            # Step 1: the policy document and a temporary key.
            dev.temp_key = _policy_key(ctx, "temp")
            dev.policy_key = None
            if len(out) == 1 and ptype == "MS-EAS-Provisioning-WBXML":
                # every device's set-up asks for it: encoded once, the key put in
                return Answer(200, [(b"content-type", WBXML_TYPE)], _policy_answer(dev.temp_key))
            body = (E("Provision:EASProvisionDoc", *[E("Provision:" + k, v) for k, v in POLICY])
                    if ptype == "MS-EAS-Provisioning-WBXML" else WAP_POLICY)
            reply = [E("Provision:PolicyType", ptype), E("Provision:Status", 1),
                     E("Provision:PolicyKey", dev.temp_key), E("Provision:Data", body)]
        elif key == dev.temp_key:
            # Step 2: the device acknowledged the policy; the final key.
            dev.policy_key = _policy_key(ctx, "final")
            dev.temp_key = None
            reply = [E("Provision:PolicyType", ptype), E("Provision:Status", 1),
                     E("Provision:PolicyKey", dev.policy_key)]
        else:
            reply = [E("Provision:PolicyType", ptype), E("Provision:Status", 5)]
        out.append(E("Provision:Policies", E("Provision:Policy", *reply)))
    return wbxml(E("Provision:Provision", *out))


def _policy_tree(key: str) -> Element:
    """Provision step 1's answer to a device that sent nothing else (the fleet's)."""
    doc = E("Provision:EASProvisionDoc", *[E("Provision:" + k, v) for k, v in POLICY])
    return E("Provision:Provision", E("Provision:Status", 1), E("Provision:Policies", E(
        "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"),
        E("Provision:Status", 1), E("Provision:PolicyKey", key), E("Provision:Data", doc))))


@functools.lru_cache(maxsize=1)
def _policy_parts() -> tuple[bytes, bytes] | None:
    """The encoded step-1 answer around its PolicyKey's text (an inline string: no
    length to patch), or None if the codec did not encode it so (every answer is then
    encoded whole). Proved on keys of both lengths a key can have (9 and 10 digits)."""
    mark = "\x01policykey\x01"
    whole = encode(_policy_tree(mark))
    at = whole.find(mark.encode())
    if at < 0 or whole.count(mark.encode()) != 1:
        return None
    parts = (whole[:at], whole[at + len(mark):])
    for probe in ("100000000", "2147483647"):
        if parts[0] + probe.encode() + parts[1] != encode(_policy_tree(probe)):
            return None
    return parts


def _policy_answer(key: str) -> bytes:
    parts = _policy_parts()
    if parts is None:
        return encode(_policy_tree(key))
    return parts[0] + key.encode() + parts[1]


def _policy_key(ctx: Ctx, step: str) -> str:
    rng = random.Random(f"{ctx.sim.seed}/{ctx.mbox.user}/{ctx.dev.id}/{step}/{ctx.sim.next_serial()}")
    return str(rng.randrange(10**8, 2**31))


# -- FolderSync -----------------------------------------------------------------------

def folder_sync(ctx: Ctx) -> Answer:
    key = text(ctx.doc, "FolderHierarchy:SyncKey")
    dev = ctx.dev
    if key == "0":
        dev.folder_key = 1
        # the same for every device (SyncKey 1, the same folders): encoded once
        return Answer(200, [(b"content-type", WBXML_TYPE)], _first_folder_sync())
    if key is None or not dev.folder_key or key != str(dev.folder_key):
        return wbxml(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", 9)))
    return wbxml(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", 1),
                   E("FolderHierarchy:SyncKey", dev.folder_key),
                   E("FolderHierarchy:Changes", E("FolderHierarchy:Count", 0))))


@functools.lru_cache(maxsize=1)
def _first_folder_sync() -> bytes:
    adds = [E("FolderHierarchy:Add", E("FolderHierarchy:ServerId", sid),
              E("FolderHierarchy:ParentId", "0"), E("FolderHierarchy:DisplayName", name),
              E("FolderHierarchy:Type", ftype)) for sid, name, ftype, _ in FOLDERS]
    return encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", 1),
                    E("FolderHierarchy:SyncKey", 1),
                    E("FolderHierarchy:Changes", E("FolderHierarchy:Count", len(adds)), *adds)))


# -- bodies ---------------------------------------------------------------------------

class BodyPref(NamedTuple):
    type: int
    truncation: int | None
    all_or_none: bool


def body_preference(options: Element | None) -> BodyPref:
    """The first BodyPreference whose Type the simulator serves (1, 2, 4); else plain text."""
    for pref in kids(options, "AirSyncBase:BodyPreference"):
        t = _int(text(pref, "AirSyncBase:Type"), 1)
        if t in (1, 2, 4):
            trunc = text(pref, "AirSyncBase:TruncationSize")
            return BodyPref(t, _int(trunc, None) if trunc else None,
                            text(pref, "AirSyncBase:AllOrNone") == "1")
    return BodyPref(1, None, False)


def body_bytes(msg: Message, body_type: int) -> bytes:
    if body_type == 4:
        return msg.mime
    return (msg.html if body_type == 2 else msg.text).encode()


def _truncate(full: bytes, limit: int | None) -> tuple[str, bool]:
    if limit is None or len(full) <= limit:
        return full.decode("utf-8", "replace"), False
    return full[:limit].decode("utf-8", "ignore"), True


def body_element(msg: Message, pref: BodyPref, part: list[bytes] | None = None) -> Element:
    full = body_bytes(msg, pref.type)
    data_str, truncated = _truncate(full, pref.truncation)
    content: Element | None
    if truncated and pref.all_or_none:
        content = None
    elif part is not None:          # multipart ItemOperations: the body is a part
        part.append(data_str.encode())
        content = E("ItemOperations:Part", len(part))
    else:
        content = E("AirSyncBase:Data", data_str)
    return E("AirSyncBase:Body", E("AirSyncBase:Type", pref.type),
             E("AirSyncBase:EstimatedDataSize", len(full)),
             E("AirSyncBase:Truncated", int(truncated)), content)


def file_reference(server_id: str, k: int) -> str:
    return f"{server_id}:{k}"


def long_id(server_id: str) -> str:
    """A Search result's LongId (opaque to devices; ItemOperations Fetch takes it back)."""
    return "L" + server_id


def server_id_of(long: str) -> str:
    return long[1:] if long.startswith("L") else ""


def attachments_element(msg: Message, server_id: str) -> Element | None:
    if not msg.attachments:
        return None
    return E("AirSyncBase:Attachments", *[
        E("AirSyncBase:Attachment", E("AirSyncBase:DisplayName", name),
          E("AirSyncBase:FileReference", file_reference(server_id, k)),
          E("AirSyncBase:Method", 1), E("AirSyncBase:EstimatedDataSize", len(blob)),
          E("AirSyncBase:IsInline", 0))
        for k, (name, _ctype, blob) in enumerate(msg.attachments)])


def email_fields(msg: Message, item: Item) -> list[Element]:
    return [E("Email:To", msg.to), E("Email:From", msg.sender), E("Email:Subject", msg.subject),
            E("Email:DateReceived", msg.date.strftime("%Y-%m-%dT%H:%M:%S.000Z")),
            E("Email:DisplayTo", msg.to.split("@")[0]), E("Email:ThreadTopic", msg.subject),
            E("Email:Importance", 1), E("Email:Read", int(item.read))]


def message_class(msg: Message) -> str:
    return "IPM.Note.SMIME.MultipartSigned" if msg.signed else "IPM.Note"


def application_data(ctx: Ctx, sid: str, item: Item, options: Element | None,
                     record: list | None = None) -> Element:
    """``record``: (ServerId, facts.Item) appended (spliced answers only)."""
    if ctx.splices is None:
        return _application_data(ctx.sim.corpus.message(item.msg), sid, item, ctx.version, options)
    t = item_template(ctx, item, options, _shape(ctx, options))
    if record is not None:
        record.append((sid, facts.with_server_id(t.facts, HOLE, sid)))
    return ctx.splices.placeholder(t, sid)


def _shape(ctx: Ctx, options: Element | None) -> tuple:
    """What shapes an item's ApplicationData besides the message: the version class
    and the options the builders read (one look-up per collection, not per item)."""
    if ctx.version < 120:
        return (25, text(options, "AirSync:MIMESupport"), text(options, "AirSync:MIMETruncation"),
                text(options, "AirSync:Truncation"))
    return (120, body_preference(options))


def item_template(ctx: Ctx, item: Item, options: Element | None, shape: tuple) -> Template:
    """The item's ApplicationData encoded once (the ServerId a hole, filled per item)."""
    msg = ctx.sim.corpus.message(item.msg)
    key = (msg, item.read, shape)
    version, read = ctx.version, item.read

    def build() -> Template:
        stand_in = Item(item.msg)
        stand_in.read = read
        el = _application_data(msg, HOLE, stand_in, version, options)
        t = Template(el, len(msg.attachments), msg.mime)
        t.facts = facts.item_of(el)[0]
        return t
    return ctx.sim.splice_cache.get(key, build)


def _application_data(msg: Message, sid: str, item: Item, version: int, options: Element | None) -> Element:
    if version < 120:
        return E("AirSync:ApplicationData", *email_fields(msg, item), *_body_25(msg, sid, options),
                 E("Email:MessageClass", message_class(msg)))
    return E("AirSync:ApplicationData", *email_properties(msg, sid, item, options))


def email_properties(msg: Message, sid: str, item: Item, options: Element | None) -> list[Element]:
    """12.0+ Email properties of an item (Sync ApplicationData, Search Properties)."""
    return [*email_fields(msg, item), attachments_element(msg, sid),
            body_element(msg, body_preference(options)),
            E("Email:MessageClass", message_class(msg)), E("Email:InternetCPID", 65001),
            E("Email:Flag"), E("Email:ContentClass", "urn:content-classes:message"),
            E("AirSyncBase:NativeBodyType", 2)]


def _body_25(msg: Message, sid: str, options: Element | None) -> list[Element]:
    """Protocol 2.5: Email:Body (plain text) or Email:MIMEData, Email:Attachments."""
    mime_support = _int(text(options, "AirSync:MIMESupport"), 0)
    out = []
    if mime_support == 2 or (mime_support == 1 and msg.signed):
        limit = TRUNCATION_CODES.get(_int(text(options, "AirSync:MIMETruncation"), 8))
        s, cut = _truncate(msg.mime, limit)
        out += [E("Email:MIMETruncated", int(cut)), E("Email:MIMESize", len(msg.mime)),
                E("Email:MIMEData", s)]
    else:
        full = msg.text.encode()
        limit = TRUNCATION_CODES.get(_int(text(options, "AirSync:Truncation"), 8))
        s, cut = _truncate(full, limit)
        if cut:
            out += [E("Email:BodyTruncated", 1), E("Email:BodySize", len(full))]
        out.append(E("Email:Body", s))
    if msg.attachments:
        out.append(E("Email:Attachments", *[
            E("Email:Attachment", E("Email:AttMethod", 1), E("Email:AttSize", len(blob)),
              E("Email:DisplayName", name), E("Email:AttName", file_reference(sid, k)))
            for k, (name, _c, blob) in enumerate(msg.attachments)]))
    return out


# -- Sync -----------------------------------------------------------------------------

def sync(ctx: Ctx) -> Answer:
    doc = ctx.doc
    if doc is None:                         # empty Sync: repeat the last one (12.1+)
        doc = ctx.dev.last_sync
        if doc is None:
            return _sync_status(13)
    elif doc.tag != "AirSync:Sync":
        return _sync_status(4)
    else:
        ctx.dev.last_sync = doc
    # the first Collection's facts, as the device's check reads them (facts.py)
    record: list | None = [] if ctx.splices is not None else None
    colls = list(kids(find(doc, "AirSync:Collections"), "AirSync:Collection"))
    if not colls:
        return _sync_status(4)
    if len(colls) == 1 and record is not None:
        # one Collection (a phone's steady state): new items only are written by a frame
        out = _sync_collection(ctx, colls[0], record, framed=True)
        if type(out) is bytes:
            return Answer(200, [(b"content-type", WBXML_TYPE)], out, record[0])
        return wbxml(E("AirSync:Sync", E("AirSync:Collections", out)), ctx, record[0])
    out = [_sync_collection(ctx, c, record) for c in colls]
    return wbxml(E("AirSync:Sync", E("AirSync:Collections", *out)), ctx, record[0] if record else None)


def _sync_status(status: int) -> Answer:
    return wbxml(E("AirSync:Sync", E("AirSync:Status", status)),
                 recorded=facts.Sync(str(status), False, None, None, False, ()))


def _sync_collection(ctx: Ctx, coll: Element, record: list | None = None, framed: bool = False) -> Element | bytes:
    """One Collection of the answer; its facts appended to ``record`` (when not None).
    ``framed``: the whole answer's bytes instead, when it holds only new items and the
    request no Class (splice.SyncFrame; spliced answers only)."""
    dev = ctx.dev
    key = text(coll, "AirSync:SyncKey", default="")
    cid = text(coll, "AirSync:CollectionId", default="")
    cls = text(coll, "AirSync:Class")
    head = E("AirSync:Class", cls) if cls else None
    if cid not in FOLDER_IDS:
        if record is not None:
            record.append(facts.Sync(None, True, "8", key, False, ()))
        return E("AirSync:Collection", head, E("AirSync:SyncKey", key),
                 E("AirSync:CollectionId", cid), E("AirSync:Status", 8))
    if key == "0":
        dev.sync[cid] = SyncState()
        if record is not None:
            record.append(facts.Sync(None, True, "1", "1", False, ()))
        return E("AirSync:Collection", head, E("AirSync:SyncKey", 1),
                 E("AirSync:CollectionId", cid), E("AirSync:Status", 1))
    st = dev.sync.get(cid)
    if st is None or key not in (str(st.key), str(st.prev_key)):
        if record is not None:
            record.append(facts.Sync(None, True, "3", key, False, ()))
        return E("AirSync:Collection", head, E("AirSync:SyncKey", key),
                 E("AirSync:CollectionId", cid), E("AirSync:Status", 3))
    if key == str(st.prev_key):
        # The device never got our last answer: roll back and answer again.
        st.key, st.known = st.prev_key, set(st.prev_known)
    before = set(st.known)
    responses = _client_commands(ctx, cid, st, find(coll, "AirSync:Commands"))
    commands: list[Element] = []
    new: list[tuple[str, Item]] = []
    more = False
    get_changes = text(coll, "AirSync:GetChanges")
    options = None
    if get_changes in (None, "", "1"):
        window = min(max(_int(text(coll, "AirSync:WindowSize"), 100), 1), MAX_WINDOW)
        options = find(coll, "AirSync:Options")
        folder = ctx.mbox.folder(cid)
        gone = sorted(st.known - folder.keys(), key=_id_order)
        for sid in gone[:window]:
            commands.append(E("AirSync:Delete", E("AirSync:ServerId", sid)))
            st.known.discard(sid)
        more = len(gone) > window
        room = window - len(commands)
        for sid, item in folder.items():
            if sid in st.known:
                continue
            if len(new) >= room:
                more = True
                break
            new.append((sid, item))
            st.known.add(sid)
    # A new key on every answer (as Exchange does), so a retry is always recognisable.
    st.prev_key, st.prev_known = st.key, before
    st.key += 1
    if record is None:
        commands += [E("AirSync:Add", E("AirSync:ServerId", sid), application_data(ctx, sid, item, options))
                     for sid, item in new]
    else:
        shape = _shape(ctx, options) if new else None
        items = [(sid, item_template(ctx, item, options, shape)) for sid, item in new]
        record.append(facts.Sync(None, True, "1", str(st.key), more,
                                 tuple((sid, facts.with_server_id(t.facts, HOLE, sid)) for sid, t in items)))
        if framed and items and not commands and not responses and head is None:
            return ctx.sim.splice_cache.frame(more).encode(str(st.key), cid, items)
        commands += [E("AirSync:Add", E("AirSync:ServerId", sid), ctx.splices.placeholder(t, sid))
                     for sid, t in items]
    return E("AirSync:Collection", head, E("AirSync:SyncKey", st.key), E("AirSync:CollectionId", cid),
             E("AirSync:Status", 1), E("AirSync:MoreAvailable") if more else None,
             E("AirSync:Commands", *commands) if commands else None,
             E("AirSync:Responses", *responses) if responses else None)


def _client_commands(ctx: Ctx, cid: str, st: SyncState, cmds: Element | None) -> list[Element]:
    """Apply the device's own changes; return the Responses entries they need."""
    mbox = ctx.mbox
    responses: list[Element] = []
    for cmd in kids(cmds):
        sid = text(cmd, "AirSync:ServerId", default="")
        if cmd.tag == "AirSync:Change":
            found = mbox.find(sid)
            if found is None:
                responses.append(E("AirSync:Change", E("AirSync:ServerId", sid), E("AirSync:Status", 8)))
                continue
            read = text(cmd, "AirSync:ApplicationData", "Email:Read")
            if read is not None:
                found[1].read = read == "1"
        elif cmd.tag == "AirSync:Delete":
            if mbox.find(sid) is None:
                responses.append(E("AirSync:Delete", E("AirSync:ServerId", sid), E("AirSync:Status", 8)))
                continue
            if cid == DELETED:
                del mbox.folder(cid)[sid]
            else:
                mbox.move(sid, DELETED)
            st.known.discard(sid)
        elif cmd.tag == "AirSync:Add":
            # Drafts the device creates: kept as an empty corpus message 0 stand-in.
            new = mbox.add(cid, Item(0))
            st.known.add(new)
            responses.append(E("AirSync:Add", E("AirSync:ClientId", text(cmd, "AirSync:ClientId", default="")),
                               E("AirSync:ServerId", new), E("AirSync:Status", 1)))
        elif cmd.tag == "AirSync:Fetch":
            found = mbox.find(sid)
            if found is None:
                responses.append(E("AirSync:Fetch", E("AirSync:ServerId", sid), E("AirSync:Status", 8)))
            else:
                responses.append(E("AirSync:Fetch", E("AirSync:ServerId", sid), E("AirSync:Status", 1),
                                   application_data(ctx, sid, found[1], None)))
    return responses


# -- GetItemEstimate --------------------------------------------------------------------

def get_item_estimate(ctx: Ctx) -> Answer:
    out = []
    for coll in kids(find(ctx.doc, "GetItemEstimate:Collections"), "GetItemEstimate:Collection"):
        cid = text(coll, "GetItemEstimate:CollectionId", default="")
        key = text(coll, "AirSync:SyncKey") or text(coll, "GetItemEstimate:SyncKey")
        st = ctx.dev.sync.get(cid)
        if cid not in FOLDER_IDS:
            out.append(E("GetItemEstimate:Response", E("GetItemEstimate:Status", 2)))
            continue
        if key is not None and (st is None or key != str(st.key)):
            # 3: the collection was never synchronised (not primed); 4: a stale key
            out.append(E("GetItemEstimate:Response", E("GetItemEstimate:Status", 3 if st is None else 4)))
            continue
        known = st.known if st is not None else set()
        folder = ctx.mbox.folder(cid)
        estimate = sum(1 for sid in folder if sid not in known) + len(known - folder.keys())
        out.append(E("GetItemEstimate:Response", E("GetItemEstimate:Status", 1),
                     E("GetItemEstimate:Collection", E("GetItemEstimate:CollectionId", cid),
                       E("GetItemEstimate:Estimate", estimate))))
    if not out:
        return wbxml(E("GetItemEstimate:GetItemEstimate", E("GetItemEstimate:Status", 2)))
    return wbxml(E("GetItemEstimate:GetItemEstimate", *out))


# -- MoveItems --------------------------------------------------------------------------

def move_items(ctx: Ctx) -> Answer:
    out = []
    for mv in kids(ctx.doc, "Move:Move"):
        src = text(mv, "Move:SrcMsgId", default="")
        src_fld = text(mv, "Move:SrcFldId", default="")
        dst_fld = text(mv, "Move:DstFldId", default="")
        found = ctx.mbox.find(src)
        if found is None or found[0] != src_fld:
            status, new = 1, None
        elif dst_fld not in FOLDER_IDS:
            status, new = 2, None
        elif dst_fld == src_fld:
            status, new = 4, None
        else:
            status, new = 3, ctx.mbox.move(src, dst_fld)
        out.append(E("Move:Response", E("Move:SrcMsgId", src), E("Move:Status", status),
                     E("Move:DstMsgId", new) if new else None))
    return wbxml(E("Move:MoveItems", *out))


# -- Settings ---------------------------------------------------------------------------

def settings(ctx: Ctx) -> Answer:
    doc = ctx.doc
    out = [E("Settings:Status", 1)]
    address = f"{ctx.mbox.user}@seg-fast.test"
    for el in kids(doc):
        name = el.tag.split(":")[1]
        if name == "Oof":
            out.append(E("Settings:Oof", E("Settings:Status", 1),
                         E("Settings:Get", E("Settings:OofState", 0)) if find(el, "Settings:Get") else None))
        elif name == "DeviceInformation":
            out.append(E("Settings:DeviceInformation", E("Settings:Status", 1)))
        elif name == "DevicePassword":
            out.append(E("Settings:DevicePassword", E("Settings:Status", 1)))
        elif name == "UserInformation":
            if ctx.version >= 141:
                info = E("Settings:Accounts", E("Settings:Account",
                         E("Settings:UserDisplayName", ctx.mbox.user),
                         E("Settings:EmailAddresses", E("Settings:PrimarySmtpAddress", address))))
            else:
                info = E("Settings:EmailAddresses", E("Settings:SmtpAddress", address))
            out.append(E("Settings:UserInformation", E("Settings:Status", 1), E("Settings:Get", info)))
        elif name == "RightsManagementInformation":
            out.append(E("Settings:RightsManagementInformation", E("Settings:Status", 1)))
    return wbxml(E("Settings:Settings", *out))


# -- ResolveRecipients ------------------------------------------------------------------------

def resolve_recipients(ctx: Ctx) -> Answer:
    """The simulator's directory (MS-ASCMD 2.2.1.15): every address resolves as a GAL entry
    except local parts starting "unknown" (Status 4); certificates only for the corpus
    signer (sim/smime.py), so everyone else has none (Certificates Status 7) for a gateway
    to fill in from LDAP."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from seg_fast.sim.smime import SIGNER_EMAIL, signer

    root = ctx.doc
    if root is None or root.tag != "ResolveRecipients:ResolveRecipients":
        return wbxml(E("ResolveRecipients:ResolveRecipients", E("ResolveRecipients:Status", 5)))
    retrieval = _int(text(root, "ResolveRecipients:Options", "ResolveRecipients:CertificateRetrieval"), 1)
    out = [E("ResolveRecipients:Status", 1)]
    for to in kids(root, "ResolveRecipients:To"):
        name = (text(to) or "").strip()
        local, at, domain = name.partition("@")
        if not at or not local or not domain or local.lower().startswith("unknown"):
            out.append(E("ResolveRecipients:Response", E("ResolveRecipients:To", name),
                         E("ResolveRecipients:Status", 4), E("ResolveRecipients:RecipientCount", 0)))
            continue
        email = name.lower()
        certs = None
        if retrieval in (2, 3):
            if email == SIGNER_EMAIL:
                der = signer()[1].public_bytes(Encoding.DER)
                blob = E("ResolveRecipients:Certificate" if retrieval == 2 else "ResolveRecipients:MiniCertificate",
                         base64.b64encode(der).decode("ascii"))
                certs = E("ResolveRecipients:Certificates", E("ResolveRecipients:Status", 1),
                          E("ResolveRecipients:CertificateCount", 1), E("ResolveRecipients:RecipientCount", 1), blob)
            else:
                certs = E("ResolveRecipients:Certificates", E("ResolveRecipients:Status", 7),
                          E("ResolveRecipients:CertificateCount", 0), E("ResolveRecipients:RecipientCount", 0))
        out.append(E("ResolveRecipients:Response", E("ResolveRecipients:To", name),
                     E("ResolveRecipients:Status", 1), E("ResolveRecipients:RecipientCount", 1),
                     E("ResolveRecipients:Recipient", E("ResolveRecipients:Type", 1),
                       E("ResolveRecipients:DisplayName", local.replace(".", " ").title()),
                       E("ResolveRecipients:EmailAddress", email), certs)))
    return wbxml(E("ResolveRecipients:ResolveRecipients", *out))


# -- ItemOperations, GetAttachment -----------------------------------------------------------

def find_attachment(mbox: Mailbox, sim, ref: str) -> tuple[str, str, bytes] | None:
    sid, _, k = ref.rpartition(":")
    found = mbox.find(sid)
    if found is None or not k.isdigit():
        return None
    atts = sim.corpus.message(found[1].msg).attachments
    return atts[int(k)] if int(k) < len(atts) else None


def item_operations(ctx: Ctx) -> Answer:
    doc = ctx.doc
    if doc is None or doc.tag != "ItemOperations:ItemOperations":
        return wbxml(E("ItemOperations:ItemOperations", E("ItemOperations:Status", 2)))
    parts: list[bytes] | None = [] if ctx.multipart else None
    out = []
    fetched: list[tuple[str, int]] = []      # (Status, Data length) of each Fetch (facts.Fetch)
    for op in kids(doc):
        if op.tag == "ItemOperations:Fetch":
            out.append(_fetch(ctx, op, parts, fetched))
        elif op.tag == "ItemOperations:EmptyFolderContents":
            cid = text(op, "AirSync:CollectionId", default="")
            if cid in FOLDER_IDS:
                ctx.mbox.folder(cid).clear()
            out.append(E("ItemOperations:EmptyFolderContents",
                         E("ItemOperations:Status", 1 if cid in FOLDER_IDS else 6),
                         E("AirSync:CollectionId", cid)))
        elif op.tag == "ItemOperations:Move":
            src = text(op, "ItemOperations:ConversationId", default="")
            out.append(E("ItemOperations:Move", E("ItemOperations:Status", 6),
                         E("ItemOperations:ConversationId", src)))
    tree = E("ItemOperations:ItemOperations", E("ItemOperations:Status", 1),
             E("ItemOperations:Response", *out) if out else None)
    if parts is None:
        first = fetched[0] if fetched else (None, -1)
        return wbxml(tree, ctx, facts.Fetch("1", first[0], first[1]))
    return Answer(200, [(b"content-type", MULTIPART_TYPE)], build_multipart([encode(tree), *parts]))


def _fetch(ctx: Ctx, op: Element, parts: list[bytes] | None, fetched: list) -> Element:
    """One Fetch of the answer; (its Status, its Data's length or -1) appended to ``fetched``."""
    options = find(op, "ItemOperations:Options")
    ref = text(op, "AirSyncBase:FileReference")
    if ref is not None:
        att = find_attachment(ctx.mbox, ctx.sim, ref)
        head = E("AirSyncBase:FileReference", ref)
        if att is None:
            fetched.append(("15", -1))
            return E("ItemOperations:Fetch", E("ItemOperations:Status", 15), head)
        _name, ctype, blob = att
        total = len(blob)
        rng = text(options, "ItemOperations:Range")
        if not rng and parts is None and ctx.splices is not None:
            fetched.append(("1", total))
            # the whole attachment inline: its Properties (base64 of up to 10 MB) cached
            def build() -> Template:
                return Template(E("ItemOperations:Properties", E("AirSyncBase:ContentType", ctype),
                                  E("ItemOperations:Data", base64.b64encode(blob).decode())))
            return E("ItemOperations:Fetch", E("ItemOperations:Status", 1), head,
                     ctx.splices.placeholder(ctx.sim.splice_cache.get(("att", att), build)))
        props = [E("AirSyncBase:ContentType", ctype)]
        if rng:
            lo, _, hi = rng.partition("-")
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi) or int(lo) >= total:
                fetched.append(("8", -1))
                return E("ItemOperations:Fetch", E("ItemOperations:Status", 8), head)
            blob = blob[int(lo):int(hi) + 1]
            props += [E("ItemOperations:Range", f"{lo}-{int(lo) + len(blob) - 1}"),
                      E("ItemOperations:Total", total)]
        if parts is not None:
            parts.append(blob)
            props.append(E("ItemOperations:Part", len(parts)))
            fetched.append(("1", -1))
        else:
            props.append(E("ItemOperations:Data", base64.b64encode(blob).decode()))
            fetched.append(("1", len(blob)))
        return E("ItemOperations:Fetch", E("ItemOperations:Status", 1), head,
                 E("ItemOperations:Properties", *props))
    long = text(op, "Search:LongId")
    if long is not None:          # a Search result, by its LongId
        sid, cid = server_id_of(long), None
        head = [E("Search:LongId", long)]
    else:
        sid = text(op, "AirSync:ServerId")
        cid = text(op, "AirSync:CollectionId")
        head = [E("AirSync:CollectionId", cid), E("AirSync:ServerId", sid)]
    found = ctx.mbox.find(sid) if sid else None
    if found is None or (cid is not None and found[0] != cid):
        fetched.append(("6", -1))
        return E("ItemOperations:Fetch", E("ItemOperations:Status", 6), *head)
    fetched.append(("1", -1))               # an item's Properties: no ItemOperations:Data
    msg = ctx.sim.corpus.message(found[1].msg)
    props = [*email_fields(msg, found[1]), attachments_element(msg, sid),
             body_element(msg, body_preference(options), parts),
             E("Email:MessageClass", message_class(msg))]
    return E("ItemOperations:Fetch", E("ItemOperations:Status", 1), *head,
             E("AirSync:Class", "Email"), E("ItemOperations:Properties", *props))


def get_attachment(ctx: Ctx) -> Answer:
    ref = ctx.query.params.get("AttachmentName", "")
    att = find_attachment(ctx.mbox, ctx.sim, ref)
    if att is None:
        return Answer(404, [], b"")
    return Answer(200, [(b"content-type", att[1].encode())], att[2])


# -- SendMail, SmartReply, SmartForward ---------------------------------------------------------

def send_mail(ctx: Ctx, command: str) -> Answer:
    """12.x and older: the body is the raw message/rfc822 (SaveInSent in the query);
    14.0+: a ComposeMail tree with the MIME as opaque data. Empty 200 on success."""
    root = "ComposeMail:" + command
    if ctx.doc is not None:
        if ctx.doc.tag != root:
            return wbxml(E(root, E("ComposeMail:Status", 103)))
        mime = data(ctx.doc, "ComposeMail:Mime")
        save = find(ctx.doc, "ComposeMail:SaveInSentItems") is not None
    else:
        mime, save = ctx.raw, ctx.query.flag("SaveInSent")
    if not mime or not _looks_like_mime(mime):
        if ctx.version >= 140:
            return wbxml(E(root, E("ComposeMail:Status", 107)))
        return Answer(400, [], b"")
    ctx.sim.record_sent(ctx.mbox.user, command, mime)
    if save:
        ctx.mbox.add(SENT, Item(0))
    return empty()


def _looks_like_mime(mime: bytes) -> bool:
    head = mime[:65536]
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    return end > 0 and b":" in head[:end]


# -- Ping -------------------------------------------------------------------------------

PING_CLASSES = {f[0]: f[3] for f in FOLDERS}


def ping_request(ctx: Ctx) -> Answer | tuple[int, tuple[str, ...]]:
    """Read (and cache) the heartbeat and folders; an Answer when it cannot park."""
    dev = ctx.dev
    doc = ctx.doc
    if doc is not None:
        dev.ping_body = None
        if doc.tag != "Ping:Ping":
            return wbxml(E("Ping:Ping", E("Ping:Status", 4)))
        hb = text(doc, "Ping:HeartbeatInterval")
        if hb is not None:
            hbi = _int(hb, -1)
            if not MIN_HEARTBEAT <= hbi <= MAX_HEARTBEAT:
                bound = MIN_HEARTBEAT if hbi < MIN_HEARTBEAT else MAX_HEARTBEAT
                return wbxml(E("Ping:Ping", E("Ping:Status", 5), E("Ping:HeartbeatInterval", bound)))
            dev.heartbeat = hbi
        folders = find(doc, "Ping:Folders")
        if folders is not None:
            ids = tuple(text(f, "Ping:Id", default="") for f in kids(folders, "Ping:Folder"))
            if len(ids) > MAX_PING_FOLDERS:
                return wbxml(E("Ping:Ping", E("Ping:Status", 6), E("Ping:MaxFolders", MAX_PING_FOLDERS)))
            if any(i not in FOLDER_IDS for i in ids):
                return wbxml(E("Ping:Ping", E("Ping:Status", 7)))
            dev.ping_folders = ids
    if dev.heartbeat is None or not dev.ping_folders:
        return wbxml(E("Ping:Ping", E("Ping:Status", 3)))
    if doc is not None:
        # the same body again (a phone's every Ping) is not read again: _dispatch skips it;
        # one object per distinct body, however many devices send it
        dev.ping_body = _PING_BODIES.setdefault(ctx.raw, ctx.raw) if len(_PING_BODIES) < 1024 else ctx.raw
    return dev.heartbeat, dev.ping_folders


_PING_BODIES: dict[bytes, bytes] = {}


@functools.lru_cache(maxsize=64)
def ping_answer(changed: tuple[str, ...] | None) -> Answer:
    # cached: a handful of distinct answers, sent for every Ping (never mutated)
    if not changed:
        return wbxml(E("Ping:Ping", E("Ping:Status", 1)))
    return wbxml(E("Ping:Ping", E("Ping:Status", 2),
                   E("Ping:Folders", *[E("Ping:Folder", f) for f in changed])))


# -- helpers ----------------------------------------------------------------------------

def _int(value: str | None, default):
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _id_order(server_id: str) -> int:
    return _int(server_id.partition(":")[2], 0)
