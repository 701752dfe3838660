"""Where a sizing run's CPU goes, by the kernel's own sampler: a gateway worker and a fleet shard.

    python benchmarks/cpu_where.py -- --devices 8000 --paths gateway --repeat 1 --hold 120 --nice -10
    python benchmarks/cpu_where.py --seconds 60 --strace 30 --key 8k -- <any sizing.py options>

It runs ``benchmarks/sizing.py`` with the options after ``--``, and once the gateway path's hold
has begun records ``--seconds`` of one gateway worker and one fleet shard at once with
``perf record -e cpu-clock -g`` (a software clock: it samples a thread only while it runs on a
CPU, so the samples are CPU time, checked against the thread's own schedstat), then counts
the worker's system calls for ``--strace`` seconds (``strace -c``; slows it while it runs,
so it comes after the profile). Per process: the share of CPU samples by library
(interpreter, OpenSSL, libc, the kernel) and the kernel's time inclusive by what it was
doing (socket writes with the loopback receive they run, reads, ``epoll_wait`` — the sleep
and the wake-up —, ``epoll_ctl``, the context switch); the system calls per request.

Why not py-spy for this: on this VM py-spy's ``--nonblocking`` mode put 38% of a worker's
samples at real rates inside trio's ``epoll_wait``, where perf finds 3% of the CPU (it
judges "active" from the thread's state; a thread that sleeps ~170 times a second is most
likely caught woken but not yet on the CPU) (2026-12-02, benchmarks/README.md "Results"). Python frames need
py-spy; shares of CPU need perf.

Writes results/cpu_where.json under ``--key`` (the date and time by default).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_fetch_tail import write_keyed  # noqa: E402
from tls_tickets_bench import threads_cpu_ns  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "benchmarks" / "results" / "cpu_where.json"
TARGETS = {"gateway_worker": "seg_fast serve --worker", "fleet_shard": "seg_fast.sim.fleet"}
# The kernel's work, inclusive, by the function that names it (perf's children view).
KERNEL = {
    "socket writes (with the loopback receive they run)": ("tcp_sendmsg",),
    "reads": ("ksys_read", "__sys_recvfrom", "__sys_recvmsg"),
    "epoll_wait (sleeping, waking)": ("do_epoll_wait",),
    "epoll_ctl": ("do_epoll_ctl",),
    "accept": ("__sys_accept4",),
    "close": ("__x64_sys_close",),
    "context switch": ("finish_task_switch.isra.0", "finish_task_switch"),
    "softirq (network receive, all of it)": ("handle_softirqs",),
}
# (Debian's python3 has the interpreter linked into the executable: its DSO is "python3.11")
LIBRARIES = {"libpython": "interpreter", "python3": "interpreter", "libcrypto": "OpenSSL", "libssl": "OpenSSL",
             "libc.so": "libc", "[kernel": "kernel"}


def pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


def _report(data: Path, *args: str) -> list[tuple[float, str]]:
    out = subprocess.run(["perf", "report", "-i", str(data), "-q", "-g", "none", *args],
                         capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(?:[\d.]+%\s+)?(.+?)\s*$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2)))
    return rows


def summarise(data: Path, cpu_s: float, seconds: float) -> dict:
    """Shares of the CPU samples in ``data`` (perf.data): by library and by kernel path."""
    by_dso = _report(data, "--no-children", "--sort", "dso")
    libs: dict[str, float] = {}
    for pct, dso in by_dso:
        name = next((v for k, v in LIBRARIES.items() if dso.startswith(k)), "other")
        libs[name] = round(libs.get(name, 0.0) + pct, 1)
    children = {sym.split("] ", 1)[-1]: pct for pct, sym in _report(data, "--children", "--sort", "sym")}
    kernel = {what: round(max((children.get(f, 0.0) for f in funcs), default=0.0), 1)
              for what, funcs in KERNEL.items()}
    samples = 0
    log = data.with_suffix(".log")
    if log.exists():
        m = re.search(r"\((\d+) samples\)", log.read_text())
        samples = int(m.group(1)) if m else 0
    return {"cpu_share_of_core": round(cpu_s / seconds, 4), "cpu_s": round(cpu_s, 2), "samples": samples,
            "by_library_pct": dict(sorted(libs.items(), key=lambda kv: -kv[1])),
            "kernel_inclusive_pct": kernel,
            "top_dsos": [[pct, dso] for pct, dso in by_dso[:8]]}


def strace_counts(pid: int, seconds: float, out: Path) -> dict[str, int]:
    subprocess.run(["timeout", str(seconds), "strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                   capture_output=True)
    calls = {}
    for line in out.read_text().splitlines() if out.exists() else []:
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sizing_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="perf's recording, in the hold")
    ap.add_argument("--strace", type=float, default=30.0, help="then the worker's system calls (0: none)")
    ap.add_argument("--delay", type=float, default=5.0, help="seconds into the hold before recording")
    ap.add_argument("--key", default=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    ap.add_argument("--note", default="")
    a = ap.parse_args(own)
    if not sizing_args:
        ap.error("give sizing.py's options after --")
    work = Path("/tmp") / f"cpu-where-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True)
    cmd = [sys.executable, str(HERE / "benchmarks" / "sizing.py"), *sizing_args]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict = {}
    reqs: list[tuple[float, int]] = []
    wrote: list[str] = []

    def profile() -> None:
        time.sleep(a.delay)
        targets = {name: (pids(pat) or [None])[0] for name, pat in TARGETS.items()}
        found["workers"] = len(pids(TARGETS["gateway_worker"]))
        before = {n: threads_cpu_ns([p]) for n, p in targets.items() if p}
        recs = [(n, p, subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", "997", "-g", "-p", str(p), "-o", str(work / f"{n}.data"),
             "--", "sleep", str(a.seconds)], stdout=open(work / f"{n}.log", "w"), stderr=subprocess.STDOUT))
            for n, p in targets.items() if p]
        for _, _, r in recs:
            r.wait()
        for n, p, _ in recs:
            found[n] = summarise(work / f"{n}.data", (threads_cpu_ns([p]) - before[n]) / 1e9, a.seconds)
            found[n]["pid"] = p
        if a.strace and targets.get("gateway_worker"):
            t0 = time.monotonic()
            found["strace_window"] = [time.monotonic() - start]
            found["syscalls"] = strace_counts(targets["gateway_worker"], a.strace, work / "strace.txt")
            found["strace_window"].append(found["strace_window"][0] + time.monotonic() - t0)

    start = time.monotonic()
    thread = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = re.search(r"^\s+gateway\s+hold\s.*\breq=(\d+)", line)
        if m:
            reqs.append((time.monotonic() - start, int(m.group(1))))
            if thread is None:
                thread = threading.Thread(target=profile, daemon=True)
                thread.start()
        w = re.match(r"wrote (\S+\.json)", line)
        if w:
            wrote.append(str(Path(w.group(1)).resolve().relative_to(HERE)) if w.group(1).startswith(str(HERE))
                         else w.group(1))
    proc.wait()
    if thread is not None:
        thread.join()
    if "syscalls" in found and found.get("workers"):
        t0, t1 = found["strace_window"]
        inside = [(t, n) for t, n in reqs if t0 <= t <= t1]
        if len(inside) >= 2:
            per_s = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) / found["workers"]
            found["worker_requests_per_s"] = round(per_s, 1)
            found["syscalls_per_request"] = {k: round(v / a.strace / per_s, 2)
                                             for k, v in sorted(found["syscalls"].items(), key=lambda kv: -kv[1])
                                             if v / a.strace / per_s >= 0.05}
    commit = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    out = {"command": "python benchmarks/cpu_where.py " + shlex.join(own + ["--", *sizing_args]), "commit": commit,
           "note": a.note, "sizing_json": wrote[:1], "perf_data": str(work), **found}
    print(json.dumps({k: v for k, v in out.items() if k != "syscalls"}, indent=1))
    write_keyed(RESULTS, a.key, out)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
