"""A minimal ActiveSync device over trio + h11: one keep-alive connection.

For tests, the demo and load tools: it speaks to the simulator or to the gateway
in front of it the way a phone does (Basic auth, plain or base64 query, policy key
header, WBXML bodies).
"""
from __future__ import annotations

import base64
from typing import NamedTuple
from urllib.parse import urlencode

import h11
import trio

from seg_fast.eas.request import PARAM_TAGS, encode_base64_query
from seg_fast.sim.tree import E, Element, decode, encode, text

WBXML_TYPE = b"application/vnd.ms-sync.wbxml"


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def doc(self) -> Element | None:
        return decode(self.body) if self.body[:2] == b"\x03\x01" else None


class EasClient:
    def __init__(self, host: str, port: int, user: str, password: str, device_id: str, *,
                 device_type: str = "SmartPhone", version: str = "14.1", ssl_context=None,
                 server_hostname: str | None = None, path: str = "/Microsoft-Server-ActiveSync",
                 user_agent: str = "seg-fast-sim/1.0"):
        self.host, self.port = host, port
        self.user, self.password = user, password
        self.device_id, self.device_type = device_id, device_type
        self.version = version
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.path = path
        self.user_agent = user_agent
        self.policy_key: str | None = None
        self._stream = None
        self._conn: h11.Connection | None = None

    async def aclose(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
        self._stream = self._conn = None

    async def __aenter__(self) -> "EasClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def target(self, command: str, params: dict[str, str] | None = None, base64_query: bool = False) -> str:
        if base64_query:
            key = int(self.policy_key) if self.policy_key else None
            tags = {name: tag for tag, name in PARAM_TAGS.items()}
            encoded = [(tags[name], value if isinstance(value, bytes) else value.encode())
                       for name, value in (params or {}).items()]
            return f"{self.path}?" + encode_base64_query(
                version=self.version, command=command, device_id=self.device_id.encode(),
                device_type=self.device_type, policy_key=key, params=encoded)
        query = {"Cmd": command, "User": self.user, "DeviceId": self.device_id,
                 "DeviceType": self.device_type, **(params or {})}
        return f"{self.path}?{urlencode(query)}"

    async def request(self, command: str, body: Element | bytes | None = None, *,
                      params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                      base64_query: bool = False, method: str = "POST", auth: bool = True) -> Response:
        raw = encode(body) if isinstance(body, Element) else (body or b"")
        hdrs = [("host", f"{self.host}:{self.port}"), ("user-agent", self.user_agent),
                ("content-length", str(len(raw)))]
        if auth:
            cred = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            hdrs.append(("authorization", f"Basic {cred}"))
        if not base64_query:
            hdrs.append(("ms-asprotocolversion", self.version))
            if self.policy_key:
                hdrs.append(("x-ms-policykey", self.policy_key))
        if isinstance(body, Element):
            hdrs.append(("content-type", WBXML_TYPE.decode()))
        hdrs += list((headers or {}).items())
        target = self.target(command, params, base64_query) if command else self.path
        return await self.send(method, target, hdrs, raw)

    async def send(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        if self._conn is None or self._conn.our_state is not h11.IDLE:
            await self._connect()
        conn, stream = self._conn, self._stream
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers))
                              + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        resp = await self._next(conn, stream)
        if not isinstance(resp, h11.Response):
            raise ConnectionError(f"no response: {resp!r}")
        chunks = []
        while True:
            ev = await self._next(conn, stream)
            if isinstance(ev, h11.Data):
                chunks.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise ConnectionError(f"response cut short: {ev!r}")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        return Response(resp.status_code,
                        {k.decode("latin-1"): v.decode("latin-1") for k, v in resp.headers},
                        b"".join(chunks))

    async def _connect(self) -> None:
        await self.aclose()
        stream = await trio.open_tcp_stream(self.host, self.port)
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_hostname=self.server_hostname,
                                    https_compatible=True)
        self._stream = stream
        self._conn = h11.Connection(h11.CLIENT)

    @staticmethod
    async def _next(conn: h11.Connection, stream):
        try:
            while True:
                ev = conn.next_event()
                if ev is not h11.NEED_DATA:
                    return ev
                conn.receive_data(await stream.receive_some(65536))
        except h11.RemoteProtocolError as exc:
            raise ConnectionError(f"bad HTTP from the server: {exc}") from None

    # -- conveniences ---------------------------------------------------------------------
    async def provision(self) -> str:
        """The two-step Provision; sets and returns the final policy key."""
        ptype = "MS-WAP-Provisioning-XML" if self.version == "2.5" else "MS-EAS-Provisioning-WBXML"
        self.policy_key = None
        r1 = await self.request("Provision", E("Provision:Provision", E("Provision:Policies",
                                E("Provision:Policy", E("Provision:PolicyType", ptype)))))
        temp = text(r1.doc, "Provision:Policies", "Provision:Policy", "Provision:PolicyKey")
        if r1.status != 200 or not temp:
            raise ConnectionError(f"Provision step 1 failed: HTTP {r1.status}")
        r2 = await self.request("Provision", E("Provision:Provision", E("Provision:Policies",
                                E("Provision:Policy", E("Provision:PolicyType", ptype),
                                  E("Provision:PolicyKey", temp), E("Provision:Status", 1)))))
        final = text(r2.doc, "Provision:Policies", "Provision:Policy", "Provision:PolicyKey")
        if r2.status != 200 or not final:
            raise ConnectionError(f"Provision step 2 failed: HTTP {r2.status}")
        self.policy_key = final
        return final
