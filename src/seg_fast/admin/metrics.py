"""Prometheus text exposition (format 0.0.4) of the workers' statistics, written by hand.

Workers are separate processes, each writing its counters to a file (seg_fast.stats);
``prometheus_client``'s multiprocess mode wants its own mmap files and metric objects
in every worker, so the control process renders the snapshots itself. Each family
exists twice: ``seg_fast_*`` summed over the live workers, and ``seg_fast_worker_*``
with a ``worker`` label (the PID), so that ``sum()`` over one never counts twice.
"""
from __future__ import annotations

from seg_fast.stats import TX_BOUNDS_MS, WorkerSnapshot, total

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


class _Out:
    def __init__(self):
        self.lines: list[str] = []
        self.seen: set[str] = set()

    def family(self, name: str, kind: str, help_: str) -> None:
        if name in self.seen:
            return
        self.seen.add(name)
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict, value) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")


def _histogram(out: _Out, name: str, help_: str, base: dict, bounds_s, buckets, count, sum_s=None) -> None:
    out.family(name, "histogram", help_)
    acc = 0
    for bound, n in zip(bounds_s, buckets):
        acc += n
        out.sample(f"{name}_bucket", {**base, "le": _num(float(bound))}, acc)
    acc += buckets[len(bounds_s)] if len(buckets) > len(bounds_s) else 0
    out.sample(f"{name}_bucket", {**base, "le": "+Inf"}, acc)
    out.sample(f"{name}_count", base, count if count is not None else acc)
    if sum_s is not None:
        out.sample(f"{name}_sum", base, sum_s)


def _emit(out: _Out, prefix: str, s: WorkerSnapshot, base: dict) -> None:
    """Every family of one snapshot (one worker, or the sum with ``base`` empty)."""
    p = prefix
    out.family(f"{p}_requests_total", "counter", "EAS transactions by command and answer status")
    for cmd, by_status in sorted(s.requests.items()):
        for status, n in sorted(by_status.items()):
            out.sample(f"{p}_requests_total", {**base, "command": cmd, "status": status}, n)
    out.family(f"{p}_decisions_total", "counter", "Policy decisions by reason")
    for reason, n in sorted(s.decisions.items()):
        out.sample(f"{p}_decisions_total", {**base, "reason": reason}, n)
    out.family(f"{p}_gateway_answers_total", "counter",
               "Answers the gateway made itself, by cause (upstream_unavailable: mail-server errors)")
    for kind, n in sorted(s.gateway_answers.items()):
        out.sample(f"{p}_gateway_answers_total", {**base, "kind": kind}, n)
    out.family(f"{p}_request_bytes_total", "counter", "Request body bytes received from devices")
    out.sample(f"{p}_request_bytes_total", base, s.bytes_in)
    out.family(f"{p}_answer_bytes_total", "counter", "Answer body bytes sent to devices")
    out.sample(f"{p}_answer_bytes_total", base, s.bytes_out)
    n_tx = sum(s.tx_ms_buckets)
    _histogram(out, f"{p}_transaction_seconds", "Transaction time, Pings excluded", base,
               [b / 1000 for b in TX_BOUNDS_MS], s.tx_ms_buckets, n_tx, round(s.tx_ms_sum / 1000, 6))
    for name, value, help_ in (
            ("connections", s.connections, "Open device connections (parked Pings included)"),
            ("parked_pings", s.parked_pings, "Pings waiting in the parking lot for the mail server"),
            ("lane_carried", s.lane_carried, "Exchanges the keep-alive lane answered in the lot's step, "
                                             "since the workers started"),
            ("lane_handed", s.lane_handed, "Kept-alive connections the lane handed to a task, since the workers started"),
            ("upstream_connections_open", s.upstream_open, "Mail-server connections open (busy or idle)"),
            ("upstream_connections_idle", s.upstream_idle, "Idle keep-alive mail-server connections"),
            ("unsent_bytes", s.unsent_bytes, "Answer bytes held for devices that have not read them"),
            ("policy_snapshot_version", s.policy_version, "Version of the policy snapshot in force"),
            ("policy_snapshot_age_seconds", s.policy_version_age_s, "Seconds since the snapshot last changed"),
            ("policies_loaded", s.policies_loaded, "1 when a policy document is loaded"),
            ("policy_store_ok", s.store_ok, "1 when the policy store is reachable"),
            ("dx_targets", s.dx_targets, "Devices and users under targeted (Dx) logging")):
        out.family(f"{p}_{name}", "gauge", help_)
        out.sample(f"{p}_{name}", base, value)
    out.family(f"{p}_transformed_answers_total", "counter",
               "Answers rewritten by content policies (links, attachments), by command")
    for cmd, n in sorted(s.transformed.items()):
        out.sample(f"{p}_transformed_answers_total", {**base, "command": cmd}, n)
    out.family(f"{p}_transform_bytes_in_total", "counter", "Size of those answers as the mail server sent them")
    out.sample(f"{p}_transform_bytes_in_total", base, s.transform_bytes_in)
    out.family(f"{p}_transform_bytes_out_total", "counter", "Size of those answers as sent to devices")
    out.sample(f"{p}_transform_bytes_out_total", base, s.transform_bytes_out)
    out.family(f"{p}_attachments_total", "counter",
               "Attachments by action (encrypt, block, allow), each time their content passed (body or fetch)")
    for action in ("encrypt", "block", "allow"):
        out.sample(f"{p}_attachments_total", {**base, "action": action}, s.attachments.get(action, 0))
    out.family(f"{p}_links_rewritten_total", "counter", "Links rewritten to open in the secure browser")
    out.sample(f"{p}_links_rewritten_total", base, s.links_rewritten)
    out.family(f"{p}_incidents_total", "counter",
               "Refused connections, deadlines and contained errors, by kind")
    for kind, n in sorted(s.incidents.items()):
        out.sample(f"{p}_incidents_total", {**base, "kind": kind}, n)
    if s.tls_tickets:          # the workers use the control process's ticket keys (proxy/tickets.py)
        t = s.tls_tickets
        for name, key, help_ in (
                ("tls_tickets_issued_total", "issued", "TLS session tickets issued (renewals included)"),
                ("tls_tickets_renewed_total", "renewed", "Tickets issued on a resumed connection (the renewal)"),
                ("tls_tickets_refused_total", "refused",
                 "Tickets under no key of the ring (rotated out or foreign): full handshake")):
            out.family(f"{p}_{name}", "counter", help_)
            out.sample(f"{p}_{name}", base, int(t.get(key, 0)))
        out.family(f"{p}_tls_tickets_accepted_total", "counter",
                   "Tickets accepted (resumptions), by key: current, or other (previous or next of the ring)")
        for label, key in (("current", "accepted_current"), ("other", "accepted_other")):
            out.sample(f"{p}_tls_tickets_accepted_total", {**base, "key": label}, int(t.get(key, 0)))
        out.family(f"{p}_tls_ticket_key_age_seconds", "gauge",
                   "Seconds since the encrypting ticket key became current (sum: the oldest worker's)")
        out.sample(f"{p}_tls_ticket_key_age_seconds", base, float(t.get("key_age_s", 0.0)))
    if s.kcd:                  # kcd on (kcd/delegation.py): its rounds with the KDC
        out.family(f"{p}_kcd_kdc_requests_total", "counter",
                   "Constrained-delegation rounds with the KDC (S4U2Self + S4U2Proxy) by result")
        for result in ("fetched", "refused", "unavailable"):
            out.sample(f"{p}_kcd_kdc_requests_total", {**base, "result": result}, s.kcd.get(result, 0))
        for name, key, help_ in (
                ("kcd_timeouts_total", "timeout", "Requests that stopped waiting for the KDC at kcd.timeout"),
                ("kcd_cached_refusals_total", "refused_cached",
                 "Users refused from the remembered KDC refusal, without asking the KDC"),
                ("kcd_tokens_total", "tokens", "Negotiate tokens made for the mail server")):
            out.family(f"{p}_{name}", "counter", help_)
            out.sample(f"{p}_{name}", base, s.kcd.get(key, 0))


def _loop_lag(out: _Out, s: WorkerSnapshot, base: dict) -> None:
    lag = s.loop_lag or {}
    hist = lag.get("histogram_ms") or {}
    if not hist:
        return
    bounds = [float(k[3:]) for k in hist if k.startswith("le_")]
    buckets = [hist[k] for k in hist if k.startswith("le_")] + [hist.get("inf", 0)]
    _histogram(out, "seg_fast_worker_loop_lag_seconds", "How late the event loop woke the worker's 0.2 s housekeeping wait", base,
               [b / 1000 for b in bounds], buckets, lag.get("samples"))
    out.family("seg_fast_worker_loop_lag_max_seconds", "gauge", "Largest event-loop lag since the worker started")
    out.sample("seg_fast_worker_loop_lag_max_seconds", base, round(lag.get("max_ms", 0.0) / 1000, 6))
    gc = lag.get("gc") or {}
    if gc.get("collections"):
        out.family("seg_fast_worker_gc_collections_total", "counter", "Garbage collector runs by generation")
        for gen, n in enumerate(gc["collections"]):
            out.sample("seg_fast_worker_gc_collections_total", {**base, "generation": str(gen)}, n)
        out.family("seg_fast_worker_gc_pause_seconds_total", "counter", "Time in garbage collector pauses")
        for gen, ms in enumerate(gc.get("total_ms", [])):
            out.sample("seg_fast_worker_gc_pause_seconds_total", {**base, "generation": str(gen)},
                       round(ms / 1000, 6))


def render(snaps: list[WorkerSnapshot]) -> str:
    out = _Out()
    out.family("seg_fast_workers", "gauge", "Workers that reported in the last 10 seconds")
    out.sample("seg_fast_workers", {}, len(snaps))
    _emit(out, "seg_fast", total(snaps), {})
    for s in sorted(snaps, key=lambda s: s.pid):
        base = {"worker": str(s.pid)}
        out.family("seg_fast_worker_start_time_seconds", "gauge", "When the worker started (Unix time)")
        out.sample("seg_fast_worker_start_time_seconds", base, round(s.started, 3))
        _emit(out, "seg_fast_worker", s, base)
    for s in sorted(snaps, key=lambda s: s.pid):
        _loop_lag(out, s, {"worker": str(s.pid)})
    return "\n".join(_group(out.lines)) + "\n"


def _group(lines: list[str]) -> list[str]:
    """Samples of one family together, after its HELP/TYPE (the format requires it)."""
    order: list[str] = []
    by_family: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line.startswith("# HELP "):
            current = line.split(" ", 3)[2]
            if current not in by_family:
                order.append(current)
                by_family[current] = []
            by_family[current].append(line)
        elif line.startswith("# TYPE "):
            by_family[current].append(line)
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            fam = _family_of(name, by_family)
            by_family[fam].append(line)
    return [line for fam in order for line in by_family[fam]]


def _family_of(sample: str, families: dict) -> str:
    if sample in families:
        return sample
    for suffix in ("_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample[:-len(suffix)] in families:
            return sample[:-len(suffix)]
    raise KeyError(sample)
