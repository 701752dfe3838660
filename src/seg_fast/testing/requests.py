"""Hypothesis strategies for valid EAS request documents (MS-ASCMD 2.2.1), per version.

``request(command, version, known=Known())`` draws one request tree for the
command; ``requests(version=..., commands=...)`` draws (command, tree) pairs.
Element order follows the spec's schemas, values stay in their ranges and
elements a version lacks are never drawn for it (spec.SINCE is the checklist the
tests hold the gates to). ``Known`` tells the strategies which ids the mailbox
under test really has, so the requests can be the ones the spec says succeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from seg_fast.eas.wbxml import Element, encode
from seg_fast.sim.tree import E
from seg_fast.testing import spec
from seg_fast.testing.mime import mime_messages


@dataclass(frozen=True)
class Known:
    """Ids the mailbox under test holds (defaults: a fresh simulator mailbox)."""
    email_folders: tuple[str, ...] = ("1", "2", "3", "4", "5")
    contacts_folder: str = "7"
    calendar_folder: str = "6"
    server_ids: tuple[str, ...] = ("1:1", "1:2", "1:3")
    file_references: tuple[str, ...] = ("1:1:0",)
    sync_keys: dict[str, str] = field(default_factory=dict)   # CollectionId -> current SyncKey
    folder_sync_key: str = "0"
    user: str = "fuzz"
    domain: str = "seg-fast.test"


# -- values ---------------------------------------------------------------------------

# Readable text: shrinks to "a"-like strings and shows well as XML; no NUL, no surrogates.
words = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_categories=("Cs",)),
                min_size=1, max_size=24)
ascii_words = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=1, max_size=12)
boolean = st.sampled_from(["0", "1"])


@st.composite
def addresses(draw, domain: str = "seg-fast.test") -> str:
    return f"{draw(ascii_words)}@{draw(st.sampled_from([domain, 'example.com', 'contoso.com']))}"


@st.composite
def timestamps(draw) -> str:
    """The compact date-time of MS-ASDTYPE (2.2.3.2): 2026-11-29T08:00:00.000Z."""
    y, mo, d = draw(st.integers(2000, 2037)), draw(st.integers(1, 12)), draw(st.integers(1, 28))
    h, mi, s = draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 59))
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}.000Z"


@st.composite
def ranges(draw, limit: int = 100) -> str:
    lo = draw(st.integers(0, 1000))
    return f"{lo}-{lo + draw(st.integers(0, limit - 1))}"


def _opt(draw, strategy, p: bool = True):
    """Draw ``strategy`` or None (an optional element); shrinks towards absent."""
    return draw(strategy) if p and draw(st.booleans()) else None


# -- shared pieces --------------------------------------------------------------------

@st.composite
def body_preference(draw, v: int, ns: str = "AirSyncBase") -> Element:
    trunc = _opt(draw, st.integers(0, 2**31 - 1).map(str))
    return E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", draw(st.sampled_from([1, 2, 3, 4]))),
             E("AirSyncBase:TruncationSize", trunc) if trunc else None,
             E("AirSyncBase:AllOrNone", draw(boolean)) if trunc and draw(st.booleans()) else None,
             E("AirSyncBase:Preview", draw(st.integers(0, 255))) if v >= 140 and draw(st.booleans()) else None)


@st.composite
def body_part_preference(draw, v: int) -> Element | None:
    if v < 141 or not draw(st.booleans()):
        return None
    return E("AirSyncBase:BodyPartPreference", E("AirSyncBase:Type", 2),
             E("AirSyncBase:TruncationSize", draw(st.integers(0, 2**20))),
             E("AirSyncBase:Preview", draw(st.integers(0, 255))) if draw(st.booleans()) else None)


def _rights(draw, v: int) -> Element | None:
    if v >= 141 and draw(st.booleans()):
        return E("RightsManagement:RightsManagementSupport", draw(boolean))
    return None


# -- Sync -----------------------------------------------------------------------------

@st.composite
def sync_request(draw, v: int, known: Known = Known()) -> Element:
    n = draw(st.integers(1, 2))
    email = draw(st.lists(st.sampled_from(known.email_folders), min_size=1, max_size=n, unique=True))
    collections = [draw(_sync_collection(v, known, cid, "Email")) for cid in email]
    if draw(st.booleans()):
        collections.append(draw(_sync_collection(v, known, known.contacts_folder, "Contacts")))
    wait = None
    if draw(st.booleans()):
        if v >= 140 and draw(st.booleans()):
            wait = E("AirSync:HeartbeatInterval", draw(st.integers(60, 3540)))
        else:
            wait = E("AirSync:Wait", draw(st.integers(1, 59)))
    window = E("AirSync:WindowSize", draw(st.integers(1, 512))) if draw(st.booleans()) else None
    return E("AirSync:Sync", E("AirSync:Collections", *collections), wait, window)


@st.composite
def _sync_collection(draw, v: int, known: Known, cid: str, cls: str) -> Element:
    key = known.sync_keys.get(cid, "0")
    primed = key != "0"
    options = None
    if draw(st.booleans()):
        prefs = draw(st.lists(body_preference(v), max_size=2, unique_by=lambda e: e.children[0].text))
        options = E("AirSync:Options",
                    E("AirSync:FilterType", draw(st.integers(0, 5 if cls == "Email" else 0)))
                    if draw(st.booleans()) else None,
                    *prefs, draw(body_part_preference(v)),
                    E("AirSync:MIMESupport", draw(st.integers(0, 2))) if cls == "Email" and draw(st.booleans())
                    else None,
                    E("AirSync:MIMETruncation", draw(st.integers(0, 8))) if cls == "Email" and draw(st.booleans())
                    else None,
                    _rights(draw, v))
    commands = None
    if primed and draw(st.booleans()):
        commands = E("AirSync:Commands", *draw(st.lists(_sync_command(v, known, cls), min_size=1, max_size=3)))
    return E("AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", cid),
             E("AirSync:DeletesAsMoves", draw(boolean)) if primed and draw(st.booleans()) else None,
             E("AirSync:GetChanges", draw(boolean)) if primed and draw(st.booleans()) else None,
             E("AirSync:WindowSize", draw(st.integers(1, 512))) if draw(st.booleans()) else None,
             E("AirSync:ConversationMode", draw(boolean)) if v >= 140 and cls == "Email" and draw(st.booleans())
             else None,
             options, commands)


@st.composite
def _sync_command(draw, v: int, known: Known, cls: str) -> Element:
    sid = draw(st.sampled_from(known.server_ids))
    if cls == "Email":
        kind = draw(st.sampled_from(["Change", "Delete", "Fetch"]))
        if kind == "Change":
            return E("AirSync:Change", E("AirSync:ServerId", sid),
                     E("AirSync:ApplicationData", E("Email:Read", draw(boolean))))
        return E(f"AirSync:{kind}", E("AirSync:ServerId", sid))
    return E("AirSync:Add", E("AirSync:ClientId", draw(st.integers(1, 10**6))), E(
        "AirSync:ApplicationData", E("Contacts:FirstName", draw(words)), E("Contacts:LastName", draw(words)),
        E("Contacts:Email1Address", draw(addresses(known.domain))) if draw(st.booleans()) else None))


# -- FolderSync, Ping, MoveItems, GetItemEstimate ----------------------------------------------

def folder_sync_request(v: int, known: Known = Known()) -> st.SearchStrategy[Element]:
    return st.builds(lambda: E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", known.folder_sync_key)))


@st.composite
def ping_request(draw, v: int, known: Known = Known()) -> Element:
    folders = draw(st.lists(st.sampled_from(known.email_folders), min_size=1, max_size=3, unique=True))
    return E("Ping:Ping", E("Ping:HeartbeatInterval", draw(st.integers(60, 3540))),
             E("Ping:Folders", *[E("Ping:Folder", E("Ping:Id", f), E("Ping:Class", "Email")) for f in folders]))


@st.composite
def move_items_request(draw, v: int, known: Known = Known()) -> Element:
    moves = []
    for sid in draw(st.lists(st.sampled_from(known.server_ids), min_size=1, max_size=3, unique=True)):
        src = sid.partition(":")[0]
        dst = draw(st.sampled_from([f for f in known.email_folders if f != src] or [src]))
        moves.append(E("Move:Move", E("Move:SrcMsgId", sid), E("Move:SrcFldId", src), E("Move:DstFldId", dst)))
    return E("Move:MoveItems", *moves)


@st.composite
def get_item_estimate_request(draw, v: int, known: Known = Known()) -> Element:
    out = []
    for cid in draw(st.lists(st.sampled_from(known.email_folders), min_size=1, max_size=3, unique=True)):
        key = known.sync_keys.get(cid, "0")
        if v < 140:     # 12.1: Class, CollectionId, FilterType, SyncKey
            out.append(E("GetItemEstimate:Collection", E("GetItemEstimate:Class", "Email"),
                         E("GetItemEstimate:CollectionId", cid),
                         E("AirSync:FilterType", draw(st.integers(0, 5))), E("AirSync:SyncKey", key)))
        else:
            options = (E("AirSync:Options", E("AirSync:FilterType", draw(st.integers(0, 5))))
                       if draw(st.booleans()) else None)
            out.append(E("GetItemEstimate:Collection", E("AirSync:SyncKey", key),
                         E("GetItemEstimate:CollectionId", cid),
                         E("AirSync:ConversationMode", draw(boolean)) if draw(st.booleans()) else None,
                         options))
    return E("GetItemEstimate:GetItemEstimate", E("GetItemEstimate:Collections", *out))


# -- ItemOperations -----------------------------------------------------------------------

@st.composite
def item_operations_request(draw, v: int, known: Known = Known()) -> Element:
    ops = draw(st.lists(_item_operation(v, known), min_size=1, max_size=3))
    return E("ItemOperations:ItemOperations", *ops)


@st.composite
def _item_operation(draw, v: int, known: Known) -> Element:
    kinds = ["fetch-attachment", "fetch-item", "empty"] + (["move"] if v >= 140 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "fetch-attachment":
        opts = E("ItemOperations:Options", E("ItemOperations:Range", draw(ranges(65536)))) \
            if draw(st.booleans()) else None
        return E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                 E("AirSyncBase:FileReference", draw(st.sampled_from(known.file_references))), opts)
    if kind == "fetch-item":
        sid = draw(st.sampled_from(known.server_ids))
        opts = None
        if draw(st.booleans()):
            opts = E("ItemOperations:Options", *draw(st.lists(body_preference(v), max_size=1)),
                     draw(body_part_preference(v)), _rights(draw, v))
        return E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                 E("AirSync:CollectionId", sid.partition(":")[0]), E("AirSync:ServerId", sid), opts)
    if kind == "empty":
        return E("ItemOperations:EmptyFolderContents",
                 E("AirSync:CollectionId", draw(st.sampled_from(known.email_folders))),
                 E("ItemOperations:Options", E("ItemOperations:DeleteSubFolders")) if draw(st.booleans()) else None)
    return E("ItemOperations:Move", E("ItemOperations:ConversationId", draw(st.binary(min_size=16, max_size=16))),
             E("ItemOperations:DstFldId", draw(st.sampled_from(known.email_folders))),
             E("ItemOperations:Options", E("ItemOperations:MoveAlways")) if draw(st.booleans()) else None)


# -- SendMail, SmartReply, SmartForward ----------------------------------------------------

@st.composite
def compose_request(draw, v: int, known: Known = Known(), command: str = "SendMail") -> Element | bytes:
    """14.0+: the ComposeMail tree. 12.1: the raw MIME (message/rfc822) the body
    carries instead (SaveInSent, ItemId and CollectionId then go in the query)."""
    mime = draw(mime_messages(sender=f"{known.user}@{known.domain}"))
    if v < 140:
        return mime
    sid = draw(st.sampled_from(known.server_ids))
    source = None
    if command != "SendMail":
        source = E("ComposeMail:Source", E("ComposeMail:FolderId", sid.partition(":")[0]),
                   E("ComposeMail:ItemId", sid))
    forwardees = None
    if command == "SmartForward" and v >= 160 and draw(st.booleans()):
        forwardees = E("ComposeMail:Forwardees", *[
            E("ComposeMail:Forwardee", E("ComposeMail:Name", draw(words)), E("ComposeMail:Email", a))
            for a in draw(st.lists(addresses(known.domain), min_size=1, max_size=2))])
    return E(f"ComposeMail:{command}", E("ComposeMail:ClientId", draw(st.integers(1, 10**9))),
             E("ComposeMail:AccountId", draw(ascii_words)) if v >= 141 and draw(st.booleans()) else None,
             E("ComposeMail:SaveInSentItems") if draw(st.booleans()) else None,
             E("ComposeMail:ReplaceMime") if source is not None and draw(st.booleans()) else None,
             source, forwardees, E("ComposeMail:Mime", mime))


# -- Search, Find, ResolveRecipients ---------------------------------------------------------

@st.composite
def search_request(draw, v: int, known: Known = Known()) -> Element:
    if draw(st.booleans()):
        query = E("Search:Query", E("Search:And", E("AirSync:Class", "Email"),
                                    E("AirSync:CollectionId", draw(st.sampled_from(known.email_folders))),
                                    E("Search:FreeText", draw(ascii_words))))
        options = E("Search:Options", E("Search:Range", draw(ranges(100))),
                    E("Search:DeepTraversal") if draw(st.booleans()) else None,
                    E("Search:RebuildResults") if draw(st.booleans()) else None,
                    *draw(st.lists(body_preference(v), max_size=1)), _rights(draw, v))
        return E("Search:Search", E("Search:Store", E("Search:Name", "Mailbox"), query, options))
    picture = None
    if v >= 141 and draw(st.booleans()):
        picture = E("Search:Picture", E("Search:MaxSize", draw(st.integers(1, 10**6))),
                    E("Search:MaxPictures", draw(st.integers(1, 100))))
    return E("Search:Search", E("Search:Store", E("Search:Name", "GAL"), E("Search:Query", draw(ascii_words)),
                                E("Search:Options", E("Search:Range", draw(ranges(100))), picture)))


@st.composite
def find_request(draw, v: int, known: Known = Known()) -> Element:
    if draw(st.booleans()):
        criterion = E("Find:MailBoxSearchCriterion", E(
            "Find:Query", E("AirSync:Class", "Email"),
            E("AirSync:CollectionId", draw(st.sampled_from(known.email_folders))),
            E("Find:FreeText", draw(ascii_words))),
            E("Find:Options", E("Find:DeepTraversal")) if draw(st.booleans()) else None)
    else:
        criterion = E("Find:GALSearchCriterion", E("Find:Query", E("Find:FreeText", draw(ascii_words))))
    return E("Find:Find", E("Find:SearchId", draw(st.uuids()).hex.upper()),
             E("Find:ExecuteSearch", criterion,
               # a Find Range starts at 0 (else Status 4, StartWithRangeZero)
               E("Find:Options", E("Find:Range", f"0-{draw(st.integers(0, 99))}"))))


@st.composite
def resolve_recipients_request(draw, v: int, known: Known = Known()) -> Element:
    to = draw(st.lists(st.one_of(addresses(known.domain), ascii_words), min_size=1, max_size=3))
    options = None
    if draw(st.booleans()):
        availability = None
        if v >= 140 and draw(st.booleans()):
            availability = E("ResolveRecipients:Availability", E("ResolveRecipients:StartTime", draw(timestamps())),
                             E("ResolveRecipients:EndTime", draw(timestamps())))
        picture = None
        if v >= 141 and draw(st.booleans()):
            picture = E("ResolveRecipients:Picture", E("ResolveRecipients:MaxSize", draw(st.integers(1, 10**6))))
        options = E("ResolveRecipients:Options",
                    E("ResolveRecipients:CertificateRetrieval", draw(st.integers(1, 3))),
                    E("ResolveRecipients:MaxCertificates", draw(st.integers(0, 9999))),
                    E("ResolveRecipients:MaxAmbiguousRecipients", draw(st.integers(0, 9999))),
                    availability, picture)
    return E("ResolveRecipients:ResolveRecipients", *[E("ResolveRecipients:To", t) for t in to], options)


# -- Settings, Provision, MeetingResponse ------------------------------------------------------

@st.composite
def device_information(draw, v: int) -> Element:
    return E("Settings:DeviceInformation", E("Settings:Set",
             E("Settings:Model", draw(words)),
             E("Settings:IMEI", draw(st.text("0123456789", min_size=15, max_size=15))) if draw(st.booleans())
             else None,
             E("Settings:FriendlyName", draw(words)), E("Settings:OS", draw(words)),
             E("Settings:OSLanguage", draw(st.sampled_from(["English", "Deutsch", "Français"]))),
             E("Settings:PhoneNumber", draw(st.text("0123456789+", min_size=3, max_size=15))),
             E("Settings:UserAgent", draw(words)) if draw(st.booleans()) else None,
             E("Settings:EnableOutboundSMS", draw(boolean)) if v >= 140 and draw(st.booleans()) else None,
             E("Settings:MobileOperator", draw(words)) if v >= 140 and draw(st.booleans()) else None))


@st.composite
def settings_request(draw, v: int, known: Known = Known()) -> Element:
    kinds = ["oof-get", "oof-set", "device", "password", "user"] + (["rights"] if v >= 141 else [])
    picked = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3, unique=True))
    out = []
    for kind in kinds:          # spec order, whichever were drawn
        if kind not in picked:
            continue
        if kind == "oof-get":
            out.append(E("Settings:Oof", E("Settings:Get", E("Settings:BodyType",
                                                              draw(st.sampled_from(["Text", "HTML"]))))))
        elif kind == "oof-set":
            state = draw(st.integers(0, 2))
            times = [E("Settings:StartTime", draw(timestamps())), E("Settings:EndTime", draw(timestamps()))] \
                if state == 2 else []
            out.append(E("Settings:Oof", E("Settings:Set", E("Settings:OofState", state), *times,
                         E("Settings:OofMessage", E("Settings:AppliesToInternal"), E("Settings:Enabled", draw(boolean)),
                           E("Settings:ReplyMessage", draw(words)), E("Settings:BodyType", "Text")))))
        elif kind == "device":
            out.append(draw(device_information(v)))
        elif kind == "password":
            out.append(E("Settings:DevicePassword", E("Settings:Set", E("Settings:Password", draw(words)))))
        elif kind == "user":
            out.append(E("Settings:UserInformation", E("Settings:Get")))
        else:
            out.append(E("Settings:RightsManagementInformation", E("Settings:Get")))
    return E("Settings:Settings", *out)


@st.composite
def provision_request(draw, v: int, known: Known = Known(), policy_key: str | None = None) -> Element:
    """Step 1 (no key) or, given the temporary ``policy_key``, step 2 (the acknowledgement)."""
    info = draw(device_information(v)) if v >= 141 and draw(st.booleans()) else None
    policy = [E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML")]
    if policy_key is not None:
        policy += [E("Provision:PolicyKey", policy_key), E("Provision:Status", 1)]
    return E("Provision:Provision", info, E("Provision:Policies", E("Provision:Policy", *policy)))


@st.composite
def meeting_response_request(draw, v: int, known: Known = Known()) -> Element:
    reqs = []
    for sid in draw(st.lists(st.sampled_from(known.server_ids), min_size=1, max_size=2, unique=True)):
        send = None
        if v >= 160 and draw(st.booleans()):
            times = []
            if v >= 161 and draw(st.booleans()):
                times = [E("MeetingResponse:ProposedStartTime", draw(timestamps())),
                         E("MeetingResponse:ProposedEndTime", draw(timestamps()))]
            send = E("MeetingResponse:SendResponse",
                     E("AirSyncBase:Body", E("AirSyncBase:Type", 1), E("AirSyncBase:Data", draw(words))), *times)
        reqs.append(E("MeetingResponse:Request", E("MeetingResponse:UserResponse", draw(st.integers(1, 3))),
                      E("MeetingResponse:CollectionId", sid.partition(":")[0]),
                      E("MeetingResponse:RequestId", sid),
                      E("MeetingResponse:InstanceId", draw(timestamps())) if v >= 141 and draw(st.booleans())
                      else None, send))
    return E("MeetingResponse:MeetingResponse", *reqs)


REQUESTS = {
    "Sync": sync_request, "FolderSync": folder_sync_request, "Ping": ping_request,
    "ItemOperations": item_operations_request,
    "SendMail": lambda v, known=Known(): compose_request(v, known, "SendMail"),
    "SmartReply": lambda v, known=Known(): compose_request(v, known, "SmartReply"),
    "SmartForward": lambda v, known=Known(): compose_request(v, known, "SmartForward"),
    "MoveItems": move_items_request, "GetItemEstimate": get_item_estimate_request,
    "Search": search_request, "Settings": settings_request, "Provision": provision_request,
    "ResolveRecipients": resolve_recipients_request, "MeetingResponse": meeting_response_request,
    "Find": find_request,
}


def commands_for(version: str | int) -> tuple[str, ...]:
    v = spec.vnum(version) if isinstance(version, str) else version
    return tuple(c for c in spec.COMMANDS if spec.FIRST_VERSION.get(c, 0) <= v)


def request(command: str, version: str = "16.1", known: Known = Known()) -> st.SearchStrategy:
    """Valid request bodies of ``command`` at ``version``: an Element, or for
    SendMail/SmartReply/SmartForward at 12.1 the raw MIME bytes."""
    v = spec.vnum(version)
    if command not in REQUESTS:
        raise ValueError(f"no request strategy for {command!r} (have: {', '.join(REQUESTS)})")
    if spec.FIRST_VERSION.get(command, 0) > v:
        raise ValueError(f"{command} does not exist in protocol {version}")
    return REQUESTS[command](v, known)


def as_wbxml(strategy: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """The same documents encoded as WBXML (raw MIME bodies and None pass through)."""
    return strategy.map(lambda doc: encode(doc) if isinstance(doc, Element) else doc)


def requests(version: str = "16.1", commands=None, known: Known = Known()) -> st.SearchStrategy:
    """(command, body) pairs over ``commands`` (default: every command the version has)."""
    names = [c for c in (commands or commands_for(version)) if c in commands_for(version)]
    return st.one_of(*[request(c, version, known).map(lambda body, c=c: (c, body)) for c in names])
