"""What one wake-up of an idle event loop costs on this machine: a bare epoll loop beside trio's.

    python benchmarks/wake_cost.py [--wakes 1000] [--rounds 3]

At low load a gateway worker sleeps between events, and every event (a device's request, a
mail server's answer, a deadline) is a wake-up from idle: the kernel's (in a VM, the
hypervisor's) and the event loop's own pass. nginx pays the first part only. Each variant
runs in a child process pinned to CPU 0 and counts its own CPU (every thread's schedstat, ns)
over ``--wakes`` wake-ups, 10 ms apart:

- ``io_bare``: select.epoll on one end of a socketpair that a forked writer pokes; recv.
- ``io_trio``: the same wait through trio (trio.lowlevel.wait_readable), as a worker waits.
- ``timer_bare``: epoll.poll with a 10 ms timeout, nothing to read.
- ``timer_trio``: trio.sleep(0.01) (a cancel scope's deadline, as a worker's timers were).

Medians of ``--rounds`` rounds, variants alternating; writes results/wake_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tls_tickets_bench import threads_cpu_ns  # noqa: E402
VARIANTS = ("io_bare", "io_trio", "timer_bare", "timer_trio")
GAP = 0.01


def _cpu_ns() -> int:
    return threads_cpu_ns([os.getpid()])     # every thread's schedstat


def _child(variant: str, wakes: int) -> float:
    """CPU µs per wake-up of ``variant`` (runs in the pinned child)."""
    if variant.startswith("io"):
        a, b = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            a.close()
            time.sleep(0.2)
            for _ in range(wakes):
                time.sleep(GAP)
                b.send(b"x")
            os._exit(0)
        b.close()
        a.setblocking(False)
    if variant == "io_bare":
        ep = select.epoll()
        ep.register(a.fileno(), select.EPOLLIN)
        c0, n = _cpu_ns(), 0
        while n < wakes:
            ep.poll()
            n += len(a.recv(64))
        c1 = _cpu_ns()
    elif variant == "io_trio":
        import trio

        async def main():
            sock = trio.socket.from_stdlib_socket(a)
            c0, n = _cpu_ns(), 0
            while n < wakes:
                await trio.lowlevel.wait_readable(sock)
                n += len(a.recv(64))
            return c0, _cpu_ns()
        c0, c1 = trio.run(main)
    elif variant == "timer_bare":
        ep = select.epoll()
        c0 = _cpu_ns()
        for _ in range(wakes):
            ep.poll(GAP)
        c1 = _cpu_ns()
    else:
        import trio

        async def main():
            c0 = _cpu_ns()
            for _ in range(wakes):
                await trio.sleep(GAP)
            return c0, _cpu_ns()
        c0, c1 = trio.run(main)
    if variant.startswith("io"):
        os.waitpid(pid, 0)
    return (c1 - c0) / wakes / 1000.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wakes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "wake_cost.json"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.wakes)))
        return 0
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            out = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--child", v,
                                  "--wakes", str(args.wakes)], capture_output=True, text=True, check=True)
            runs[v].append(round(json.loads(out.stdout), 1))
            print(f"round {r + 1} {v}: {runs[v][-1]} µs CPU per wake-up", flush=True)
    med = {v: statistics.median(x) for v, x in runs.items()}
    summary = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average": os.getloadavg(),
               "wakes": args.wakes, "gap_s": GAP, "rounds": args.rounds,
               "us_per_wake_median": med, "runs": runs,
               "trio_over_bare_io_us": round(med["io_trio"] - med["io_bare"], 1),
               "trio_over_bare_timer_us": round(med["timer_trio"] - med["timer_bare"], 1)}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("us_per_wake_median", "trio_over_bare_io_us",
                                              "trio_over_bare_timer_us")}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
