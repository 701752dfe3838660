"""The console's list view with 100,000 devices: SQLite and a real Redis.

    python benchmarks/console_bench.py [--devices 100000] [--repeat 3]
    python benchmarks/console_bench.py --history-only

The dashboard's history (admin/series.py) is measured too, at its bounds: 8 workers with
100 commands x 5 answer statuses and 30 decision reasons each, 288 full buckets; the
cost of one sample, of the 24-hour view, and of saving and loading the file (written to
benchmarks/results/console_history_bench.json; --history-only measures that alone).

Loads N device sightings (and N/2 MDM records) into each store, then times what the
control process does: reading every sighting from the store and building the
column index (at most every 5 s, or after an action), and the list view's queries
over the index (first page, filters, free-text search, sorts, the dashboard's
aggregates). Redis is Debian's redis-server on a free loopback port (as the tests
start it). Prints the figures and writes benchmarks/results/console_bench.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))          # redis_server: how the tests start a real Redis

from seg_fast.admin.console import DeviceIndex  # noqa: E402
from seg_fast.policy.model import DeviceRecord, DeviceSighting, device_key  # noqa: E402
from seg_fast.policy.store import RedisStore, SqliteStore  # noqa: E402

NOW = time.time()
QUERIES = {
    "first page (last seen)": {"limit": "50"},
    "status=blocked": {"status": "blocked", "limit": "50"},
    "violation, unmanaged": {"violation": "true", "managed": "false", "limit": "50"},
    "search q=user4242": {"q": "user4242", "limit": "50"},
    "platform + seen 24h": {"platform": "android", "seen_within_days": "1", "limit": "50"},
    "sort by user, page 100": {"sort": "user", "offset": "5000", "limit": "50"},
    "not seen 30 days": {"not_seen_days": "30", "managed": "false", "limit": "50"},
}


def fleet(n: int, seed: int = 7):
    rnd = random.Random(seed)
    sightings, records = [], []
    for i in range(n):
        blocked = rnd.random() < 0.2
        sightings.append(DeviceSighting(
            device_id=f"DEV{i:07d}", user=f"user{i % 50000}@corp.example", device_type=rnd.choice(["iPhone", "Android", "iPad"]),
            mail_client=rnd.choice(["Apple-iPhone15C2/2104.100", "Outlook-iOS/2.0", "Android-Mail/12"]),
            ip=f"10.{i % 250}.{i % 200}.1", node=f"gw{i % 3}/{1000 + i % 4}", first_seen=NOW - rnd.uniform(0, 400) * 86400,
            last_seen=NOW - rnd.uniform(0, 60) * 86400, last_command="Sync",
            status="blocked" if blocked else "allowed",
            reason="blocked.device_compromised" if blocked else "allowed.compliant", http_status=200))
        if i % 2 == 0:
            records.append(DeviceRecord(device_id=f"DEV{i:07d}", managed=True, compliant=not blocked,
                                        platform=rnd.choice(["Apple", "Android"]), model="m", os="17"))
    return sightings, records


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


async def measure(store, sightings, records, repeat: int) -> dict:
    await store.open()
    t0 = time.perf_counter()
    for i in range(0, len(sightings), 10000):
        await store.put_sightings(sightings[i:i + 10000])
    await store.put_devices(records)
    load_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    seen = await store.all_sightings()
    read_ms = (time.perf_counter() - t0) * 1000
    devices = {device_key(r.device_id): r for r in records}
    index = DeviceIndex()
    build_ms = timed(lambda: index.build(seen, devices), repeat)
    out = {"load_ms": round(load_ms, 1), "read_all_sightings_ms": round(read_ms, 1),
           "build_index_ms": round(build_ms, 1), "rows": len(index.rows), "queries_ms": {}}
    for name, params in QUERIES.items():
        total = index.query(params)["total"]
        out["queries_ms"][name] = {"ms": round(timed(lambda: index.query(params), repeat), 2), "matches": total}
    out["queries_ms"]["dashboard aggregates"] = {"ms": round(timed(index.aggregates, repeat), 2)}
    await store.aclose()
    return out


def history(repeat: int) -> dict:
    from seg_fast.admin.series import Series
    from seg_fast.stats import WorkerSnapshot
    step = 300.0
    t0 = 1_800_000_000.0

    def snaps(k: int):
        return [WorkerSnapshot(
            pid=1000 + w, ts=t0, started=1.0,
            requests={f"Cmd{c}": {st: k * (c + 1) for st in ("200", "401", "449", "500", "503")} for c in range(100)},
            decisions={f"blocked.reason{r}": k * r for r in range(30)},
            gateway_answers={"upstream_unavailable": k, "device_gone": k},
            attachments={"encrypt": k, "block": k, "allow": k}, links_rewritten=5 * k, parked_pings=1000 + k)
            for w in range(8)]
    devices = {"by_status": {"allowed": 80_000, "blocked": 20_000},
               "by_reason": {f"blocked.reason{r}": 600 + r for r in range(30)}}
    with tempfile.TemporaryDirectory() as d:
        s = Series(Path(d) / "series.json", step=step)
        for b in range(288):                 # a full day, one sample per bucket
            s.sample(snaps(b + 1), devices=devices, now=t0 + b * step)
        k = [300]

        def one():
            k[0] += 1
            s.sample(snaps(k[0]), devices=devices, now=t0 + 287 * step + 1)
        sample_ms = timed(one, repeat)
        view_ms = timed(lambda: s.view(now=t0 + 287 * step + 1), repeat)
        view_bytes = len(json.dumps(s.view(now=t0 + 287 * step + 1)))
        save_ms = timed(s.save, repeat)
        size = (Path(d) / "series.json").stat().st_size
        t = Series(Path(d) / "series.json", step=step)
        load_ms = timed(t.load, repeat)
    return {"workers": 8, "keys_per_bucket": sum(len(v) for v in s.buckets[max(s.buckets)].counters.values()),
            "buckets": len(s.buckets), "sample_ms": round(sample_ms, 2), "view_24h_ms": round(view_ms, 2),
            "view_24h_json_bytes": view_bytes, "save_ms": round(save_ms, 2), "file_bytes": size,
            "load_ms": round(load_ms, 2)}


def print_history(h: dict) -> None:
    print(f"history at its bounds ({h['workers']} workers, {h['keys_per_bucket']} keys a bucket, {h['buckets']} "
          f"buckets): sample {h['sample_ms']:.2f} ms, 24 h view {h['view_24h_ms']:.1f} ms "
          f"({h['view_24h_json_bytes']:,} bytes of JSON), save {h['save_ms']:.1f} ms ({h['file_bytes']:,} bytes), "
          f"load {h['load_ms']:.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--history-only", action="store_true", help="measure the dashboard's history alone")
    args = ap.parse_args()
    hist = history(args.repeat)
    print_history(hist)
    hist_out = ROOT / "benchmarks" / "results" / "console_history_bench.json"
    hist_out.write_text(json.dumps({"python": platform.python_version(), **hist}, indent=2) + "\n")
    print(f"wrote {hist_out.relative_to(ROOT)}")
    if args.history_only:
        return 0
    sightings, records = fleet(args.devices)
    result = {"python": platform.python_version(), "devices": args.devices, "mdm_records": len(records), "stores": {}}
    with tempfile.TemporaryDirectory() as d:
        result["stores"]["sqlite"] = trio.run(measure, SqliteStore(Path(d) / "p.db"), sightings, records, args.repeat)
        try:
            from redis_server import running_redis
            with running_redis(Path(d)) as url:
                result["stores"]["redis"] = trio.run(measure, RedisStore(url), sightings, records, args.repeat)
        except BaseException as exc:  # noqa: BLE001 - pytest.skip when redis-server is missing
            print(f"redis: not measured ({type(exc).__name__}: {exc})")
    for name, r in result["stores"].items():
        print(f"{name}: {r['rows']} rows; load {r['load_ms']:.0f} ms, read all sightings {r['read_all_sightings_ms']:.0f} ms, "
              f"build index {r['build_index_ms']:.0f} ms")
        for q, v in r["queries_ms"].items():
            print(f"  {q:28s} {v['ms']:8.2f} ms" + (f"  ({v['matches']} match)" if "matches" in v else ""))
    out = ROOT / "benchmarks" / "results" / "console_bench.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
