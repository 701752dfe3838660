"""How fast each core of this machine was when a sizing run began and ended.

The same gateway code has cost 0.039 and 0.057 CPU-seconds per device-hour on this shared
machine an hour apart (the host's other tenants, a different host after a restart). A fixed
piece of work timed on each core before and after a run lets a reader set two runs' CPU
figures side by side: the interpreter's part (dicts, strings, calls: what most of a worker's
time is) and a C part (SHA-256 over 16 MiB: memory and the CPU's own speed). Each is run
in a child pinned to the core, best of ``REPEAT``; the work's result comes back with the
time, so the work is known to have run in full.

    python -m seg_fast.sim.speed 0 1        # prints the probe of cores 0 and 1 as JSON
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

REPEAT = 3
LOOPS = 200_000
HASHED = 16 << 20


def python_work() -> int:
    """Interpreter-bound work of a fixed size; its result is a checksum of what it did."""
    seen: dict[str, int] = {}
    acc = 0
    for i in range(LOOPS):
        key = "k%d" % (i % 997)
        seen[key] = seen.get(key, 0) + i
        acc = (acc * 31 + len(key) + (seen[key] & 7)) & 0xFFFFFFFF
    return acc


def hash_work() -> str:
    return hashlib.sha256(b"\x5a" * HASHED).hexdigest()[:16]


def probe_here() -> dict:
    """Best of REPEAT timings of each work, in ms of this process's CPU, with their results."""
    out: dict = {}
    for name, work in (("python", python_work), ("sha256", hash_work)):
        best, result = None, None
        for _ in range(REPEAT):
            t = time.process_time()
            result = work()
            spent = (time.process_time() - t) * 1000.0
            best = spent if best is None else min(best, spent)
        out[f"{name}_ms"] = round(best, 2)
        out[f"{name}_result"] = result
    return out


def probe(cpus: list[int], timeout: float = 60.0) -> dict[str, dict]:
    """{"cpu<N>": probe_here() run in a child pinned to core N} (a core that cannot be
    probed gives {"error": why})."""
    out: dict[str, dict] = {}
    for cpu in cpus:
        code = (f"import os, json; os.sched_setaffinity(0, {{{cpu}}}); "
                "from seg_fast.sim.speed import probe_here; print(json.dumps(probe_here()))")
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=timeout, env=os.environ.copy())
            out[f"cpu{cpu}"] = (json.loads(done.stdout) if done.returncode == 0
                                else {"error": done.stderr.strip().splitlines()[-1:] or ["exit"]})
        except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
            out[f"cpu{cpu}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def drift(before: dict[str, dict], after: dict[str, dict]) -> float | None:
    """The largest relative change of a core's interpreter time between two probes, the
    faster taken as the base (0.75: one took 75% longer than the other); None if none compare."""
    moved = [max(a["python_ms"], b["python_ms"]) / min(a["python_ms"], b["python_ms"]) - 1.0
             for cpu, b in before.items() if (a := after.get(cpu)) and "python_ms" in a and "python_ms" in b]
    return round(max(moved), 3) if moved else None


if __name__ == "__main__":
    print(json.dumps(probe([int(c) for c in sys.argv[1:]] or [0]), indent=1))
