"""A sizing summary's runs as the markdown table benchmarks/README.md quotes.

    python benchmarks/sizing_table.py benchmarks/results/sizing-off-20261206-060918.json

One row per run of every point, in the order measured (a search's walk), then the runs a
partial summary's pending point has finished; the columns are the verdict's own figures,
so a table in the README can be checked against (and remade from) the committed JSON.

    python benchmarks/sizing_table.py --tails SUMMARY.json

The same runs, a column per command class: the paired added p99.9 beside its mirror (how
much slower the direct run was at that rank: the pairing's own noise), then both net of
the load side's read delays (the kernel's receive stamps). Issue 10's 20 ms bound is read
against these: a class whose mirror reaches the bound cannot show it met.
"""
from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from seg_fast.sim.sizing import SLO_ADDED_P99_MS, SLO_ADDED_P999_MS, host_ms

HEAD = ("| per core (driven), run | verdict | worst paired added p99 / p99.9, ms | "
        "gateway CPU of the core; CPU-s per device-hour | periods throttled over the gateway path | "
        "workers' loop lag max in the window, ms | PSS; KiB per device with kernel sockets | "
        "load side against the gateway | host: sim/speed's loop, ms | measured at |")


def worst(run: dict) -> str:
    """The class that decided the run: one over the bounds if any, else the highest p99.9."""
    classes = run.get("added_latency_ms", {}).get("gateway", {}).get("classes", {})
    if not classes:
        return "-"
    over = lambda c: classes[c]["p999"] > SLO_ADDED_P999_MS or classes[c]["p99"] > SLO_ADDED_P99_MS
    name = max(classes, key=lambda c: (over(c), classes[c]["p999"]))
    return f"{name} {classes[name]['p99']:.1f} / {classes[name]['p999']:.1f}"


def row(devices: int, held: float, run: dict, paths: dict, number: int, measured: dict | None,
        note: str = "") -> str:
    g = run.get("metrics", {}).get("gateway", {})
    share = g.get("cpu_share")
    cpu = "-" if share is None else f"{100 * share:.1f}%" + (
        f" ({100 * share / held:.1f}% of its {held:g})" if held != 1.0 else "")
    if g.get("cpu_s_per_device_hour") is not None:
        cpu += f"; {g['cpu_s_per_device_hour']:.4f}"
    cg = g.get("cgroup") or {}
    throttled = (f"{cg['nr_throttled']:,} of {cg['nr_periods']:,} ({cg['throttled_s']:.0f} s)"
                 if "nr_throttled" in cg else "-")
    lag = g.get("loop_lag_max_ms")
    pss = g.get("pss_mib")
    memory = "-" if pss is None else f"{pss:.0f} MiB; {g.get('pss_kib_per_device_with_kernel', 0):.1f}"
    load = run.get("metrics", {}).get("load_cpu_vs_gateway")
    at = (run.get("measured") or measured or {}).get("commit", "?")
    verdict = ("meets" if run.get("meets") else "misses") + note
    host = host_ms(paths.values())      # runs on different machines show here
    return (f"| {round(devices / held):,} ({devices:,}), run {number} | {verdict} | {worst(run)} | {cpu} "
            f"| {throttled} | {'-' if lag is None else f'{lag:.1f}'} | {memory} "
            f"| {'-' if load is None else f'{load:.3f}'} | {'-' if host is None else f'{host:.1f}'} | {at} |")


def runs_table(summary: dict) -> str:
    """The markdown table of every run ``summary`` (a sizing summary, whole or partial) holds."""
    rows = [HEAD, "|" + " --- |" * (HEAD.count("|") - 1)]
    for p in summary.get("points", []):
        v = p["verdict"]
        held = v.get("held_to_cores", 1.0)
        for r in v.get("each_run", []):
            rows.append(row(p["devices"], held, r, r.get("paths", {}), r["run"], p.get("measured")))
    pending = summary.get("pending")
    if pending:
        for i, r in enumerate(pending["runs"]):
            rows.append(row(pending["devices"], pending["held_to_cores"], r["verdict"], r.get("paths", {}), i + 1,
                            r["measured"], " (its point unfinished)"))
    return "\n".join(rows)


# the classes in the order the README's tables give them; others (none today) follow by name
CLASS_ORDER = ("Sync", "SendMail", "ItemOperations", "FolderSync", "GetItemEstimate", "Settings", "other")


def _tail(c: dict | None) -> str:
    if not c or c.get("p999") is None:
        return "-"
    mirror = c.get("mirror_p999")
    return f"{c['p999']:.1f} / {'-' if mirror is None else f'{mirror:.1f}'}"


def tails_table(summary: dict) -> str:
    """Per run of every point and per proxy path in it (the gateway, nginx when it ran), per
    class: paired added p99.9 / its mirror, ms, then the same net of the load side's read
    delays (in brackets; "-" where the run had none)."""
    rows = []
    for p in summary.get("points", []):
        held = p["verdict"].get("held_to_cores", 1.0)
        for r in p["verdict"].get("each_run", []):
            for path in ("gateway", "nginx"):
                added = r.get("added_latency_ms", {}).get(path)
                if added:
                    rows.append((f"{round(p['devices'] / held):,} ({p['devices']:,}), run {r['run']}, {path}", added))
    seen = {c for _, added in rows for c in added.get("classes", {})}
    names = [c for c in CLASS_ORDER if c in seen] + sorted(seen - set(CLASS_ORDER))
    lines = ["| per core (driven), run, path | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for label, added in rows:
        net = added.get("net_of_load_side", {}).get("classes", {})
        cells = [f"{_tail(added.get('classes', {}).get(c))} ({_tail(net.get(c))})" for c in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    tails = argv[:1] == ["--tails"]
    if tails:
        argv = argv[1:]
    if len(argv) != 1:
        print("usage: python benchmarks/sizing_table.py [--tails] SUMMARY.json", file=sys.stderr)
        return 2
    try:
        summary = msgspec.json.decode(Path(argv[0]).read_bytes())
        print(tails_table(summary) if tails else runs_table(summary))
    except (OSError, msgspec.DecodeError, KeyError, TypeError) as exc:
        print(f"sizing_table: {argv[0]}: not a sizing summary ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    return 0
