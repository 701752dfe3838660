"""Hypothesis strategies for valid EAS answers (MS-ASCMD 2.2.1 responses), per version.

``answer(command, version)`` draws a server's answer tree: what a client,
or a gateway reading the server's side, must accept. Status values come from
spec.STATUS (success and the command's own failures), content from the same
value strategies the requests use; Email items carry AirSyncBase bodies and
attachments (12.1+) with 14.0+ Preview and conversation ids where the version
has them.
"""
from __future__ import annotations

import base64

from hypothesis import strategies as st

from seg_fast.eas.wbxml import Element
from seg_fast.sim.tree import E
from seg_fast.testing import spec
from seg_fast.testing.requests import addresses, ascii_words, boolean, timestamps, words

_ids = st.integers(1, 99).map(str)
_server_ids = st.tuples(st.integers(1, 9), st.integers(1, 999)).map(lambda t: f"{t[0]}:{t[1]}")
_keys = st.integers(1, 2**31 - 1).map(str)


def _status(tag: str, failures: list[int] | None = None):
    """Status 1 mostly; otherwise one of the tag's own failure values."""
    bad = failures if failures is not None else sorted(spec.STATUS[tag] - {1})
    return st.one_of(st.just(1), st.sampled_from(bad)) if bad else st.just(1)


@st.composite
def email_item(draw, v: int, *, ns_body: bool = True) -> list[Element]:
    """Email properties of one item (Sync ApplicationData, ItemOperations/Search Properties)."""
    data = draw(words)
    truncated = draw(st.booleans())
    body = E("AirSyncBase:Body", E("AirSyncBase:Type", draw(st.sampled_from([1, 2, 4]))),
             E("AirSyncBase:EstimatedDataSize", len(data.encode()) + (draw(st.integers(1, 10**6)) if truncated else 0)),
             E("AirSyncBase:Truncated", int(truncated)), E("AirSyncBase:Data", data),
             E("AirSyncBase:Preview", draw(words)) if v >= 140 and draw(st.booleans()) else None)
    atts = None
    if draw(st.booleans()):
        atts = E("AirSyncBase:Attachments", *[
            E("AirSyncBase:Attachment", E("AirSyncBase:DisplayName", f"{n}.pdf"),
              E("AirSyncBase:FileReference", f"{sid}:{k}"), E("AirSyncBase:Method", 1),
              E("AirSyncBase:EstimatedDataSize", draw(st.integers(0, 10**7))),
              E("AirSyncBase:IsInline", draw(boolean)))
            for k, (n, sid) in enumerate(draw(st.lists(st.tuples(ascii_words, _server_ids), min_size=1, max_size=2)))])
    conv = []
    if v >= 140 and draw(st.booleans()):
        conv = [E("Email2:ConversationId", draw(st.binary(min_size=16, max_size=16))),
                E("Email2:ConversationIndex", draw(st.binary(min_size=5, max_size=10)))]
    return [E("Email:To", draw(addresses())), E("Email:From", draw(addresses())), E("Email:Subject", draw(words)),
            E("Email:DateReceived", draw(timestamps())), E("Email:DisplayTo", draw(words)),
            E("Email:ThreadTopic", draw(words)), E("Email:Importance", draw(st.integers(0, 2))),
            E("Email:Read", draw(boolean)), atts, body,
            E("Email:MessageClass", draw(st.sampled_from(["IPM.Note", "IPM.Note.SMIME.MultipartSigned",
                                                           "IPM.Note.SMIME"]))),
            E("Email:InternetCPID", 65001), E("Email:ContentClass", "urn:content-classes:message"),
            E("AirSyncBase:NativeBodyType", draw(st.integers(1, 3))), *conv,
            E("Email2:IsDraft", 0) if v >= 160 and draw(st.booleans()) else None]


@st.composite
def sync_answer(draw, v: int) -> Element:
    if draw(st.integers(0, 9)) == 0:
        return E("AirSync:Sync", E("AirSync:Status", draw(st.sampled_from([4, 5, 6, 7, 9, 12, 13, 14, 15, 16]))))
    colls = []
    for _ in range(draw(st.integers(1, 2))):
        status = draw(_status("AirSync:Status", [3, 8]))
        commands = responses = None
        if status == 1 and draw(st.booleans()):
            cmds = []
            for _ in range(draw(st.integers(1, 3))):
                kind = draw(st.sampled_from(["Add", "Change", "Delete"]))
                sid = E("AirSync:ServerId", draw(_server_ids))
                if kind == "Add":
                    cmds.append(E("AirSync:Add", sid, E("AirSync:ApplicationData", *draw(email_item(v)))))
                elif kind == "Change":
                    cmds.append(E("AirSync:Change", sid, E("AirSync:ApplicationData", E("Email:Read", draw(boolean)))))
                else:
                    cmds.append(E("AirSync:Delete", sid))
            commands = E("AirSync:Commands", *cmds)
        if status == 1 and draw(st.booleans()):
            responses = E("AirSync:Responses", E("AirSync:Change", E("AirSync:ServerId", draw(_server_ids)),
                                                 E("AirSync:Status", draw(st.sampled_from([6, 7, 8])))))
        colls.append(E("AirSync:Collection", E("AirSync:SyncKey", draw(_keys)), E("AirSync:CollectionId", draw(_ids)),
                       E("AirSync:Status", status),
                       E("AirSync:MoreAvailable") if status == 1 and draw(st.booleans()) else None,
                       commands, responses))
    return E("AirSync:Sync", E("AirSync:Collections", *colls))


@st.composite
def folder_sync_answer(draw, v: int) -> Element:
    status = draw(_status("FolderHierarchy:Status", [6, 9, 10, 11, 12]))
    if status != 1:
        return E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", status))
    adds = [E("FolderHierarchy:Add", E("FolderHierarchy:ServerId", sid), E("FolderHierarchy:ParentId", "0"),
              E("FolderHierarchy:DisplayName", draw(words)), E("FolderHierarchy:Type", draw(st.integers(1, 19))))
            for sid in draw(st.lists(_ids, max_size=4, unique=True))]
    return E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", 1), E("FolderHierarchy:SyncKey", draw(_keys)),
             E("FolderHierarchy:Changes", E("FolderHierarchy:Count", len(adds)), *adds))


@st.composite
def ping_answer(draw, v: int) -> Element:
    status = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]))
    extra = None
    if status == 2:
        extra = E("Ping:Folders", *[E("Ping:Folder", f) for f in draw(st.lists(_ids, min_size=1, max_size=3))])
    elif status == 5:
        extra = E("Ping:HeartbeatInterval", draw(st.sampled_from([60, 3540])))
    elif status == 6:
        extra = E("Ping:MaxFolders", draw(st.integers(1, 300)))
    return E("Ping:Ping", E("Ping:Status", status), extra)


@st.composite
def item_operations_answer(draw, v: int) -> Element:
    fetches = []
    for _ in range(draw(st.integers(0, 2))):
        status = draw(_status("ItemOperations:Status", [6, 15]))
        ref = E("AirSyncBase:FileReference", f"{draw(_server_ids)}:0")
        props = None
        if status == 1:
            blob = draw(st.binary(max_size=64))
            props = E("ItemOperations:Properties", E("AirSyncBase:ContentType", "application/pdf"),
                      E("ItemOperations:Data", base64.b64encode(blob).decode()))
        fetches.append(E("ItemOperations:Fetch", E("ItemOperations:Status", status), ref, props))
    return E("ItemOperations:ItemOperations", E("ItemOperations:Status", 1),
             E("ItemOperations:Response", *fetches) if fetches else None)


@st.composite
def compose_answer(draw, v: int, command: str = "SendMail") -> Element | None:
    """None: success, an empty 200. Otherwise the root with a (common) Status, 14.0+."""
    if v < 140 or draw(st.booleans()):
        return None
    return E(f"ComposeMail:{command}", E("ComposeMail:Status", draw(st.sampled_from([102, 103, 105, 110, 113, 120]))))


@st.composite
def move_items_answer(draw, v: int) -> Element:
    out = []
    for sid in draw(st.lists(_server_ids, min_size=1, max_size=3)):
        status = draw(st.sampled_from([1, 2, 3, 4, 5, 7]))
        out.append(E("Move:Response", E("Move:SrcMsgId", sid), E("Move:Status", status),
                     E("Move:DstMsgId", draw(_server_ids)) if status == 3 else None))
    return E("Move:MoveItems", *out)


@st.composite
def get_item_estimate_answer(draw, v: int) -> Element:
    out = []
    for cid in draw(st.lists(_ids, min_size=1, max_size=3)):
        status = draw(_status("GetItemEstimate:Status"))
        coll = E("GetItemEstimate:Collection", E("GetItemEstimate:CollectionId", cid),
                 E("GetItemEstimate:Estimate", draw(st.integers(0, 10**5)))) if status == 1 else None
        out.append(E("GetItemEstimate:Response", E("GetItemEstimate:Status", status), coll))
    return E("GetItemEstimate:GetItemEstimate", *out)


@st.composite
def search_answer(draw, v: int) -> Element:
    results = [E("Search:Result", E("AirSync:Class", "Email"), E("Search:LongId", "L" + sid),
                 E("AirSync:CollectionId", sid.partition(":")[0]), E("Search:Properties", *draw(email_item(v))))
               for sid in draw(st.lists(_server_ids, max_size=2))] or [E("Search:Result")]
    total = 0 if results[0].children == [] else len(results)
    store = E("Search:Store", E("Search:Status", 1), *results,
              E("Search:Range", f"0-{max(total - 1, 0)}") if total else None, E("Search:Total", total))
    return E("Search:Search", E("Search:Status", 1), E("Search:Response", store))


@st.composite
def find_answer(draw, v: int) -> Element:
    results = [E("Find:Result", E("AirSync:Class", "Email"), E("AirSync:ServerId", sid),
                 E("AirSync:CollectionId", sid.partition(":")[0]),
                 E("Find:Properties", E("Email:Subject", draw(words)), E("Email:DateReceived", draw(timestamps())),
                   E("Find:Preview", draw(words))))
               for sid in draw(st.lists(_server_ids, max_size=2))]
    return E("Find:Find", E("Find:Status", 1), E("Find:Response", E("ItemOperations:Store", "Mailbox"),
             E("Find:Status", 1), *results, E("Find:Range", f"0-{max(len(results) - 1, 0)}"),
             E("Find:Total", len(results))))


@st.composite
def resolve_recipients_answer(draw, v: int) -> Element:
    out = []
    for to in draw(st.lists(addresses(), min_size=1, max_size=2)):
        recips = [E("ResolveRecipients:Recipient", E("ResolveRecipients:Type", draw(st.integers(1, 2))),
                    E("ResolveRecipients:DisplayName", draw(words)), E("ResolveRecipients:EmailAddress", to))
                  for _ in range(draw(st.integers(0, 2)))]
        out.append(E("ResolveRecipients:Response", E("ResolveRecipients:To", to),
                     E("ResolveRecipients:Status", 1 if recips else 4),
                     E("ResolveRecipients:RecipientCount", len(recips)), *recips))
    return E("ResolveRecipients:ResolveRecipients", E("ResolveRecipients:Status", 1), *out)


@st.composite
def meeting_response_answer(draw, v: int) -> Element:
    return E("MeetingResponse:MeetingResponse", *[
        E("MeetingResponse:Result", E("MeetingResponse:RequestId", sid),
          E("MeetingResponse:Status", status),
          E("MeetingResponse:CalendarId", draw(_server_ids)) if status == 1 and draw(st.booleans()) else None)
        for sid, status in draw(st.lists(st.tuples(_server_ids, _status("MeetingResponse:Status")),
                                         min_size=1, max_size=2))])


@st.composite
def settings_answer(draw, v: int) -> Element:
    addr = draw(addresses())
    if v >= 141:
        info = E("Settings:Accounts", E("Settings:Account", E("Settings:UserDisplayName", draw(words)),
                 E("Settings:EmailAddresses", E("Settings:PrimarySmtpAddress", addr))))
    else:
        info = E("Settings:EmailAddresses", E("Settings:SmtpAddress", addr))
    return E("Settings:Settings", E("Settings:Status", 1),
             E("Settings:Oof", E("Settings:Status", 1), E("Settings:Get", E("Settings:OofState", draw(st.integers(0, 2)))))
             if draw(st.booleans()) else None,
             E("Settings:DeviceInformation", E("Settings:Status", draw(_status("Settings:Status", [2])))),
             E("Settings:UserInformation", E("Settings:Status", 1), E("Settings:Get", info)))


@st.composite
def provision_answer(draw, v: int) -> Element:
    policy = [E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"),
              E("Provision:Status", draw(_status("Provision:Status", [2, 3, 5]))),
              E("Provision:PolicyKey", draw(_keys))]
    if draw(st.booleans()):
        policy.append(E("Provision:Data", E("Provision:EASProvisionDoc",
                        E("Provision:DevicePasswordEnabled", draw(boolean)),
                        E("Provision:MinDevicePasswordLength", draw(st.integers(1, 16))),
                        E("Provision:AllowCamera", draw(boolean)),
                        E("Provision:MaxAttachmentSize", draw(st.integers(0, 10**8))))))
    info = E("Settings:DeviceInformation", E("Settings:Status", 1)) if v >= 141 and draw(st.booleans()) else None
    return E("Provision:Provision", E("Provision:Status", 1), info,
             E("Provision:Policies", E("Provision:Policy", *policy)))


ANSWERS = {
    "Sync": sync_answer, "FolderSync": folder_sync_answer, "Ping": ping_answer,
    "ItemOperations": item_operations_answer,
    "SendMail": lambda v: compose_answer(v, "SendMail"), "SmartReply": lambda v: compose_answer(v, "SmartReply"),
    "SmartForward": lambda v: compose_answer(v, "SmartForward"),
    "MoveItems": move_items_answer, "GetItemEstimate": get_item_estimate_answer, "Search": search_answer,
    "Settings": settings_answer, "Provision": provision_answer,
    "ResolveRecipients": resolve_recipients_answer, "MeetingResponse": meeting_response_answer,
    "Find": find_answer,
}


def answer(command: str, version: str = "16.1") -> st.SearchStrategy:
    """Valid answers of ``command`` at ``version`` (SendMail & co.: None = an empty 200)."""
    v = spec.vnum(version)
    if command not in ANSWERS:
        raise ValueError(f"no answer strategy for {command!r}")
    if spec.FIRST_VERSION.get(command, 0) > v:
        raise ValueError(f"{command} does not exist in protocol {version}")
    return ANSWERS[command](v)
