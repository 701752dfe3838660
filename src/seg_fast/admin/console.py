"""The console's server side: the device list view (filters, search, sort, paging),
the dashboard's aggregates, bulk actions and the audit log.

Every device seen (the store's sightings) joined with the MDM records the control
process's engine holds, kept as one column index in memory and rebuilt from the
store at most every ``REFRESH`` seconds (or at once after an action): a query is a
pass over plain tuples, so listing, filtering and counting 100,000 devices never
ships them to the browser (benchmarks/console_bench.py measures it).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgspec

from seg_fast.policy.model import device_key
from seg_fast.statedir import resolve

REFRESH = 5.0
DAY = 86400.0
MAX_PAGE = 500

# Columns as in the guide's list view (the order of the tuple rows below).
COLUMNS = ("device_id", "user", "mail_client", "device_type", "platform", "model", "os", "managed", "compliant",
           "override", "last_seen", "status", "reason", "first_seen", "node", "ip", "last_command", "http_status")
C = {name: i for i, name in enumerate(COLUMNS)}
SORTABLE = frozenset(COLUMNS)
# Text searched by q= (lower-cased once, at build time).
_SEARCH = ("device_id", "user", "mail_client", "device_type", "platform", "model", "os", "reason", "node", "ip")


class QueryError(ValueError):
    pass


class DeviceIndex:
    def __init__(self):
        self.rows: list[tuple] = []
        self.text: list[str] = []          # per row: the searchable fields, lower-cased, joined
        self.built = 0.0
        self.build_s = 0.0                 # how long the last build took (paces the next one)
        self._orders: dict[tuple[int, bool], list[int]] = {}

    def build(self, sightings, records: dict) -> None:
        rows, text, seen = [], [], set()
        for s in sightings:
            k = device_key(s.device_id)
            seen.add(k)
            r = records.get(k)
            rows.append((s.device_id, s.user, s.mail_client, s.device_type, r.platform if r else "",
                         r.model if r else "", r.os if r else "", bool(r and r.managed),
                         r.compliant if r else None, r.override if r else "default", s.last_seen, s.status,
                         s.reason, s.first_seen, s.node.rsplit("/", 1)[0], s.ip, s.last_command, s.http_status))
        for k, r in records.items():
            if k in seen:
                continue            # MDM records the gateway never saw: listed too, never seen
            rows.append((r.device_id, r.user, "", "", r.platform, r.model, r.os, r.managed, r.compliant, r.override,
                         0.0, "", "", 0.0, "", "", "", 0))
        t0 = time.perf_counter()
        cols = [C[c] for c in _SEARCH]
        for row in rows:
            text.append("\x00".join([str(row[i]) for i in cols]).lower())
        self.rows, self.text, self.built = rows, text, time.time()
        self._orders = {}
        self.build_s = time.perf_counter() - t0

    def _order(self, col: int, desc: bool) -> list[int]:
        """Row numbers sorted by a column, computed once per build and direction."""
        key = (col, desc)
        order = self._orders.get(key)
        if order is None:
            rows = self.rows
            order = sorted(range(len(rows)), key=lambda i: _sort_key(rows[i][col]), reverse=desc)
            self._orders[key] = order
        return order

    # -- queries ------------------------------------------------------------------
    def _tests(self, params: dict[str, str], now: float | None = None) -> list:
        """The filters in ``params`` as predicates over a row number."""
        now = time.time() if now is None else now
        rows, text = self.rows, self.text
        tests = []
        q = params.get("q", "").strip().lower()
        if q:
            tests.append(lambda i: q in text[i])
        for name, value in params.items():
            if value == "" or name in ("q", "sort", "order", "offset", "limit"):
                continue
            f = _filter(name, value, now)
            tests.append(lambda i, f=f: f(rows[i]))
        return tests

    def select(self, params: dict[str, str], now: float | None = None) -> list[int]:
        """Row numbers matching every filter in ``params``."""
        tests = self._tests(params, now)
        return [i for i in range(len(self.rows)) if all(t(i) for t in tests)]

    def query(self, params: dict[str, str], now: float | None = None) -> dict:
        sort = params.get("sort") or "last_seen"
        if sort not in SORTABLE:
            raise QueryError(f"cannot sort by {sort!r} (one of {', '.join(COLUMNS)})")
        desc = (params.get("order") or ("desc" if sort in ("last_seen", "first_seen") else "asc")) == "desc"
        try:
            offset = max(0, int(params.get("offset") or 0))
            limit = min(MAX_PAGE, max(1, int(params.get("limit") or 50)))
        except ValueError:
            raise QueryError("offset and limit must be whole numbers") from None
        order = self._order(C[sort], desc)
        rows = self.rows
        tests = self._tests(params, now)
        if not tests:
            total, hits = len(order), order[offset:offset + limit]
        else:
            # One pass in sorted order: count every match, keep the page's.
            total, hits, end = 0, [], offset + limit
            for i in order:
                for t in tests:
                    if not t(i):
                        break
                else:
                    if offset <= total < end:
                        hits.append(i)
                    total += 1
        page = [dict(zip(COLUMNS, rows[i])) for i in hits]
        return {"total": total, "offset": offset, "limit": limit, "sort": sort,
                "order": "desc" if desc else "asc", "columns": COLUMNS, "devices": page}

    def ids(self, params: dict[str, str]) -> list[str]:
        return [self.rows[i][0] for i in self.select(params)]

    def aggregates(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        by_status: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        day_status: dict[str, int] = {}
        platform: dict[str, int] = {}
        managed = unmanaged = overrides = 0
        st, rs, ls, mg, ov, pf = C["status"], C["reason"], C["last_seen"], C["managed"], C["override"], C["platform"]
        for row in self.rows:
            s = row[st] or "never_seen"
            by_status[s] = by_status.get(s, 0) + 1
            if row[rs]:
                by_reason[row[rs]] = by_reason.get(row[rs], 0) + 1
            if row[ls] >= now - DAY:
                day_status[s] = day_status.get(s, 0) + 1
            if row[mg]:
                managed += 1
            else:
                unmanaged += 1
            if row[ov] != "default":
                overrides += 1
            p = row[pf] or "(unknown)"
            platform[p] = platform.get(p, 0) + 1
        return {"devices": len(self.rows), "by_status": by_status, "by_reason": by_reason,
                "seen_last_24h_by_status": day_status, "managed": managed, "unmanaged": unmanaged,
                "overrides": overrides, "by_platform": platform}


def _sort_key(v):
    # None (not reported) sorts first; mixed types never meet in one column.
    if v is None:
        return (0, "")
    if isinstance(v, str):
        return (1, v.lower())
    return (1, v)


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise QueryError(f"not a yes/no value: {value!r}")


def _filter(name: str, value: str, now: float):
    """One filter of the list view as a predicate over a row."""
    if name == "q":
        return None
    if name in ("status", "override", "platform", "node", "device_type"):
        i, want = C[name], value.lower()
        return lambda row: (row[i] or "").lower() == want
    if name in ("user", "mail_client", "model", "os", "device_id"):
        i, want = C[name], value.lower()
        return lambda row: want in (row[i] or "").lower()
    if name == "reason":
        i = C["reason"]
        return lambda row: row[i] == value or row[i].startswith(value + ".")
    if name == "managed":
        i, want = C["managed"], _bool(value)
        return lambda row: row[i] is want
    if name == "compliant":
        i, want = C["compliant"], _bool(value)
        return lambda row: row[i] is want
    if name == "violation":
        # A policy violation: blocked by a policy other than an administrator's blacklist.
        i, want = C["reason"], _bool(value)
        return lambda row: (row[i].startswith("blocked.") and row[i] != "blocked.blacklisted") is want
    if name in ("seen_within_days", "not_seen_days"):
        try:
            days = float(value)
        except ValueError:
            raise QueryError(f"{name} must be a number of days") from None
        i, edge = C["last_seen"], now - days * DAY
        if name == "seen_within_days":
            return lambda row: row[i] >= edge
        return lambda row: row[i] < edge
    raise QueryError(f"unknown filter {name!r}")


FILTERS = ("q", "status", "reason", "override", "platform", "node", "device_type", "user", "mail_client", "model",
           "os", "device_id", "managed", "compliant", "violation", "seen_within_days", "not_seen_days")


# -- audit log ------------------------------------------------------------------------

class AuditLog:
    """Who did what when, one JSON object per line, mode 0600 in the state directory."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, who: str, action: str, **what) -> dict:
        entry = {"ts": round(time.time(), 3), "who": who, "action": action, **what}
        line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:
            pass
        return entry

    def tail(self, n: int = 200) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 256 * 1024))
                lines = f.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines[-n:]:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out[::-1]


def audit_path(config) -> Path:
    return resolve("seg-fast-audit.jsonl", config.state_dir)


def query_params(target: bytes) -> dict[str, str]:
    from urllib.parse import parse_qsl
    q = target.split(b"?", 1)[1].decode("utf-8", "replace") if b"?" in target else ""
    return dict(parse_qsl(q, keep_blank_values=True))


class BulkBody(msgspec.Struct, forbid_unknown_fields=True):
    """A bulk action: the devices a filter selects (or ``ids``), confirmed by their count."""
    filter: dict[str, str] = {}
    ids: list[str] = []
    expected: int = -1                # the count the administrator confirmed; must match
