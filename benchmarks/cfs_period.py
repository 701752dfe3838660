"""What the CFS period of the sizing run's cgroup limit charges to the process it holds.

    python benchmarks/cfs_period.py [--fraction 0.25] [--periods 100,20,10,5] [--seconds 15]
        [--rounds 3] [--use 0.6] [--json PATH]     (results/cfs_period.json, keyed by fraction and use)

A server (pinned to core 0, as the gateway is) answers requests over a socket pair, each
after spinning for its CPU cost (99% 300 us, 1% 10 ms: the gateway's small requests and a
large answer); a client on core 1 sends them open-loop at Poisson times, ``--use`` of the
allowance on average. The server runs held to ``--fraction`` of a core by seg_fast.sim.cgroup
with each period in turn, unlimited ("none"), and unlimited with 1/fraction times the
requests ("whole core": what a point at the fraction stands for, the reference a period
should come close to), alternated round by round. Per
configuration: the wait each request saw (reply time - send time - its own CPU cost),
p50/p99/p99.9/max over every request of its rounds (and of the small ones alone), medians of the rounds' p99.9, and the
group's throttled periods. Claims nothing about devices: it isolates the limit's latency.

``--sizing-devices N`` does the same with the gateway itself: per round one direct run
of the sizing fleet (N devices, time compressed 10x), then the gateway held to
``--fraction`` with each period in turn; the paired added latency (gateway minus direct,
the same requests) pooled over every command but Ping, and the gateway's CPU and
throttling. A development run: it compares periods, it claims nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from big_fetch_tail import write_keyed  # noqa: E402  (benchmarks/: the keyed JSON write)
from seg_fast.sim.cgroup import CpuLimit

SMALL_US, BIG_US, BIG_SHARE = 300, 10_000, 0.01
MSG = struct.Struct("<II")          # sequence number, CPU cost in us

SERVER = r'''
import socket, struct, sys, time
MSG = struct.Struct("<II")
s = socket.socket(fileno=int(sys.argv[1]))
buf = b""
while True:
    data = s.recv(65536)
    if not data:
        break
    buf += data
    while len(buf) >= MSG.size:
        seq, cost = MSG.unpack_from(buf)
        buf = buf[MSG.size:]
        end = time.thread_time() + cost / 1e6
        while time.thread_time() < end:
            pass
        s.sendall(MSG.pack(seq, cost))
'''


def one(period_ms: float | None, fraction: float, seconds: float, use: float, seed: int,
        whole: bool = False) -> dict:
    """One configuration for ``seconds``: the waits in ms and the group's throttling.
    ``whole``: no limit and 1/fraction times the requests, what the limited run stands for."""
    mean_us = (1 - BIG_SHARE) * SMALL_US + BIG_SHARE * BIG_US
    rate = use * (1.0 if whole else fraction) / (mean_us / 1e6)      # requests per second
    rng = random.Random(seed)
    mine, theirs = socket.socketpair()
    limit = CpuLimit(fraction, period_us=round(period_ms * 1000)).__enter__() if period_ms else None
    cmd = (limit.prefix() if limit else []) + ["nice", "-n", "-5", "taskset", "-c", "0",
                                               sys.executable, "-c", SERVER, str(theirs.fileno())]
    proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
    theirs.close()
    sent: dict[int, tuple[float, int]] = {}
    waits: list[tuple[float, int]] = []            # (ms waited, CPU cost in us)

    def receive() -> None:
        buf = b""
        while True:
            data = mine.recv(65536)
            if not data:
                return
            now = time.perf_counter()
            buf += data
            while len(buf) >= MSG.size:
                seq, cost = MSG.unpack_from(buf)
                buf = buf[MSG.size:]
                t, _ = sent.pop(seq)
                waits.append(((now - t) * 1000 - cost / 1000, cost))

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    try:
        time.sleep(0.5)                                  # the server is up and in its group
        t = start = time.perf_counter()
        seq = 0
        while t - start < seconds:
            t += rng.expovariate(rate)
            delay = t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            cost = BIG_US if rng.random() < BIG_SHARE else SMALL_US
            sent[seq] = (time.perf_counter(), cost)
            mine.sendall(MSG.pack(seq, cost))
            seq += 1
        deadline = time.monotonic() + 30
        while sent and time.monotonic() < deadline:      # the last answers come in
            time.sleep(0.01)
        mine.shutdown(socket.SHUT_WR)
        proc.wait(timeout=30)
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mine.close()
        info = limit.throttling() if limit else None
        if limit:
            limit.remove()
    return {"waits_ms": waits, "lost": len(sent), "cgroup": info}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3) if s else float("nan")


def figures(ms: list[float]) -> dict:
    return {"n": len(ms), "p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "p999": pct(ms, 0.999),
            "max": round(max(ms), 3) if ms else None}


def sizing_ab(devices: int, fraction: float, periods: list[float], rounds: int) -> dict:
    """Paired added latency through the gateway held to ``fraction`` with each period,
    against one direct run per round (seg_fast.sim.sizing's run_path, time compressed)."""
    import tempfile

    import msgspec
    import trio

    from seg_fast.sim import sizing
    from seg_fast.sim.latency import paired_differences

    base = sizing.Options(devices=devices, paths=["direct", "gateway"], rate_scale=10.0, ramp=20.0, settle=5.0,
                          hold=40.0, drain=10.0, seed=3, nice=-5, repeat=1, load_cpu=1, gateway_cpu=0)
    runs: dict[str, list[dict]] = {f"{p:g} ms": [] for p in periods}
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="seg-cfs-period-") as wd:
            direct = trio.run(sizing.run_path, "direct", base, Path(wd), lambda _m: None)
            for p in periods:
                o = msgspec.structs.replace(base, cgroup_fraction=fraction, cgroup_period_us=round(p * 1000))
                gw = trio.run(sizing.run_path, "gateway", o, Path(wd), lambda _m: None)
                diffs = [d for v in paired_differences(gw["latency_raw"], direct["latency_raw"]).values() for d in v]
                row = {**figures(diffs), "failures": sum(gw["failures"].values()),
                       "gateway_cpu_share_of_allowance": round(gw["server"]["cpu_share"] / fraction, 3),
                       "cgroup": gw["server"]["cgroup"],
                       "loop_lag_max_ms_window": (gw["server"]["loop_lag"] or {}).get("max_ms_window")}
                runs[f"{p:g} ms"].append(row)
                print(f"round {r + 1} {p:g} ms", json.dumps(row), flush=True)
    return {"devices": devices, "rate_scale": 10.0, "fraction": fraction,
            "configs": {name: {"median_of_rounds": {q: statistics.median(x[q] for x in rows)
                                                    for q in ("p99", "p999", "max")}, "runs": rows}
                        for name, rows in runs.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--periods", default="100,20,10,5", help="ms, each run beside 'none' (no limit)")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--use", type=float, default=0.6, help="mean CPU as a share of the allowance")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "cfs_period.json")
    ap.add_argument("--sizing-devices", type=int, default=0,
                    help="the gateway under the sizing fleet (time compressed) instead of the spinning server")
    a = ap.parse_args(argv)
    command = "python benchmarks/cfs_period.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.sizing_devices:
        out = sizing_ab(a.sizing_devices, a.fraction, [float(p) for p in a.periods.split(",")], a.rounds)
        for name, c in out["configs"].items():
            print(f"{name:>7}: medians of rounds {c['median_of_rounds']}")
        write_keyed(a.json, f"sizing_fraction_{a.fraction:g}_devices_{a.sizing_devices}", out | {
            "command": command, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit()})
        print(f"wrote {a.json}")
        return 0
    os.sched_setaffinity(0, {1})                         # the client on the load core
    # (name, period ms or None, whole core): the same requests unlimited; the requests
    # 1/fraction times over on a whole core (what a point at the fraction stands for);
    # then the fraction with each period
    configs = [("none", None, False), ("whole core", None, True)] + [
        (f"{float(p):g} ms", float(p), False) for p in a.periods.split(",")]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for r in range(a.rounds):
        for name, p, whole in configs:
            res = one(p, a.fraction, a.seconds, a.use, seed=r, whole=whole)
            row = {"lost": res["lost"], **figures([ms for ms, _ in res["waits_ms"]]),
                   "small": figures([ms for ms, c in res["waits_ms"] if c == SMALL_US]),
                   "cgroup": res["cgroup"], "waits_ms": res["waits_ms"]}
            runs[name].append(row)
            print(name, json.dumps({k: v for k, v in row.items() if k != "waits_ms"}), flush=True)
    out = {"command": command, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(),
           "fraction": a.fraction, "use_of_allowance": a.use, "seconds": a.seconds,
           "work_us": {"small": SMALL_US, "big": BIG_US, "big_share": BIG_SHARE}, "configs": {}}
    for name, rows in runs.items():
        pooled = [w for r in rows for w in r["waits_ms"]]
        out["configs"][name] = {
            "pooled": figures([ms for ms, _ in pooled]),
            # the small requests alone: what a Sync waits while the limit holds the process
            "pooled_small": figures([ms for ms, c in pooled if c == SMALL_US]),
            "median_of_rounds": {q: statistics.median(r[q] for r in rows) for q in ("p99", "p999", "max")},
            "runs": [{k: v for k, v in r.items() if k != "waits_ms"} for r in rows]}
        c = out["configs"][name]
        print(f"{name:>7}: pooled {c['pooled']}  small {c['pooled_small']}  medians {c['median_of_rounds']}")
    write_keyed(a.json, f"fraction_{a.fraction:g}_use_{a.use:g}", out)
    print(f"wrote {a.json}")
    return 0


def commit() -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()



if __name__ == "__main__":
    sys.exit(main())
