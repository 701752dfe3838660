"""What memory costs on this machine: first touch, idle memory touched again, a fresh big buffer.

The sizing runs' tail grows with the devices held, not with the request rate
(benchmarks/README.md, "The 50,000 miss is not the request rate"). A parked device's memory
sits untouched for minutes, and a virtual machine's host may make idle memory slower to reach
again (page-table tricks, reclaim, page reporting: this kernel runs DAMON with a pageout scheme
and free page reporting). This measures it directly, without the gateway:

- first touch of ``--gib`` of anonymous memory, per page (a page fault each);
- the same memory read again at once (hot), and after ``--idle`` seconds untouched;
- a fresh 10 MB mapping written and unmapped (what glibc's mmap does for a big answer
  buffer, proxy/malloc.py), beside the same 10 MB rewritten in place.

Prints the figures and writes results/vm_memory.json.

    python benchmarks/vm_memory.py [--gib 2] [--idle 150]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import time
from pathlib import Path

PAGE = mmap.PAGESIZE
CHUNK = 1 << 20
BIG = 10 << 20


def touch(view: memoryview, write: bool) -> dict:
    """One byte per page, timed per MiB."""
    per = []
    for off in range(0, len(view), CHUNK):
        t0 = time.perf_counter()
        if write:
            for p in range(off, off + CHUNK, PAGE):
                view[p] = 1
        else:
            s = 0
            for p in range(off, off + CHUNK, PAGE):
                s += view[p]
        per.append(time.perf_counter() - t0)
    per.sort()
    pages = len(view) // PAGE
    return {"us_per_page": round(sum(per) / pages * 1e6, 3),
            "ms_per_mib_p50": round(per[len(per) // 2] * 1e3, 3),
            "ms_per_mib_p99": round(per[int(len(per) * 0.99)] * 1e3, 3),
            "ms_per_mib_max": round(per[-1] * 1e3, 3)}


def big_buffers(fresh: bool, n: int = 50) -> dict:
    per = []
    keep = mmap.mmap(-1, BIG)
    for _ in range(n):
        t0 = time.perf_counter()
        buf = mmap.mmap(-1, BIG) if fresh else keep
        view = memoryview(buf)
        for p in range(0, BIG, PAGE):
            view[p] = 1
        view.release()
        if fresh:
            buf.close()
        per.append(time.perf_counter() - t0)
    keep.close()
    per.sort()
    return {"ms_p50": round(per[n // 2] * 1e3, 3), "ms_max": round(per[-1] * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--idle", type=float, default=150.0, help="seconds the memory sits untouched")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vm_memory.json"))
    a = ap.parse_args()
    size = int(a.gib * (1 << 30)) // CHUNK * CHUNK
    region = mmap.mmap(-1, size)
    view = memoryview(region)
    out = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "page": PAGE},
           "gib": a.gib, "idle_s": a.idle}
    out["first_touch"] = touch(view, write=True)
    out["hot_read"] = touch(view, write=False)
    print(f"first touch  {out['first_touch']}\nhot re-read  {out['hot_read']}", flush=True)
    time.sleep(a.idle)
    out["idle_read"] = touch(view, write=False)
    out["hot_read_again"] = touch(view, write=False)
    print(f"after {a.idle:.0f} s idle {out['idle_read']}\nhot again    {out['hot_read_again']}", flush=True)
    view.release()
    region.close()
    out["fresh_10mb"] = big_buffers(fresh=True)
    out["reused_10mb"] = big_buffers(fresh=False)
    out["idle_vs_hot"] = round(out["idle_read"]["us_per_page"] / out["hot_read_again"]["us_per_page"], 1)
    print(f"fresh 10 MB mapping written and unmapped {out['fresh_10mb']}; the same 10 MB rewritten "
          f"{out['reused_10mb']}; idle memory read {out['idle_vs_hot']}x slower than hot", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
