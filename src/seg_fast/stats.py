"""Worker statistics for the control process: counted in memory, written once a second.

Each worker counts its transactions with ONE call per completed transaction
(``Stats.tx(record)`` from the exchange's ``_log``): a few dict increments, no I/O,
no lock (one trio thread). Everything else (connections, parked Pings, the pool,
refused connections, the event loop's lag, the policy snapshot) is read from the
Gateway when the snapshot is taken, not per request.

Once a second a worker writes its snapshot, msgspec JSON, to
``state_dir/stats/worker-<pid>.json`` (a spare file + name exchange, mode 0600); the control
process (admin API: ``/metrics``, the console's dashboard) reads every live
worker's file. A file not rewritten for ``STALE_AFTER`` seconds belongs to a worker
that is gone and is ignored.
"""
from __future__ import annotations

import bisect
import os
import time
from pathlib import Path

from time import perf_counter

import msgspec
import trio

from seg_fast import ticker
from seg_fast.content import pipeline as content_pipeline
from seg_fast.dx import DX_DIR, Dx
from seg_fast.proxy import tickets
from seg_fast.statedir import exchange, resolve

STATS_DIR = "stats"
WRITE_INTERVAL = 1.0
STALE_AFTER = 10.0
# Transaction time histogram bounds, in ms (Pings excluded: they last their heartbeat).
TX_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class WorkerSnapshot(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one worker writes; also what the control process reads back."""
    pid: int
    ts: float                                        # wall clock when written
    started: float = 0.0
    requests: dict[str, dict[str, int]] = {}         # command -> status -> count
    decisions: dict[str, int] = {}                   # reason -> count
    gateway_answers: dict[str, int] = {}             # error kind -> count (answered by the gateway)
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_ms_sum: float = 0.0
    tx_ms_bounds: list[float] = []
    tx_ms_buckets: list[int] = []                    # per bound, plus the overflow bucket
    tx_ms_sum: float = 0.0
    # Gauges, read from the Gateway at write time.
    connections: int = 0
    parked_pings: int = 0
    lane_carried: int = 0                            # exchanges the keep-alive lane answered itself
    lane_handed: int = 0                             # ... and handed to a task (proxy/lane.py)
    upstream_open: int = 0
    upstream_idle: int = 0
    unsent_bytes: int = 0
    incidents: dict[str, int] = {}                   # refused connections, deadlines, contained errors
    loop_lag: dict = {}                              # looplag.LoopLag.snapshot() without the series
    policy_version: int = 0
    policy_version_age_s: float = 0.0                # since this worker's snapshot last changed
    policy_store_version: int = 0                    # the last store change taken in (logging levels too)
    policies_loaded: bool = False
    store_ok: bool = False
    dx_targets: int = 0
    transformed: dict[str, int] = {}                 # answers rewritten by content policies, by command
    transform_bytes_in: int = 0                      # their size from the mail server
    transform_bytes_out: int = 0                     # their size as sent to devices
    attachments: dict[str, int] = {}                 # attachment action (encrypt, block, allow) -> count
    links_rewritten: int = 0
    kcd: dict[str, int] = {}                         # kcd/delegation.py's KDC outcomes (empty: kcd off)
    tls_tickets: dict[str, float] = {}               # proxy/tickets.metrics() (empty: OpenSSL's own keys)


def _error_kind(rec) -> str:
    """A short, bounded label for why the gateway answered itself (never the message's details)."""
    err = rec.error
    if not err:
        return ""
    if rec.status == 503:
        return "upstream_unavailable"
    if rec.status == 499:
        return "device_gone"
    if rec.status == 413:
        return "body_too_large"
    if rec.status == 400:
        return "malformed_request"
    if rec.status == 404:
        return "not_eas_path"
    if rec.status == 500:
        return "content_refused"
    return f"status_{rec.status}"


class Stats:
    """The counters of one worker (or of an in-process Gateway in tests)."""

    __slots__ = ("requests", "decisions", "gateway_answers", "bytes_in", "bytes_out", "upstream_ms_sum",
                 "tx_buckets", "tx_ms_sum", "started", "_version", "_version_since", "dx",
                 "transformed", "transform_bytes_in", "transform_bytes_out", "content")

    def __init__(self, content=None):
        self.requests: dict[tuple, int] = {}
        self.decisions: dict[str, int] = {}
        self.gateway_answers: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_ms_sum = 0.0
        self.tx_buckets = [0] * (len(TX_BOUNDS_MS) + 1)
        self.tx_ms_sum = 0.0
        self.started = time.time()
        self._version = -1
        self._version_since = self.started
        self.dx = Dx()                 # targeted logging: its targets follow state_dir/dx (write_loop)
        self.transformed: dict[str, int] = {}
        self.transform_bytes_in = 0
        self.transform_bytes_out = 0
        # The content pipeline's counts (attachment actions, links): the worker's own, read at snapshot.
        self.content = content_pipeline.counts if content is None else content

    def tx(self, rec, t0: float | None = None) -> None:
        """One completed transaction (observe.Transaction; ``t0`` its perf_counter start):
        the only per-request call."""
        key = (rec.command or rec.method, rec.status)
        req = self.requests
        req[key] = req.get(key, 0) + 1
        reason = rec.decision
        if reason:
            d = self.decisions
            d[reason] = d.get(reason, 0) + 1
        if rec.error:
            kind = _error_kind(rec)
            g = self.gateway_answers
            g[kind] = g.get(kind, 0) + 1
        self.bytes_in += rec.bytes_in
        self.bytes_out += rec.bytes_out
        self.upstream_ms_sum += rec.upstream_ms
        if rec.command != "Ping":
            ms = rec.total_ms if t0 is None else (perf_counter() - t0) * 1000.0
            self.tx_buckets[bisect.bisect_left(TX_BOUNDS_MS, ms)] += 1
            self.tx_ms_sum += ms
        if self.dx.active:             # one attribute test unless some device or user is targeted
            if t0 is not None and not rec.total_ms:
                rec.total_ms = round((perf_counter() - t0) * 1000.0, 3)
            self.dx.capture(rec)

    def transform(self, command: str | None, size_in: int, size_out: int) -> None:
        """An answer a content policy rewrote (links, attachments): once per such answer."""
        key = command or "?"
        self.transformed[key] = self.transformed.get(key, 0) + 1
        self.transform_bytes_in += size_in
        self.transform_bytes_out += size_out

    def snapshot(self, gw=None, *, now: float | None = None) -> WorkerSnapshot:
        now = time.time() if now is None else now
        requests: dict[str, dict[str, int]] = {}
        for (command, status), n in self.requests.items():
            requests.setdefault(command, {})[str(status)] = n
        snap = WorkerSnapshot(
            pid=os.getpid(), ts=now, started=self.started, requests=requests, decisions=dict(self.decisions),
            gateway_answers=dict(self.gateway_answers), bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            upstream_ms_sum=round(self.upstream_ms_sum, 3), tx_ms_bounds=list(TX_BOUNDS_MS),
            tx_ms_buckets=list(self.tx_buckets), tx_ms_sum=round(self.tx_ms_sum, 3),
            transformed=dict(self.transformed), transform_bytes_in=self.transform_bytes_in,
            transform_bytes_out=self.transform_bytes_out,
            attachments={k: n for k, n in self.content.attachments.items() if n},
            links_rewritten=self.content.links)
        if gw is not None:
            _gauges(snap, gw, self, now)
        return snap


def _gauges(snap: WorkerSnapshot, gw, stats: Stats, now: float) -> None:
    snap.connections = gw.active
    parking = getattr(gw, "parking", None)
    snap.parked_pings = parking.count if parking is not None else 0
    if parking is not None:
        snap.lane_carried, snap.lane_handed = parking.carried, parking.handed
    pool = gw.pool
    if pool is not None:
        snap.upstream_open = pool.open
        snap.upstream_idle = sum(len(v) for v in pool.idle.values())
    unsent = getattr(gw, "unsent", None)
    snap.unsent_bytes = getattr(unsent, "total", 0) or 0
    snap.incidents = dict(gw.incidents.counts)
    lag = getattr(gw, "looplag", None)
    if lag is not None:
        s = lag.snapshot()
        # the last seconds' maxima only: a reader sampling once a second (the sizing
        # run) gets the exact maximum of any window without the whole series
        s["max_per_second"] = s["max_per_second"][-10:]
        snap.loop_lag = s
    keeper = getattr(gw, "gatekeeper", None)
    engine = getattr(keeper, "engine", None)
    if engine is not None:
        if engine.version != stats._version:
            stats._version, stats._version_since = engine.version, now
        snap.policy_version = engine.version
        snap.policy_version_age_s = round(now - stats._version_since, 3)
        snap.policies_loaded = engine.policies is not None
        snap.store_ok = bool(getattr(keeper, "store_ok", False))
        snap.policy_store_version = getattr(keeper, "store_version", 0)
    snap.dx_targets = len(stats.dx.devices) + len(stats.dx.users)
    kcd = getattr(gw, "kcd", None)
    if kcd is not None:
        snap.kcd = dict(kcd.outcomes)
    snap.tls_tickets = tickets.metrics(now)


# -- files ---------------------------------------------------------------------

def stats_dir(config) -> Path:
    return resolve(STATS_DIR, config.state_dir)


_encoder = msgspec.json.Encoder()


def write_snapshot(directory: Path, snap: WorkerSnapshot) -> Path:
    """Atomically: readers see the old file or the new one, never half of one.

    The snapshot is written over the spare file (what the last exchange left there: the one
    before last), cut to its length, and the two names exchanged. On ext4 a rename over an
    existing file, like a file truncated to zero, makes the kernel allocate and start
    writing the new blocks inside the call (auto_da_alloc): measured here ~100 us of CPU and
    ~190 us of the event loop each second per worker (more behind a busy disk), against ~18
    us for blocks overwritten in place and an exchange. Without the exchange (another
    system or file system): a rename, as before."""
    path = directory / f"worker-{snap.pid}.json"
    spare = directory / f".worker-{snap.pid}.tmp"
    data = _encoder.encode(snap)
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    try:
        if exchange(spare, path):
            return path
    except FileNotFoundError:
        pass                      # the first snapshot: nothing to exchange with yet
    os.replace(spare, path)
    return path


def read_snapshots(directory: Path, *, now: float | None = None) -> list[WorkerSnapshot]:
    """Every live worker's latest snapshot (stale or unreadable files are skipped)."""
    now = time.time() if now is None else now
    out = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    decoder = msgspec.json.Decoder(WorkerSnapshot)
    for name in names:
        if not (name.startswith("worker-") and name.endswith(".json")):
            continue
        try:
            with open(directory / name, "rb") as f:
                snap = decoder.decode(f.read())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        if now - snap.ts <= STALE_AFTER:
            out.append(snap)
    return out


def remove_snapshot(directory: Path, pid: int) -> None:
    for name in (f"worker-{pid}.json", f".worker-{pid}.tmp"):
        try:
            os.unlink(directory / name)
        except OSError:
            pass


def clear(directory: Path) -> None:
    """The control process at start: files of an earlier run's workers go."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(("worker-", ".worker-")):
            try:
                os.unlink(directory / name)
            except OSError:
                pass


async def write_loop(gw, directory: Path, *, interval: float = WRITE_INTERVAL,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """In a worker: the snapshot once a second, and once more when cancelled (at exit)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass
    gw.stats.dx.directory = directory.parent / DX_DIR
    task_status.started()
    try:
        while True:
            gw.stats.dx.refresh()
            _write(gw, directory)
            await ticker.every(interval)
    finally:
        _write(gw, directory)


def _write(gw, directory: Path) -> None:
    # The transaction log first: a transaction this snapshot counts is then in the log file.
    log = getattr(gw, "log", None)
    if log is not None:
        log.flush()
    try:
        write_snapshot(directory, gw.stats.snapshot(gw))
    except OSError:
        pass                      # a full or read-only state_dir must not stop the worker


# -- sums ------------------------------------------------------------------------

def total(snaps: list[WorkerSnapshot]) -> WorkerSnapshot:
    """The gateway's sum over its workers (gauges summed; policy version the lowest)."""
    t = WorkerSnapshot(pid=0, ts=max((s.ts for s in snaps), default=time.time()), tx_ms_bounds=list(TX_BOUNDS_MS),
                       tx_ms_buckets=[0] * (len(TX_BOUNDS_MS) + 1))
    t.requests, t.decisions, t.gateway_answers, t.incidents, t.transformed, t.attachments = {}, {}, {}, {}, {}, {}
    t.kcd = {}
    t.tls_tickets = {}
    for s in snaps:
        for cmd, by_status in s.requests.items():
            dst = t.requests.setdefault(cmd, {})
            for st, n in by_status.items():
                dst[st] = dst.get(st, 0) + n
        for attr in ("decisions", "gateway_answers", "incidents", "transformed", "attachments", "kcd"):
            dst = getattr(t, attr)
            for k, n in getattr(s, attr).items():
                dst[k] = dst.get(k, 0) + n
        for k, n in s.tls_tickets.items():      # counters summed; the key's age: the oldest worker's
            t.tls_tickets[k] = max(t.tls_tickets.get(k, 0), n) if k == "key_age_s" else t.tls_tickets.get(k, 0) + n
        for attr in ("bytes_in", "bytes_out", "upstream_ms_sum", "tx_ms_sum", "connections", "parked_pings",
                     "lane_carried", "lane_handed",
                     "upstream_open", "upstream_idle", "unsent_bytes", "dx_targets",
                     "transform_bytes_in", "transform_bytes_out", "links_rewritten"):
            setattr(t, attr, getattr(t, attr) + getattr(s, attr))
        if list(s.tx_ms_bounds) == list(TX_BOUNDS_MS):
            t.tx_ms_buckets = [a + b for a, b in zip(t.tx_ms_buckets, s.tx_ms_buckets)]
    if snaps:
        t.policy_version = min(s.policy_version for s in snaps)
        t.policy_version_age_s = max(s.policy_version_age_s for s in snaps)
        t.policies_loaded = all(s.policies_loaded for s in snaps)
        t.store_ok = all(s.store_ok for s in snaps)
    return t
