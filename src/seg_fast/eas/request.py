"""EasRequest: who is asking for what, read from the request line and headers.

(Contract shared by proxy, policy and content; the parser is filled in by the
gateway-core work.)
"""
from __future__ import annotations

import msgspec


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
