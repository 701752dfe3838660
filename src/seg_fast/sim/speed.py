"""How fast each core of this machine ran interpreter work while a sizing run measured.

The same gateway code has cost 0.039 and 0.057 CPU-seconds per device-hour on this shared
machine hours apart, and a fixed interpreter-bound loop has taken 80 ms at the start of a
30-minute run and 140 ms at its end while SHA-256 kept its speed: what shares the host's
cores slows the interpreter, which is most of the gateway's time. One timing says little
(the loop's time differed 2x between two processes started a minute apart), so the sizing
run times it on each core every ``EVERY`` seconds of a path's window (a thread of the run's
own process pinned to the core, ~25 ms of work) and keeps the median, and the verdict names a path whose
median differs from the direct path's by more than SPEED_DRIFT_NOTED (its paired latency
then compares two machines).

    python -m seg_fast.sim.speed 0 1        # ms of the loop on cores 0 and 1, 9 times each
"""
from __future__ import annotations

import os
import statistics
import sys
import time

LOOPS = 25_000
EVERY = 10.0                 # s between samples in a window


def python_work() -> int:
    """Interpreter-bound work of a fixed size; its result is a checksum of what it did."""
    seen: dict[str, int] = {}
    acc = 0
    for i in range(LOOPS):
        key = "k%d" % (i % 997)
        seen[key] = seen.get(key, 0) + i
        acc = (acc * 31 + len(key) + (seen[key] & 7)) & 0xFFFFFFFF
    return acc


def timed_on(cpu: int) -> float | None:
    """ms of this thread's CPU for python_work() run pinned to ``cpu`` (the calling thread
    only; its affinity is put back); None if it cannot be pinned there."""
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
    except (OSError, ValueError):
        return None
    try:
        t = time.thread_time()
        python_work()
        return round((time.thread_time() - t) * 1000.0, 3)
    finally:
        os.sched_setaffinity(0, before)


def medians(samples: list[dict[int, float]]) -> dict[str, float]:
    """{"cpu<N>": median ms} over the samples that timed that core."""
    cpus = sorted({cpu for s in samples for cpu in s})
    return {f"cpu{cpu}": round(statistics.median(s[cpu] for s in samples if cpu in s), 3) for cpu in cpus}


if __name__ == "__main__":
    for cpu in [int(c) for c in sys.argv[1:]] or [0]:
        print(f"cpu{cpu}", [timed_on(cpu) for _ in range(9)])
