"""What pymalloc's arenas on huge pages (seg_fast._hugearena) save a wake-up that walks a big heap.

    python benchmarks/huge_arenas.py [--heap-mib 200] [--wakes 2000] [--touch 300] [--rounds 3]

A worker holding 8,000 devices has a heap of ~150-200 MiB, and each wake-up touches the state
of a few connections scattered over it, after the core's other workers have had the caches and
the TLB. Each variant runs in a child process pinned to CPU 0: it builds ``--heap-mib`` of
small objects (one dict and a few strings and lists per "connection", the shape a worker's
state has), then ``--wakes`` times sleeps 2 ms while a second process pinned to the same CPU
walks 64 MiB of its own (the other workers), and on waking reads and updates ``--touch``
connections picked at random. Its CPU for the walks alone (thread CPU clock around them) is
divided by the wake-ups:

- ``small``: pymalloc's arenas where it puts them (4 KiB pages).
- ``huge``: ``_hugearena.install()`` first, so the same objects sit on 2 MiB pages.

Variants alternate; medians of ``--rounds``. Writes results/huge_arenas.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("small", "huge")


def _thrash(stop_after: float) -> None:
    """The core's other workers: walk 64 MiB, again and again, on the same CPU."""
    os.sched_setaffinity(0, {0})
    buf = bytearray(64 << 20)
    end = time.monotonic() + stop_after
    while time.monotonic() < end:
        for i in range(0, len(buf), 4096):
            buf[i] = (buf[i] + 1) & 0xFF
        time.sleep(0.0005)


def _child(variant: str, heap_mib: int, wakes: int, touch: int, seed: int) -> dict:
    os.sched_setaffinity(0, {0})
    if variant == "huge":
        sys.path.insert(0, str(HERE.parent / "src"))
        from seg_fast import _hugearena

        assert _hugearena.install()
    rng = random.Random(seed)
    conns = []
    # ~1.6 KiB of small objects per connection, as a worker's per-device state in pymalloc
    for i in range(heap_mib * 1024 * 1024 // 1600):
        conns.append({"id": i, "user": f"user{i}@example.com", "device": f"dev{i:08x}", "state": [i, i + 1, None],
                      "headers": {"a": str(i), "b": str(i * 7)}, "bytes": 0, "last": 0.0})
        # allocations of other sizes in between, as other work interleaves with a device's
        if i % 3 == 0:
            conns[-1]["scratch"] = [str(i)] * (i % 17)
    # a new process, not a fork: after fork() the first write to each huge page would copy
    # it in 4 KiB pieces, and the heap would be on small pages again
    thrasher = subprocess.Popen([sys.executable, __file__, "--thrash"])
    try:
        spent = 0
        n = len(conns)
        for _ in range(wakes):
            time.sleep(0.002)
            t0 = time.thread_time_ns()
            for _ in range(touch):
                c = conns[rng.randrange(n)]
                c["bytes"] += len(c["user"]) + len(c["headers"]["a"])
                c["last"] = c["state"][0] * 0.5
            spent += time.thread_time_ns() - t0
    finally:
        thrasher.kill()
        thrasher.wait()
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    huge_kib = next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
    return {"us_per_wake": spent / wakes / 1000.0, "connections": n, "anon_huge_mib": huge_kib // 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heap-mib", type=int, default=200)
    ap.add_argument("--wakes", type=int, default=2000)
    ap.add_argument("--touch", type=int, default=300, help="connections read and updated per wake-up")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--thrash", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "huge_arenas.json"))
    a = ap.parse_args()
    if a.thrash:
        _thrash(3600)
        return 0
    if a.child:
        print(json.dumps(_child(a.child, a.heap_mib, a.wakes, a.touch, seed=7)))
        return 0
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    for _ in range(a.rounds):
        for v in VARIANTS:
            done = subprocess.run([sys.executable, __file__, "--child", v, "--heap-mib", str(a.heap_mib),
                                   "--wakes", str(a.wakes), "--touch", str(a.touch)],
                                  capture_output=True, text=True, check=True)
            runs[v].append(json.loads(done.stdout))
            print(v, runs[v][-1], flush=True)
    out = {"what": "CPU µs of a wake-up that reads and updates --touch random connections of a --heap-mib heap "
                   "while another process walks 64 MiB on the same CPU; medians",
           "thp": thp.read_text().strip() if thp.exists() else None,
           "options": {"heap_mib": a.heap_mib, "wakes": a.wakes, "touch": a.touch, "rounds": a.rounds},
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "us_per_wake_median": {v: round(statistics.median(r["us_per_wake"] for r in rs), 2) for v, rs in runs.items()},
           "runs": runs}
    m = out["us_per_wake_median"]
    out["huge_vs_small"] = round(m["huge"] / m["small"], 3)
    print(json.dumps({k: out[k] for k in ("us_per_wake_median", "huge_vs_small", "thp")}))
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
