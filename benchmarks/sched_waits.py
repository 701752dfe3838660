"""Who ran on the gateway's core while its workers waited for it: `perf sched` read back.

Record during a sizing run's hold (as root; the workers' pids from `pgrep -f "seg_fast serve"`
or the run's work directory), then read the record with this:

    perf sched record -a -o sched.data -- sleep 20
    perf sched timehist -i sched.data > timehist.txt
    python benchmarks/sched_waits.py timehist.txt --pids 23378-23384 --cpu 0 [--over 20] [--out F]

For each wake-up of a worker that waited longer than ``--over`` ms for the core (timehist's
"sch delay"), the time the core spent meanwhile is split by who ran it (other workers, kernel
threads such as ksoftirqd, idle); with each task's CPU share, its longest uninterrupted runs and
its wake-up delays (p99, max). Prints a summary and writes it as JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
import re

ROW = re.compile(r"\s*([\d.]+)\s+\[(\d+)\]\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def read(path: str) -> list[tuple[float, int, str, float, float]]:
    """(switched out at s, cpu, task, sch delay ms, run ms) per timehist row."""
    rows = []
    with open(path) as fh:
        for line in fh:
            m = ROW.match(line)
            if m:
                t, cpu, task, _wait, sch, run = m.groups()
                rows.append((float(t), int(cpu), task, float(sch), float(run)))
    return rows


def pid_range(text: str) -> set[int]:
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def summarise(rows, pids: set[int], cpu: int, over_ms: float) -> dict:
    def pid_of(task: str) -> int | None:
        m = re.search(r"\[(\d+)(?:/(\d+))?\]$", task)
        return None if m is None else int(m.group(2) or m.group(1))

    workers = {task for _, _, task, _, _ in rows if pid_of(task) in pids and "/" not in task}
    span = rows[-1][0] - rows[0][0]
    on_cpu = [r for r in rows if r[1] == cpu]
    waits = [r for r in rows if r[2] in workers and r[3] > over_ms]
    during: collections.Counter = collections.Counter()
    for t, _, _, sch, run in waits:
        start, end = t - (run + sch) / 1e3, t - run / 1e3
        for t2, _, task, _, run2 in on_cpu:
            overlap = min(t2, end) - max(t2 - run2 / 1e3, start)
            if overlap > 0:
                during["idle" if task == "<idle>" else "gateway workers" if task in workers
                       else re.sub(r"\[.*", "", task)] += overlap
    total = sum(during.values()) or 1.0
    by_task = collections.defaultdict(list)
    for r in rows:
        by_task[r[2]].append(r)
    per_task = {}
    for task in sorted({r[2] for r in on_cpu}):
        mine = by_task[task]
        runs = sorted(r[4] for r in mine)
        delays = sorted(r[3] for r in mine)
        per_task[task] = {"cpu_share": round(sum(runs) / 1e3 / span, 4), "switches": len(mine),
                          "longest_runs_ms": runs[-3:][::-1],
                          "delay_p99_ms": delays[int(len(delays) * 0.99)], "delay_max_ms": delays[-1]}
    top = dict(sorted(per_task.items(), key=lambda kv: -kv[1]["cpu_share"])[:16])
    return {"span_s": round(span, 2), "cpu": cpu, "workers": sorted(workers),
            "wakeups": sum(1 for r in rows if r[2] in workers), "waits_over_ms": over_ms,
            "waits": len(waits), "longest_wait_ms": max((r[3] for r in waits), default=0.0),
            "core_during_waits": {k: round(v / total, 3) for k, v in during.most_common()},
            "tasks": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("timehist")
    ap.add_argument("--pids", required=True, help="the gateway workers' pids: 100-106,110")
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--over", type=float, default=20.0, help="ms a wake-up waited to count")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    out = summarise(read(a.timehist), pid_range(a.pids), a.cpu, a.over)
    print(f"{out['waits']} of {out['wakeups']} worker wake-ups waited > {a.over:g} ms for core {a.cpu} "
          f"(longest {out['longest_wait_ms']:.1f} ms) in {out['span_s']} s; the core meanwhile ran:")
    for who, share in out["core_during_waits"].items():
        print(f"  {who:24} {share * 100:5.1f}%")
    for task, v in out["tasks"].items():
        print(f"  {task:32} cpu {v['cpu_share'] * 100:5.1f}%  longest runs {v['longest_runs_ms']} ms  "
              f"delay p99 {v['delay_p99_ms']:.2f} max {v['delay_max_ms']:.2f} ms")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
