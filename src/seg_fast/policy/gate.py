"""The Gatekeeper one gateway worker uses: the engine, its store and its upkeep.

``decide`` is the engine's (a dict lookup on the request path). ``run`` loads the
snapshot from the store, then follows the store's changes (every worker sees a
change within a second) and flushes what the worker observed (device sightings,
learned folder classes) once a second, so ``record`` never waits for I/O.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import msgspec
import trio

from seg_fast import ticker
from seg_fast.errors import PolicyError
from seg_fast.hooks import Decision, Gatekeeper, Headers
from seg_fast.malloc import give_back
from seg_fast.policy import records
from seg_fast.policy.engine import Engine
from seg_fast.policy.model import DeviceSighting, device_key
from seg_fast.policy.settings import PolicySettings
from seg_fast.policy.store import Change, Store, StoreError, decode_document_bytes, open_store
from seg_fast.statedir import resolve

log = logging.getLogger("seg_fast.policy.cache")

# Logging areas of the guide's admin page -> the logger each one sets.
LOG_AREAS: dict[str, str] = {
    "transaction_summary": "seg_fast.tx.summary",
    "device_transactions_all": "seg_fast.tx.all",
    "device_transactions_blocked": "seg_fast.tx.blocked",
    "policy_cache": "seg_fast.policy.cache",
    "policy_updates": "seg_fast.policy.updates",
    "content_helpers": "seg_fast.content",
    "reporting": "seg_fast.reporting",
    # EWS and webmail passthrough records (proxy/passthrough.py; on at info by default).
    "transactions_ews": "seg_fast.tx.ews",
    "transactions_webmail": "seg_fast.tx.webmail",
}
LOG_LEVELS = {"all": 1, "trace": 5, "debug": logging.DEBUG, "info": logging.INFO,
              "warn": logging.WARNING, "error": logging.ERROR, "off": logging.CRITICAL + 10}

# Meta keys in the store that every worker follows.
META_TEST_MODE = "test_mode"
META_LOG_LEVELS = "log_levels"
META_COMPLIANCE_RUN = "compliance_run"

FLUSH_INTERVAL = 1.0
NODE_HEARTBEAT = 10.0      # seconds between a worker's cluster heartbeats
TICK = 0.4          # resolution of time-dependent decisions (MDM inactivity); on the 0.2 s grid
MAX_PENDING_SIGHTINGS = 200_000
# Device records changed since the snapshot, kept per worker beside the shared table; past
# this many (or an eighth of the table) the worker loads a snapshot again, into a new table.
OVERLAY_MAX = 4096
RECORDS_DIR = "policy-records"     # in the state directory
# Sightings built and written per step of a flush: when thousands of devices leave
# together (each leaves a record), one step built them all (11-25 ms of CPU at
# 3,000-7,500 devices: benchmarks/park_leave.py); ~3 us each makes this ~3 ms.
FLUSH_CHUNK = 1000


def apply_log_levels(raw: str | None) -> None:
    if not raw:
        return
    try:
        levels = msgspec.json.decode(raw, type=dict[str, str])
    except (msgspec.ValidationError, msgspec.DecodeError):
        return
    for area, level in levels.items():
        if area in LOG_AREAS and level in LOG_LEVELS:
            logging.getLogger(LOG_AREAS[area]).setLevel(LOG_LEVELS[level])
    # The transaction log (observe.py) writes by the transaction areas' levels.
    from seg_fast.observe import refresh_levels
    refresh_levels()


def node_name(settings: PolicySettings) -> str:
    return settings.node_name or f"{socket.gethostname()}"


class PolicyGatekeeper:
    def __init__(self, settings: PolicySettings, *, store: Store | None = None, node: str | None = None,
                 transforms_for=None, clock=time.time, records_dir: Path | None = None):
        from seg_fast.policy.syncsettings import FolderRegistry, sync_settings_transforms

        self.settings = settings
        self.store = store if store is not None else open_store(settings)
        self.records_dir = records_dir       # where the node's workers share record tables (None: not shared)
        self.node = node or f"{node_name(settings)}/{os.getpid()}"
        self._last_heartbeat = 0.0
        self.folders = FolderRegistry()
        self.engine = Engine(allow_if_no_policies=settings.allow_if_no_policies, test_mode=settings.test_mode,
                             user_without_credential=settings.user_without_credential,
                             transforms_for=transforms_for,
                             sync_transforms=lambda types: sync_settings_transforms(types, self.folders),
                             clock=clock)
        self.decide = self.engine.decide
        self._clock = clock
        # DeviceId -> (request, decision, status, time) since the last flush.
        self._pending: dict[str, tuple] = {}
        self._first_seen: dict[str, float] = {}
        self._first_unsaved: set[str] = set()   # ... whose first_seen a failed flush did not store
        self.loaded = trio.Event()
        self.store_ok = False
        self.store_version = 0       # the last store change this worker has taken in (stats snapshot)
        # 451/3xx mappings user -> mail server URL, shared by every worker and node through
        # the store; the proxy reads this dict (RedirectMap.attach) and learns through
        # note_redirect. Updated in place: the proxy keeps a reference.
        self.redirects: dict[str, str] = {}
        self._pending_redirects: dict[str, str] = {}
        self._flushing = trio.Lock()

    # -- Gatekeeper ---------------------------------------------------------------
    def blocked_answer(self, req, decision: Decision) -> tuple[int, Headers, bytes]:
        from seg_fast.eas.answers import blocked_answer
        return blocked_answer(req.command, req.protocol_version)

    def record(self, req, decision: Decision, status: int) -> None:
        # The request path: keep the facts in one tuple per device (raw id as key,
        # no normalising); the flush turns them into DeviceSightings.
        raw = req.device_id
        if not raw:
            return
        pending = self._pending
        if raw not in pending and len(pending) >= MAX_PENDING_SIGHTINGS:
            return   # the flush is behind: drop rather than grow without bound
        pending[raw] = (req, decision, status, self.engine.now)

    def note_redirect(self, user_key: str, location: str) -> None:
        """The mail server sent this user elsewhere ("" : back to the default server);
        in force in this worker now, in every other within a second (the flush)."""
        if location:
            self.redirects[user_key] = location
        else:
            self.redirects.pop(user_key, None)
        if user_key in self._pending_redirects or len(self._pending_redirects) < MAX_PENDING_SIGHTINGS:
            self._pending_redirects[user_key] = location

    def _sighting(self, key: str, raw: str, req, decision: Decision, status: int, when: float) -> DeviceSighting:
        first = self._first_seen.setdefault(key, when)
        return DeviceSighting(
            device_id=raw, user=req.user or "", device_type=req.device_type or "",
            mail_client=req.user_agent or "", ip=req.client_ip, node=self.node, first_seen=first,
            last_seen=when, last_command=req.command or "", reason=decision.reason, http_status=status,
            status="test_mode" if decision.test_mode else ("allowed" if decision.allowed else "blocked"))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._open_and_load()
                task_status.started()
                if not self.store_ok:
                    nursery.start_soon(self._retry_open)
                else:
                    nursery.start_soon(self._follow)
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._tick_loop)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(2):
                    await self.flush()       # what this worker saw last is not lost
                await self.store.aclose()

    # -- upkeep -----------------------------------------------------------------
    async def _open_and_load(self) -> None:
        try:
            await self.store.open()
            await self.reload()
            self.store_ok = True
        except (StoreError, PolicyError) as exc:
            log.error("policy store unavailable: %s", exc)
            await self.store.aclose()     # the retry opens it afresh

    async def _retry_open(self) -> None:
        delay = 0.5
        while not self.store_ok:
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)
            await self._open_and_load()
        await self._follow()

    async def reload(self) -> None:
        version, document, bodies = await self.store.snapshot_bodies()
        # (built off the loop: decoding 100,000 records once to check them takes ~0.3 s)
        table = await trio.to_thread.run_sync(records.shared_table, bodies, self.records_dir)
        del bodies
        self.engine.load(document, table, version)     # (the old table goes here)
        give_back()                                     # the rows' pages, not kept for the worker's life
        self.store_version = max(self.store_version, version)
        self.folders.load(await self.store.get_entries("folders"))
        redirects = {k: v.decode("utf-8", "replace") for k, v in (await self.store.get_entries("redirects")).items()
                     if v}
        redirects.update((k, v) for k, v in self._pending_redirects.items() if v)
        self.redirects.clear()
        self.redirects.update(redirects)
        await self._apply_meta()
        self.loaded.set()
        log.info("policy snapshot %d loaded: %d devices%s", version, table.count,
                 f" (shared: {table.path.name})" if table.path else "")

    async def _apply_meta(self) -> None:
        tm = await self.store.get_meta(META_TEST_MODE)
        self.engine.set_test_mode(self.settings.test_mode if tm is None else tm == "1")
        apply_log_levels(await self.store.get_meta(META_LOG_LEVELS))

    async def apply(self, ch: Change) -> None:
        """Bring the engine up to date with one change from the store."""
        if ch.kind in ("device", "device_removed"):
            rec = await self.store.get_device(ch.key) if ch.kind == "device" else None
            if rec is None:
                self.engine.remove_device(ch.key, ch.version)
            else:
                self.engine.put_device(rec, ch.version)
            if len(self.engine.devices.overlay) > max(OVERLAY_MAX, self.engine.devices.table.count // 8):
                await self.reload()          # the changes into a new shared table
        elif ch.kind == "document":
            self.engine.set_document(await self.store.get_document(), ch.version)
        elif ch.kind == "folders":
            self.folders.load(await self.store.get_entries("folders", [ch.key]))
        elif ch.kind == "redirects":
            value = (await self.store.get_entries("redirects", [ch.key])).get(ch.key)
            if ch.key not in self._pending_redirects:     # our own newer mapping is on its way
                if value:
                    self.redirects[ch.key] = value.decode("utf-8", "replace")
                else:
                    self.redirects.pop(ch.key, None)
        elif ch.kind == "meta":
            if ch.key == META_COMPLIANCE_RUN:
                self.engine.set_document(self.engine.policies.doc if self.engine.policies else None,
                                         ch.version)
            await self._apply_meta()
        else:
            await self.reload()

    async def catch_up(self) -> None:
        """Apply every change the store has that this engine has not (after our own writes)."""
        for ch in await self.store.changes_since(self.engine.version):
            await self.apply(ch)

    async def _follow(self) -> None:
        while True:
            try:
                # From the version applied: a change written since the snapshot was read is not lost.
                async for ch in self.store.subscribe(since=self.engine.version):
                    try:
                        await self.apply(ch)
                    except PolicyError as exc:
                        # A damaged record: keep the previous snapshot and say why.
                        log.error("policy change %d (%s %s) rejected: %s", ch.version, ch.kind, ch.key, exc)
                    self.store_version = max(self.store_version, ch.version)
            except StoreError as exc:
                log.error("policy store: %s; retrying", exc)
                await trio.sleep(1.0)

    async def _tick_loop(self) -> None:
        while True:
            await ticker.every(TICK)
            self.engine.tick()

    async def _flush_loop(self) -> None:
        while True:
            await ticker.every(FLUSH_INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        """Write what was recorded before the call. One flush at a time: the loop's, a
        caller's and the last one at shutdown take turns, so one that returns has written
        (or logged why not) everything recorded before it began, not left it to another
        flush still waiting on the store."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        if not self.store_ok:
            return
        if not self.store.writable:
            # A read-only store, or Redis down and its local copy serving: sightings are
            # observations (the next request makes them again); keep no backlog.
            self._pending.clear()
            return
        now = time.time()
        if now - self._last_heartbeat >= NODE_HEARTBEAT:
            self._last_heartbeat = now
            beat = {"node": self.node, "last_seen": now, "version": self.engine.version}
            try:
                await self.store.put_entries("nodes", {self.node: msgspec.json.encode(beat)})
            except StoreError as exc:
                log.warning("node heartbeat not saved: %s", exc)
        if self._pending:
            pending, self._pending = self._pending, {}
            items = list(pending.items())
            del pending
            for at in range(0, len(items), FLUSH_CHUNK):
                new: set = set()
                try:
                    if at:
                        await trio.sleep(0)          # the next chunk in a step of its own
                    batch = {}
                    for raw, (req, decision, status, when) in items[at:at + FLUSH_CHUNK]:
                        key = device_key(raw)
                        if key not in self._first_seen or key in self._first_unsaved:
                            new.add(key)                 # its first_seen goes to the store too
                        batch[key] = self._sighting(key, raw, req, decision, status, when)   # one row per device
                    await self.store.put_sightings(list(batch.values()), new)
                    self._first_unsaved -= new
                except StoreError as exc:
                    log.warning("device sightings not saved: %s", exc)
                    self._first_unsaved |= new       # offered again with the device's next sighting
                    break                            # observations: the next requests make them again
                except trio.Cancelled:
                    # Shutting down between chunks or mid-write: what this flush had not
                    # written goes back for the last one (newer sightings of the same devices win).
                    self._first_unsaved |= new
                    for raw, seen in items[at:]:
                        self._pending.setdefault(raw, seen)
                    raise
            if len(self._first_seen) > MAX_PENDING_SIGHTINGS:
                self._first_seen, self._first_unsaved = {}, set()    # the store keeps the earliest anyway
        if self._pending_redirects:
            pending, self._pending_redirects = self._pending_redirects, {}
            try:
                await self.store.put_entries("redirects", {k: v.encode() for k, v in pending.items()}, notify=True)
            except StoreError as exc:
                log.warning("redirect mappings not saved: %s", exc)
        learned = self.folders.take_learned()
        if learned:
            try:
                await self.store.put_entries("folders", learned, notify=True)
            except StoreError as exc:
                log.warning("folder classes not saved: %s", exc)


def build(config) -> Gatekeeper:
    """The gatekeeper for one worker process, from the gateway config."""
    return PolicyGatekeeper(config.policy, records_dir=resolve(RECORDS_DIR, config.state_dir))
