"""The console's server side: the device list view (filters, search, sort, paging),
the dashboard's aggregates, bulk actions and the audit log.

Every device seen (the store's sightings) joined with the MDM records the control
process's engine holds, kept as one column index in memory and rebuilt from the
store at most every ``REFRESH`` seconds (or at once after an action): a query is a
pass over plain tuples, so listing, filtering and counting 100,000 devices never
ships them to the browser (benchmarks/console_bench.py measures it).
"""
from __future__ import annotations

import bisect
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
        self._ranks: dict[tuple[int, bool], list[int]] = {}
        self._masks: dict[int, dict] = {}          # column -> value -> bitmask of rows (int)
        self._blobs: dict[int, tuple[str, list[int]]] = {}
        self._seen_sorted: tuple[list[float], list[int]] | None = None

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
        self._orders, self._ranks, self._masks, self._blobs, self._seen_sorted = {}, {}, {}, {}, None
        # Bitmasks per value of the columns filtered by equality: a filter is an AND of ints.
        for name in _EXACT:
            self._mask_of(C[name])
        self.build_s = time.perf_counter() - t0

    def _mask_of(self, col: int) -> dict:
        masks = self._masks.get(col)
        if masks is None:
            where: dict = {}
            for i, row in enumerate(self.rows):
                v = row[col]
                key = v.lower() if isinstance(v, str) else v
                where.setdefault(key, []).append(i)
            masks = {k: _bits(idx, len(self.rows)) for k, idx in where.items()}
            self._masks[col] = masks
        return masks

    def _blob(self, col: int | None) -> tuple[str, list[int]]:
        """A column's lower-cased text (or the search text) in one string, and where each row starts."""
        got = self._blobs.get(col)
        if got is None:
            parts = self.text if col is None else [str(row[col]).lower() for row in self.rows]
            starts, pos = [], 0
            for p in parts:
                starts.append(pos)
                pos += len(p) + 1
            got = ("\n".join(parts), starts)
            self._blobs[col] = got
        return got

    def _contains(self, col: int | None, needle: str) -> int:
        """Rows whose text holds ``needle``: str.find over one string, not a test per row."""
        blob, starts = self._blob(col)
        n = len(starts)
        hits, pos = [], blob.find(needle)
        while pos >= 0:
            row = bisect.bisect_right(starts, pos) - 1
            hits.append(row)
            nxt = starts[row + 1] if row + 1 < n else len(blob)
            pos = blob.find(needle, nxt)
        return _bits(hits, n)

    def _seen_mask(self, edge: float, after: bool) -> int:
        if self._seen_sorted is None:
            col = C["last_seen"]
            order = sorted(range(len(self.rows)), key=lambda i: self.rows[i][col])
            self._seen_sorted = ([self.rows[i][col] for i in order], order)
        values, order = self._seen_sorted
        cut = bisect.bisect_left(values, edge)
        return _bits(order[cut:] if after else order[:cut], len(self.rows))

    def _rank(self, col: int, desc: bool) -> list[int]:
        key = (col, desc)
        rank = self._ranks.get(key)
        if rank is None:
            rank = [0] * len(self.rows)
            for pos, i in enumerate(self._order(col, desc)):
                rank[i] = pos
            self._ranks[key] = rank
        return rank

    def mask(self, params: dict[str, str], now: float | None = None) -> int | None:
        """The rows every filter in ``params`` selects, as a bitmask (None: no filter)."""
        now = time.time() if now is None else now
        out = None
        for name, value in params.items():
            if value == "" or name in ("sort", "order", "offset", "limit"):
                continue
            m = self._filter_mask(name, value, now)
            out = m if out is None else out & m
        return out

    def _filter_mask(self, name: str, value: str, now: float) -> int:
        if name == "q":
            q = value.strip().lower()
            return self._contains(None, q) if q else (1 << len(self.rows)) - 1
        if name in _EXACT and name not in ("managed", "compliant", "reason"):
            return self._masks[C[name]].get(value.lower(), 0)
        if name in ("managed", "compliant"):
            return self._masks[C[name]].get(_bool(value), 0)
        if name in ("user", "mail_client", "model", "os", "device_id"):
            return self._contains(C[name], value.lower())
        if name in ("reason", "violation"):
            masks, want, m = self._masks[C["reason"]], None, 0
            if name == "violation":
                want = _bool(value)
            for reason, bits in masks.items():
                if name == "reason":
                    hit = reason == value.lower() or reason.startswith(value.lower() + ".")
                else:
                    hit = (reason.startswith("blocked.") and reason != "blocked.blacklisted") is want
                if hit:
                    m |= bits
            return m
        if name in ("seen_within_days", "not_seen_days"):
            try:
                days = float(value)
            except ValueError:
                raise QueryError(f"{name} must be a number of days") from None
            return self._seen_mask(now - days * DAY, after=name == "seen_within_days")
        raise QueryError(f"unknown filter {name!r}")

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
        m = self.mask(params, now)
        if m is None:
            total, hits = len(order), order[offset:offset + limit]
        else:
            picked = _rows_of(m)
            total = len(picked)
            rank = self._rank(C[sort], desc)
            hits = sorted(picked, key=rank.__getitem__)[offset:offset + limit]
        page = [dict(zip(COLUMNS, rows[i])) for i in hits]
        return {"total": total, "offset": offset, "limit": limit, "sort": sort,
                "order": "desc" if desc else "asc", "columns": COLUMNS, "devices": page}

    def ids(self, params: dict[str, str]) -> list[str]:
        m = self.mask(params)
        picked = range(len(self.rows)) if m is None else _rows_of(m)
        return [self.rows[i][0] for i in picked]

    def aggregates(self, now: float | None = None) -> dict:
        """The dashboard's counts, from the bitmasks (a popcount each, no pass over the rows)."""
        now = time.time() if now is None else now
        count = lambda masks: {(k or "never_seen"): m.bit_count() for k, m in masks.items() if m}
        statuses = self._masks[C["status"]]
        day = self._seen_mask(now - DAY, after=True)
        managed = self._masks[C["managed"]].get(True, 0).bit_count()
        return {"devices": len(self.rows), "by_status": count(statuses),
                "by_reason": {k: v for k, v in count(self._masks[C["reason"]]).items() if k != "never_seen"},
                "seen_last_24h_by_status": count({k: m & day for k, m in statuses.items()}),
                "managed": managed, "unmanaged": len(self.rows) - managed,
                "overrides": len(self.rows) - self._masks[C["override"]].get("default", 0).bit_count(),
                "by_platform": {(k or "(unknown)"): m.bit_count() for k, m in self._masks[C["platform"]].items()}}


_EXACT = ("status", "override", "platform", "node", "device_type", "managed", "compliant", "reason")
_BITS = [tuple(k for k in range(8) if b >> k & 1) for b in range(256)]


def _bits(rows, n: int) -> int:
    """Row numbers as a bitmask (bit i: row i)."""
    ba = bytearray((n + 7) // 8)
    for i in rows:
        ba[i >> 3] |= 1 << (i & 7)
    return int.from_bytes(ba, "little")


def _rows_of(mask: int) -> list[int]:
    """The row numbers a bitmask holds, in order."""
    out = []
    data = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    for j, b in enumerate(data):
        if b:
            base = j << 3
            out.extend([base + k for k in _BITS[b]])
    return out


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


# -- what the gateway saw of one device, recently ---------------------------------------

TAIL_BYTES = 4 * 1024 * 1024          # of the transaction log read for one device's detail
RECENT = 20
# Request headers that identify a device and its client (from a Dx line; Authorization is
# already cut to scheme and user there).
IDENTIFYING = ("user-agent", "ms-asprotocolversion", "x-ms-policykey", "authorization", "ms-asacceptmultipart",
               "x-forwarded-for", "host")


def _tail_lines(path: Path, limit: int) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    return lines[1:] if size > limit else lines     # the first may be cut


def recent_transactions(path: str, device_id: str, n: int = RECENT) -> list[dict]:
    """The device's last transactions in the transaction log (its last 4 MB), newest first;
    [] when the log is off or on stdout."""
    if not path or path == "-":
        return []
    needle = device_id.lower().encode()
    out = []
    for line in reversed(_tail_lines(Path(path), TAIL_BYTES)):
        if needle not in line.lower():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if str(rec.get("device_id", "")).lower() == needle.decode():
            out.append({k: rec.get(k) for k in ("ts", "command", "status", "decision", "total_ms", "upstream",
                                                 "client_ip", "protocol_version", "error")
                        if rec.get(k) not in (None, "")})
            if len(out) >= n:
                break
    return out


def protocol_version(recent: list[dict], identity: dict) -> str:
    """The EAS version the device spoke last: its newest transaction record's (every record
    carries it), else its last Dx line's; "" when neither says."""
    return next((r["protocol_version"] for r in recent if r.get("protocol_version")), "") \
        or identity.get("protocol_version", "")


def identifying_headers(dx_log: bytes) -> dict:
    """From the device's last Dx line: the headers that identify it and its protocol version."""
    for line in reversed(dx_log.splitlines()[-50:]):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        headers = entry.get("request_headers")
        if not headers:
            continue
        shown = [[k, v] for k, v in headers if k.lower() in IDENTIFYING]
        version = next((v for k, v in headers if k.lower() == "ms-asprotocolversion"), "")
        return {"ts": entry.get("ts"), "command": entry.get("command"), "protocol_version": version,
                "headers": shown}
    return {}


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
    minutes: float = 60.0             # Dx over a filter: for how long
