"""Does holding a trio loop back before it sleeps batch enough events to pay? (It does not here.)

    python benchmarks/holdoff.py [--rates 300,1000] [--seconds 5] [--hold-ms 2] [--rounds 2]

At real rates a gateway worker sleeps between events and every event is a wake-up from
idle (a py-spy profile seemed to put a third of a worker's CPU in trio's ``epoll_wait``;
perf later found 3%: benchmarks/cpu_where.py). The idea tried here: when the loop has nothing to run, look once more
(``epoll_wait(0)``), then sleep ``--hold-ms`` before blocking, so that events arriving
meanwhile are taken in one pass. A child pinned to CPU 0 serves 50 socketpairs (a trio
task each: read 100 bytes, answer 100); a writer on CPU 1 pokes them at Poisson times at
each rate. Variants alternate; CPU per event is the child's rusage over the window.
Writes results/holdoff.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = 50


def child(mode: str, rate: float, seconds: float, hold: float) -> dict:
    import trio
    from trio._core._io_epoll import EpollIOManager

    class HoldOff(EpollIOManager):
        __slots__ = ()

        def get_events(self, timeout):
            if timeout > 0:
                events = self._epoll.poll(0, 1024)
                if events:
                    return events
                time.sleep(min(hold, timeout))
                events = self._epoll.poll(0, 1024)
                if events:
                    return events
                timeout = max(0.0, timeout - hold)
            return self._epoll.poll(timeout, 1024)

    pairs = [socket.socketpair() for _ in range(PAIRS)]
    pid = os.fork()
    if pid == 0:                      # the writer
        os.sched_setaffinity(0, {1})
        rng = random.Random(1)
        ends = [b for _, b in pairs]
        for s in ends:
            s.setblocking(False)      # the server stops answering when its window ends
        t = time.monotonic()
        end = t + seconds + 1.0
        while t < end:
            t += rng.expovariate(rate)
            wait = t - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            s = ends[rng.randrange(PAIRS)]
            try:
                s.send(b"x" * 100)
                s.recv(1000)          # the last answer, if it came
            except BlockingIOError:
                pass
        os._exit(0)
    os.sched_setaffinity(0, {0})
    served = 0
    out = {}

    async def serve(s):
        nonlocal served
        s.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(s)
            s.recv(1000)
            s.send(b"y" * 100)
            served += 1

    async def main():
        if mode == "holdoff":
            trio._core._run.GLOBAL_RUN_CONTEXT.runner.io_manager.__class__ = HoldOff
        async with trio.open_nursery() as nursery:
            for a, _ in pairs:
                nursery.start_soon(serve, a)
            await trio.sleep(0.5)
            r0, n0 = resource.getrusage(resource.RUSAGE_SELF), served
            await trio.sleep(seconds)
            r1, n1 = resource.getrusage(resource.RUSAGE_SELF), served
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            out.update(events=n1 - n0, cpu_s=round(cpu, 4), us_per_event=round(cpu / max(n1 - n0, 1) * 1e6, 1),
                       switches=r1.ru_nvcsw - r0.ru_nvcsw)
            nursery.cancel_scope.cancel()

    trio.run(main)
    os.waitpid(pid, 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="300,1000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--hold-ms", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, rate, seconds = a.child
        print(json.dumps(child(mode, float(rate), float(seconds), a.hold_ms / 1000)))
        return
    result = {"command": " ".join(["python", "benchmarks/holdoff.py"] + sys.argv[1:]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "hold_ms": a.hold_ms, "rates": {}}
    for rate in a.rates.split(","):
        runs: dict[str, list] = {"plain": [], "holdoff": []}
        for _ in range(a.rounds):
            for mode in runs:
                p = subprocess.run([sys.executable, __file__, "--hold-ms", str(a.hold_ms), "--child", mode, rate,
                                    str(a.seconds)], capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(p.stdout))
        row = {m: {"us_per_event_median": statistics.median(r["us_per_event"] for r in rs),
                   "switches_per_event": round(statistics.median(r["switches"] / max(r["events"], 1) for r in rs), 3),
                   "runs": rs} for m, rs in runs.items()}
        result["rates"][rate] = row
        print(f"{rate}/s: plain {row['plain']['us_per_event_median']} us/event "
              f"({row['plain']['switches_per_event']} sleeps/event), hold-off {a.hold_ms} ms "
              f"{row['holdoff']['us_per_event_median']} us/event ({row['holdoff']['switches_per_event']} sleeps/event)")
    (HERE / "results" / "holdoff.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
