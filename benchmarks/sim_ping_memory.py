"""Memory per parked Ping in the mailbox simulator (the sizing benchmark's load side).

Starts `seg-fast sim` as a child process, parks N Pings on N connections from
N different users/devices (each a mailbox, a device record and a sleeping
connection task), and reads the child's resident memory before and after:

    python benchmarks/sim_ping_memory.py [--pings 10000] [--warm 1000] [--reactor]

``--reactor`` serves the simulator as the sizing shards do (`seg-fast sim --reactor`:
one epoll set for all connections, a parked Ping is its connection marked parked,
no task); it writes sim_ping_memory_reactor.json.

Prints KiB per parked Ping and how fast new mail releases them all; writes
benchmarks/results/sim_ping_memory.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from seg_fast.sim.tree import E, encode  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=30) as r:
        return json.load(r)


def ping_request(k: int, heartbeat: int) -> bytes:
    body = encode(E("Ping:Ping", E("Ping:HeartbeatInterval", heartbeat), E("Ping:Folders", E(
        "Ping:Folder", E("Ping:Id", "1"), E("Ping:Class", "Email")))))
    auth = base64.b64encode(f"u{k}:secret".encode()).decode()
    head = (f"POST /Microsoft-Server-ActiveSync?Cmd=Ping&User=u{k}&DeviceId=BENCH{k:06d}&DeviceType=Bench "
            f"HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\nMS-ASProtocolVersion: 14.1\r\n"
            f"Content-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def park(port: int, first: int, n: int, socks: list) -> None:
    for k in range(first, first + n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(ping_request(k, 3000))
        socks.append(s)


def wait_parked(port: int, n: int, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while stats(port)["parked"] < n:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {stats(port)['parked']} of {n} Pings parked")
        time.sleep(0.2)
    time.sleep(1.0)           # let the allocator settle
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pings", type=int, default=10000)
    ap.add_argument("--warm", type=int, default=1000)
    ap.add_argument("--reactor", action="store_true", help="seg-fast sim --reactor (the shards' server)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.pings + args.warm + 100 > hard:
        print(f"need {args.pings + args.warm} descriptors per side; the hard limit is {hard}", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--no-provisioning",
                              *(["--reactor"] if args.reactor else [])],
                             stdout=subprocess.PIPE, env=env, text=True)
    try:
        ready = json.loads(child.stdout.readline())
        port, pid = ready["sim_port"], ready["pid"]
        rss_start = rss_kib(pid)
        socks: list[socket.socket] = []
        park(port, 0, args.warm, socks)
        wait_parked(port, args.warm)
        rss_warm = rss_kib(pid)
        t0 = time.monotonic()
        park(port, args.warm, args.pings, socks)
        wait_parked(port, args.warm + args.pings)
        took = time.monotonic() - t0
        rss_full = rss_kib(pid)
        per = (rss_full - rss_warm) / args.pings
        result = {"server": "reactor" if args.reactor else "task per connection",
                  "pings": args.pings, "warm": args.warm, "rss_start_kib": rss_start,
                  "rss_warm_kib": rss_warm, "rss_full_kib": rss_full,
                  "kib_per_parked_ping": round(per, 2), "seconds_to_park": round(took, 2),
                  "stats": stats(port)}
        print(f"simulator RSS: start {rss_start} KiB, {args.warm} parked {rss_warm} KiB, "
              f"{args.warm + args.pings} parked {rss_full} KiB")
        print(f"memory per parked Ping (mailbox + device + connection{'' if args.reactor else ' + task'}): {per:.2f} KiB "
              f"({args.pings} Pings parked in {took:.1f} s)")
        # Release them all: new mail for every user, then every device reads its answer.
        t0 = time.monotonic()
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/sim/deliver?prefix=u&users={len(socks)}", method="POST"), timeout=300).read()
        released = 0
        for s in socks:
            s.settimeout(60)
            head = s.recv(4096)
            released += head.startswith(b"HTTP/1.1 200")
        took = time.monotonic() - t0
        result.update(released=released, seconds_to_release=round(took, 2))
        print(f"released {released} of {len(socks)} parked Pings with new mail in {took:.1f} s")
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / ("sim_ping_memory_reactor.json" if args.reactor else "sim_ping_memory.json")).write_text(
            json.dumps(result, indent=2))
        for s in socks:
            s.close()
    finally:
        child.terminate()
        child.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
