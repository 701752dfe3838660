"""EasRequest: who is asking for what, read from the request line and headers.

Both query forms of MS-ASHTTP 2.2.1.1.1 are understood: the plain form
(``Cmd=Sync&User=jdoe&DeviceId=ABC&DeviceType=iPhone``) and the base64 form
(2.2.1.1.1.1, one base64 blob of packed fields). Anything malformed raises
EASRequestError, which the proxy answers with HTTP 400.

The user the policy decides on comes from the credential where it names one
(credentials.py); the device's ``User=`` must then agree with it. Two
Authorization headers, or a control character in any header value, are refused.
"""
from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote_to_bytes

import msgspec

from seg_fast.eas import credentials
from seg_fast.errors import EASRequestError


class EasRequest(msgspec.Struct, kw_only=True):
    method: str                       # "POST", "OPTIONS", ...
    path: str                         # the path without the query
    command: str | None = None        # "Sync", "Ping", ... (names as in MS-ASCMD)
    user: str | None = None           # the credential's user; else the query's User= (see identity)
    device_id: str | None = None
    device_type: str | None = None
    protocol_version: str | None = None   # "14.1"; from MS-ASProtocolVersion or the base64 form
    policy_key: str | None = None
    user_agent: str | None = None     # the "mail client" policies match
    params: dict[str, str] = {}       # other query parameters (CollectionId, ItemId, AttachmentName...)
    base64_query: bool = False
    accept_multipart: bool = False
    client_ip: str = ""               # the device's address (past trusted proxies)
    auth_scheme: str = ""             # "basic", "bearer", "ntlm", "negotiate", ... ("" : none)
    identity: str = credentials.NONE  # where ``user`` came from: credentials.CREDENTIAL / HANDSHAKE / NONE


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
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_TOKEN = re.compile(r"[A-Za-z0-9_.\-:@\\]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
# Header values: anything but a control character, HTAB allowed (RFC 9110 5.5).
_CLEAN_VALUE_BYTES = re.compile(rb"[\t\x20-\x7e\x80-\xff]*").fullmatch
_CLEAN_VALUE_STR = re.compile("[\t\x20-\x7e\x80-\U0010ffff]*").fullmatch
_B64_VERSIONS = {v: f"{v // 10}.{v % 10}" for v in range(20, 200)}   # base64-form version byte -> "14.1"

# Lowercased header name (bytes and str keys, so either form is one lookup) -> the key it is
# kept under, or "" for common headers not read: those skip the lower() call.
_WANTED: dict[bytes | str, str] = {}
for _name in ("user-agent", "ms-asprotocolversion", "x-ms-policykey", "ms-asacceptmultipart", "authorization",
              "host", "content-type", "content-length", "accept", "accept-encoding", "accept-language",
              "connection", "x-forwarded-for", "expect", "transfer-encoding"):
    _key = _name if _name in ("user-agent", "ms-asprotocolversion", "x-ms-policykey",
                              "ms-asacceptmultipart", "authorization") else ""
    _WANTED[_name] = _WANTED[_name.encode("ascii")] = _key
del _name, _key
# Query bytes that need no unquoting, UTF-8 or control check, and are valid in a device token.
_SIMPLE_QUERY_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-:@\\=&"



def parse_request(method: str, target: bytes | str, headers, client_ip: str = "",
                  trusted_proxies=None) -> EasRequest:
    """Identify one request. ``headers`` is a list of (name, value) pairs (bytes or str).

    ``client_ip`` is the peer's address; when it is one of ``trusted_proxies``
    (proxy.headers.TrustedProxies), the device's address is read from X-Forwarded-For.
    """
    if isinstance(target, str):
        target = target.encode("latin-1")
    path_b, _, query = target.partition(b"?")
    try:
        path = path_b.decode("ascii")
    except UnicodeDecodeError:
        raise EASRequestError("request path is not ASCII") from None
    if len(query) > _MAX_QUERY:
        raise EASRequestError(f"query longer than {_MAX_QUERY} bytes")

    # One pass, keeping only the headers read (the first of each name); values decoded later.
    hdr = {}
    wanted = _WANTED
    values = []
    keep = values.append
    for name, value in headers:
        key = wanted.get(name)
        if key is None:
            key = wanted.get(name.lower())
        if key:
            if key not in hdr:
                hdr[key] = value
            elif key == "authorization":
                # The policy would decide on one while the mail server may take the other.
                raise EASRequestError("more than one Authorization header")
        keep(value)
    _check_values(values)

    req = EasRequest(method=method, path=path, client_ip=client_ip)
    if hdr:
        value = hdr.get("user-agent")
        if value is not None:
            req.user_agent = value.decode("latin-1") if isinstance(value, bytes) else value
        version = hdr.get("ms-asprotocolversion")
        if version is not None:
            if isinstance(version, bytes):
                version = version.decode("latin-1")
            version = version.strip()
            # Same as fullmatch(r"\d{1,2}\.\d{1,2}"): str \d is exactly isdecimal().
            major, dot, minor = version.partition(".")
            if not (dot and 0 < len(major) < 3 and 0 < len(minor) < 3
                    and major.isdecimal() and minor.isdecimal()):
                raise EASRequestError("MS-ASProtocolVersion header is not a version number")
            req.protocol_version = version
        value = hdr.get("x-ms-policykey")
        if value is not None:
            req.policy_key = value.decode("latin-1") if isinstance(value, bytes) else value
        value = hdr.get("ms-asacceptmultipart")
        if value is not None:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            req.accept_multipart = value.strip().upper() == "T"

    if query:
        unquoted = None if b"&" in query else _unquoted_base64(query)
        if unquoted is not None:
            _parse_base64_query(unquoted, req)
        else:
            _parse_plain_query(query, req)

    value = hdr.get("authorization")
    if value:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        # Not cached: a cache keyed by the header would keep passwords in memory.
        req.auth_scheme, auth_user, req.identity = credentials.read_authorization(value)
        if auth_user is not None:
            # The credential's user is the one the mail server checks; the query's User is a
            # claim that must agree with it (docs/policy.md, "Which user a request is decided on").
            claimed = req.user
            if claimed and not credentials.same_user(claimed, auth_user):
                raise EASRequestError("User= names another user than the credential")
            req.user = auth_user
    if trusted_proxies is not None and client_ip in trusted_proxies:
        req.client_ip = trusted_proxies.client_of(client_ip, headers)
    return req


def _check_values(values: list) -> None:
    """Refuse control characters other than HTAB in header values (RFC 9110 5.5): h11
    refuses NUL, CR, LF, VT and FF, not the others (0x01-0x08, 0x0e-0x1f, 0x7f)."""
    try:
        clean = _CLEAN_VALUE_BYTES(b"".join(values))     # one scan of the whole head's values
    except TypeError:                                   # str values (callers other than the proxy)
        clean = all(_CLEAN_VALUE_STR(v) if isinstance(v, str) else _CLEAN_VALUE_BYTES(v) for v in values)
    if not clean:
        raise EASRequestError("a header value holds a control character")


def _unquoted_base64(query: bytes) -> bytes | None:
    """The unquoted query if it is one base64 token ('=' only as up to 2 pads), else None."""
    # The plain form always has name=value pairs; a base64 blob is one token with '=' only as padding.
    unquoted = unquote_to_bytes(query) if b"%" in query else query
    body = unquoted.rstrip(b"=")
    if not body or len(unquoted) - len(body) > 2 or body.translate(None, _B64_ALPHABET):
        return None
    return unquoted


def _parse_plain_query(query: bytes, req: EasRequest) -> None:
    # The usual query (token characters, '=' and '&' only) needs no decoding checks at all.
    simple = not query.translate(None, _SIMPLE_QUERY_BYTES)
    if simple:
        text = query.decode("ascii")
        control = False
    else:
        if b"%" in query:
            return _parse_plain_query_quoted(query, req)
        try:
            # '+' and '=' and '&' are ASCII, so decoding the whole equals decoding each piece.
            text = query.replace(b"+", b" ").decode("utf-8")
        except UnicodeDecodeError:
            return _parse_plain_query_quoted(query, req)   # reports the first bad pair in order
        control = _CONTROL_BYTES.search(query) is not None
    params: dict[str, str] = {}
    for pair in text.split("&"):
        if not pair:
            continue
        name, eq, value = pair.partition("=")
        if not name or not eq:
            raise EASRequestError("query parameter without a name or '='")
        if len(value) > _MAX_VALUE or (control and (_CONTROL.search(name) or _CONTROL.search(value))):
            raise EASRequestError(f"query parameter {name[:40]!r} is too long or holds control characters")
        if name in params:
            raise EASRequestError(f"query parameter {name[:40]!r} given twice")
        params[name] = value
    _take_plain_fields(params, req, simple)


def _parse_plain_query_quoted(query: bytes, req: EasRequest) -> None:
    # Control characters come from raw bytes or from %-escapes: search only where they can be.
    raw_control = _CONTROL_BYTES.search(query) is not None
    params: dict[str, str] = {}
    for pair in query.split(b"&"):
        if not pair:
            continue
        name_b, eq, value_b = pair.partition(b"=")
        name_b = name_b.replace(b"+", b" ")
        value_b = value_b.replace(b"+", b" ")
        name_q = b"%" in name_b
        value_q = b"%" in value_b
        try:
            name = (unquote_to_bytes(name_b) if name_q else name_b).decode("utf-8")
            value = (unquote_to_bytes(value_b) if value_q else value_b).decode("utf-8")
        except UnicodeDecodeError:
            raise EASRequestError("query parameter is not UTF-8") from None
        if not name or not eq:
            raise EASRequestError("query parameter without a name or '='")
        if len(value) > _MAX_VALUE or ((raw_control or name_q or value_q)
                                       and (_CONTROL.search(name) or _CONTROL.search(value))):
            raise EASRequestError(f"query parameter {name[:40]!r} is too long or holds control characters")
        if name in params:
            raise EASRequestError(f"query parameter {name[:40]!r} given twice")
        params[name] = value
    _take_plain_fields(params, req)


def _take_plain_fields(params: dict[str, str], req: EasRequest, tokens_checked: bool = False) -> None:
    cmd = params.pop("Cmd", None)
    if cmd is not None:
        if not cmd.isalnum():
            raise EASRequestError("Cmd is not a command name")
        req.command = cmd
    req.user = params.pop("User", None)
    device_id = params.pop("DeviceId", None)
    device_type = params.pop("DeviceType", None)
    req.device_id = device_id
    req.device_type = device_type
    # A query of token bytes may still carry '=' inside a value ("DeviceId==").
    if device_id is not None and (not _TOKEN.fullmatch(device_id) if not tokens_checked else "=" in device_id):
        raise EASRequestError("device_id holds characters a device identifier may not")
    if device_type is not None and (not _TOKEN.fullmatch(device_type) if not tokens_checked else "=" in device_type):
        raise EASRequestError("device_type holds characters a device identifier may not")
    req.params = params


def _parse_base64_query(unquoted: bytes, req: EasRequest) -> None:
    try:
        # What b64decode(validate=True) runs; the token was checked against the alphabet already.
        raw = binascii.a2b_base64(unquoted, strict_mode=True)
    except (binascii.Error, ValueError):
        raise EASRequestError("base64 query is not valid base64") from None
    req.base64_query = True
    end = len(raw)
    if end < 7:
        raise EASRequestError("base64 query shorter than its fixed fields")
    version = raw[0]
    if not 20 <= version <= 199:
        raise EASRequestError(f"base64 query protocol version byte {version} is not a version")
    req.protocol_version = _B64_VERSIONS[version]
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
    return credentials.basic_user(token)


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
