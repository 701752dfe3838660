"""Does the fleet's oracle thread hold up the shard's loop more than a process would?

    python benchmarks/oracle_convoy.py [--rounds 2] [--mib 10]

The shard checks a big answer (a sealed attachment: base64 decoded in slices, opened with
AES-GCM, SHA-256 compared; sim/checks.py, sim/oracle.py) in a thread of its own at a 1 ms
switch interval. Here a loop thread does 1-byte round trips over a socketpair (an echo
thread answers) on core 1 while that work runs beside it: first alone, then in a thread of
the same process, then in a forked process pinned to the same core. Round-trip percentiles
in ms per case; writes results/oracle_convoy.json.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from seg_fast.sim import checks

OUT = Path(__file__).resolve().parent / "results" / "oracle_convoy.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mib", type=int, default=10)
    ap.add_argument("--cpu", type=int, default=1)
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    data = os.urandom(args.mib << 20)
    key, nonce = AESGCM.generate_key(256), os.urandom(12)
    b64 = base64.encodebytes(AESGCM(key).encrypt(nonce, data, b""))
    want = hashlib.sha256(data).digest()

    def work() -> None:
        raw = checks.b64decode(b64)
        assert data[:4096] not in raw
        assert hashlib.sha256(AESGCM(key).decrypt(nonce, raw, b"")).digest() == want

    def round_trips(stop) -> list[float]:
        a, b = socket.socketpair()

        def echo() -> None:
            while d := b.recv(1):
                b.send(d)
        threading.Thread(target=echo, daemon=True).start()
        out = []
        while not stop():
            t = time.perf_counter()
            a.send(b"x")
            a.recv(1)
            out.append(time.perf_counter() - t)
        a.close()
        return out

    def summary(xs: list[float], busy: float) -> dict:
        xs = sorted(xs)
        at = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 3)   # noqa: E731
        return {"busy_ms": round(busy * 1e3, 1), "round_trips": len(xs), "p50": at(0.5), "p99": at(0.99),
                "p999": at(0.999), "max": round(xs[-1] * 1e3, 3)}

    sys.setswitchinterval(checks.SWITCH_S)
    rounds = []
    for _ in range(args.rounds):
        r = {}
        t0 = time.perf_counter()
        r["alone"] = summary(round_trips(lambda: time.perf_counter() - t0 > 0.3), 0.0)
        done = threading.Event()
        t0 = time.perf_counter()
        th = threading.Thread(target=lambda: (work(), done.set()))
        th.start()
        r["thread"] = summary(round_trips(done.is_set), time.perf_counter() - t0)
        th.join()
        t0 = time.perf_counter()
        p = mp.get_context("fork").Process(target=work)
        p.start()
        r["process"] = summary(round_trips(lambda: not p.is_alive()), time.perf_counter() - t0)
        p.join()
        for case, v in r.items():
            print(f"{case:8s} " + "  ".join(f"{k} {v[k]}" for k in v), flush=True)
        rounds.append(r)
    OUT.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                               "argv": sys.argv[1:], "mib": args.mib, "unit": "ms",
                               "switch_interval_s": checks.SWITCH_S, "rounds": rounds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
