"""The admin API's routes, sans-IO: (method, path, body) -> (status, content type, body).

Everything under ``/seg/`` as in the guide's diagnostics table, plus the actions of
the email dashboard (overrides, test mode, run compliance), logging levels per
area, the MDM's push endpoint and the OpenAPI document. ``AdminApi`` reads from a
``PolicyGatekeeper`` (its engine follows the store like a worker's does) and
writes through the store, so every worker sees an admin change within a second.
"""
from __future__ import annotations

import contextvars
import csv
import io
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import unquote

import msgspec
import trio

from seg_fast.admin.console import (
    FILTERS, AuditLog, BulkBody, DeviceIndex, QueryError, audit_path,
)
from seg_fast.eas.request import EasRequest
from seg_fast.errors import PolicyError, SegFastError
from seg_fast.policy import engine as E
from seg_fast.policy.gate import (
    LOG_AREAS, LOG_LEVELS, META_COMPLIANCE_RUN, META_LOG_LEVELS, META_TEST_MODE, PolicyGatekeeper,
)
from seg_fast.policy.model import DeviceRecord, Override, device_key, decode_document
from seg_fast.policy.source import apply_push

log = logging.getLogger("seg_fast.policy.updates")

# Per request (one trio task each): who is calling (for the audit log) and the query string.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="token")
QUERY: contextvars.ContextVar[dict] = contextvars.ContextVar("query", default={})

JSON = "application/json"
CSV = "text/csv; charset=utf-8"
Answer = tuple[int, str, bytes]


class HttpError(SegFastError):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


class OverrideBody(msgspec.Struct, forbid_unknown_fields=True):
    override: Override


class TestModeBody(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool


class DxStart(msgspec.Struct, forbid_unknown_fields=True):
    kind: str                       # "device" | "user"
    target: str
    minutes: float = 60.0


def _json(obj, status: int = 200) -> Answer:
    return status, JSON, msgspec.json.encode(obj)


def _body(raw: bytes, typ):
    try:
        return msgspec.json.decode(raw, type=typ)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise HttpError(400, f"request body: {exc}") from None


def _csv(header: list[str], rows) -> Answer:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for row in rows:
        # A cell starting with = + - @ would be a formula in a spreadsheet: quote it.
        w.writerow(["'" + c if isinstance(c, str) and c[:1] in ("=", "+", "-", "@") else c for c in row])
    return 200, CSV, buf.getvalue().encode()


@dataclass
class Route:
    method: str
    pattern: str            # "/seg/policy/device/{id}"
    summary: str
    handler: Callable[..., Awaitable[Answer]]
    auth: str = "admin"     # "admin" | "push"
    body: str = ""          # name of the request body schema in the OpenAPI document


class AdminApi:
    def __init__(self, config, gate: PolicyGatekeeper, *, source=None, started: float | None = None):
        self.config = config
        self.gate = gate
        self.store = gate.store
        self.source = source
        self.started = started or time.time()
        self.index = DeviceIndex()
        self.index_dirty = True
        self.audit = AuditLog(audit_path(config))
        from seg_fast.admin.series import Series, series_path
        self.series = Series(series_path(config))
        self.series.load()
        self._devices_sampled = 0.0
        self.routes = [
            Route("GET", "/seg/diagnostic/cluster", "Nodes, workers, snapshot version and counts", self.cluster),
            Route("GET", "/seg/policy/segconfig", "Every section of the running config (tokens and URL passwords masked)", self.segconfig),
            Route("GET", "/seg/policy/generalaccess", "General access and managed device policies", self.generalaccess),
            Route("GET", "/seg/policy/device/{id}", "One device: MDM record, what the gateway saw, the decision", self.device),
            Route("GET", "/seg/policy/account/{user}", "One user's devices and the user policy's verdict", self.account),
            Route("GET", "/seg/policy/easdevicetype/{type}", "The EAS device type policy's verdict for a type", self.devicetype),
            Route("GET", "/seg/policy/mailclient/{client}", "The mail client policy's verdict (URL-encoded client)", self.mailclient),
            Route("GET", "/seg/policy/hyperlink", "The hyperlink policy", self.hyperlink),
            Route("GET", "/seg/policy/encryptionkeydatapayload/{id}",
                  "The device-user attachment key id the MDM reported for a device", self.keydata),
            Route("GET", "/seg/download/{type}/", "CSV: device, account, managedattachment, unmanagedattachment, redirect", self.download),
            Route("GET", "/seg/devices/{status}", "List view: devices seen (all, allowed, blocked, test_mode)", self.devices),
            Route("GET", "/seg/admin", "The console (asks for the token once, then a session cookie)", self.page,
                  auth="none"),
            Route("GET", "/seg/logging", "Logging level per area", self.get_logging),
            Route("PUT", "/seg/logging", "Set logging levels ({area: level})", self.put_logging, body="LogLevels"),
            Route("POST", "/seg/device/{id}/override", "Whitelist, blacklist or default one device", self.override, body="Override"),
            Route("POST", "/seg/testmode", "Test mode on or off", self.testmode, body="TestMode"),
            Route("POST", "/seg/compliance/run", "Re-evaluate every known device now", self.run_compliance),
            Route("PUT", "/seg/policy/document", "Replace the policy document", self.put_document, body="PolicyDocument"),
            Route("POST", "/seg/push", "MDM real-time push: device changes (bearer push token)", self.push, auth="push", body="Push"),
            Route("GET", "/seg/openapi.json", "This API as an OpenAPI 3.1 document", self.openapi, auth="none"),
            Route("GET", "/metrics", "Prometheus text format: every worker's counters, and their sum "
                  "(bearer token, or from loopback without one)", self.metrics, auth="metrics"),
            Route("GET", "/seg/stats", "Every live worker's statistics and their sum (JSON)", self.worker_stats),
            Route("GET", "/seg/console/dashboard", "The dashboard's aggregates: devices by status and reason, "
                  "requests, decisions, parked Pings, mail-server errors", self.dashboard),
            Route("GET", "/seg/console/series", "The dashboard's history: per 5-minute bucket over the last "
                  "hours= (default 24) requests per command and status, decisions, attachment actions, links "
                  "rewritten, mail-server errors, parked Pings, devices by status and blocking reason",
                  self.series_view),
            Route("GET", "/seg/console/devices", "List view: every device seen; filters, q= search, sort, order, "
                  "offset, limit as query parameters", self.list_devices),
            Route("GET", "/seg/console/device/{id}", "Device detail: MDM record, what the gateway saw, the decision",
                  self.device_detail),
            Route("POST", "/seg/console/override/{override}", "Bulk whitelist / blacklist / default over a filter "
                  "or ids (expected = the confirmed count)", self.bulk_override, body="Bulk"),
            Route("POST", "/seg/console/delete-unmanaged/{days}", "Forget unmanaged devices not seen for N days "
                  "(expected = the confirmed count)", self.delete_unmanaged, body="Bulk"),
            Route("POST", "/seg/console/compliance", "Run compliance for the devices a filter (or ids) selects "
                  "(expected = the confirmed count)", self.bulk_compliance, body="Bulk"),
            Route("POST", "/seg/console/rotate-key", "New attachment key generation for the devices a filter "
                  f"selects (at most {MAX_BULK_KEYS}; expected = the confirmed count)", self.bulk_rotate_key,
                  body="Bulk"),
            Route("POST", "/seg/console/dx/{action}", "Start (minutes, default 60) or stop Dx logging for the "
                  f"devices a filter selects (at most {MAX_BULK_DX}; expected = the confirmed count)",
                  self.bulk_dx, body="Bulk"),
            Route("GET", "/seg/console/audit", "The audit log, newest first (who, what, when)", self.audit_log),
            Route("POST", "/seg/console/device/{id}/rotate-key", "A new attachment key generation for a device "
                  "(attachments sealed from now on use it)", self.rotate_key),
            Route("GET", "/seg/admin/{asset}", "The console's script and style sheet", self.asset, auth="none"),
            Route("GET", "/seg/dx", "Targets of targeted (Dx) logging and until when", self.dx_list),
            Route("POST", "/seg/dx", "Start Dx logging for a device or user ({kind, target, minutes})", self.dx_start,
                  body="DxStart"),
            Route("DELETE", "/seg/dx/{kind}/{target}", "Stop Dx logging for a device or user", self.dx_stop),
            Route("GET", "/seg/dx/{kind}/{target}/log", "Download a Dx target's log (JSON lines)", self.dx_log),
        ]

    # -- dispatch -----------------------------------------------------------------
    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        seen_path = False
        for r in self.routes:
            params = _match(r.pattern, path)
            if params is None:
                continue
            seen_path = True
            if r.method == method:
                return r, params
        if seen_path:
            raise HttpError(405, f"{method} not allowed on {path}")
        return None

    async def handle(self, method: str, path: str, body: bytes) -> Answer:
        m = self.match(method, path)
        if m is None:
            raise HttpError(404, f"no such endpoint: {path}")
        route, params = m
        return await self.call(route, params, body)

    async def call(self, route: Route, params: dict, body: bytes) -> Answer:
        answer = await route.handler(body=body, **params)
        if route.method != "GET":
            # Our own view follows our writes at once (the workers within a second).
            await self.gate.catch_up()
        return answer

    # -- diagnostics --------------------------------------------------------------
    def _doc(self):
        pol = self.gate.engine.policies
        if pol is None:
            raise HttpError(404, "no policy document loaded")
        return pol.doc

    async def cluster(self, body) -> Answer:
        # The diagnostic answers even while the store is down (and says so in store_status).
        try:
            sightings = await self.store.sightings()
        except SegFastError:
            sightings = []
        nodes: dict[str, dict] = {}

        def node_of(worker: str) -> dict:
            node = worker.rsplit("/", 1)[0]
            return nodes.setdefault(node, {"node": node, "workers": set(), "devices": 0, "last_seen": 0.0})
        try:
            beats = await self.store.get_entries("nodes")
        except SegFastError:
            beats = {}
        for worker, raw in beats.items():      # every worker's heartbeat, even one no device reached last
            try:
                beat = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                continue
            n = node_of(worker)
            n["workers"].add(worker)
            n["last_seen"] = max(n["last_seen"], float(beat.get("last_seen", 0.0)))
        for s in sightings:
            n = node_of(s.node)
            n["workers"].add(s.node)
            n["devices"] += 1
            n["last_seen"] = max(n["last_seen"], s.last_seen)
        by_status: dict[str, int] = {}
        for s in sightings:
            by_status[s.status] = by_status.get(s.status, 0) + 1
        src = None
        if self.source is not None:
            try:
                token = await self.store.get_meta("delta_token")
            except SegFastError:
                token = None
            src = {"url": self.config.policy.api_url, "last_error": self.source.last_error, "delta_token": token}
        return _json({
            "store": self.config.policy.store,
            # Reachable? Read-only? Which snapshot serves when Redis is down, and how old.
            "store_status": await self.store.status(),
            "snapshot_version": self.gate.engine.version,
            "policies_loaded": self.gate.engine.policies is not None,
            "test_mode": self.gate.engine.test_mode,
            "device_records": len(self.gate.engine.devices),
            "devices_seen": len(sightings),
            "devices_by_status": by_status,
            "nodes": [{**n, "workers": sorted(n["workers"])} for n in nodes.values()],
            "policy_source": src,
            "uptime_s": round(time.time() - self.started, 1),
        })

    async def segconfig(self, body) -> Answer:
        """Every section of the running config; tokens and passwords in URLs masked."""
        running = masked(msgspec.to_builtins(self.config))
        gw = self.gate.engine.policies.doc.gateway if self.gate.engine.policies else None
        return _json({**running, "gateway": gw, "test_mode": self.gate.engine.test_mode, "reasons": E.REASONS})

    def _snapshots(self):
        from seg_fast.stats import read_snapshots, stats_dir
        return read_snapshots(stats_dir(self.config))

    async def metrics(self, body) -> Answer:
        from seg_fast.admin.metrics import CONTENT_TYPE, render
        return 200, CONTENT_TYPE, render(self._snapshots()).encode()

    async def worker_stats(self, body) -> Answer:
        from seg_fast.stats import total
        snaps = self._snapshots()
        return _json({"workers": snaps, "total": total(snaps)})

    async def generalaccess(self, body) -> Answer:
        doc = self._doc()
        return _json({"general": doc.general, "managed": doc.managed})

    def _probe(self, **kw) -> EasRequest:
        return EasRequest(method="POST", path="/", command="Sync", **kw)

    async def device(self, body, id: str) -> Answer:
        rec = await self.store.get_device(id)
        seen = await self.store.sightings([device_key(id)])
        sighting = seen[0] if seen else None
        if rec is None and sighting is None:
            raise HttpError(404, f"device {id!r} is neither in the MDM records nor seen by the gateway")
        probe = self._probe(device_id=id, user=(sighting.user if sighting else rec.user) or None,
                            device_type=sighting.device_type if sighting else None,
                            user_agent=sighting.mail_client if sighting else None)
        reason, _ = self.gate.engine.explain(probe)
        return _json({"record": rec, "seen": sighting, "decision": reason})

    async def account(self, body, user: str) -> Answer:
        forms = E.user_forms(user)
        recs = [d for d in self.gate.engine.devices.values() if d.user and E.user_forms(d.user)[-1] == forms[-1]]
        seen = [s for s in await self.store.sightings() if s.user and E.user_forms(s.user)[-1] == forms[-1]]
        pol = self.gate.engine.policies
        verdict = None
        if pol is not None and pol.user is not None:
            verdict = "allowed" if pol.user.passes(*forms) else "blocked"
        return _json({"user": user, "user_policy": verdict, "records": recs, "seen": seen})

    async def devicetype(self, body, type: str) -> Answer:
        pol = self.gate.engine.policies
        verdict = None
        if pol is not None and pol.device_type is not None:
            verdict = "allowed" if pol.device_type.passes(type) else "blocked"
        return _json({"device_type": type, "verdict": verdict if verdict else "not restricted"})

    async def mailclient(self, body, client: str) -> Answer:
        pol = self.gate.engine.policies
        verdict = None
        if pol is not None and pol.mail_client is not None:
            verdict = "allowed" if pol.mail_client.passes(client) else "blocked"
        return _json({"mail_client": client, "verdict": verdict if verdict else "not restricted"})

    async def hyperlink(self, body) -> Answer:
        sec = self._doc().security
        hl = msgspec.to_builtins(sec).get("hyperlinks") if sec is not None else None
        return _json({"hyperlink": hl})

    async def keydata(self, body, id: str) -> Answer:
        rec = await self.store.get_device(id)
        if rec is None:
            raise HttpError(404, f"device {id!r} has no MDM record")
        return _json({"device_id": rec.device_id, "user": rec.user, "key_id": rec.key_id})

    async def download(self, body, type: str) -> Answer:
        type = type.lower()
        if type == "device":
            seen = {device_key(s.device_id): s for s in await self.store.sightings()}
            keys = sorted(set(self.gate.engine.devices) | set(seen))
            rows = []
            for k in keys:
                r, s = self.gate.engine.devices.get(k), seen.get(k)
                rows.append([(r or s).device_id, (r.user if r else "") or (s.user if s else ""),
                             r.managed if r else False, r.override if r else "default",
                             s.status if s else "", s.reason if s else "", s.device_type if s else "",
                             s.mail_client if s else "", s.last_seen if s else "", s.node if s else ""])
            return _csv(["device_id", "user", "managed", "override", "status", "reason", "device_type",
                         "mail_client", "last_seen", "node"], rows)
        if type == "account":
            users: dict[str, list] = {}
            for s in await self.store.sightings():
                u = users.setdefault(E.user_forms(s.user)[-1], [0, 0])
                u[0] += 1
                u[1] += s.status == "blocked"
            return _csv(["user", "devices", "blocked"], [[u, n, b] for u, (n, b) in sorted(users.items())])
        if type in ("managedattachment", "unmanagedattachment"):
            doc = self._doc()
            sec = msgspec.to_builtins(doc.security) if doc.security is not None else {}
            att = sec.get("managed_attachments" if type == "managedattachment" else "unmanaged_attachments") or {}
            rows = [[ft, action] for ft, action in sorted((att.get("file_types") or {}).items())]
            rows.append(["(default)", att.get("default", "allow")])
            return _csv(["file_type", "action"], rows)
        if type == "redirect":
            entries = await self.store.get_entries("redirects")
            return _csv(["user", "location"], sorted((k, v.decode()) for k, v in entries.items() if v))
        raise HttpError(404, f"unknown download type {type!r} (device, account, managedattachment, "
                             "unmanagedattachment, redirect)")

    async def devices(self, body, status: str) -> Answer:
        if status not in ("all", "allowed", "blocked", "test_mode"):
            raise HttpError(404, f"unknown status {status!r} (all, allowed, blocked, test_mode)")
        seen = await self.store.sightings()
        out = []
        for s in sorted(seen, key=lambda s: -s.last_seen):
            if status != "all" and s.status != status:
                continue
            rec = self.gate.engine.devices.get(device_key(s.device_id))
            out.append({"seen": s, "managed": bool(rec and rec.managed),
                        "override": rec.override if rec else "default"})
        return _json({"count": len(out), "devices": out})

    async def page(self, body) -> Answer:
        from importlib.resources import files
        return 200, "text/html; charset=utf-8", files("seg_fast.admin").joinpath("admin.html").read_bytes()

    # -- actions ------------------------------------------------------------------
    async def get_logging(self, body) -> Answer:
        names = {v: k for k, v in LOG_LEVELS.items()}
        return _json({area: names.get(logging.getLogger(name).getEffectiveLevel(), "info")
                      for area, name in LOG_AREAS.items()})

    async def put_logging(self, body) -> Answer:
        levels = _body(body, dict[str, str])
        for area, level in levels.items():
            if area not in LOG_AREAS:
                raise HttpError(400, f"unknown logging area {area!r} (one of {', '.join(LOG_AREAS)})")
            if level not in LOG_LEVELS:
                raise HttpError(400, f"unknown level {level!r} (one of {', '.join(LOG_LEVELS)})")
        current = await self.store.get_meta(META_LOG_LEVELS)
        merged = {**(msgspec.json.decode(current) if current else {}), **levels}
        await self.store.set_meta(META_LOG_LEVELS, msgspec.json.encode(merged).decode())
        return _json(merged)

    async def override(self, body, id: str) -> Answer:
        ov = _body(body, OverrideBody).override
        rec = await self.store.get_device(id) or DeviceRecord(device_id=id)
        rec = msgspec.structs.replace(rec, override=ov)
        version = await self.store.put_devices([rec])
        log.info("admin: device override set to %s", ov)
        self._audit("override", devices=[rec.device_id], override=ov)
        return _json({"device_id": rec.device_id, "override": ov, "version": version})

    async def testmode(self, body) -> Answer:
        on = _body(body, TestModeBody).enabled
        version = await self.store.set_meta(META_TEST_MODE, "1" if on else "0")
        self._audit("test_mode", enabled=on)
        return _json({"test_mode": on, "version": version})

    async def run_compliance(self, body, ids: list[str] | None = None) -> Answer:
        """Re-evaluate every device the gateway has seen (or those of ``ids``) against the current snapshot."""
        await self.gate.reload()
        seen = await self.store.sightings([device_key(i) for i in ids] if ids is not None else None)
        changed, counts = [], {}
        for s in seen:
            probe = self._probe(device_id=s.device_id, user=s.user or None, device_type=s.device_type or None,
                                user_agent=s.mail_client or None)
            reason, _ = self.gate.engine.explain(probe)
            status = "allowed" if reason.startswith("allowed.") else "blocked"
            counts[reason] = counts.get(reason, 0) + 1
            if (s.status, s.reason) != (status, reason):
                s.status, s.reason = status, reason
                changed.append(s)
        await self.store.put_sightings(changed)
        version = await self.store.set_meta(META_COMPLIANCE_RUN, repr(time.time()))
        self._audit("run_compliance", devices=len(seen), changed=len(changed),
                    **({"selected": ids[:100]} if ids is not None else {}))
        return _json({"devices": len(seen), "changed": len(changed), "reasons": counts, "version": version})

    # -- console ------------------------------------------------------------------
    def _audit(self, action: str, **what) -> None:
        self.index_dirty = True
        self.audit.write(CALLER.get(), action, **what)

    async def _fresh_index(self) -> DeviceIndex:
        # Rebuilt on demand, at most every REFRESH_INDEX s (and never more than a tenth of
        # the time: a slow store must not keep the control process busy rebuilding).
        age = time.time() - self.index.built
        if self.index_dirty or age > max(REFRESH_INDEX, 10 * self.index.build_s):
            self.index_dirty = False
            self.index.build(await self.store.all_sightings(), self.gate.engine.devices)
        return self.index

    async def dashboard(self, body) -> Answer:
        from seg_fast.stats import total
        index = await self._fresh_index()
        snaps = self._snapshots()
        t = total(snaps)
        return _json({
            **index.aggregates(), "test_mode": self.gate.engine.test_mode,
            "policies_loaded": self.gate.engine.policies is not None, "snapshot_version": self.gate.engine.version,
            "workers": len(snaps), "requests": t.requests, "decisions": t.decisions,
            "gateway_answers": t.gateway_answers, "parked_pings": t.parked_pings, "connections": t.connections,
            "mail_server_errors": t.gateway_answers.get("upstream_unavailable", 0),
            "dx_targets": t.dx_targets, "index_built": index.built,
            "attachments": {a: t.attachments.get(a, 0) for a in ("encrypt", "block", "allow")},
            "links_rewritten": t.links_rewritten})

    async def sample_series(self, *, devices: bool = True) -> None:
        """One sample of the workers' counters into the history; the device counts once per
        bucket, or whenever the list view's index is fresh anyway (a rebuild over 100,000
        devices takes seconds: not every 15 s)."""
        now = time.time()
        agg = None
        fresh = not self.index_dirty and now - self.index.built <= REFRESH_INDEX
        if devices and (fresh or now // self.series.step != self._devices_sampled // self.series.step):
            try:
                agg = (await self._fresh_index()).aggregates(now)
                self._devices_sampled = now
            except SegFastError as exc:
                log.warning("dashboard history: device counts not sampled: %s", exc)
        self.series.sample(self._snapshots(), devices=agg, now=now)

    async def series_view(self, body) -> Answer:
        try:
            hours = float(QUERY.get().get("hours") or 24)
        except ValueError:
            raise HttpError(400, "hours must be a number") from None
        if not 0 < hours <= 24:
            raise HttpError(400, "hours must be more than 0 and at most 24")
        await self.sample_series()
        return _json(self.series.view(hours=hours))

    async def list_devices(self, body) -> Answer:
        index = await self._fresh_index()
        try:
            return _json(index.query(QUERY.get()))
        except QueryError as exc:
            raise HttpError(400, f"{exc} (filters: {', '.join(FILTERS)})") from None

    async def device_detail(self, body, id: str) -> Answer:
        status, ctype, out = await self.device(body, id)
        detail = msgspec.json.decode(out)
        rec = await self.store.get_device(id)
        seen = detail.get("seen") or {}
        detail["trace"] = self._trace(id, seen, rec)
        detail["key_id"] = rec.key_id if rec else ""
        detail["key_generation"] = self._keyring().generation(id)
        # What the gateway saw lately: the transaction log's lines for it (with the protocol
        # version it spoke), and (when it was under Dx) the headers that identify it, from its
        # last Dx line.
        from seg_fast import dx
        from seg_fast.admin.console import identifying_headers, protocol_version, recent_transactions
        detail["recent"] = await trio.to_thread.run_sync(recent_transactions, self.config.log.transactions, id)
        detail["identity"] = identifying_headers(dx.read_log(dx.dx_dir(self.config), "device", id))
        detail["protocol_version"] = protocol_version(detail["recent"], detail["identity"])
        return _json(detail)

    def _trace(self, id: str, seen: dict, rec) -> list[dict]:
        """Which policy said what: the decision with, and without, each thing an administrator controls."""
        eng = self.gate.engine
        probe = self._probe(device_id=id, user=seen.get("user") or (rec.user if rec else None) or None,
                            device_type=seen.get("device_type") or None, user_agent=seen.get("mail_client") or None)
        reason, used = eng.explain(probe)
        steps = [{"step": "policies loaded", "result": eng.policies is not None},
                 {"step": "test mode", "result": eng.test_mode},
                 {"step": "MDM record", "result": "found" if rec else "none (unmanaged)"},
                 {"step": "override", "result": rec.override if rec else "default"},
                 {"step": "decision", "result": reason}]
        if used is not None and used is not rec:
            steps.insert(3, {"step": "record used", "result": "not for this user (enrolled to another)"})
        if eng.policies is not None:
            steps[-1:-1] = _policy_checks(eng.policies, probe, used, eng._clock())
        return steps

    def _bulk_ids(self, raw: bytes, index: DeviceIndex) -> list[str]:
        bulk = _body(raw or b"{}", BulkBody)
        try:
            ids = list(bulk.ids) if bulk.ids else index.ids(bulk.filter)
        except QueryError as exc:
            raise HttpError(400, str(exc)) from None
        if not bulk.ids and not bulk.filter:
            raise HttpError(400, "a bulk action needs a filter or ids")
        if bulk.expected != len(ids):
            # The list changed since the administrator confirmed it: confirm again.
            raise HttpError(409, f"the selection holds {len(ids)} devices, {bulk.expected} were confirmed")
        return ids

    async def bulk_override(self, body, override: str) -> Answer:
        if override not in ("whitelist", "blacklist", "default"):
            raise HttpError(404, f"unknown override {override!r} (whitelist, blacklist, default)")
        index = await self._fresh_index()
        ids = self._bulk_ids(body, index)
        recs = []
        for i in ids:
            rec = self.gate.engine.devices.get(device_key(i)) or await self.store.get_device(i) or DeviceRecord(device_id=i)
            recs.append(msgspec.structs.replace(rec, override=override))
        version = await self.store.put_devices(recs) if recs else self.gate.engine.version
        self._audit("bulk_override", override=override, count=len(ids), devices=ids[:100])
        return _json({"override": override, "devices": len(ids), "version": version})

    async def bulk_compliance(self, body) -> Answer:
        ids = self._bulk_ids(body, await self._fresh_index())
        return await self.run_compliance(b"", ids=ids)

    async def bulk_rotate_key(self, body) -> Answer:
        ids = self._bulk_ids(body, await self._fresh_index())
        if len(ids) > MAX_BULK_KEYS:
            raise HttpError(400, f"{len(ids)} devices selected; new keys for at most {MAX_BULK_KEYS} at once "
                                 "(narrow the filter)")
        keys, gens = self._keyring(), {}
        try:
            for i in ids:
                gens[i] = keys.rotate(i)
        except SegFastError as exc:
            raise HttpError(409, str(exc)) from None
        finally:
            if gens:
                self._audit("rotate_key", devices=list(gens)[:100], count=len(gens))
        return _json({"devices": len(gens), "generations": gens})

    async def bulk_dx(self, body, action: str) -> Answer:
        from seg_fast import dx
        if action not in ("start", "stop"):
            raise HttpError(404, f"unknown Dx action {action!r} (start, stop)")
        ids = self._bulk_ids(body, await self._fresh_index())
        if action == "start" and len(ids) > MAX_BULK_DX:
            raise HttpError(400, f"{len(ids)} devices selected; Dx for at most {MAX_BULK_DX} at once "
                                 "(it logs every transaction of each: narrow the filter)")
        directory = dx.dx_dir(self.config)
        if action == "stop":
            stopped = [i for i in ids if dx.stop(directory, "device", i)]
            self._audit("dx_stop", kind="device", count=len(stopped), devices=stopped[:100])
            return _json({"stopped": len(stopped)})
        minutes = _body(body, BulkBody).minutes
        try:
            until = [dx.start(directory, "device", i, minutes, who=CALLER.get()).until for i in ids]
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        self._audit("dx_start", kind="device", count=len(ids), devices=ids[:100], minutes=minutes)
        return _json({"started": len(ids), "until": max(until, default=0.0)})

    async def delete_unmanaged(self, body, days: str) -> Answer:
        try:
            n_days = float(days)
        except ValueError:
            raise HttpError(400, "days must be a number") from None
        index = await self._fresh_index()
        raw = msgspec.json.decode(body or b"{}")
        raw["filter"] = {"managed": "false", "not_seen_days": str(n_days)}
        ids = self._bulk_ids(msgspec.json.encode(raw), index)
        await self.store.remove_entries("sightings", [device_key(i) for i in ids])
        self._audit("delete_unmanaged", days=n_days, count=len(ids), devices=ids[:100])
        return _json({"deleted": len(ids)})

    async def asset(self, body, asset: str) -> Answer:
        from importlib.resources import files
        types = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
        if asset not in types:
            raise HttpError(404, f"no such asset: {asset}")
        return 200, types[asset], files("seg_fast.admin").joinpath(asset).read_bytes()

    async def dx_list(self, body) -> Answer:
        from seg_fast import dx
        return _json({"targets": dx.read_targets(dx.dx_dir(self.config))})

    async def dx_start(self, body) -> Answer:
        from seg_fast import dx
        req = _body(body, DxStart)
        try:
            t = dx.start(dx.dx_dir(self.config), req.kind, req.target, req.minutes, who=CALLER.get())
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        self._audit("dx_start", kind=t.kind, target=t.target, until=t.until)
        return _json(t)

    async def dx_stop(self, body, kind: str, target: str) -> Answer:
        from seg_fast import dx
        if kind not in dx.KINDS:
            raise HttpError(404, f"unknown Dx target kind {kind!r} (device, user)")
        stopped = dx.stop(dx.dx_dir(self.config), kind, target)
        self._audit("dx_stop", kind=kind, target=target)
        return _json({"stopped": stopped})

    async def dx_log(self, body, kind: str, target: str) -> Answer:
        from seg_fast import dx
        if kind not in dx.KINDS:
            raise HttpError(404, f"unknown Dx target kind {kind!r} (device, user)")
        data = dx.read_log(dx.dx_dir(self.config), kind, target)
        self._audit("dx_download", kind=kind, target=target, bytes=len(data))
        return 200, "application/x-ndjson", data, [
            (b"content-disposition", f'attachment; filename="{dx.log_name(kind, target)}"'.encode())]

    def _keyring(self):
        from seg_fast.content.keys import Keyring
        if getattr(self, "_keys", None) is None:
            self._keys = Keyring.from_settings(self.config.security)
        return self._keys

    async def rotate_key(self, body, id: str) -> Answer:
        try:
            gen = self._keyring().rotate(id)
        except SegFastError as exc:
            raise HttpError(409, str(exc)) from None
        self._audit("rotate_key", devices=[id], generation=gen)
        return _json({"device_id": id, "key_generation": gen})

    async def audit_log(self, body) -> Answer:
        return _json({"entries": self.audit.tail()})

    async def put_document(self, body) -> Answer:
        try:
            doc = decode_document(body, what="request body")
        except PolicyError as exc:
            raise HttpError(400, str(exc)) from None
        version = await self.store.put_document(doc)
        return _json({"version": version})

    async def push(self, body) -> Answer:
        try:
            version = await apply_push(self.store, body)
        except PolicyError as exc:
            raise HttpError(400, str(exc)) from None
        return _json({"version": version})

    async def openapi(self, body) -> Answer:
        from seg_fast.admin.openapi import document
        return _json(document(self.routes))


def _policy_checks(pol, probe, device, now: float) -> list[dict]:
    """Each policy of the snapshot and what it says of this device, in the rule book's order
    (engine.evaluate: the first "blocks" decides, an override before all); "off" when not set."""
    out = []

    def check(name: str, on: bool, passes, reason: str) -> None:
        out.append({"step": f"policy: {name}", "result": "off" if not on else
                    ("passes" if passes() else f"blocks ({reason})")})
    managed = device is not None and device.managed
    check("user", pol.user is not None, lambda: pol.user.passes(*E.user_forms(probe.user)), E.USER)
    check("EAS device type", pol.device_type is not None,
          lambda: pol.device_type.passes(probe.device_type or ""), E.DEVICE_TYPE)
    check("mail client", pol.mail_client is not None,
          lambda: pol.mail_client.passes(probe.user_agent or ""), E.MAIL_CLIENT)
    check("managed devices only", pol.managed_only, lambda: managed, E.UNMANAGED)
    if not managed:
        out.append({"step": "policy: managed device policies", "result": "not applied (unmanaged device)"})
        return out
    check("MDM inactivity", pol.inactive_after is not None,
          lambda: device.last_checkin > 0 and now < device.last_checkin + pol.inactive_after, E.INACTIVE)
    check("compromised", pol.compromised, lambda: not device.compromised, E.COMPROMISED)
    check("encryption", pol.encryption, lambda: device.encrypted is not False, E.NOT_ENCRYPTED)
    check("MDM compliance", pol.mdm_compliant, lambda: device.compliant is not False, E.NONCOMPLIANT)
    check("model", pol.model is not None, lambda: pol.model.passes(device.platform, device.model), E.MODEL)
    check("OS version", pol.os is not None, lambda: pol.os.passes(device.platform, device.os), E.OS)
    check("EAS profile", pol.require_eas_profile, lambda: device.eas_profile, E.NO_EAS_PROFILE)
    return out


REFRESH_INDEX = 5.0
MAX_BULK_KEYS = 1000      # each rotation rewrites the key state file every worker reads
MAX_BULK_DX = 50          # each target logs every transaction in full
SECRET_WORDS = ("token", "password", "secret")


def masked(obj):
    """Settings as shown to an administrator: secrets as "(set)", URL passwords as ****."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, str) and any(w in k.lower() for w in SECRET_WORDS):
                out[k] = "(set)" if v else ""
            else:
                out[k] = masked(v)
        return out
    if isinstance(obj, list):
        return [masked(v) for v in obj]
    if isinstance(obj, str) and "://" in obj and "@" in obj:
        return _mask_url(obj)
    return obj


def _mask_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit
    try:
        u = urlsplit(url)
    except ValueError:
        return "(unparsable URL, hidden)"
    if u.password is None:
        return url
    host = u.netloc.rsplit("@", 1)[1]
    return urlunsplit((u.scheme, f"{u.username}:****@{host}", u.path, u.query, u.fragment))


def _match(pattern: str, path: str) -> dict[str, str] | None:
    pp, parts = pattern.strip("/").split("/"), path.strip("/").split("/")
    # "/seg/download/{type}/" also answers without the trailing slash.
    if len(pp) != len(parts):
        return None
    out = {}
    for p, v in zip(pp, parts):
        if p.startswith("{") and p.endswith("}"):
            if not v:
                return None
            out[p[1:-1]] = unquote(v)
        elif p != v:
            return None
    return out
