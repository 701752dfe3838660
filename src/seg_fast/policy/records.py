"""The MDM's device records as one file that every worker of a node maps.

Every worker needs every record (a device may reach any worker, and a decision needs no I/O).
Decoded into a dict per worker they cost ~730 B of resident memory per record, and a node
runs one worker per ~8,300 devices (its descriptor limit): with 100,000 devices and as many
records, twelve workers held ~70 MiB each, memory growing with workers x records. Here a
snapshot's rows are laid out once, sorted by a 64-bit hash of the device key, in a file named
by its content (``records-<sha256>.tbl`` in the state directory): the first worker to load a
snapshot writes it, the others find the same bytes there and map the same pages. A lookup
(on a decision-cache miss only) is a binary search of the mapped hashes and one decode of the
row. Records the store changes after the snapshot sit in a per-worker overlay until the gate
reloads a snapshot.

Layout (native byte order, the file never leaves its machine): b"SEGREC01", the count n
(u64), n sorted hashes (u64), n + 1 entry offsets (u64), then per entry the key's length
(u32), the key (UTF-8) and the record as the store encodes it (JSON).
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import struct
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import msgspec

from seg_fast.errors import PolicyError
from seg_fast.policy.model import DeviceRecord, device_key

log = logging.getLogger("seg_fast.policy")

MAGIC = b"SEGREC01"
_HEAD = struct.Struct("=8sQ")
_KLEN = struct.Struct("=I")
STALE_AFTER = 60.0          # s: another snapshot's table this old is removed (its mappings stay valid)
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(DeviceRecord)
_MISSING = object()

# Distinct strings shared by the cache (device types, mail clients, MDM platforms and
# models): a fleet has a few hundred; past this many a new one is kept as it came, so
# devices sending random values cannot grow the table.
MAX_SHARED_STRINGS = 4096
MAX_SHARED_LENGTH = 128       # longer values are not shared (the strings stay under ~1 MB)


class Shared:
    """One object per distinct string, for values many devices repeat.

    Every worker keeps an entry per device it has seen and the records changed since its
    snapshot, once per worker (several per core): a record's "Apple" and "iPhone 15", a
    request's "Apple-iPhone15C2/2104.100", each its own object, cost ~55 bytes per device
    apiece.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __call__(self, value):
        if value is None or len(value) > MAX_SHARED_LENGTH:
            return value
        seen = self._seen
        got = seen.get(value)
        if got is not None:
            return got
        if len(seen) < MAX_SHARED_STRINGS:
            seen[value] = value
        return value


def compact_record(rec: DeviceRecord, shared: Shared) -> DeviceRecord:
    """``rec`` with its repeated strings (platform, model, OS, key id) shared."""
    p, m, o, k = shared(rec.platform), shared(rec.model), shared(rec.os), shared(rec.key_id)
    if p is rec.platform and m is rec.model and o is rec.os and k is rec.key_id:
        return rec
    return msgspec.structs.replace(rec, platform=p, model=m, os=o, key_id=k)


def record_key(device_id: str) -> str:
    """device_key(device_id), the id itself when it is already in that form (no second copy)."""
    key = device_key(device_id)
    return device_id if key == device_id else key


def decode_device_bytes(raw: bytes) -> DeviceRecord:
    """A record as the store encodes it (JSON); PolicyError if it is damaged."""
    try:
        return _dec.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PolicyError(f"stored device record is damaged: {exc}") from None


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def build(bodies: Iterable[bytes]) -> bytes:
    """The table's bytes for the store's encoded records. Each is decoded once here (a damaged
    one raises PolicyError, as a snapshot always did) and keyed as the engine keys it; for two
    records of one key the later wins. (No tuple per record: the last 2,000 freed stay in
    CPython's free list, spread over the allocator's arenas, and kept ~12 MiB of them from
    going back to the system after 50,000 records.)"""
    rows: dict[str, bytes] = {}
    for body in bodies:
        rows[record_key(decode_device_bytes(body).device_id)] = body
    keys = sorted(rows)                      # (ties of the hash below stay in key order)
    hashes = array("Q", map(key_hash, keys))
    order = sorted(range(len(keys)), key=hashes.__getitem__)
    n = len(keys)
    offsets = array("Q")
    data = bytearray()
    at = _HEAD.size + 8 * (2 * n + 1)
    for i in order:
        kb = keys[i].encode("utf-8", "surrogatepass")
        offsets.append(at + len(data))
        data += _KLEN.pack(len(kb))
        data += kb
        data += rows[keys[i]]
    offsets.append(at + len(data))
    return b"".join((_HEAD.pack(MAGIC, n), array("Q", map(hashes.__getitem__, order)).tobytes(),
                     offsets.tobytes(), data))


class RecordTable:
    """Read-only lookups over a table's bytes (a mapped file, or bytes of its own)."""

    __slots__ = ("count", "path", "_buf", "_hashes", "_offsets")

    def __init__(self, buf, path: Path | None = None):
        magic, n = _HEAD.unpack_from(buf, 0)
        if magic != MAGIC or len(buf) < _HEAD.size + 8 * (2 * n + 1):
            raise ValueError("not a device record table")
        mv = memoryview(buf)
        self.count = n
        self.path = path
        self._buf = buf
        self._hashes = mv[_HEAD.size:_HEAD.size + 8 * n].cast("Q")
        self._offsets = mv[_HEAD.size + 8 * n:_HEAD.size + 8 * (2 * n + 1)].cast("Q")

    @classmethod
    def of(cls, records: Iterable[DeviceRecord]) -> RecordTable:
        return cls(build(_enc.encode(r) for r in records))

    def _entry(self, i: int) -> tuple[bytes, int, int]:
        start, end = self._offsets[i], self._offsets[i + 1]
        (klen,) = _KLEN.unpack_from(self._buf, start)
        k0 = start + _KLEN.size
        return self._buf[k0:k0 + klen], k0 + klen, end

    def _find(self, key: str) -> int:
        """The entry's index, or -1."""
        h = key_hash(key)
        hashes = self._hashes
        i = bisect_left(hashes, h)
        want = None
        while i < self.count and hashes[i] == h:
            if want is None:
                want = key.encode("utf-8", "surrogatepass")
            if self._entry(i)[0] == want:
                return i
            i += 1
        return -1

    def _record(self, i: int) -> DeviceRecord:
        _, b0, b1 = self._entry(i)
        return decode_device_bytes(self._buf[b0:b1])

    def get(self, key: str) -> DeviceRecord | None:
        i = self._find(key)
        return self._record(i) if i >= 0 else None

    def __contains__(self, key: str) -> bool:
        return self._find(key) >= 0          # (no record decoded)

    def keys(self) -> Iterator[str]:
        for i in range(self.count):
            yield self._entry(i)[0].decode("utf-8", "surrogatepass")

    def items(self) -> Iterator[tuple[str, DeviceRecord]]:
        """Every (key, record), in table order: each row decoded once, no look-up per key."""
        for i in range(self.count):
            k, b0, b1 = self._entry(i)
            yield k.decode("utf-8", "surrogatepass"), decode_device_bytes(self._buf[b0:b1])


class Records(Mapping):
    """The engine's view of the records: the table, and the changes applied since it was built
    (a record, or None for a removed one)."""

    __slots__ = ("table", "overlay", "_shared")

    def __init__(self, table: RecordTable, shared: Shared | None = None):
        self.table = table
        self.overlay: dict[str, DeviceRecord | None] = {}
        self._shared = shared or Shared()

    def get(self, key, default=None):
        if self.overlay:
            rec = self.overlay.get(key, _MISSING)
            if rec is not _MISSING:
                return default if rec is None else rec
        rec = self.table.get(key)
        return default if rec is None else rec

    def __getitem__(self, key):
        rec = self.get(key)
        if rec is None:
            raise KeyError(key)
        return rec

    def __iter__(self):
        overlay = self.overlay
        for k in self.table.keys():
            if overlay.get(k, _MISSING) is not None:
                yield k
        for k, rec in overlay.items():
            if rec is not None and k not in self.table:
                yield k

    def items(self) -> Iterator[tuple[str, DeviceRecord]]:
        """Every (key, record) (a walk of the table, not a look-up per key as Mapping's)."""
        overlay = self.overlay
        for k, rec in self.table.items():
            if k not in overlay:
                yield k, rec
        for k, rec in overlay.items():
            if rec is not None:
                yield k, rec

    def values(self) -> Iterator[DeviceRecord]:
        return (rec for _, rec in self.items())

    def __len__(self) -> int:
        n = self.table.count
        for k, rec in self.overlay.items():
            n += (rec is not None) - (k in self.table)
        return n

    def put(self, key: str, rec: DeviceRecord) -> None:
        self.overlay[key] = compact_record(rec, self._shared)

    def remove(self, key: str) -> None:
        self.overlay[key] = None


def shared_table(bodies: Iterable[bytes], directory: Path | None) -> RecordTable:
    """A table for these rows, mapped from ``directory`` where every worker of the node finds
    the same file (written there if no worker has yet); its own bytes without a directory or
    when the file cannot be used (said once in the log)."""
    content = build(bodies)
    if directory is None:
        return RecordTable(content)
    try:
        mm, path = _map_shared(content, directory)
    except OSError as exc:
        log.warning("device records not shared between workers (%s): each worker keeps its own copy", exc)
        return RecordTable(content)
    return RecordTable(mm, path)


def _map_shared(content: bytes, directory: Path) -> tuple[mmap.mmap, Path]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"records-{hashlib.sha256(content).hexdigest()[:32]}.tbl"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            _write_new(content, directory, path)
            continue
        try:
            if os.fstat(fd).st_size == len(content):
                mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                # The name says what it should hold; what it holds is checked (a cache: a
                # damaged or foreign file is replaced, never trusted).
                if mm[:] == content:
                    return mm, path
                mm.close()
        finally:
            os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    raise OSError(f"{path}: could not be written and read back")


def _write_new(content: bytes, directory: Path, path: Path) -> None:
    tmp = directory / f".{path.stem}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(content)
        try:
            os.link(tmp, path)         # all or nothing, and never over another worker's
        except FileExistsError:
            pass
    finally:
        os.close(fd)
        os.unlink(tmp)
    # Older snapshots' tables: a worker that mapped one keeps its pages; a worker starting
    # later with an old snapshot writes it again.
    now = time.time()
    for old in directory.glob("records-*.tbl"):
        try:
            if old != path and now - old.stat().st_mtime > STALE_AFTER:
                old.unlink()
        except OSError:
            pass
