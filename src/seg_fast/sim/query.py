"""The simulator's reading of an EAS request line (both query forms, MS-ASHTTP).

Deliberately small and separate from the gateway's parser: the simulator plays the
mail server, so it is an independent reading of the same spec.
"""
from __future__ import annotations

import base64
import binascii
import struct
from urllib.parse import parse_qsl, unquote

from seg_fast.errors import EASRequestError

# MS-ASHTTP 2.2.1.1.1.1.2 command codes
COMMAND_CODES: dict[int, str] = {
    0: "Sync", 1: "SendMail", 2: "SmartForward", 3: "SmartReply", 4: "GetAttachment",
    9: "FolderSync", 10: "FolderCreate", 11: "FolderDelete", 12: "FolderUpdate",
    13: "MoveItems", 14: "GetItemEstimate", 15: "MeetingResponse", 16: "Search",
    17: "Settings", 18: "Ping", 19: "ItemOperations", 20: "Provision",
    21: "ResolveRecipients", 22: "ValidateCert", 23: "Find",
}
# MS-ASHTTP 2.2.1.1.1.1.3 parameter tags
PARAM_TAGS: dict[int, str] = {
    0: "AttachmentName", 1: "CollectionId", 3: "ItemId", 4: "LongId",
    6: "Occurrence", 7: "Options", 8: "User",
}
OPTION_SAVE_IN_SENT = 0x01
OPTION_ACCEPT_MULTIPART = 0x02


class Query:
    __slots__ = ("command", "user", "device_id", "device_type", "version", "policy_key",
                 "params", "base64")

    def __init__(self) -> None:
        self.command: str | None = None
        self.user: str | None = None
        self.device_id: str | None = None
        self.device_type: str | None = None
        self.version: str | None = None
        self.policy_key: str | None = None
        self.params: dict[str, str] = {}
        self.base64 = False

    def flag(self, name: str) -> bool:
        """SaveInSent=T (plain form) or the Options bit (base64 form)."""
        if self.base64:
            opts = self.params.get("Options", "")
            bit = {"SaveInSent": OPTION_SAVE_IN_SENT, "AcceptMultiPart": OPTION_ACCEPT_MULTIPART}[name]
            return bool(opts) and bool(ord(opts[0]) & bit)
        return self.params.get(name, "F").upper() == "T"


def parse_target(target: str) -> tuple[str, Query]:
    """Split ``/path?query`` into the path and a Query; raise EASRequestError."""
    path, _, raw = target.partition("?")
    q = Query()
    if not raw:
        return unquote(path), q
    pairs = parse_qsl(raw, keep_blank_values=True)
    # A base64 query can end in "=" padding, so the plain form is told by its Cmd
    # key (the simulator's own /sim/ paths use plain queries without one).
    if any(key == "Cmd" for key, _ in pairs) or path.startswith("/sim/"):
        for key, value in pairs:
            if key == "Cmd":
                q.command = value
            elif key == "User":
                q.user = value
            elif key == "DeviceId":
                q.device_id = value
            elif key == "DeviceType":
                q.device_type = value
            else:
                q.params[key] = value
        return unquote(path), q
    _parse_base64(unquote(raw), q)
    return unquote(path), q


def _parse_base64(raw: str, q: Query) -> None:
    try:
        blob = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise EASRequestError("query is neither key=value pairs nor base64") from None
    q.base64 = True
    try:
        version, code = blob[0], blob[1]
        pos = 4                                   # version, command, locale (2)
        n = blob[pos]
        q.device_id = blob[pos + 1:pos + 1 + n].decode("ascii")
        pos += 1 + n
        n = blob[pos]
        if n not in (0, 4):
            raise EASRequestError(f"base64 query: policy key length {n}, expected 0 or 4")
        if n:
            q.policy_key = str(struct.unpack_from("<I", blob, pos + 1)[0])
        pos += 1 + n
        n = blob[pos]
        q.device_type = blob[pos + 1:pos + 1 + n].decode("ascii")
        pos += 1 + n
        if pos > len(blob):
            raise IndexError
        while pos < len(blob):
            tag, n = blob[pos], blob[pos + 1]
            value = blob[pos + 2:pos + 2 + n]
            if len(value) != n:
                raise IndexError
            name = PARAM_TAGS.get(tag, f"Tag{tag}")
            # Options is a bitmask byte: kept as latin-1 so every byte value survives.
            q.params[name] = value.decode("latin-1" if name == "Options" else "utf-8", "replace")
            pos += 2 + n
    except (IndexError, struct.error, UnicodeDecodeError):
        raise EASRequestError("base64 query is truncated") from None
    if version not in (121, 140, 141, 160, 161):
        raise EASRequestError(f"base64 query: unknown protocol version byte {version}")
    q.version = f"{version // 10}.{version % 10}"
    q.command = COMMAND_CODES.get(code)
    if q.command is None:
        raise EASRequestError(f"base64 query: unknown command code {code}")
    q.user = q.params.pop("User", None)
