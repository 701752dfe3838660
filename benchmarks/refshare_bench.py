"""What sharing a FileReference entry between a serve's workers costs (seg_fast/refshare.py).

    python benchmarks/refshare_bench.py [--entries 20000] [--rounds 5]

In one process, over a real SOCK_SEQPACKET socketpair, CPU time (process_time) per entry:

- ``publish``: the pipeline's call in the worker that learnt it (msgpack + one send), the
  reads that drain the socket included (the control process's side of the same socket);
- ``received``: a worker taking another's entry into its pipeline cache (decode + remember);
- ``remember_alone``: the pipeline's remember outside a serve (nothing published), for scale.

The control process's relay is one recv and a send per other worker. Medians over
``--rounds``; writes benchmarks/results/refshare.json.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

from seg_fast import refshare
from seg_fast.content import pipeline
from seg_fast.content.settings import ContentSettings
from seg_fast.proxy import channel

HERE = Path(__file__).resolve().parent


def round_once(n: int) -> dict:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    pipeline._runtime = pipeline._Runtime(ContentSettings())
    user = "kim.lee@example.com"
    channel._worker_sock = a
    t = time.process_time()
    for i in range(n):
        refshare.publish(refshare.NAME, (user, f"5%3a{i}%3a0"), f"Quarterly report {i}.pdf")
        if i % 64 == 63:
            while True:
                try:
                    b.recv(1024)
                except BlockingIOError:
                    break
    publish = (time.process_time() - t) / n * 1e6
    channel._worker_sock = None
    messages = [refshare.MAGIC + refshare._encode((refshare.NAME, user, f"6%3a{i}%3a0", f"Minutes {i}.pdf"))
                for i in range(n)]
    t = time.process_time()
    for m in messages:
        refshare.received(m)
    received = (time.process_time() - t) / n * 1e6
    t = time.process_time()
    for i in range(n):
        pipeline._runtime.remember(user, f"7%3a{i}%3a0", f"Notes {i}.pdf")
    alone = (time.process_time() - t) / n * 1e6
    a.close()
    b.close()
    return {"publish": publish, "received": received, "remember_alone": alone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "refshare.json"))
    args = ap.parse_args()
    rounds = [round_once(args.entries) for _ in range(args.rounds)]
    result = {"command": "python benchmarks/refshare_bench.py " + " ".join(sys.argv[1:]),
              "what": "CPU µs per FileReference entry (process_time), one process, a real socketpair",
              "entries_per_round": args.entries, "rounds": args.rounds,
              "us_per_entry_median": {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
