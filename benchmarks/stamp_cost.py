"""What the sizing run's per-request stamp read costs the load side (sim/stamps.py).

    python benchmarks/stamp_cost.py [--calls 200000] [--rounds 3]

The simulator and the fleet each call ``stamps.late`` once per request, before reading its
first bytes: a ``recvmsg(MSG_PEEK | MSG_TRUNC)`` on a socket holding an unread, stamped
segment. Timed here in this process's CPU time over ``--calls`` calls per round, beside a
plain ``recv_into`` of one byte with MSG_PEEK (the cheapest read of the same socket); prints
the medians in µs per call and writes results/stamp_cost.json.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

from seg_fast.sim import stamps


def _pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    stamps.enable(ls)
    client = socket.create_connection(ls.getsockname())
    server, _ = ls.accept()
    server.setblocking(False)
    client.sendall(b"x" * 300)
    while stamps.late(server) is None:     # arrived (loopback: at once)
        pass
    return ls, client, server


def _us_per_call(fn, calls: int) -> float:
    t = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    ls, client, server = _pair()
    one = bytearray(1)
    late = [_us_per_call(lambda: stamps.late(server), a.calls) for _ in range(a.rounds)]
    peek = [_us_per_call(lambda: server.recv_into(one, 1, socket.MSG_PEEK), a.calls) for _ in range(a.rounds)]
    for s in (client, server, ls):
        s.close()
    out = {"calls": a.calls, "rounds": a.rounds,
           "late_us_per_call": round(statistics.median(late), 3),
           "peek_one_byte_us_per_call": round(statistics.median(peek), 3),
           "per_request_us": round(2 * statistics.median(late), 3)}
    print(f"stamps.late: {out['late_us_per_call']} µs per call (a one-byte MSG_PEEK recv_into: "
          f"{out['peek_one_byte_us_per_call']} µs); two per request: {out['per_request_us']} µs")
    path = Path(__file__).parent / "results" / "stamp_cost.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
