"""The dashboard's "last 24 hours": per-interval aggregates kept by the control process.

Workers count since they started (stats.py); the control process samples their
snapshot files every ``SAMPLE_EVERY`` seconds (and whenever the console asks) and
adds each worker's increase since the previous sample to the current bucket of
``STEP`` seconds. A worker seen for the first time (or restarted: another PID or
start time) adds all it counted. Gauges (parked Pings, devices by status and by
blocking reason) keep the bucket's highest and last value.

Bounded: ``SPAN / STEP`` buckets (288 of 5 minutes), at most ``MAX_KEYS`` keys per
family (beyond: "(other)"); at those bounds the file is about 1.2 MB and a sample of 8
workers takes 10 ms (benchmarks/console_bench.py --history-only). Written (0600, temp
file + rename) to the state directory every ``PERSIST_EVERY`` seconds and when the
control process stops, read back when it starts, so a restart keeps the day.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec
import trio

from seg_fast.statedir import resolve

log = logging.getLogger("seg_fast.admin")

STEP = 300.0
SPAN = 86400.0
SAMPLE_EVERY = 15.0
PERSIST_EVERY = 60.0
MAX_KEYS = 100
OTHER = "(other)"
FILE = "seg-fast-series.json"

# Counter families (summed per bucket) and gauge families (highest and last per bucket).
COUNTERS = ("requests_by_command", "requests_by_status", "decisions", "attachments", "links_rewritten",
            "mail_server_errors", "gateway_answers")
GAUGES = ("parked_pings", "devices_by_status", "devices_by_reason")


class Bucket(msgspec.Struct, omit_defaults=True):
    counters: dict[str, dict[str, int]] = {}
    gauges_max: dict[str, dict[str, int]] = {}
    gauges_last: dict[str, dict[str, int]] = {}


class Saved(msgspec.Struct):
    step: float
    buckets: dict[str, Bucket]                   # bucket start (as text: JSON keys) -> bucket
    last: dict[str, dict[str, int]] = {}         # "pid:started" -> that worker's counters when last sampled


def counters_of(snap) -> dict[str, int]:
    """A worker snapshot's counters, flat: "family\\0key" -> count."""
    out: dict[str, int] = {}

    def add(family: str, key: str, n: int) -> None:
        k = family + "\0" + key
        out[k] = out.get(k, 0) + n
    for cmd, by_status in snap.requests.items():
        for st, n in by_status.items():
            add("requests_by_command", cmd, n)
            add("requests_by_status", st, n)
    for reason, n in snap.decisions.items():
        add("decisions", reason, n)
    for action, n in snap.attachments.items():
        add("attachments", action, n)
    if snap.links_rewritten:
        add("links_rewritten", "links", snap.links_rewritten)
    for kind, n in snap.gateway_answers.items():
        add("gateway_answers", kind, n)
        if kind == "upstream_unavailable":
            add("mail_server_errors", "unavailable", n)
    return out


class Series:
    def __init__(self, path: Path | None = None, *, step: float = STEP, span: float = SPAN):
        self.path = path
        self.step = step
        self.n = int(span // step)
        self.buckets: dict[int, Bucket] = {}
        self.last: dict[str, dict[str, int]] = {}
        self.saved_at = 0.0

    # -- sampling -----------------------------------------------------------------------
    def _bucket(self, now: float) -> Bucket:
        start = int(now // self.step * self.step)
        b = self.buckets.get(start)
        if b is None:
            b = self.buckets[start] = Bucket(counters={}, gauges_max={}, gauges_last={})
            self._prune(now)
        return b

    def _prune(self, now: float) -> None:
        oldest = int(now // self.step * self.step) - (self.n - 1) * self.step
        for k in [k for k in self.buckets if k < oldest]:
            del self.buckets[k]

    def sample(self, snaps, *, devices: dict | None = None, now: float | None = None) -> None:
        """Add the workers' increases since the last sample (and the gauges) to the current bucket."""
        now = time.time() if now is None else now
        b = self._bucket(now)
        seen: dict[str, dict[str, int]] = {}
        for snap in snaps:
            wid = f"{snap.pid}:{snap.started!r}"
            cur = counters_of(snap)
            prev = self.last.get(wid, {})
            for k, n in cur.items():
                delta = n - prev.get(k, 0)
                if delta < 0:           # cannot happen for one worker's counters; never subtract
                    delta = n
                if delta:
                    family, key = k.split("\0", 1)
                    _add(b.counters, family, key, delta)
            seen[wid] = cur
        # Workers gone since: forgotten (their last second's counts with them).
        self.last = seen
        parked = sum(s.parked_pings for s in snaps)
        self._gauge(b, "parked_pings", {"parked": parked})
        if devices is not None:
            self._gauge(b, "devices_by_status", devices.get("by_status", {}))
            self._gauge(b, "devices_by_reason",
                        {k: v for k, v in devices.get("by_reason", {}).items() if not k.startswith("allowed")})

    def _gauge(self, b: Bucket, family: str, values: dict[str, int]) -> None:
        last = {}
        for key, v in values.items():
            last[key] = v
        b.gauges_last[family] = _capped(last)
        mx = b.gauges_max.setdefault(family, {})
        for key, v in b.gauges_last[family].items():
            if v > mx.get(key, -1):
                mx[key] = v

    # -- reading ------------------------------------------------------------------------
    def view(self, *, now: float | None = None, hours: float = 24.0) -> dict:
        """Dense arrays, oldest first: every family's keys with one value per bucket
        (counters: the bucket's sum; gauges: the bucket's highest, missing buckets null)."""
        now = time.time() if now is None else now
        n = max(1, min(self.n, int(hours * 3600 // self.step)))
        last = int(now // self.step * self.step)
        starts = [last - (n - 1 - i) * self.step for i in range(n)]
        out: dict[str, dict[str, list]] = {f: {} for f in COUNTERS + GAUGES}
        for i, start in enumerate(starts):
            b = self.buckets.get(int(start))
            if b is None:
                continue
            for family, keys in b.counters.items():
                for key, v in keys.items():
                    out.setdefault(family, {}).setdefault(key, [0] * n)[i] = v
            for family, keys in b.gauges_max.items():
                for key, v in keys.items():
                    out.setdefault(family, {}).setdefault(key, [None] * n)[i] = v
        for family, keys in out.items():
            if len(keys) > MAX_KEYS:
                out[family] = _fold(keys, family in GAUGES)
        return {"step": self.step, "start": starts[0], "end": last + self.step, "buckets": len(starts),
                "series": out}

    # -- the file -----------------------------------------------------------------------
    def load(self) -> None:
        if self.path is None:
            return
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("dashboard history %s not read: %s", self.path, exc.strerror)
            return
        try:
            saved = msgspec.json.decode(raw, type=Saved)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # A damaged file costs the history, never the start.
            log.warning("dashboard history %s not read: %s", self.path, exc)
            return
        if saved.step != self.step:
            return
        self.buckets = {int(float(k)): v for k, v in saved.buckets.items()}
        self.last = saved.last
        self._prune(max(time.time(), max(self.buckets, default=0)))   # what is older than the span

    def save(self) -> None:
        if self.path is None:
            return
        data = msgspec.json.encode(Saved(step=self.step, buckets={str(k): v for k, v in self.buckets.items()},
                                         last=self.last))
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            self.saved_at = time.time()
        except OSError as exc:
            log.warning("dashboard history %s not written: %s", self.path, exc.strerror)


def _add(where: dict, family: str, key: str, n: int) -> None:
    keys = where.setdefault(family, {})
    if key not in keys and len(keys) >= MAX_KEYS:
        key = OTHER                 # labels come from devices (commands): never unbounded
    keys[key] = keys.get(key, 0) + n


def _fold(keys: dict[str, list], gauge: bool) -> dict[str, list]:
    """The MAX_KEYS - 1 largest keys over the whole view, the rest summed as "(other)"."""
    total = lambda vs: sum(v or 0 for v in vs)
    ranked = sorted(keys.items(), key=lambda kv: (kv[0] == OTHER, -total(kv[1])))
    out = dict(ranked[:MAX_KEYS - 1])
    rest = [vs for _, vs in ranked[MAX_KEYS - 1:]]
    merged = []
    for column in zip(*rest):
        got = [v for v in column if v is not None]
        merged.append(sum(got) if got or not gauge else None)
    out[OTHER] = merged
    return out


def _capped(values: dict[str, int]) -> dict[str, int]:
    if len(values) <= MAX_KEYS:
        return dict(values)
    top = sorted(values.items(), key=lambda kv: -kv[1])
    out = dict(top[:MAX_KEYS - 1])
    out[OTHER] = sum(v for _, v in top[MAX_KEYS - 1:])
    return out


def series_path(config) -> Path:
    return resolve(FILE, config.state_dir)


async def run(api, *, every: float = SAMPLE_EVERY, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """In the control process: sample every ``every`` seconds; save every minute and at exit."""
    task_status.started()
    try:
        while True:
            await trio.sleep(every)
            try:
                await api.sample_series()
            except Exception:        # noqa: BLE001 - history must never stop the admin API
                log.exception("dashboard history sample failed")
            if time.time() - api.series.saved_at >= PERSIST_EVERY:
                api.series.save()
    finally:
        with trio.CancelScope(shield=True):
            try:
                await api.sample_series(devices=False)     # the files only: no store call at exit
            except Exception:        # noqa: BLE001
                pass
            api.series.save()
