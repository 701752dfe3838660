"""What the per-transaction statistics (and the Dx check) cost a worker.

    python benchmarks/stats_bench.py [--number 200000] [--repeat 5]

Measured on one core, side by side with what every transaction already pays at
the same place (the transaction log's JSON encoding into its buffer):
  - stats.tx: Stats.tx(record, t0), the one call per transaction (dict increments,
    one histogram bucket);
  - with Dx on for another device and user: the same call when the transaction is not targeted;
  - txlog encode: TransactionLog.write of the same record (buffer only, no I/O);
  - snapshot: building the once-a-second snapshot (not per request).
Prints the figures (nothing is asserted) and writes benchmarks/results/stats_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from seg_fast.observe import Transaction, TransactionLog  # noqa: E402
from seg_fast.stats import Stats  # noqa: E402

COMMANDS = ["Sync", "Ping", "FolderSync", "ItemOperations", "SendMail", "Provision", "GetItemEstimate"]


def records(n: int = 64) -> list[Transaction]:
    out = []
    for i in range(n):
        cmd = COMMANDS[i % len(COMMANDS)]
        out.append(Transaction(ts=time.time(), method="POST", command=cmd, user=f"user{i}", device_id=f"DEV{i}",
                               device_type="iPhone", client_ip="10.0.0.1", status=200 if i % 9 else 503,
                               bytes_in=300 + i, bytes_out=5000 + i, upstream_ms=3.2, total_ms=4.1,
                               decision="allowed.managed" if i % 5 else "blocked.compromised",
                               upstream="127.0.0.1:8080", error="" if i % 9 else "mail server down"))
    return out


def per_call_us(fn, recs, number: int, repeat: int) -> float:
    n = len(recs)
    state = {"i": 0}

    def one():
        i = state["i"]
        fn(recs[i])
        state["i"] = (i + 1) % n

    best = min(timeit.repeat(one, number=number, repeat=repeat))
    return best / number * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    recs = records()
    stats = Stats()
    t0 = time.perf_counter()
    loop_cost = per_call_us(lambda r: None, recs, args.number, args.repeat)
    cases = {"stats.tx (no Dx target)": per_call_us(lambda r: stats.tx(r, t0), recs, args.number, args.repeat)}
    # Dx on for another device and another user: every transaction here is looked up and missed.
    from seg_fast import dx
    d = Path(tempfile.mkdtemp())
    dx.start(d, "device", "SOMEONE-ELSE", 60)
    dx.start(d, "user", "someone-else", 60)
    targeted = Stats()
    targeted.dx.directory = d
    targeted.dx.refresh()
    assert targeted.dx.active
    cases["stats.tx (Dx on, miss)"] = per_call_us(lambda r: targeted.tx(r, t0), recs, args.number, args.repeat)
    with tempfile.TemporaryDirectory() as d:
        log = TransactionLog(os.path.join(d, "tx.jsonl"))
        cases["txlog encode"] = per_call_us(log.write, recs, args.number, args.repeat)
        log.close()
    snap_s = min(timeit.repeat(lambda: stats.snapshot(), number=200, repeat=3)) / 200
    result = {"python": platform.python_version(), "number": args.number, "repeat": args.repeat,
              "loop_overhead_us": round(loop_cost, 4),
              "per_transaction_us": {k: round(v - loop_cost, 4) for k, v in cases.items()},
              "snapshot_once_a_second_us": round(snap_s * 1e6, 2)}
    print(f"python {result['python']}, best of {args.repeat} x {args.number} calls (harness overhead "
          f"{loop_cost:.3f} us subtracted)")
    for k, v in result["per_transaction_us"].items():
        print(f"  {k:26s} {v:8.3f} us per transaction")
    print(f"  {'snapshot':26s} {result['snapshot_once_a_second_us']:8.2f} us once a second")
    out = ROOT / "benchmarks" / "results" / "stats_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
