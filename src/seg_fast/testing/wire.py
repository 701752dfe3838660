"""EAS requests as they go on the wire: request line (plain or base64 query), headers, body.

``build(command, body, version=..., device=Device(...), base64_query=...)`` gives
an ``HttpRequest`` (msgspec: it is what a failure file stores); the strategy
``http_requests(...)`` draws valid ones over the commands of a version. The
base64 form (MS-ASHTTP 2.2.1.1.1.1) carries version, device and policy key in
the blob, so those headers are left out; the plain form sends them as headers.
"""
from __future__ import annotations

import base64
from urllib.parse import urlencode

import msgspec
from hypothesis import strategies as st

from seg_fast.eas.request import OPTION_SAVE_IN_SENT, PARAM_TAGS, encode_base64_query
from seg_fast.eas.wbxml import Element, encode
from seg_fast.testing import spec
from seg_fast.testing.requests import Known, request

WBXML_TYPE = "application/vnd.ms-sync.wbxml"
MIME_TYPE = "message/rfc822"
_TAG_OF = {name: tag for tag, name in PARAM_TAGS.items()}


class Device(msgspec.Struct, frozen=True):
    """Who the fuzzer speaks as."""
    user: str = "fuzz"
    password: str = "secret"
    device_id: str = "SEGFASTFUZZ1"
    device_type: str = "SmartPhone"
    user_agent: str = "seg-fast-fuzz/1.0"
    policy_key: str | None = None


class HttpRequest(msgspec.Struct, kw_only=True):
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    command: str = ""
    version: str = ""


def query_params(command: str, body, v: int, known: Known) -> dict[str, str]:
    """Query parameters a 12.1 SendMail/SmartReply/SmartForward with a MIME body needs."""
    if v >= 140 or not isinstance(body, bytes) or command not in ("SendMail", "SmartReply", "SmartForward"):
        return {}
    params = {"SaveInSent": "T"}
    if command != "SendMail":
        sid = known.server_ids[0]
        params.update(ItemId=sid, CollectionId=sid.partition(":")[0])
    return params


def build(command: str, body: Element | bytes | None, *, version: str, device: Device = Device(),
          base64_query: bool = False, params: dict[str, str] | None = None, host: str = "localhost",
          path: str = "/Microsoft-Server-ActiveSync", extra_headers=()) -> HttpRequest:
    raw = encode(body) if isinstance(body, Element) else (body or b"")
    params = dict(params or {})
    headers = [("host", host), ("user-agent", device.user_agent)]
    cred = base64.b64encode(f"{device.user}:{device.password}".encode()).decode()
    headers.append(("authorization", f"Basic {cred}"))
    if base64_query:
        key = int(device.policy_key) if device.policy_key and device.policy_key.isdigit() else None
        encoded = []
        for name, value in params.items():
            if name == "SaveInSent":
                encoded.append((_TAG_OF["Options"], bytes([OPTION_SAVE_IN_SENT])))
            else:
                encoded.append((_TAG_OF[name], value.encode()))
        target = f"{path}?" + encode_base64_query(
            version=version, command=command, device_id=device.device_id.encode(),
            device_type=device.device_type, policy_key=key, params=encoded)
    else:
        query = {"Cmd": command, "User": device.user, "DeviceId": device.device_id,
                 "DeviceType": device.device_type, **params}
        target = f"{path}?{urlencode(query)}"
        headers.append(("ms-asprotocolversion", version))
        if device.policy_key:
            headers.append(("x-ms-policykey", device.policy_key))
    if isinstance(body, Element):
        headers.append(("content-type", WBXML_TYPE))
    elif raw:
        headers.append(("content-type", MIME_TYPE))
    headers += list(extra_headers)
    headers.append(("content-length", str(len(raw))))
    return HttpRequest(method="POST", target=target, headers=headers, body=raw, command=command, version=version)


@st.composite
def http_requests(draw, version: str = "16.1", commands=None, known: Known = Known(),
                  device: Device = Device(), host: str = "localhost",
                  path: str = "/Microsoft-Server-ActiveSync") -> HttpRequest:
    """Valid requests, in either query form, over ``commands`` at ``version``."""
    from seg_fast.testing.requests import commands_for
    names = [c for c in (commands or commands_for(version)) if c in commands_for(version)]
    command = draw(st.sampled_from(names))
    body = draw(request(command, version, known))
    extra = [("ms-asacceptmultipart", "T")] if command == "ItemOperations" and draw(st.booleans()) else []
    return build(command, body, version=version, device=device, base64_query=draw(st.booleans()),
                 params=query_params(command, body, spec.vnum(version), known), host=host, path=path,
                 extra_headers=extra)
