"""Latency figures of the sizing benchmark, and the *paired* added latency.

The latency a proxy adds is taken request by request: the same seeded request
(same device, same schedule slot) timed on the direct path and through the proxy,
the difference per request, then p99 and p99.9 of those differences. The
difference of two runs' p99s would let a slow direct run flatter the proxy.

Commands with fewer than ``POOL_MIN`` paired samples in the window are pooled into
one ``other`` class for the verdict: a p99 over a hundred samples is its second
worst value, not a percentile.
"""
from __future__ import annotations

import math

from seg_fast.sim.corpus import ATTACHMENT_SIZES

POOL_MIN = 1000
OTHER = "other"
NOT_JUDGED = ("Ping",)          # a parked Ping's duration is the heartbeat, not latency


def percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not sorted_vals:
        return 0.0
    return sorted_vals[min(len(sorted_vals) - 1, max(0, int(math.ceil(q * len(sorted_vals))) - 1))]


def lat_summary(vals: list[float]) -> dict:
    v = sorted(vals)
    return {"n": len(v), "p50": percentile(v, 0.50), "p90": percentile(v, 0.90),
            "p99": percentile(v, 0.99), "p999": percentile(v, 0.999), "max": v[-1] if v else 0.0}


def diff_summary(diffs: list[float]) -> dict:
    """``lat_summary`` of paired differences, with the same ranks read from the other
    end: ``mirror_p99`` and ``mirror_p999`` are how much *slower the direct run* was
    for the same request, at the rarity of p99 and p99.9. A proxy cannot make a
    request faster than no proxy, so that side is the instrument's own noise; where it
    comes near p99 or p99.9, the added tail is mostly noise and a bound below it cannot
    be judged. It is a lower bound of that noise: stalls of the load side during the
    proxy's run (its loop lags more there) land on the added side and have no mirror."""
    s = lat_summary(diffs)
    flipped = sorted(-d for d in diffs)
    s["mirror_p99"] = percentile(flipped, 0.99)
    s["mirror_p999"] = percentile(flipped, 0.999)
    return s


def paired_differences(path_raw: dict[str, dict[str, float]],
                       direct_raw: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """Per command: path latency minus direct latency of every request measured on
    both paths (same key), in ms. Requests measured on one path only are left out."""
    out: dict[str, list[float]] = {}
    for cmd, a in path_raw.items():
        if cmd in NOT_JUDGED:
            continue
        b = direct_raw.get(cmd)
        if not b:
            continue
        out[cmd] = [a[k] - b[k] for k in a.keys() & b.keys()]
    return out


def judged_classes(diffs: dict[str, list[float]], pool_min: int = POOL_MIN) -> dict[str, list[float]]:
    """The classes the verdict looks at: each command with at least ``pool_min``
    paired samples on its own, the rest pooled into ``other``."""
    classes: dict[str, list[float]] = {}
    pooled: list[float] = []
    for cmd in sorted(diffs):
        d = diffs[cmd]
        if len(d) >= pool_min:
            classes[cmd] = d
        else:
            pooled.extend(d)
    if pooled:
        classes[OTHER] = pooled
    return classes


def _summary_ms(diffs: list[float]) -> dict:
    """diff_summary to the microsecond (what the JSON keeps)."""
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in diff_summary(diffs).items()}


def size_label(size: int) -> str:
    """The profile's attachment size nearest to ``size`` (by ratio): "~50 KiB" ... "~10 MiB"."""
    near = min((s for s, _ in ATTACHMENT_SIZES), key=lambda s: abs(math.log(max(size, 1) / s)))
    return f"~{near >> 20} MiB" if near >= 1 << 20 else f"~{near >> 10} KiB"


def added_by_size(path_raw: dict[str, float], direct_raw: dict[str, float], sizes: dict[str, int]) -> dict:
    """Paired added latency of one command split by the size each request fetched (``sizes``:
    key -> bytes), smallest first: where a command's tail comes from. For reading only; the
    verdict judges the command whole."""
    split: dict[str, list[float]] = {size_label(s): [] for s, _ in ATTACHMENT_SIZES}
    for k in path_raw.keys() & direct_raw.keys():
        if k in sizes:
            split[size_label(sizes[k])].append(path_raw[k] - direct_raw[k])
    return {label: _summary_ms(d) for label, d in split.items() if d}


def added_split(path_raw: dict[str, float], direct_raw: dict[str, float],
                path_timing: dict[str, tuple[float, float]], direct_timing: dict[str, tuple[float, float]],
                sizes: dict[str, int] | None = None, path_seconds: dict[int, dict] | None = None,
                direct_seconds: dict[int, dict] | None = None) -> dict:
    """Where one command's added latency forms, for reading only (the verdict judges the
    whole): per request paired as the verdict pairs them, the part before the answer's
    first byte (``head``: the request through the proxy and the mail server's answer
    starting back) and the part after it (``body``: the answer streaming through), each
    summarised like the whole; split by fetched size when ``sizes`` is given. ``worst``:
    the slowest 1% of the added latencies, when they were sent (seconds of the shared
    schedule): how many distinct seconds they fell in and the most in one second, so a
    stall that caught many requests at once shows apart from a tail spread thin. With
    ``path_seconds``/``direct_seconds`` (schedule second -> what the machine did in it,
    sizing.seconds_context), each run's slow seconds are set beside its own machine figures."""
    keys = [k for k in path_raw.keys() & direct_raw.keys() if k in path_timing and k in direct_timing]
    groups: dict[str, list[str]] = {}
    for k in keys:
        label = size_label(sizes[k]) if sizes is not None and k in sizes else "all"
        groups.setdefault(label, []).append(k)
    out: dict = {}
    for label, ks in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0])):
        head = [path_timing[k][1] - direct_timing[k][1] for k in ks]
        body = [(path_raw[k] - path_timing[k][1]) - (direct_raw[k] - direct_timing[k][1]) for k in ks]
        out[label] = {"head": _summary_ms(head), "body": _summary_ms(body)}
    out["worst"] = _slowest_in_time(keys, lambda k: path_raw[k] - direct_raw[k], path_timing, path_seconds)
    # the same for the direct run's own slow moments (the instrument's): bursts in both at the
    # same seconds are the machine's, not the proxy's
    out["mirror_worst"] = _slowest_in_time(keys, lambda k: direct_raw[k] - path_raw[k], path_timing,
                                           direct_seconds)
    return out


def _slowest_in_time(keys: list[str], added, timing: dict[str, tuple[float, float]],
                     seconds: dict[int, dict] | None = None) -> dict:
    """The slowest 1% of ``keys`` by ``added(key)``: in how many seconds of the schedule they
    were sent, the most in one, and the five busiest seconds ([second, count]). With
    ``seconds`` (second -> figures): ``machine``, each figure's mean over the seconds the
    slowest were sent in (weighted by how many) beside its mean over every second, and the
    busiest seconds' own rows: a stall of the machine's shows as a figure far above its mean."""
    ranked = sorted(keys, key=added, reverse=True)
    worst = ranked[:max(1, len(ranked) // 100)] if ranked else []
    per_second: dict[int, int] = {}
    for k in worst:
        sec = int(timing[k][0])
        per_second[sec] = per_second.get(sec, 0) + 1
    busiest = sorted(per_second.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    out = {"n": len(worst), "seconds": len(per_second),
           "most_in_one_second": max(per_second.values(), default=0),
           "added_ms_min": round(added(worst[-1]), 3) if worst else 0.0,
           "busiest_seconds": [[sec, n] for sec, n in busiest]}
    if seconds:
        out["machine"] = _beside_the_machine(per_second, seconds, [sec for sec, _ in busiest])
    return out


def _beside_the_machine(per_second: dict[int, int], seconds: dict[int, dict], busiest: list[int]) -> dict:
    """{figure: [mean where the slowest were sent, weighted by their count; mean of all
    seconds]} and the busiest seconds' rows."""
    figures = sorted({f for row in seconds.values() for f in row if f != "sec"})
    means = {}
    for f in figures:
        every = [row[f] for row in seconds.values() if f in row]
        hit = [(row[f], per_second[sec]) for sec, row in seconds.items() if sec in per_second and f in row]
        if every and hit:
            means[f] = [round(sum(v * n for v, n in hit) / sum(n for _, n in hit), 2),
                        round(sum(every) / len(every), 2)]
    return {"mean_where_slowest_vs_all": means,
            "busiest": [seconds[sec] for sec in busiest if sec in seconds]}


def net_of_load_side(raw: dict[str, dict[str, float]],
                     late: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each request's latency less the load side's own delay in it: how long the
    answer's (and, where the simulator recorded it, the request's) bytes sat in a
    load-side socket before the load side read them (sim/stamps.py). Through a proxy
    that is two wake-ups of the load core's processes which the direct path, whose
    shard answers itself, does not have; a measured delay can only understate the
    wait, so the net figure does not flatter a path."""
    out: dict[str, dict[str, float]] = {}
    for cmd, a in raw.items():
        d = late.get(cmd, {})
        out[cmd] = {k: v - d.get(k, 0.0) for k, v in a.items()}
    return out


def added_latency(path_raw: dict[str, dict[str, float]], direct_raw: dict[str, dict[str, float]],
                  pool_min: int = POOL_MIN) -> dict:
    """``{"commands": {cmd: stats}, "classes": {class: stats}, "pooled": [cmds]}``,
    stats of the paired differences (n, p50, p99, p999, max and their mirrors, ms)."""
    diffs = paired_differences(path_raw, direct_raw)
    classes = judged_classes(diffs, pool_min)
    return {"commands": {c: _summary_ms(d) for c, d in sorted(diffs.items())},
            "classes": {c: _summary_ms(d) for c, d in classes.items()},
            "pooled": sorted(c for c in diffs if c not in classes and diffs[c])}
