"""Where policies come from: the policy API (pull: full, then delta) and push.

Pull, from ``[policy] api_url`` (runs once, in the control process):
  GET  <api_url>/snapshot               -> {"token": T, "policies": {...}, "devices": [...]}
  GET  <api_url>/changes?since=<T>      -> {"token": T2, "policies"?: {...},
                                            "devices": [...changed], "removed": [ids]}
  with ``Authorization: Bearer <api_token>``, through ``api_proxy_url`` if set (http:// or
  https://, TLS to the proxy trusted like the API), TLS
  trust from ``api_verify_tls`` / ``api_ca_file``. The full snapshot is fetched
  when there is no token yet (or the API answers 410 Gone to a delta); then a
  delta every ``delta_interval`` seconds. An unreachable or failing API leaves the
  store as it is (the last snapshot keeps serving); a malformed answer is rejected
  whole with a precise error.

Push (``apply_push``): the MDM posts one change (enrolment, compliance, override)
to the admin listener's ``/seg/push``; it lands in the store at once and every
worker applies it within a second.
"""
from __future__ import annotations

import logging
from urllib.parse import quote, urlsplit

import h11
import msgspec
import trio

from seg_fast.errors import PolicyError, SegFastError
from seg_fast.policy.model import (
    DeviceRecord, PolicyDocument, check_devices, check_document, decode_delta, decode_json,
    decode_policy_file,
)
from seg_fast.policy.settings import PolicySettings
from seg_fast.policy.store import Store, StoreError

log = logging.getLogger("seg_fast.policy.updates")

META_TOKEN = "delta_token"
META_LAST_PULL = "last_pull"
MAX_ANSWER = 256 * 1024 * 1024
RETRY_AFTER_ERROR = 30.0


class SourceError(SegFastError):
    """The policy API could not be reached or answered with an error."""


class PushMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the MDM pushes: changed device records, removed device ids, or a new document."""
    devices: list[DeviceRecord] = []
    removed: list[str] = []
    policies: PolicyDocument | None = None


def decode_push(raw: bytes) -> PushMessage:
    msg = decode_json(raw, PushMessage, "push")
    if msg.policies is not None:
        check_document(msg.policies)
    check_devices(msg.devices, "push")
    return msg


async def apply_push(store: Store, raw: bytes) -> int:
    """Validate one push and write it; returns the store version after it."""
    msg = decode_push(raw)
    version = 0
    if msg.policies is not None:
        version = await store.put_document(msg.policies)
    if msg.devices:
        version = await store.put_devices(msg.devices)
    if msg.removed:
        version = await store.remove_devices(msg.removed)
    log.info("push: %d device(s) changed, %d removed%s", len(msg.devices), len(msg.removed),
             ", new document" if msg.policies is not None else "")
    return version


async def http_get(url: str, settings: PolicySettings, label: str = "policy API",
                   proxy_ca_file: str | None = None) -> tuple[int, bytes]:
    """One GET through the configured outbound proxy and TLS trust; (status, body).

    ``label`` names the service in errors (check-config also reaches the mail server with it);
    an https:// proxy is trusted with ``proxy_ca_file`` (None: api_ca_file, as for the API)."""
    from seg_fast.config import TimeoutSettings, UpstreamSettings
    from seg_fast.proxy.upstream import UpstreamError, UpstreamPool, origin_of

    try:
        origin = origin_of(url)
    except UpstreamError as exc:
        raise SourceError(f"{label}: {exc}") from None
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # The proxy's connector (outbound CONNECT proxy, TLS trust), configured for the API.
    pool = UpstreamPool(UpstreamSettings(url=url, verify_tls=settings.api_verify_tls, ca_file=settings.api_ca_file,
                                         proxy_url=settings.api_proxy_url,
                                         proxy_ca_file=settings.api_ca_file if proxy_ca_file is None else proxy_ca_file,
                                         pool_size=1, idle_pool_size=0),
                        TimeoutSettings(upstream_connect=settings.api_timeout))
    try:
        with trio.fail_after(settings.api_timeout):
            conn = await pool.connect(origin)
            try:
                headers = [(b"host", origin.host_header), (b"accept", b"application/json"),
                           (b"connection", b"close"), (b"user-agent", b"seg-fast-policy")]
                if settings.api_token:
                    headers.append((b"authorization", b"Bearer " + settings.api_token.encode()))
                h = conn.h11
                await conn.stream.send_all(h.send(h11.Request(method=b"GET", target=target.encode(),
                                                              headers=headers)))
                await conn.stream.send_all(h.send(h11.EndOfMessage()))
                status, chunks, size = 0, [], 0
                while True:
                    event = h.next_event()
                    if event is h11.NEED_DATA:
                        h.receive_data(await conn.stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > MAX_ANSWER:
                            raise SourceError(f"{label} answer larger than {MAX_ANSWER} bytes")
                        chunks.append(event.data)
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        return status, b"".join(chunks)
            finally:
                await conn.aclose()
    except trio.TooSlowError:
        raise SourceError(f"{label} {origin.host}:{origin.port}: no answer within {settings.api_timeout} s") from None
    except UpstreamError as exc:
        raise SourceError(f"{label}: {exc}") from None
    except (h11.ProtocolError, trio.BrokenResourceError, OSError) as exc:
        raise SourceError(f"{label} {origin.host}:{origin.port}: {exc}") from None


class _Full(msgspec.Struct, kw_only=True):
    token: str = ""


class PolicySource:
    """Pulls the policy API into the store: one full snapshot, then deltas."""

    retry_after_error = RETRY_AFTER_ERROR

    def __init__(self, settings: PolicySettings, store: Store):
        self.settings = settings
        self.store = store
        self.base = settings.api_url.rstrip("/")
        self.last_error: str = ""
        self.last_success: float = 0.0

    async def pull_full(self) -> int:
        status, body = await http_get(f"{self.base}/snapshot", self.settings)
        if status != 200:
            raise SourceError(f"policy API snapshot: HTTP {status}")
        pf = decode_policy_file(_without_token(body), what="policy API snapshot")
        token = msgspec.json.decode(body, type=_Full).token
        version = await self.store.replace_all(pf.policies, pf.devices)
        await self.store.set_meta(META_TOKEN, token, notify=False)
        log.info("policy API: full snapshot, %d devices, version %d", len(pf.devices), version)
        return version

    async def pull_delta(self, token: str) -> int:
        status, body = await http_get(f"{self.base}/changes?since={quote(token, safe='')}", self.settings)
        if status == 410:   # the token expired: start over
            return await self.pull_full()
        if status != 200:
            raise SourceError(f"policy API changes: HTTP {status}")
        delta = decode_delta(body)
        version = await self.store.version()
        if delta.policies is not None:
            version = await self.store.put_document(delta.policies)
        if delta.devices:
            version = await self.store.put_devices(delta.devices)
        if delta.removed:
            version = await self.store.remove_devices(delta.removed)
        await self.store.set_meta(META_TOKEN, delta.token, notify=False)
        log.info("policy API: delta, %d changed, %d removed", len(delta.devices), len(delta.removed))
        return version

    async def pull_once(self) -> int:
        """One pull (full or delta); raises SourceError/PolicyError, store untouched then."""
        token = await self.store.get_meta(META_TOKEN)
        version = await (self.pull_delta(token) if token else self.pull_full())
        self.last_success = trio.current_time()
        self.last_error = ""
        return version

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.pull_once()
                delay = self.settings.delta_interval
            except (SourceError, PolicyError, StoreError) as exc:
                # Keep serving the last snapshot (a store that cannot be written, Redis down,
                # fails the pull the same way); say why, try again sooner.
                self.last_error = str(exc)
                log.error("policy pull failed (last snapshot keeps serving): %s", exc)
                delay = min(self.settings.delta_interval, self.retry_after_error)
            await trio.sleep(delay)


def _without_token(body: bytes) -> bytes:
    """The snapshot answer is a PolicyFile plus "token": drop the token for strict decoding."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise PolicyError(f"policy API snapshot: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PolicyError("policy API snapshot: expected a JSON object")
    obj.pop("token", None)
    return msgspec.json.encode(obj)


async def run_pull(settings: PolicySettings, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The policy API pull on its own store connection: for a control process whose
    admin API is off (with it on, the admin server runs the pull beside the API)."""
    from seg_fast.policy.store import open_store

    store = open_store(settings)
    delay = 0.5
    while True:
        try:
            await store.open()
            break
        except StoreError as exc:
            log.error("policy pull waits for the store: %s", exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)
    try:
        await PolicySource(settings, store).run(task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
