"""The load side's loop in the hold window: its schedule lag and the steps that held it.

A sizing run's fleet shards record their slow loop steps (``sim/steps.py``: steps and
batches over 10 ms of wall or thread CPU, named, with the full collections per phase) in
their result JSON; ``--keep`` keeps those files. This runs the same sizing command on a
base tree and this one, alternated (an A/B on one machine state), keeps each run's shard
files and summary, and reports per run: the fleet's schedule lag in the hold window
(max and p99 over the shards), the slow steps of the hold (how many over 10 ms of CPU,
the longest by wall and by CPU, what they were), full collections in the hold, the
shards' run-queue wait and the load side's CPU per device-hour.

    python benchmarks/load_side_steps.py --base /tmp/base-tree --rounds 2
    # summarise runs made already (each DIR: the kept shard files and the sizing JSON)
    python benchmarks/load_side_steps.py --from base=DIR1 this=DIR2 ...

Writes results/load_side_steps.json under ``--key`` (the date by default).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_fetch_tail import alternated, write_keyed  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "benchmarks" / "results" / "load_side_steps.json"
SIZING = ["--devices", "15000", "--ramp", "300", "--settle", "30", "--hold", "120", "--drain", "30",
          "--paths", "gateway", "--repeat", "1", "--seed", "3", "--nice", "-5"]
OVER_CPU_MS = 10.0


def _commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--short", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out + ("+changes" if dirty else "")


def summary(run_dir: Path) -> dict:
    """One run's figures from its kept shard files (*-shard*.json) and its sizing JSON."""
    shards = [json.loads(p.read_text()) for p in sorted(run_dir.glob("*-shard*.json"))]
    raw = next(iter(sorted(run_dir.rglob("*.raw.json"))), None)
    out: dict = {"shards": len(shards)}
    if raw is not None:
        point = json.loads(raw.read_text())["points"][0]
        run = point["runs"][0]["paths"]
        path = next(iter(run))
        load = run[path]["load"]
        out.update({
            "path": path,
            "fleet_lag_max_ms": round(1000 * load["lag_max"], 1),
            "fleet_lag_p99_ms": round(1000 * load["lag_p99"], 1),
            "load_cpu_share": load["cpu_share"], "load_core_busy": load["core_busy"],
            "load_runqueue_wait": load["runqueue_wait"],
            "load_cpu_s_per_device_hour": point["verdict"]["metrics"]["load"][path]["cpu_s_per_device_hour"],
            "gateway_cpu_s_per_device_hour": point["verdict"]["metrics"]["gateway"]["cpu_s_per_device_hour"],
            "gateway_loop_lag_max_ms": point["verdict"]["metrics"]["gateway"]["loop_lag_max_ms"],
            "caveats": point["verdict"]["caveats"],
        })
    held = []
    full_gc = [0, 0.0]
    for r in shards:
        ss = r.get("slow_steps") or {}
        held += [dict(x, shard=r["shard"]) for x in ss.get("records", {}).get("hold", [])]
        n, ms = (ss.get("full_gc") or {}).get("hold", [0, 0.0])
        full_gc = [full_gc[0] + n, max(full_gc[1], ms)]
    steps = [x for x in held if x["kind"] == "step"]
    longest = sorted(steps, key=lambda x: -x["wall_ms"])[:5]
    dearest = sorted(steps, key=lambda x: -x["cpu_ms"])[:5]
    out.update({
        "per_shard_lag_max_ms": [round(1000 * r["lag_max"], 1) for r in shards],
        "shard_cpu_s": [round(r["cpu_s"], 1) for r in shards],
        "shard_maxrss_mib": [round(r["maxrss_kib"] / 1024) for r in shards],
        "frozen_at": [r.get("frozen_at") for r in shards],
        "hold_steps_over_10ms_wall": len(steps),
        "hold_steps_over_10ms_cpu": sum(x["cpu_ms"] > OVER_CPU_MS for x in steps),
        "hold_step_cpu_ms_max": max((x["cpu_ms"] for x in steps), default=0.0),
        "hold_step_wall_ms_max": max((x["wall_ms"] for x in steps), default=0.0),
        "hold_step_gc_ms_max": max((x["gc_ms"] or 0.0 for x in steps), default=0.0),
        "hold_full_gc": full_gc if any(
            "full_gc" in (r.get("slow_steps") or {}) for r in shards) else None,
        "hold_longest_steps": longest,
        "hold_dearest_steps": dearest,
    })
    return out


def one_run(tree: Path, store: Path) -> dict:
    """The sizing command in ``tree`` (its own sources), kept; its files copied to ``store``."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    t0 = time.strftime("%H:%M:%S", time.gmtime())
    # Since 2026-12-02 the shards time their steps only when asked (a tree before asks nothing).
    steps = ["--load-steps"] if "--load-steps" in (tree / "src/seg_fast/sim/sizing.py").read_text() else []
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "sizing.py"), *SIZING, *steps, "--keep",
                           "--out", str(store)], cwd=tree, env=env, capture_output=True, text=True)
    kept = re.search(r"kept (/\S+)", proc.stdout + proc.stderr)
    if kept:
        for f in Path(kept.group(1)).glob("*-shard*.json"):
            shutil.copy(f, store)
        shutil.rmtree(kept.group(1), ignore_errors=True)
    return {"commit": _commit(tree), "utc": f"{t0}-{time.strftime('%H:%M:%S', time.gmtime())}",
            **summary(store)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="the base tree (built: setup.py build_ext --inplace)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--from", dest="dirs", nargs="*", default=[],
                    help="NAME=DIR: summarise runs made already, in this order")
    ap.add_argument("--key", default=time.strftime("%Y-%m-%d", time.gmtime()))
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    if a.dirs:
        runs: dict[str, list] = {}
        for item in a.dirs:
            name, _, d = item.partition("=")
            runs.setdefault(name, []).append(summary(Path(d)))
            print(name, json.dumps(runs[name][-1]), flush=True)
    else:
        work = Path(os.environ.get("TMPDIR", "/tmp")) / f"load-side-steps-{os.getpid()}"
        counter = iter(range(10 ** 6))

        def one(tree: Path) -> dict:
            store = work / f"run{next(counter)}"
            store.mkdir(parents=True)
            return one_run(tree, store)
        runs = alternated(a.base, a.rounds, one)
    out = {"command": "python benchmarks/sizing.py " + " ".join(SIZING) + " --load-steps --keep", "note": a.note,
           "runs": runs}
    for name, rs in runs.items():
        for k in ("fleet_lag_max_ms", "hold_step_cpu_ms_max", "load_cpu_s_per_device_hour"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                out.setdefault("medians", {}).setdefault(name, {})[k] = round(statistics.median(vals), 4)
    print(json.dumps(out.get("medians"), indent=1))
    write_keyed(RESULTS, a.key, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
