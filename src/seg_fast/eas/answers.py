"""The answers the gateway itself gives: a blocked device, an unavailable upstream.

Blocked device (EAS-NOTES "Answers for a blocked or unhealthy path", MS-ASCMD 2.2.2):
- protocol 14.0 and later: HTTP 200, the command's own root element holding
  ``Status`` 129 (DeviceIsBlockedForThisUser); MoveItems and MeetingResponse keep
  their status one level down (``Move:Response``, ``MeetingResponse:Result``);
- protocol 12.1 and older (or unknown), and commands whose answer is not WBXML
  (GetAttachment, 12.x SendMail...): HTTP 403 with an empty body.
The WBXML bodies are built once through the codec and reused.
"""
from __future__ import annotations

from functools import lru_cache

Headers = list[tuple[bytes, bytes]]

WBXML_TYPE = b"application/vnd.ms-sync.wbxml"

# MS-ASCMD common status codes.
DEVICE_BLOCKED = 129      # DeviceIsBlockedForThisUser
USER_DISABLED = 126
ACCESS_DENIED = 130
MAX_DEVICES = 177

# command -> (root tag, container tags between the root and Status)
BLOCKED_SHAPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Sync": ("AirSync:Sync", ()),
    "FolderSync": ("FolderHierarchy:FolderSync", ()),
    "FolderCreate": ("FolderHierarchy:FolderCreate", ()),
    "FolderDelete": ("FolderHierarchy:FolderDelete", ()),
    "FolderUpdate": ("FolderHierarchy:FolderUpdate", ()),
    "GetItemEstimate": ("GetItemEstimate:GetItemEstimate", ()),
    "MoveItems": ("Move:MoveItems", ("Move:Response",)),
    "MeetingResponse": ("MeetingResponse:MeetingResponse", ("MeetingResponse:Result",)),
    "Ping": ("Ping:Ping", ()),
    "Provision": ("Provision:Provision", ()),
    "Search": ("Search:Search", ()),
    "Settings": ("Settings:Settings", ()),
    "ItemOperations": ("ItemOperations:ItemOperations", ()),
    "ResolveRecipients": ("ResolveRecipients:ResolveRecipients", ()),
    "ValidateCert": ("ValidateCert:ValidateCert", ()),
    "SendMail": ("ComposeMail:SendMail", ()),
    "SmartReply": ("ComposeMail:SmartReply", ()),
    "SmartForward": ("ComposeMail:SmartForward", ()),
    "Find": ("Find:Find", ()),
}


def speaks_status_codes(protocol_version: str | None) -> bool:
    """Whether the device understands Status values above 100 (14.0 and later)."""
    if not protocol_version:
        return False
    major = protocol_version.split(".", 1)[0]
    return major.isdigit() and int(major) >= 14


def status_body(command: str, status: int) -> bytes | None:
    """The WBXML answer ``<Command><Status>status</Status></Command>``, or None when
    the command has no WBXML answer."""
    return _status_body(command, status)


@lru_cache(maxsize=256)
def _status_body(command: str, status: int) -> bytes | None:
    from seg_fast.eas.wbxml import Element, encode

    shape = BLOCKED_SHAPES.get(command)
    if shape is None:
        return None
    root_tag, containers = shape
    ns = root_tag.split(":", 1)[0]
    node = Element(f"{ns}:Status", text=str(status))
    for tag in reversed(containers):
        node = Element(tag, [node])
    return encode(Element(root_tag, [node]))


def _forbidden() -> tuple[int, Headers, bytes]:
    return 403, [(b"content-length", b"0")], b""


def blocked_answer(command: str | None, protocol_version: str | None,
                   status: int = DEVICE_BLOCKED) -> tuple[int, Headers, bytes]:
    """(HTTP status, headers, body) for a device the policies block."""
    if command and speaks_status_codes(protocol_version):
        body = _status_body(command, status)
        if body is not None:
            return 200, [(b"content-type", WBXML_TYPE), (b"content-length", str(len(body)).encode())], body
    return _forbidden()


def unavailable_answer(retry_after: int = 30) -> tuple[int, Headers, bytes]:
    """The mail server (or the gateway) cannot serve now: clients back off."""
    return 503, [(b"retry-after", str(retry_after).encode()), (b"content-length", b"0")], b""
