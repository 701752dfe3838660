"""Where policies and device records live, and how every worker learns of a change.

One interface, two engines:
- ``SqliteStore``: an embedded file (WAL). The default: survives a restart, so the
  last known policies serve while the policy source is down. Workers on one machine
  see changes by polling the ``changes`` table (an indexed read when the file shows a
  write, looked for every 0.2 s; read every 2 s regardless).
- ``RedisStore``: a cluster of gateways on one Redis: hashes for the snapshot,
  pub/sub for single changes (the way SEG V2 shares its policy cache).

The store holds bytes it validated on the way in; on the way out the document is
validated again, so a damaged store can never become a half-read snapshot.

Namespaces of per-key records: ``devices`` (MDM records), ``sightings`` (what the
gateway observed), ``folders`` (FolderSync ServerId -> Type per device, for the Sync
Settings policy). ``meta`` holds small settings (delta token, log levels, test mode).
"""
from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import quote, urlsplit

import msgspec
import trio

from seg_fast import ticker
from seg_fast.errors import PolicyError, SegFastError
from seg_fast.policy.model import DeviceRecord, DeviceSighting, PolicyDocument, device_key
from seg_fast.policy.records import decode_device_bytes
from seg_fast.policy.resp import RedisConnection, RedisError
from seg_fast.statedir import create_private, ensure_parent, resolve

log = logging.getLogger("seg_fast.policy.cache")

# "redirects": user -> 451/3xx mail server URL ("" once sent back to the default), shared
# by every worker and node (seg_fast.policy.gate) and listed by the admin CSV download.
# "nodes": one heartbeat per gateway worker, so the cluster view lists every node that
# runs, not only the last one each device happened to reach.
NAMESPACES = ("devices", "sightings", "first_seen", "folders", "redirects", "nodes")

_enc = msgspec.json.Encoder()
_dec_doc = msgspec.json.Decoder(PolicyDocument)
_dec_sight = msgspec.json.Decoder(DeviceSighting)


def _sighting_entries(sightings) -> dict[str, bytes]:
    return {device_key(s.device_id): _enc.encode(s) for s in sightings}


def _first_seen_entries(sightings, new: set[str] | None) -> dict[str, bytes]:
    out = {}
    for s in sightings:
        key = device_key(s.device_id)
        if new is None or key in new:
            out[key] = repr(s.first_seen).encode()
    return out


class StoreError(SegFastError):
    """The policy store cannot be read or written."""


class Change(msgspec.Struct, frozen=True, array_like=True):
    """One change every worker must apply: kind is "document", "device", "device_removed",
    "folders", "redirects", "meta" or "reload" (everything replaced)."""
    version: int
    kind: str
    key: str = ""


class Snapshot(msgspec.Struct, kw_only=True):
    version: int
    document: PolicyDocument | None
    devices: list[DeviceRecord]


def decode_document_bytes(raw: bytes) -> PolicyDocument:
    try:
        return _dec_doc.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PolicyError(f"stored policy document is damaged: {exc}") from None


class Store:
    """The interface both engines implement (async: the I/O shell calls it)."""

    poll_interval = 0.2

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...

    async def snapshot_bodies(self) -> tuple[int, PolicyDocument | None, list[bytes]]:
        """The version, the document and every device record as stored (encoded), read at
        one moment: what a worker's record table is built from, with no record decoded here."""
        raise NotImplementedError

    async def snapshot(self) -> Snapshot:
        version, document, bodies = await self.snapshot_bodies()
        return Snapshot(version=version, document=document, devices=[decode_device_bytes(b) for b in bodies])

    async def version(self) -> int: ...
    async def replace_all(self, document: PolicyDocument | None, devices: list[DeviceRecord]) -> int:
        """Full snapshot: the document and exactly these device records."""
    async def put_document(self, document: PolicyDocument) -> int: ...
    async def put_devices(self, devices: list[DeviceRecord]) -> int: ...
    async def remove_devices(self, device_ids: list[str]) -> int: ...
    async def get_device(self, device_id: str) -> DeviceRecord | None: ...
    async def get_document(self) -> PolicyDocument | None: ...
    async def add_new_entries(self, ns: str, entries: dict[str, bytes]) -> None:
        """Write only the keys not there yet (first sightings)."""
    async def put_entries(self, ns: str, entries: dict[str, bytes], *, notify: bool = False) -> int: ...
    async def get_entries(self, ns: str, keys: list[str] | None = None) -> dict[str, bytes]: ...
    async def remove_entries(self, ns: str, keys: list[str]) -> None:
        """Forget entries (the console's "delete unmanaged devices not seen for N days")."""
    async def get_meta(self, key: str) -> str | None: ...
    async def set_meta(self, key: str, value: str, *, notify: bool = True) -> int: ...
    async def changes_since(self, version: int) -> list[Change]: ...
    def subscribe(self, since: int | None = None) -> AsyncIterator[Change]:
        """Changes after version ``since`` (default: the store's version when the iterator
        starts). Pass the version of the snapshot you hold, so nothing written between
        reading it and the subscription taking hold is missed."""

    @property
    def writable(self) -> bool:
        """False while writes can only fail (a read-only store, Redis down and the local
        copy serving): callers drop what they would have recorded."""
        return True

    async def status(self) -> dict:
        """What the admin API's /seg/diagnostic/cluster says about the store."""
        return {}

    # -- conveniences on top of the namespaces ----------------------------------
    async def put_sightings(self, sightings: list[DeviceSighting], new: set[str] | None = None) -> None:
        """Each device's latest sighting, and its first_seen where none is kept yet. ``new``:
        the keys (device_key) the caller sees for the first time, the only ones whose
        first_seen can be missing (None: every one is offered)."""
        if sightings:
            await self.put_entries("sightings", _sighting_entries(sightings))
            firsts = _first_seen_entries(sightings, new)
            if firsts:
                await self.add_new_entries("first_seen", firsts)

    async def all_sightings(self) -> list[DeviceSighting]:
        """Every sighting, for the console's list view (stores read them in bulk)."""
        return await self.sightings()

    async def sightings(self, keys: list[str] | None = None) -> list[DeviceSighting]:
        """What the gateway saw, first_seen being the earliest any worker saw."""
        raw = await self.get_entries("sightings", keys)
        first = await self.get_entries("first_seen", None if keys is None else list(raw))
        out = []
        for k, v in raw.items():
            s = _dec_sight.decode(v)
            if k in first:
                s.first_seen = float(first[k])
            out.append(s)
        return out


# --------------------------------------------------------------------------- SQLite
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS document(id INTEGER PRIMARY KEY CHECK (id = 1), body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS entries(ns TEXT NOT NULL, key TEXT NOT NULL, body BLOB NOT NULL,
                                   PRIMARY KEY (ns, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
                                   key TEXT NOT NULL DEFAULT '');
"""
# Keep the change log short: a worker further behind than this reloads everything.
_KEEP_CHANGES = 50_000
# More changes than this at once: subscribers reload the snapshot instead.
BULK_CHANGES = 1000


def _why_unwritable(path: Path) -> str:
    """Why ``path`` (a database that exists) cannot be written, or "" if it can."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    d = path.parent
    try:
        vfs = os.statvfs(d)
    except OSError:
        vfs = None
    if vfs is not None and vfs.f_flag & os.ST_RDONLY:
        return f"{d}: read-only file system"
    if not os.access(d, os.W_OK):
        return f"{d}: directory not writable"
    if vfs is not None and vfs.f_bavail == 0:
        return f"{d}: {os.strerror(errno.ENOSPC)}"
    return ""


def _open_read_only(path: Path) -> sqlite3.Connection:
    """The database read-only: ``mode=ro`` reads a WAL left behind; ``immutable`` opens it
    when SQLite cannot make the -shm file it needs for that (nothing can write it then)."""
    last: Exception | None = None
    for opts in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"file:{quote(str(path))}?{opts}", uri=True, timeout=10.0, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("SELECT COUNT(*) FROM document").fetchone()
            except sqlite3.Error:
                db.close()
                raise
            return db
        except sqlite3.Error as exc:
            last = exc
    raise last


class SqliteStore(Store):
    def __init__(self, path: str | Path):
        # A relative path is inside the state directory, never the current one.
        self.path = str(resolve(path))
        self._db: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        # Set when the file could only be opened read-only: why (served, never written).
        self.read_only_reason = ""
        self.last_write_error = ""
        self.reads = 0                 # reads of the changes table by subscribe

    @property
    def writable(self) -> bool:
        return not self.read_only_reason

    async def open(self) -> None:
        def _open():
            p = Path(self.path)
            try:
                ensure_parent(p)
                create_private(p)          # 0600, and so its -wal and -shm files
                db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.executescript(_SCHEMA)
                except BaseException:
                    db.close()
                    raise
                return db, ""
            except (sqlite3.Error, OSError) as exc:
                # A read-only mount, an immutable file, a full disk: the snapshot in it still
                # serves; only writes are refused, with this reason.
                reason = p.is_file() and _why_unwritable(p)
                if not reason:
                    raise
                try:
                    return _open_read_only(p), reason
                except sqlite3.Error:
                    raise exc from None
        try:
            self._db, self.read_only_reason = await trio.to_thread.run_sync(_open)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.path}: cannot open policy store: {exc}") from None
        if self.read_only_reason:
            log.warning("policy store %s opened read-only (%s): serving it, refusing writes",
                        self.path, self.read_only_reason)

    async def aclose(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await trio.to_thread.run_sync(db.close)

    async def _run(self, fn, *, write: bool = False):
        if self._db is None:
            raise StoreError("policy store is not open")
        if write and self.read_only_reason:
            raise StoreError(f"{self.path}: policy store is read-only ({self.read_only_reason}): not written")
        async with self._lock:
            try:
                result = await trio.to_thread.run_sync(fn, self._db)
            except sqlite3.Error as exc:
                cause = self._cause(exc)
                if write:
                    self.last_write_error = cause
                raise StoreError(cause) from None
        if write:
            self.last_write_error = ""
        return result

    def _cause(self, exc: sqlite3.Error) -> str:
        """The real reason, not SQLite's last word (a full disk reads "database or disk is full")."""
        name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        p = Path(self.path)
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")):
            why = _why_unwritable(p) if p.exists() else ""
            if why:
                return f"{self.path}: not written: {why} ({name}: {exc})"
        return f"{self.path}: {exc} ({name})"

    @staticmethod
    def _tx(db: sqlite3.Connection, body) -> int:
        """Run ``body(db) -> [(kind, key)...]`` in one write transaction; log its changes."""
        db.execute("BEGIN IMMEDIATE")
        try:
            changes = body(db)
            db.executemany("INSERT INTO changes(kind, key) VALUES (?, ?)", changes)
            version = db.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()[0]
            db.execute("DELETE FROM changes WHERE id <= ?", (version - _KEEP_CHANGES,))
            db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk during COMMIT): a second
            # ROLLBACK would replace the real error with "no transaction is active".
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return version

    async def status(self) -> dict:
        return {"engine": "sqlite", "path": self.path, "writable": self.writable,
                "read_only_reason": self.read_only_reason, "last_write_error": self.last_write_error}

    async def version(self) -> int:
        return await self._run(lambda db: db.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()[0])

    async def snapshot_bodies(self):
        def read(db):
            db.execute("BEGIN")
            try:
                version = db.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()[0]
                row = db.execute("SELECT body FROM document WHERE id = 1").fetchone()
                devs = [r[0] for r in db.execute("SELECT body FROM entries WHERE ns = 'devices'")]
            finally:
                db.execute("COMMIT")
            return version, row, devs
        version, row, devs = await self._run(read)
        return version, decode_document_bytes(row[0]) if row else None, devs

    async def replace_all(self, document, devices) -> int:
        def body(db):
            if document is None:
                db.execute("DELETE FROM document")
            else:
                db.execute("INSERT OR REPLACE INTO document(id, body) VALUES (1, ?)", (_enc.encode(document),))
            db.execute("DELETE FROM entries WHERE ns = 'devices'")
            db.executemany("INSERT OR REPLACE INTO entries(ns, key, body) VALUES ('devices', ?, ?)",
                           [(device_key(d.device_id), _enc.encode(d)) for d in devices])
            return [("reload", "")]
        return await self._run(lambda db: self._tx(db, body), write=True)

    async def put_document(self, document) -> int:
        def body(db):
            db.execute("INSERT OR REPLACE INTO document(id, body) VALUES (1, ?)", (_enc.encode(document),))
            return [("document", "")]
        return await self._run(lambda db: self._tx(db, body), write=True)

    async def put_devices(self, devices) -> int:
        def body(db):
            rows = [(device_key(d.device_id), _enc.encode(d)) for d in devices]
            db.executemany("INSERT OR REPLACE INTO entries(ns, key, body) VALUES ('devices', ?, ?)", rows)
            return [("device", k) for k, _ in rows]
        return await self._run(lambda db: self._tx(db, body), write=True)

    async def remove_devices(self, device_ids) -> int:
        def body(db):
            keys = [device_key(d) for d in device_ids]
            db.executemany("DELETE FROM entries WHERE ns = 'devices' AND key = ?", [(k,) for k in keys])
            return [("device_removed", k) for k in keys]
        return await self._run(lambda db: self._tx(db, body), write=True)

    async def get_device(self, device_id):
        row = await self._run(lambda db: db.execute(
            "SELECT body FROM entries WHERE ns = 'devices' AND key = ?", (device_key(device_id),)).fetchone())
        return decode_device_bytes(row[0]) if row else None

    async def get_document(self):
        row = await self._run(lambda db: db.execute("SELECT body FROM document WHERE id = 1").fetchone())
        return decode_document_bytes(row[0]) if row else None

    async def add_new_entries(self, ns, entries):
        await self._run(lambda db: db.executemany(
            "INSERT OR IGNORE INTO entries(ns, key, body) VALUES (?, ?, ?)", [(ns, k, v) for k, v in entries.items()]),
            write=True)

    async def put_sightings(self, sightings, new=None):
        # Both tables in one transaction and one trip to the store's thread (a worker's
        # flush, once a second).
        if not sightings:
            return
        latest = [("sightings", k, v) for k, v in _sighting_entries(sightings).items()]
        firsts = [("first_seen", k, v) for k, v in _first_seen_entries(sightings, new).items()]

        def body(db):
            db.executemany("INSERT OR REPLACE INTO entries(ns, key, body) VALUES (?, ?, ?)", latest)
            if firsts:
                db.executemany("INSERT OR IGNORE INTO entries(ns, key, body) VALUES (?, ?, ?)", firsts)
            return []
        await self._run(lambda db: self._tx(db, body), write=True)

    async def put_entries(self, ns, entries, *, notify=False) -> int:
        if ns not in NAMESPACES:
            raise StoreError(f"unknown store namespace {ns!r}")

        def body(db):
            db.executemany("INSERT OR REPLACE INTO entries(ns, key, body) VALUES (?, ?, ?)",
                           [(ns, k, v) for k, v in entries.items()])
            return [(ns, k) for k in entries] if notify else []
        return await self._run(lambda db: self._tx(db, body), write=True)

    async def all_sightings(self):
        # One query (first_seen joined on the primary key), not one lookup per device.
        rows = await self._run(lambda db: db.execute(
            "SELECT s.body, f.body FROM entries s LEFT JOIN entries f ON f.ns = 'first_seen' AND f.key = s.key "
            "WHERE s.ns = 'sightings'").fetchall())
        out = []
        for body, first in rows:
            sight = _dec_sight.decode(body)
            if first is not None:
                sight.first_seen = float(first)
            out.append(sight)
        return out

    async def remove_entries(self, ns, keys):
        if ns not in NAMESPACES:
            raise StoreError(f"unknown store namespace {ns!r}")
        await self._run(lambda db: db.executemany("DELETE FROM entries WHERE ns = ? AND key = ?",
                                                  [(ns, k) for k in keys]), write=True)

    async def get_entries(self, ns, keys=None):
        def read(db):
            if keys is None:
                return dict(db.execute("SELECT key, body FROM entries WHERE ns = ?", (ns,)).fetchall())
            out = {}
            for k in keys:
                row = db.execute("SELECT body FROM entries WHERE ns = ? AND key = ?", (ns, k)).fetchone()
                if row:
                    out[k] = row[0]
            return out
        return await self._run(read)

    async def get_meta(self, key):
        row = await self._run(lambda db: db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone())
        return row[0] if row else None

    async def set_meta(self, key, value, *, notify=True) -> int:
        def body(db):
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return [("meta", key)] if notify else []
        return await self._run(lambda db: self._tx(db, body), write=True)

    async def changes_since(self, version):
        def read(db):
            first = db.execute("SELECT MIN(id) FROM changes").fetchone()[0]
            rows = db.execute("SELECT id, kind, key FROM changes WHERE id > ? ORDER BY id", (version,)).fetchall()
            # Fell behind the trimmed log: the only safe change is "reload everything";
            # so is a bulk update (cheaper than reading N records one by one).
            if (first is not None and first > version + 1 and version > 0) or len(rows) > BULK_CHANGES:
                return [Change(rows[-1][0] if rows else first, "reload")]
            return [Change(*r) for r in rows]
        return await self._run(read)

    # With the file unchanged on disk the changes table is still read this often (a write
    # landing in the clock tick of the last look, leaving the sizes as they were).
    recheck_every = 2.0

    def _disk_stamp(self) -> tuple:
        """What a write changes: the database file's and its WAL's size and mtime."""
        out = []
        for p in (self.path, self.path + "-wal"):
            try:
                st = os.stat(p)
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    async def subscribe(self, since: int | None = None):
        """Changes after ``since`` (or the current version), each within ``poll_interval``
        seconds (``recheck_every`` at worst). The table is read (in a thread) only when the
        file shows a write: two stat calls on the loop instead of five thread hops a second
        in every worker."""
        version = await self.version() if since is None else since
        seen, last_read = None, trio.current_time()
        while True:
            await ticker.every(self.poll_interval)
            stamp = self._disk_stamp()          # before the read: a write after it shows next time
            if stamp == seen and trio.current_time() - last_read < self.recheck_every:
                continue
            seen, last_read = stamp, trio.current_time()
            self.reads += 1
            for ch in await self.changes_since(version):
                version = ch.version
                yield ch


# --------------------------------------------------------------------------- Redis
META_LOCAL_COPY = "redis_copy"


class RedisStore(Store):
    """Keys under ``prefix``: doc (string), version (counter), devices/sightings/folders
    (hashes), meta (hash); changes are published on ``<prefix>changes``.

    With ``local_copy`` (an SQLite file the control process keeps current, see
    ``keep_local_copy``): when Redis cannot be reached at open, reads are served from
    that copy of the last snapshot and writes are refused; ``subscribe`` reconnects
    in the background and its first change back on Redis is a "reload".
    """

    def __init__(self, url: str, *, prefix: str = "segfast:", local_copy: str | Path | None = None):
        self.url = url
        self.prefix = prefix
        self._conn: RedisConnection | None = None
        self.local_copy = str(resolve(local_copy)) if local_copy else ""
        self._copy: SqliteStore | None = None     # open while it serves in Redis's place
        self._copy_meta: dict = {}
        self.last_error = ""

    def k(self, name: str) -> str:
        return self.prefix + name

    def source(self) -> str:
        """Which Redis data a local copy holds (no password)."""
        u = urlsplit(self.url)
        return f"{u.hostname}:{u.port or 6379}{u.path or '/0'} {self.prefix}"

    async def open(self) -> None:
        try:
            self._conn = await RedisConnection.connect(self.url)
        except (RedisError, trio.TooSlowError) as exc:
            self.last_error = str(exc) or "Redis connect timed out"
            if self._copy is None and not await self._open_copy():
                raise StoreError(f"policy store: {self.last_error}") from None
            return
        self.last_error = ""
        if self._copy is not None:
            copy, self._copy = self._copy, None
            await copy.aclose()
            log.warning("Redis reachable again: the local copy no longer serves")

    async def _open_copy(self) -> bool:
        if not self.local_copy or not Path(self.local_copy).is_file():
            return False
        copy = SqliteStore(self.local_copy)
        try:
            await copy.open()
            raw = await copy.get_meta(META_LOCAL_COPY)
            meta = msgspec.json.decode(raw) if raw else {}
        except (StoreError, msgspec.DecodeError):
            await copy.aclose()
            return False
        if not isinstance(meta, dict) or meta.get("source") != self.source():
            await copy.aclose()     # not a copy of this Redis (an old sqlite store, say)
            return False
        self._copy, self._copy_meta = copy, meta
        log.warning("Redis unreachable (%s): serving the local copy of snapshot %s saved %.0f s ago",
                    self.last_error, meta.get("version"), time.time() - meta.get("saved_at", 0))
        return True

    @property
    def serving_copy(self) -> SqliteStore | None:
        return self._copy if self._conn is None else None

    @property
    def writable(self) -> bool:
        return self.serving_copy is None

    async def aclose(self) -> None:
        if self._copy is not None:
            copy, self._copy = self._copy, None
            await copy.aclose()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()

    async def _pipe(self, commands):
        if self._conn is None:
            if self._copy is not None:
                # Only writes get here: reads went to the copy.
                raise StoreError(f"policy store: Redis unreachable ({self.last_error}); serving the local copy of "
                                 f"snapshot {self._copy_meta.get('version')}: not written")
            # Lost earlier (Redis restarted, network): one reconnect attempt per call.
            await self.open()
            if self._conn is None:
                raise StoreError(f"policy store: Redis unreachable ({self.last_error})")
        elif self._conn.dropped():
            # Closed by Redis while idle (a restart): reconnect before sending, so the
            # first write after a restart lands instead of failing.
            conn, self._conn = self._conn, None
            with trio.CancelScope(shield=True):
                await conn.aclose()
            await self.open()
            if self._conn is None:
                raise StoreError(f"policy store: Redis unreachable ({self.last_error})")
        try:
            return await self._conn.pipeline(commands)
        except RedisError as exc:
            if "connection" in str(exc).lower() or "closed" in str(exc).lower():
                conn, self._conn = self._conn, None
                with trio.CancelScope(shield=True):
                    await conn.aclose()
            self.last_error = str(exc)
            raise StoreError(f"policy store (Redis): {exc}") from None

    async def status(self) -> dict:
        if self._conn is not None:
            try:
                await self._pipe([("PING",)])     # a connection Redis dropped is seen here
            except StoreError:
                pass
        copy = self.serving_copy
        serving = "local copy" if copy is not None else ("redis" if self._conn is not None else "nothing")
        info = {"engine": "redis", "redis": self.source(), "reachable": self._conn is not None,
                "serving": serving, "last_error": self.last_error}
        meta = self._copy_meta if copy is not None else await _read_copy_meta(self.local_copy)
        if meta:
            info["local_copy"] = {"path": self.local_copy, "version": meta.get("version"),
                                  "saved_at": meta.get("saved_at"),
                                  "age_s": round(time.time() - meta.get("saved_at", 0), 1)}
        return info

    async def _publish(self, changes: list[tuple[str, str]], commands: list[tuple]) -> int:
        """Apply ``commands`` and bump the version atomically; then publish each change."""
        replies = await self._pipe([("MULTI",), *commands, ("INCRBY", self.k("version"), max(1, len(changes))),
                                    ("EXEC",)])
        version = replies[-1][-1]
        first = version - max(1, len(changes)) + 1
        if len(changes) > BULK_CHANGES:
            # A bulk update: one "reload" is cheaper for every subscriber than N messages.
            pubs = [("PUBLISH", self.k("changes"), _enc.encode(Change(version, "reload")))]
        else:
            pubs = [("PUBLISH", self.k("changes"), _enc.encode(Change(first + i, kind, key)))
                    for i, (kind, key) in enumerate(changes)]
        if pubs:
            await self._pipe(pubs)
        return version

    async def version(self) -> int:
        if self.serving_copy is not None:
            return int(self._copy_meta.get("version", 0))
        v = await self._pipe([("GET", self.k("version"))])
        return int(v[0] or 0)

    async def snapshot_bodies(self):
        if (copy := self.serving_copy) is not None:
            _, doc, devs = await copy.snapshot_bodies()
            return int(self._copy_meta.get("version", 0)), doc, devs
        replies = await self._pipe([
            ("MULTI",), ("GET", self.k("version")), ("GET", self.k("doc")), ("HVALS", self.k("devices")), ("EXEC",)])
        version, doc, devs = replies[-1]
        return int(version or 0), decode_document_bytes(doc) if doc else None, devs

    async def replace_all(self, document, devices) -> int:
        cmds = [("DEL", self.k("devices"))]
        cmds.append(("DEL", self.k("doc")) if document is None else ("SET", self.k("doc"), _enc.encode(document)))
        for i in range(0, len(devices), 1000):
            chunk = devices[i:i + 1000]
            args = [a for d in chunk for a in (device_key(d.device_id), _enc.encode(d))]
            cmds.append(("HSET", self.k("devices"), *args))
        return await self._publish([("reload", "")], cmds)

    async def put_document(self, document) -> int:
        return await self._publish([("document", "")], [("SET", self.k("doc"), _enc.encode(document))])

    async def put_devices(self, devices) -> int:
        if not devices:
            return await self.version()
        args = [a for d in devices for a in (device_key(d.device_id), _enc.encode(d))]
        return await self._publish([("device", device_key(d.device_id)) for d in devices],
                                   [("HSET", self.k("devices"), *args)])

    async def remove_devices(self, device_ids) -> int:
        if not device_ids:
            return await self.version()
        keys = [device_key(d) for d in device_ids]
        return await self._publish([("device_removed", k) for k in keys], [("HDEL", self.k("devices"), *keys)])

    async def get_device(self, device_id):
        if (copy := self.serving_copy) is not None:
            return await copy.get_device(device_id)
        raw = (await self._pipe([("HGET", self.k("devices"), device_key(device_id))]))[0]
        return decode_device_bytes(raw) if raw else None

    async def get_document(self):
        if (copy := self.serving_copy) is not None:
            return await copy.get_document()
        raw = (await self._pipe([("GET", self.k("doc"))]))[0]
        return decode_document_bytes(raw) if raw else None

    async def add_new_entries(self, ns, entries):
        if entries:
            await self._pipe([("HSETNX", self.k(ns), k, v) for k, v in entries.items()])

    async def put_entries(self, ns, entries, *, notify=False) -> int:
        if ns not in NAMESPACES:
            raise StoreError(f"unknown store namespace {ns!r}")
        if not entries:
            return 0
        args = [a for kv in entries.items() for a in kv]
        if notify:
            return await self._publish([(ns, k) for k in entries], [("HSET", self.k(ns), *args)])
        await self._pipe([("HSET", self.k(ns), *args)])
        return 0

    async def all_sightings(self):
        if (copy := self.serving_copy) is not None:
            return await copy.all_sightings()
        # HSCAN in slices: a reply of a few hundred devices instead of one of 100,000
        # (which the reply parser would re-read from its start at every network read).
        first = await self._scan("first_seen")
        out = []
        for k, v in (await self._scan("sightings")).items():
            sight = _dec_sight.decode(v)
            if k in first:
                sight.first_seen = float(first[k])
            out.append(sight)
        return out

    async def _scan(self, ns: str, count: int = 250) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        cursor = b"0"
        while True:
            cursor, flat = (await self._pipe([("HSCAN", self.k(ns), cursor, "COUNT", count)]))[0]
            for i in range(0, len(flat), 2):
                out[flat[i].decode()] = flat[i + 1]
            if cursor in (b"0", 0, "0"):
                return out

    async def remove_entries(self, ns, keys):
        if ns not in NAMESPACES:
            raise StoreError(f"unknown store namespace {ns!r}")
        for i in range(0, len(keys), 1000):
            await self._pipe([("HDEL", self.k(ns), *keys[i:i + 1000])])

    async def get_entries(self, ns, keys=None):
        if (copy := self.serving_copy) is not None:
            return await copy.get_entries(ns, keys)
        if keys is None:
            flat = (await self._pipe([("HGETALL", self.k(ns))]))[0]
            return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        if not keys:
            return {}
        vals = (await self._pipe([("HMGET", self.k(ns), *keys)]))[0]
        return {k: v for k, v in zip(keys, vals) if v is not None}

    async def get_meta(self, key):
        if (copy := self.serving_copy) is not None:
            return None if key == META_LOCAL_COPY else await copy.get_meta(key)
        v = (await self._pipe([("HGET", self.k("meta"), key)]))[0]
        return v.decode() if v is not None else None

    async def set_meta(self, key, value, *, notify=True) -> int:
        if notify:
            return await self._publish([("meta", key)], [("HSET", self.k("meta"), key, value)])
        await self._pipe([("HSET", self.k("meta"), key, value)])
        return 0

    async def changes_since(self, version):
        # Redis keeps no change log: a subscriber that missed messages reloads.
        current = await self.version()
        return [Change(current, "reload")] if current > version else []

    async def subscribe(self, since: int | None = None):
        """Changes as Redis publishes them, after ``since`` (or the current version). After a
        lost connection, or while the local copy serves, it reconnects with backoff; the first
        change back on Redis (or any missed since ``since``) is a "reload"."""
        version = await self.version() if since is None else since
        reload = self.serving_copy is not None
        backoff = 0.1
        while True:
            try:
                sub = await RedisConnection.connect(self.url)
            except (RedisError, trio.TooSlowError) as exc:
                self.last_error = str(exc) or "Redis connect timed out"
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            try:
                if self._conn is None:
                    await self.open()          # the connection reads use (the copy closes)
                    if self._conn is None:
                        raise RedisError(self.last_error)
                await sub.send("SUBSCRIBE", self.k("changes"))
                await sub.read()  # the subscribe confirmation
                # Anything published between the version read and SUBSCRIBE, or missed while
                # away (Redis may even have restarted empty): one reload.
                current = await self.version()
                if reload or current != version:     # behind, or Redis restarted empty
                    version, reload = current, False
                    yield Change(current, "reload")
                backoff = 0.1
                while True:
                    msg = await sub.read()
                    if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                        try:
                            ch = msgspec.json.decode(msg[2], type=Change)
                        except (msgspec.ValidationError, msgspec.DecodeError):
                            continue
                        if ch.version <= version:
                            continue          # published before the reload above read `current`
                        if ch.version > version + 1 and version:
                            ch = Change(ch.version, "reload")   # a gap: missed messages
                        version = max(version, ch.version)
                        yield ch
            except (RedisError, StoreError) as exc:
                self.last_error = str(exc)
                reload = True
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with trio.CancelScope(shield=True):
                    await sub.aclose()


async def _read_copy_meta(path: str) -> dict:
    if not path or not Path(path).is_file():
        return {}
    copy = SqliteStore(path)
    try:
        await copy.open()
        raw = await copy.get_meta(META_LOCAL_COPY)
        meta = msgspec.json.decode(raw) if raw else {}
        return meta if isinstance(meta, dict) else {}
    except (StoreError, msgspec.DecodeError):
        return {}
    finally:
        await copy.aclose()


async def keep_local_copy(settings, *, interval: float = 1.0, min_gap: float = 5.0,
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Control process, Redis store: copy every new snapshot version (document, device
    records, meta) into the local SQLite file, so a worker started while Redis is down
    serves the last snapshot instead of blocking every device (RedisStore ``local_copy``).
    A whole copy at most every ``min_gap`` seconds: a stream of changes to a large
    snapshot must not keep the control process busy copying."""
    redis = RedisStore(settings.redis_url, prefix=settings.redis_prefix)
    copy = SqliteStore(settings.sqlite_path)
    task_status.started()
    saved, failing, delay, last = None, "", interval, -min_gap
    try:
        while True:
            try:
                if copy._db is None:
                    await copy.open()
                    saved = (await _read_copy_meta(copy.path)).get("version")
                version = await redis.version()
                if version != saved and trio.current_time() - last >= min_gap:
                    last = trio.current_time()
                    snap = await redis.snapshot()
                    meta = await redis.get_entries("meta")
                    await copy.replace_all(snap.document, snap.devices)
                    for key, value in meta.items():
                        await copy.set_meta(key, value.decode("utf-8", "replace"), notify=False)
                    await copy.set_meta(META_LOCAL_COPY, _enc.encode(
                        {"source": redis.source(), "version": snap.version, "saved_at": time.time()}).decode(),
                        notify=False)
                    saved = snap.version
                    log.info("local copy of Redis snapshot %d saved in %s", saved, copy.path)
                if failing:
                    log.warning("local copy of the Redis snapshot is kept again")
                failing, delay = "", interval
            except StoreError as exc:
                if str(exc) != failing:
                    log.warning("local copy of the Redis snapshot not kept: %s", exc)
                failing, delay = str(exc), min(delay * 2, 10.0)
            await trio.sleep(delay)
    finally:
        with trio.CancelScope(shield=True):
            await redis.aclose()
            await copy.aclose()


def open_store(settings) -> Store:
    """The store the [policy] settings name (not yet opened)."""
    if settings.store == "redis":
        # The SQLite file holds the control process's copy of the last Redis snapshot.
        return RedisStore(settings.redis_url, prefix=settings.redis_prefix, local_copy=settings.sqlite_path)
    return SqliteStore(settings.sqlite_path)
