"""EasRequest: who is asking for what, read from the request line and headers.

Both query forms of MS-ASHTTP 2.2.1.1.1 are understood: the plain form
(``Cmd=Sync&User=jdoe&DeviceId=ABC&DeviceType=iPhone``) and the base64 form
(2.2.1.1.1.1, one base64 blob of packed fields). Anything malformed raises
EASRequestError, which the proxy answers with HTTP 400.
"""
from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote_to_bytes

import msgspec

from seg_fast.errors import EASRequestError


class EasRequest(msgspec.Struct, kw_only=True):
    method: str                       # "POST", "OPTIONS", ...
    path: str                         # the path without the query
    command: str | None = None        # "Sync", "Ping", ... (names as in MS-ASCMD)
    user: str | None = None           # as the device gave it (query User= or Basic auth)
    device_id: str | None = None
    device_type: str | None = None
    protocol_version: str | None = None   # "14.1"; from MS-ASProtocolVersion or the base64 form
    policy_key: str | None = None
    user_agent: str | None = None     # the "mail client" policies match
    params: dict[str, str] = {}       # other query parameters (CollectionId, ItemId, AttachmentName...)
    base64_query: bool = False
    accept_multipart: bool = False
    client_ip: str = ""


# MS-ASHTTP 2.2.1.1.1.1.2: command codes of the base64 form.
COMMAND_CODES: dict[int, str] = {
    0: "Sync", 1: "SendMail", 2: "SmartForward", 3: "SmartReply", 4: "GetAttachment",
    5: "GetHierarchy", 6: "CreateCollection", 7: "DeleteCollection", 8: "MoveCollection",
    9: "FolderSync", 10: "FolderCreate", 11: "FolderDelete", 12: "FolderUpdate",
    13: "MoveItems", 14: "GetItemEstimate", 15: "MeetingResponse", 16: "Search",
    17: "Settings", 18: "Ping", 19: "ItemOperations", 20: "Provision",
    21: "ResolveRecipients", 22: "ValidateCert", 23: "Find",
}
COMMANDS = frozenset(COMMAND_CODES.values()) | {"Notify"}

# MS-ASHTTP 2.2.1.1.1.1.3: command parameter tags of the base64 form.
PARAM_TAGS: dict[int, str] = {
    0: "AttachmentName", 1: "CollectionId", 3: "ItemId", 4: "LongId",
    6: "Occurrence", 7: "Options", 8: "User",
}
OPTION_SAVE_IN_SENT = 0x01
OPTION_ACCEPT_MULTIPART = 0x02

_MAX_QUERY = 4096
_MAX_VALUE = 1024
_B64_QUERY = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
_TOKEN = re.compile(r"[A-Za-z0-9_.\-:@\\]*")
_VERSION = re.compile(r"\d{1,2}\.\d{1,2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_request(method: str, target: bytes | str, headers, client_ip: str = "") -> EasRequest:
    """Identify one request. ``headers`` is a list of (name, value) pairs (bytes or str)."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    path_b, _, query = target.partition(b"?")
    try:
        path = path_b.decode("ascii")
    except UnicodeDecodeError:
        raise EASRequestError("request path is not ASCII") from None
    if len(query) > _MAX_QUERY:
        raise EASRequestError(f"query longer than {_MAX_QUERY} bytes")

    hdr: dict[str, str] = {}
    for name, value in headers:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        hdr.setdefault(name.lower(), value)

    req = EasRequest(method=method, path=path, client_ip=client_ip)
    req.user_agent = hdr.get("user-agent")
    version = hdr.get("ms-asprotocolversion")
    if version is not None:
        version = version.strip()
        if not _VERSION.fullmatch(version):
            raise EASRequestError("MS-ASProtocolVersion header is not a version number")
        req.protocol_version = version
    req.policy_key = hdr.get("x-ms-policykey")
    req.accept_multipart = hdr.get("ms-asacceptmultipart", "").strip().upper() == "T"

    if query:
        if _looks_base64(query):
            _parse_base64_query(query, req)
        else:
            _parse_plain_query(query, req)

    auth_user = basic_auth_user(hdr.get("authorization"))
    if auth_user is not None:
        # The authenticated name is what the mail server checks; the query's User is a hint.
        req.user = auth_user
    return req


def _looks_base64(query: bytes) -> bool:
    # The plain form always has name=value pairs; a base64 blob is one token with '=' only as padding.
    unquoted = unquote_to_bytes(query)
    return b"&" not in query and _B64_QUERY.fullmatch(unquoted) is not None and b"=" not in unquoted.rstrip(b"=")


def _parse_plain_query(query: bytes, req: EasRequest) -> None:
    params: dict[str, str] = {}
    for pair in query.split(b"&"):
        if not pair:
            continue
        name_b, eq, value_b = pair.partition(b"=")
        try:
            name = unquote_to_bytes(name_b.replace(b"+", b" ")).decode("utf-8")
            value = unquote_to_bytes(value_b.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise EASRequestError("query parameter is not UTF-8") from None
        if not name or not eq:
            raise EASRequestError("query parameter without a name or '='")
        if len(value) > _MAX_VALUE or _CONTROL.search(name) or _CONTROL.search(value):
            raise EASRequestError(f"query parameter {name[:40]!r} is too long or holds control characters")
        if name in params:
            raise EASRequestError(f"query parameter {name[:40]!r} given twice")
        params[name] = value
    cmd = params.pop("Cmd", None)
    if cmd is not None:
        if not cmd.isalnum():
            raise EASRequestError("Cmd is not a command name")
        req.command = cmd
    req.user = params.pop("User", None)
    req.device_id = params.pop("DeviceId", None)
    req.device_type = params.pop("DeviceType", None)
    for field in ("device_id", "device_type"):
        value = getattr(req, field)
        if value is not None and not _TOKEN.fullmatch(value):
            raise EASRequestError(f"{field} holds characters a device identifier may not")
    req.params = params


def _parse_base64_query(query: bytes, req: EasRequest) -> None:
    try:
        raw = base64.b64decode(unquote_to_bytes(query), validate=True)
    except (binascii.Error, ValueError):
        raise EASRequestError("base64 query is not valid base64") from None
    req.base64_query = True
    end = len(raw)
    if end < 7:
        raise EASRequestError("base64 query shorter than its fixed fields")
    version = raw[0]
    if not 20 <= version <= 199:
        raise EASRequestError(f"base64 query protocol version byte {version} is not a version")
    req.protocol_version = f"{version // 10}.{version % 10}"
    code = raw[1]
    command = COMMAND_CODES.get(code)
    if command is None:
        raise EASRequestError(f"base64 query command code {code} is unknown")
    req.command = command
    pos = 4                                           # skip the 2-byte locale
    dev_len = raw[pos]
    pos += 1
    if pos + dev_len > end:
        raise EASRequestError("base64 query DeviceId runs past the end")
    # The DeviceId travels as raw bytes; hex keeps it a printable, stable identifier.
    req.device_id = raw[pos:pos + dev_len].hex()
    pos += dev_len
    if pos >= end:
        raise EASRequestError("base64 query ends before the policy key length")
    key_len = raw[pos]
    pos += 1
    if key_len not in (0, 4) or pos + key_len > end:
        raise EASRequestError("base64 query policy key must be 0 or 4 bytes")
    if key_len == 4:
        req.policy_key = str(int.from_bytes(raw[pos:pos + 4], "little"))
    pos += key_len
    if pos >= end:
        raise EASRequestError("base64 query ends before the DeviceType length")
    type_len = raw[pos]
    pos += 1
    if pos + type_len > end:
        raise EASRequestError("base64 query DeviceType runs past the end")
    try:
        req.device_type = raw[pos:pos + type_len].decode("ascii")
    except UnicodeDecodeError:
        raise EASRequestError("base64 query DeviceType is not ASCII") from None
    if not _TOKEN.fullmatch(req.device_type):
        raise EASRequestError("base64 query DeviceType holds characters a device type may not")
    pos += type_len
    params: dict[str, str] = {}
    while pos < end:
        if pos + 2 > end:
            raise EASRequestError("base64 query parameter header runs past the end")
        tag, length = raw[pos], raw[pos + 1]
        pos += 2
        if pos + length > end:
            raise EASRequestError("base64 query parameter value runs past the end")
        value = raw[pos:pos + length]
        pos += length
        name = PARAM_TAGS.get(tag)
        if name is None:
            raise EASRequestError(f"base64 query parameter tag {tag} is unknown")
        if name == "Options":
            # A one-byte bitmask per the spec; other lengths are carried as hex, not trusted.
            if length == 1:
                req.accept_multipart = req.accept_multipart or bool(value[0] & OPTION_ACCEPT_MULTIPART)
                params[name] = str(value[0])
            else:
                params[name] = value.hex()
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise EASRequestError(f"base64 query parameter {name} is not UTF-8") from None
        if _CONTROL.search(text):
            raise EASRequestError(f"base64 query parameter {name} holds control characters")
        if name == "User":
            req.user = text
        else:
            params[name] = text
    req.params = params


def basic_auth_user(value: str | None) -> str | None:
    """The user name of a Basic Authorization header (never the password), or None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise EASRequestError("Authorization header is not valid Basic credentials") from None
    user, colon, _ = decoded.partition(":")
    if not colon or _CONTROL.search(user):
        raise EASRequestError("Authorization header is not valid Basic credentials")
    return user


def encode_base64_query(*, version: str, command: str, device_id: bytes, device_type: str,
                        policy_key: int | None = None, locale: int = 0x0409,
                        params: list[tuple[int, bytes]] = ()) -> str:
    """The base64 query form (for the simulator, the fleet and tests)."""
    codes = {name: code for code, name in COMMAND_CODES.items()}
    major, minor = version.split(".")
    out = bytearray([int(major) * 10 + int(minor), codes[command]])
    out += locale.to_bytes(2, "little")
    out += bytes([len(device_id)]) + device_id
    if policy_key is None:
        out.append(0)
    else:
        out += b"\x04" + policy_key.to_bytes(4, "little")
    out += bytes([len(device_type)]) + device_type.encode("ascii")
    for tag, value in params:
        out += bytes([tag, len(value)]) + value
    return base64.b64encode(bytes(out)).decode("ascii")
