"""`seg-fast bench sizing`: how many devices one core of gateway holds at the service level.

One *point* is N devices run over three paths, one after another, with the same
seed (so the same requests at the same times):

- ``direct``: the fleet talks to the mailbox simulator (the latency baseline);
- ``gateway``: through ``seg-fast serve``, held to one core with taskset;
- ``nginx``: through nginx as a pass-through reverse proxy on that same core (the
  floor any proxy pays).

The fleet and the simulators run as *shards* (``seg_fast.sim.fleet``), several
processes pinned to the other core, each with at most ``--shard-size`` devices so
no process nears its 20,000 descriptors; every shard has its own 127.x addresses so
no address pair nears its ~28,000 ephemeral ports. Behind a proxy each shard gets
its own gateway instance (workers on the gateway core) pointing at its simulator.

The service level (BENCH-PROFILE.md) is checked over the hold window; a point that
misses it says which limit broke first, and a point where the load side ran out of
CPU, descriptors, ports or schedule claims nothing. ``--search`` finds the largest N
that meets it.

A second method: ``--cgroup-fraction f`` also holds the proxy to a fraction f of its
core with a cgroup CPU limit (seg_fast.sim.cgroup), so N devices stand for N/f per
core; ``--cgroup-check F`` runs N at F and 2N at 2F (F 0.5 when not given) and claims
N/F per core only when both meet the service level and the gateway's CPU per
device-hour agrees within 10% (``crosscheck``). ``--search`` walks devices per core:
with ``--cgroup-fraction f`` each point drives per-core x f devices, so per-core
figures beyond what the load core can drive are reachable (``search_walk``).
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import trio

from seg_fast.config import env_overrides
from seg_fast.oslimits import (autogroup_enabled, autogroup_of, raise_nofile_limit, rr_timeslice_ms,
                               set_autogroup_nice, set_rr_timeslice_ms, set_sched_slice)
from seg_fast.sim import speed
from seg_fast.sim.cgroup import MIN_QUOTA_US, PERIOD_US, CpuLimit, find_cpu_controller
from seg_fast.sim.fleet import POOL_CACHE, Go, PooledCorpus, ShardSpec, open_fds
from seg_fast.sim.latency import (OTHER, added_by_size, added_latency, added_split, lat_summary,
                                  net_of_load_side, percentile)
from seg_fast.sim.wire import SERVER_NAME

REPO = Path(__file__).resolve().parents[3]
RESULTS = REPO / "benchmarks" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# Service level (BENCH-PROFILE.md)
SLO_ADDED_P99_MS = 50.0
SLO_ADDED_P999_MS = 100.0
# A missed latency bound whose mirror (the direct run slower than the proxy's, at the same
# rank: the instrument's own noise) reaches this share of the bound gets a caveat: the miss
# may be the load side's stalls, not the proxy's. The verdict stands (no claim from noise).
NOISE_CAVEAT_SHARE = 0.8
# A missed class whose slowest 1% were sent in seconds when the load side's shards waited for
# their core this many times their average wait, and that ratio this many times the gateway's
# workers' own, gets a caveat: the load side's bursts are in that tail, beyond the read delays
# its stamps take out. The verdict stands.
LOAD_BURST_CAVEAT = 1.5
LOAD_BURST_OVER_GATEWAY = 1.25
SLO_CPU_SHARE = 0.80
SLO_RSS_KIB = 2 * 1024 * 1024       # the proxy's memory, judged as PSS (``resident``)
PSS_EVERY = 5.0                      # s between reads of the proxy's PSS
SPEED_DRIFT_NOTED = 0.25             # a path's cores this much slower or faster than the direct run's: named
# When the load side stops measuring the gateway
LOAD_CPU_LIMIT = 0.90          # of the load core, by the shard processes
LAG_P99_LIMIT = 1.0            # seconds behind the schedule
LAG_MAX_LIMIT = 5.0
DEVICES_PER_SOURCE = 1000     # per local address: half the gateway's default max_connections_per_address, so a
                              # device's foreground connection beside its parked Ping is never refused
RAMP_RATE = 80.0               # devices set up per second (~6 requests each) by default
OTHERS_LIMIT = 0.15            # of a core used by processes outside the run: a shared machine
VENDOR = {"classic": {"off": 2000, "on": 250}, "v2": {"off": 4000, "on": 2000}}  # devices per core
GOAL = {"off": 100_000, "on": 50_000}


class Options(msgspec.Struct, kw_only=True):
    devices: int = 1000
    ramp: float = 0.0             # 0: derived from N
    settle: float = -1.0          # < 0: derived from the ramp
    hold: float = 120.0
    drain: float = 30.0
    paths: list[str] = msgspec.field(default_factory=lambda: ["direct", "gateway", "nginx"])
    security: str = "off"
    seed: int = 1
    shard_size: int = 8000
    gateway_cpu: int = 0
    load_cpu: int = 1
    rate_scale: float = 1.0
    quiet: bool = False
    keep: bool = False            # keep the work directory (configs, proxy logs)
    load_steps: bool = False      # the shards time every loop step (sim/steps.py; costs them ~10%)
    nice: int = 0                 # niceness of every process of the run
    fault: str = ""               # tests only: a fault the shards inject ("corrupt")
    tls: bool = True              # devices speak TLS 1.3 to the gateway, nginx and (direct) the simulator
    # the gateway and nginx reach the simulator at https:// (its TLS port, the run's certificate
    # verified), as Exchange and Office 365 are reached; off: at http:// (every claim before 2026-12-06)
    upstream_tls: bool = False
    repeat: int = 2               # runs per point; a claim needs two that both meet
    # > 0: the proxy's processes are also held to this fraction of their core by a
    # cgroup (seg_fast.sim.cgroup); N devices at f stand for N/f per core
    cgroup_fraction: float = 0.0
    cgroup_period_us: int = PERIOD_US     # its CFS period (benchmarks/cfs_period.py measures others)
    # > 0: every process of the run (gateway, nginx, shards: they inherit it from the
    # harness) runs with this EEVDF time slice, µs (oslimits.set_sched_slice)
    slice_us: int = 0
    rr_timeslice_ms: int = 0
    # > 0: every process of the run may hold this many descriptors (the harness raises its
    # own RLIMIT_NOFILE, which they inherit; nginx gets it as worker_rlimit_nofile), so
    # --shard-size may put more of a core's devices in one gateway worker and one shard,
    # as an administrator's LimitNOFILE or limits.max_descriptors would
    nofile: int = 0
    # sides whose processes run under the real-time round-robin policy ("gateway", "load"):
    # each runs until it waits (or the kernel's RR slice ends), never preempted by a
    # kernel thread or another session
    realtime: list[str] = msgspec.field(default_factory=list)


# -- /proc sampling -------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(roots: list[int]) -> list[int]:
    kids = _children_map()
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def proc_pss_kib(pids: list[int]) -> int:
    """The memory ``pids`` hold together: their proportional set sizes summed (a page k
    processes share counts 1/k in each, so once in the sum; summed RSS counts it k times:
    the workers' shared libraries and the policy record table they all map)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


def proc_usage(pids: list[int], seen: dict | None = None) -> tuple[float, int, float, int, float]:
    """(CPU seconds, resident KiB, seconds spent runnable but waiting for a CPU, times
    put on a CPU, the CPU seconds of those spent in the kernel) summed over the pids that
    still exist. The kernel's part is what no user-space work on that side can take away:
    on loopback the sender's CPU also carries the receiving end's TCP path. The wait (schedstat) is what
    tells a process starved by others from one that is merely busy; the times put on a
    CPU (schedstat's third field) count its wake-ups (a count, so machines of different
    speeds compare). With ``seen``
    (pid -> (cpu, wait, runs, kernel CPU), kept across calls) the figures of processes that have
    exited since stay counted, so the sums never go back (a short-lived child's exit
    made a window's load CPU negative)."""
    if seen is not None:
        rss = 0
        for pid in pids:
            c, r, w, k, y = proc_usage([pid])
            if r:                  # read and alive: a gone (or zombie) one keeps its last figures
                seen[pid] = (c, w, k, y)
            rss += r
        cpu, wait, runs, system = (sum(col) for col in zip(*seen.values())) if seen else (0.0, 0.0, 0, 0.0)
        return cpu, rss, wait, runs, system
    cpu, rss, wait, runs, system = 0.0, 0, 0.0, 0, 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                raw = fh.read()
            with open(f"/proc/{pid}/statm", "rb") as fh:
                statm = fh.read().split()
            with open(f"/proc/{pid}/schedstat", "rb") as fh:
                sched = fh.read().split()
        except OSError:
            continue
        f = raw[raw.rindex(b")") + 2:].split()
        cpu += (int(f[11]) + int(f[12])) / CLK_TCK
        system += int(f[12]) / CLK_TCK
        rss += int(statm[1]) * PAGE_KIB
        wait += int(sched[1]) / 1e9
        runs += int(sched[2])
    return cpu, rss, wait, runs, system


def max_fds(pids: list[int]) -> int:
    """The most descriptors any one of pids holds."""
    most = 0
    for pid in pids:
        try:
            most = max(most, open_fds(pid))          # a stat, not a listing
        except OSError:
            pass
    return most


# The proxy's kernel socket memory is sampled this long before the window, once every
# device is set up (run_path.sample)
KERNEL_SAMPLE_BEFORE = 3.0
# The proxy's sockets: devices reach it at 127.12.*, it reaches the simulators at
# 127.11.* (Proxy.start, plan_shards); an ss filter, so 100,000 devices' other ends are
# not listed too
PROXY_SOCKETS = "( src 127.12.0.0/16 or dst 127.11.0.0/16 )"
# Kernel objects behind one TCP socket a process holds (the socket, its inode, file and
# dentry, its epoll entry): slab caches in /proc/slabinfo, sized on this kernel
SOCKET_SLABS = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi")


def socket_inodes(pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        d = f"/proc/{pid}/fd"
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for fd in names:
            try:
                link = os.readlink(f"{d}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    return out


_POLICIES = {getattr(os, n, -1): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")}


def sched_policies(pids: list[int]) -> dict[str, int]:
    """How many of ``pids`` run under each scheduling policy (what --realtime did)."""
    out: dict[str, int] = {}
    for pid in pids:
        try:
            name = _POLICIES.get(os.sched_getscheduler(pid), "other")
        except OSError:
            continue                  # gone meanwhile
        out[name] = out.get(name, 0) + 1
    return out


def slab_sizes() -> dict[str, int]:
    """Object size in bytes of each slab cache (empty when /proc/slabinfo is unreadable)."""
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()[2:]
    except OSError:
        return {}
    return {f[0]: int(f[3]) for f in (ln.split() for ln in lines) if len(f) > 3}


def parse_skmem(text: str) -> dict[int, int]:
    """``ss -tmne`` output -> socket inode: bytes of kernel buffer memory it holds (its
    receive queue, write queue, forward allocation and option memory: the
    r, w, f and o of skmem; rb and tb are limits, not memory)."""
    out: dict[int, int] = {}
    ino = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            m = _INO.search(line)
            ino = int(m.group(1)) if m else None
        m = _SKMEM.search(line)
        if m and ino:
            f = dict((k, int(v)) for k, v in _SKMEM_FIELD.findall(m.group(1)))
            out[ino] = f.get("r", 0) + f.get("w", 0) + f.get("f", 0) + f.get("o", 0)
            ino = None
    return out


_INO = re.compile(r"\bino:(\d+)")
_SKMEM = re.compile(r"skmem:\(([^)]*)\)")
_SKMEM_FIELD = re.compile(r"\b(r|w|f|o)(\d+)")


def kernel_sockets(pids: list[int], where: str = "") -> dict | None:
    """Kernel memory of the TCP sockets held by ``pids``: their buffers (``ss``) and
    their kernel objects (SOCKET_SLABS, sized from /proc/slabinfo). ``where``: an ``ss``
    filter that narrows the listing (the sockets are still told by inode). None
    without ``ss``."""
    inodes = socket_inodes(pids)
    try:
        ss = subprocess.run(["ss", "-tmneaH"] + ([where] if where else []), capture_output=True,
                            text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if ss.returncode != 0:
        return None
    buffers = parse_skmem(ss.stdout)
    held = [ino for ino in inodes if ino in buffers]
    sizes = slab_sizes()
    per_socket = sum(sizes.get(name, 0) for name in SOCKET_SLABS)
    buf = sum(buffers[ino] for ino in held)
    return {"tcp_sockets": len(held), "buffers_kib": round(buf / 1024, 1),
            "objects_kib": round(len(held) * per_socket / 1024, 1),
            "objects_bytes_per_socket": per_socket if sizes else None,
            "kib": round((buf + len(held) * per_socket) / 1024, 1)}


def read_loop_lag(directory: Path) -> dict[int, dict]:
    """Each gateway worker's event-loop lag and GC figures (``loop_lag`` of its stats
    file, seg_fast.stats) by pid."""
    out = {}
    for f in directory.glob("worker-*.json"):
        try:
            snap = msgspec.json.decode(f.read_bytes())
        except (OSError, msgspec.DecodeError):
            continue                      # gone, or being replaced: the next read has it
        out[snap.get("pid", 0)] = snap.get("loop_lag") or {}
    return out


LAG_NOTABLE_MS = 50.0


def loop_lag_summary(reads: list[tuple[float, dict[int, dict]]], w0: float, w1: float) -> dict | None:
    """The gateway workers' event-loop lag and full collections, from their stats files
    read once a second: the exact largest lag of any second in the window (each file
    carries its last seconds' maxima), the largest since start, and how many gen-2
    collections ran in the window.

    A second counts only if it lies wholly inside the window: the window ends at a
    fraction of a wall second, and the rest of that second is the fleet's stop (every
    parked Ping closed at once), whose stall belongs to the run's maximum, not the hold's."""
    if not reads:
        return None
    per_second: dict[tuple[int, int], float] = {}
    run_max = 0.0
    for _t, snaps in reads:
        for pid, lag in snaps.items():
            run_max = max(run_max, lag.get("max_ms", 0.0))
            for sec, ms in lag.get("max_per_second", []):
                per_second[(pid, sec)] = max(ms, per_second.get((pid, sec), 0.0))
    inside = lambda sec: w0 <= sec and sec + 1 <= w1
    in_window = [ms for (_pid, sec), ms in per_second.items() if inside(sec)]
    # the window's seconds whose worst lag passed LAG_NOTABLE_MS (seconds into the window):
    # when the stalls came, to set beside the timeline
    notable: dict[int, float] = {}
    for (_pid, sec), ms in per_second.items():
        if inside(sec) and ms >= LAG_NOTABLE_MS:
            notable[sec] = max(ms, notable.get(sec, 0.0))

    def gen2(t: float) -> dict[int, int]:
        before = [snaps for rt, snaps in reads if rt <= t]
        snaps = before[-1] if before else {}
        return {pid: (lag.get("gc") or {}).get("collections", [0, 0, 0])[2] for pid, lag in snaps.items()}

    g0, g1 = gen2(w0), gen2(w1)
    gc_max = [(lag.get("gc") or {}).get("max_ms", [0, 0, 0])[2] for lag in reads[-1][1].values()]
    return {"workers": len(reads[-1][1]),
            "max_ms_window": max(in_window) if in_window else None,
            "seconds_in_window": len({sec for (_pid, sec) in per_second if inside(sec)}),
            "notable_seconds": [[round(sec - w0), ms] for sec, ms in sorted(notable.items())],
            "max_ms_run": round(run_max, 3),
            "gc_gen2_in_window": sum(n - g0.get(pid, 0) for pid, n in g1.items()) if g1 else None,
            "gc_gen2_max_ms_run": max(gc_max, default=None)}


def core_times(cpus: tuple[int, ...]) -> dict[int, tuple[float, float, float]]:
    """Per core, seconds since boot (one read of /proc/stat): busy, taken by the hypervisor
    (steal: the vCPU was not running at all), and by interrupts and softirqs (the kernel's
    packet work). A core not listed there is missing."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            name, _, rest = line.partition(" ")
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in rest.split()]
                out[int(name[3:])] = ((sum(v[:8]) - v[3] - v[4]) / CLK_TCK, v[7] / CLK_TCK,
                                      (v[5] + v[6]) / CLK_TCK)
    return out


LAGGING_MS = 20.0


def seconds_context(samples: list, cores: list[tuple[float, dict]], worker_reads: list,
                    t0: float, w0: float, w1: float, gateway_cpu: int, load_cpu: int) -> list[dict]:
    """What the machine did in each second of the window, by schedule second (seconds since
    the fleet's t0, the clock the latency split's ``worst`` uses), to set beside the seconds
    the slowest requests were sent in: per core the hypervisor's steal and the kernel's
    interrupt work (ms per s), the proxy's and the load side's CPU and run-queue wait (ms per
    s: more CPU in a slow second is more work arriving, more wait at the same CPU is the core
    taken by something else), and the gateway workers' largest event-loop lag and how many
    lagged >= LAGGING_MS. From the once-a-second samples, each interval given to the
    schedule second its middle falls in."""
    rows: dict[int, dict] = {}
    for (ta, ca), (tb, cb) in zip(cores, cores[1:]):
        mid = (ta + tb) / 2
        if not (w0 <= mid < w1) or tb <= ta:
            continue
        k = 1000.0 / (tb - ta)
        row = rows.setdefault(int(mid - t0), {})
        for label, cpu in (("gw", gateway_cpu), ("load", load_cpu)):
            if cpu in ca and cpu in cb:
                row[f"steal_ms_{label}"] = round((cb[cpu][1] - ca[cpu][1]) * k, 1)
                row[f"irq_ms_{label}"] = round((cb[cpu][2] - ca[cpu][2]) * k, 1)
    for a, b in zip(samples, samples[1:]):
        mid = (a[0] + b[0]) / 2
        if int(mid - t0) in rows and b[0] > a[0]:
            k = 1000.0 / (b[0] - a[0])
            rows[int(mid - t0)].update(server_cpu_ms=round((b[1] - a[1]) * k, 1),
                                       load_cpu_ms=round((b[3] - a[3]) * k, 1),
                                       server_wait_ms=round((b[6] - a[6]) * k, 1),
                                       load_wait_ms=round((b[7] - a[7]) * k, 1))
    lag: dict[int, dict[int, float]] = {}
    for _t, snaps in worker_reads:
        for pid, snap in snaps.items():
            for sec, ms in snap.get("max_per_second", []):
                per = lag.setdefault(int(sec + 0.5 - t0), {})     # the wall second's middle
                per[pid] = max(ms, per.get(pid, 0.0))
    for sec, row in rows.items():
        per = lag.get(sec) or {}
        if per:
            row["lag_max_ms"] = round(max(per.values()), 1)
            row["workers_lagging"] = sum(ms >= LAGGING_MS for ms in per.values())
    return [{"sec": sec, **row} for sec, row in sorted(rows.items())]


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() > 1 else []


def prio(opts: "Options", realtime: bool = False) -> list[str]:
    """`nice -n N` for every process of the run (negative: ahead of a busy machine), and
    `chrt --rr 1` with ``realtime`` (the load side's shards and nginx under --realtime; the
    gateway's workers set it themselves, limits.realtime_priority)."""
    return ((["chrt", "--rr", "1"] if realtime else [])
            + (["nice", "-n", str(opts.nice)] if opts.nice else []))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def wait_listening(host: str, port: int, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                s = await trio.open_tcp_stream(host, port)
                await s.aclose()
                return
            except OSError:
                await trio.sleep(0.1)


# -- the servers under test ----------------------------------------------------------

def policy_file(security: str, devices: int) -> dict:
    """BENCH-PROFILE's policies. "off": compliance decisions on every request (general
    access lists, managed-device checks for the enrolled half of the fleet), no email
    security document, so answers pass untouched. "on": the same plus hyperlink
    rewriting for 10 of the 20 corpus domains, encryption of pdf/docx/zip for managed
    devices, png blocked for unmanaged ones, classification."""
    from seg_fast.sim.corpus import CLASSIFICATIONS, REWRITE_DOMAINS
    from seg_fast.sim.fleet import device_identity
    from seg_fast.sim.oracle import BLOCK_UNMANAGED, ENCRYPT_MANAGED

    now = time.time()
    policies: dict = {
        "general": {
            "device_type": {"enabled": True, "mode": "block", "values": ["WP8", "WindowsPhone"]},
            "mail_client": {"enabled": True, "mode": "allow",
                            "values": ["Apple-iPhone*", "Apple-iPad*", "Outlook-iOS*", "Boxer*"]},
        },
        "managed": {"inactivity": {"enabled": True, "days": 30}, "compromised": True,
                    "encryption": True},
    }
    if security == "on":
        policies["security"] = {
            "hyperlinks": {"enabled": True, "mode": "include", "domains": list(REWRITE_DOMAINS)},
            # the fleet checks answers against the same lists (seg_fast.sim.oracle)
            "managed_attachments": {"file_types": {t: "encrypt" for t in ENCRYPT_MANAGED}},
            "unmanaged_attachments": {"file_types": {t: "block" for t in BLOCK_UNMANAGED}},
            "classification": {"enabled": True, "header": "X-Classification", "untagged": "allow",
                               "tags": [{"tag": t, "allowed_clients": ["Apple-iPhone*", "Boxer*"]}
                                        for t in CLASSIFICATIONS]},
            "skip_smime": True,
        }
    records = []
    for i in range(devices):
        user, device_id, managed = device_identity(i)
        if managed:
            records.append({"device_id": device_id, "user": user, "managed": True, "compliant": True,
                            "compromised": False, "encrypted": True, "platform": "Apple",
                            "model": "iPhone 15", "os": "17.4", "last_checkin": now,
                            "eas_profile": True})
    return {"policies": policies, "devices": records}


class Proxy:
    """Gateway instances or nginx, started pinned to the gateway core."""

    def __init__(self, kind: str, opts: Options, workdir: Path, sims: list[tuple[str, int]], cgroup=None):
        self.kind, self.opts, self.dir, self.sims = kind, opts, workdir, sims
        # every process of the proxy starts inside the CPU-limited group, if any
        self.wrap = cgroup.prefix() if cgroup is not None else []
        self.procs: list[subprocess.Popen] = []
        self.listen: list[tuple[str, int]] = []

    async def start(self) -> None:
        for k, _ in enumerate(self.sims):
            host = f"127.12.{k // 250}.{k % 250 + 1}"
            self.listen.append((host, free_port(host)))
        if self.kind == "gateway":
            self._start_gateways()
        else:
            self._start_nginx()
        try:
            for host, port in self.listen:
                await wait_listening(host, port)
        except trio.TooSlowError:
            raise RuntimeError(f"{self.kind} did not start listening:\n" + self.errors()) from None

    def errors(self) -> str:
        out = []
        for f in sorted(self.dir.glob("*.err")) + sorted(self.dir.glob("*.stderr")):
            tail = f.read_text(errors="replace").strip().splitlines()[-15:]
            if tail:
                out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def _start_gateways(self) -> None:
        configs = []
        for k, ((sh, sp), (lh, lp)) in enumerate(zip(self.sims, self.listen)):
            cfg = self.dir / f"gateway{k}.toml"
            configs.append(cfg)
            cfg.write_text(
                # the workers' stats (loop lag, GC) land in <workdir>/stats, read by the run
                f'state_dir = "{self.dir}"\n'
                f'[listener]\nhost = "{lh}"\nport = {lp}\n'
                + (f'tls_cert = "{self.dir}/server.pem"\ntls_key = "{self.dir}/server.key"\n'
                   if self.opts.tls else "")
                + (f'[upstream]\nurl = "https://{sh}:{sp}"\nca_file = "{self.dir}/ca.pem"\n'
                   if self.opts.upstream_tls else f'[upstream]\nurl = "http://{sh}:{sp}"\n') +
                "[admin]\nenabled = false\n"
                f'[log]\ntransactions = "{self.dir}/gateway{k}.log"\nlevel = "warn"\n'
                # every worker shares one policy store, loaded below
                f'[policy]\nsqlite_path = "{self.dir}/policy.db"\n'
                f'[security]\nmaster_key_file = "{self.dir}/master.key"\n'
                f'key_state_file = "{self.dir}/keys.json"\n'
                # the product's own setting, as an administrator would set it
                + ("[limits]\nrealtime_priority = 1\n" if "gateway" in self.opts.realtime else ""))
        pfile = self.dir / "policies.json"
        pfile.write_bytes(msgspec.json.encode(policy_file(self.opts.security, self.opts.devices)))
        # SEG_FAST_* variables override the config file: the run's state_dir in both
        env = child_env() | {"SEG_FAST_STATE_DIR": str(self.dir)}
        load = subprocess.run([sys.executable, "-m", "seg_fast", "policy", "load", str(pfile),
                               "--config", str(configs[0])], env=env, cwd=self.dir,
                              capture_output=True, text=True)
        if load.returncode != 0:
            raise RuntimeError(f"seg-fast policy load failed: {load.stderr.strip()[-500:]}")
        # A gateway worker per shard (its own config: its own mail-server shard), forked from one
        # process that imported them, as serve forks its workers (proxy/forked.py); K shards do
        # not also pay K control processes, and the workers share the modules' pages as serve's do.
        cmd = self.wrap + prio(self.opts) + pinned(self.opts.gateway_cpu) + [
            sys.executable, "-m", "seg_fast.proxy.forked", *map(str, configs)]
        self.procs.append(subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=subprocess.DEVNULL,
                                           stderr=open(self.dir / "gateway.err", "wb")))

    def _start_nginx(self) -> None:
        conf = self.dir / "nginx.conf"
        conf.write_text(self.nginx_conf())
        cmd = self.wrap + prio(self.opts, "gateway" in self.opts.realtime) + pinned(self.opts.gateway_cpu) + ["nginx", "-c", str(conf), "-p", str(self.dir)]
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                           stderr=open(self.dir / "nginx.stderr", "wb")))

    def nginx_conf(self) -> str:
        """nginx in its strongest form here: a worker per 6,000 devices, upstream keep-alive, no
        buffering but reads as large as the gateway's (NGINX_BUFFER_KIB), an access log as the
        gateway keeps its transaction log, and TLS sessions kept as long as the gateway keeps
        them (TLS_SESSION_LIFETIME_S)."""
        # devices: 2 descriptors each, well under 20,000 per process; with --nofile as many
        # per worker as the gateway's workers carry
        per_worker = shard_size(self.opts) if self.opts.nofile else 6000
        nofile = self.opts.nofile or 19500
        n = self.opts.devices
        workers = max(1, math.ceil(n / per_worker))
        ups, servers = [], []
        for k, ((sh, sp), (lh, lp)) in enumerate(zip(self.sims, self.listen)):
            ups.append(f"  upstream sim{k} {{ server {sh}:{sp}; keepalive 256; }}\n")
            servers.append(
                f"  server {{ listen {lh}:{lp} reuseport deferred{' ssl' if self.opts.tls else ''};"
                f" location / {{ proxy_pass http{'s' if self.opts.upstream_tls else ''}://sim{k}; }} }}\n")
        return (
            f"worker_processes {workers};\nworker_rlimit_nofile {nofile};\ndaemon off;\n"
            f"pid {self.dir}/nginx.pid;\nerror_log {self.dir}/nginx.err warn;\n"
            f"events {{ worker_connections {nofile - 500}; use epoll; }}\n"
            "http {\n"
            f"  access_log {self.dir}/nginx-access.log;\n"
            f"  client_body_temp_path {self.dir}/nb; proxy_temp_path {self.dir}/np;\n"
            "  client_max_body_size 0; keepalive_timeout 3600s; keepalive_requests 100000;\n"
            "  proxy_http_version 1.1; proxy_set_header Connection \"\";\n"
            "  proxy_read_timeout 3600s; proxy_send_timeout 3600s;\n"
            "  proxy_buffering off; proxy_request_buffering off;\n"
            # Unbuffered, nginx reads at most proxy_buffer_size from the mail server at a time
            # and writes each read as TLS records of its own: at the default (a page) a 2 MB
            # answer cost nginx 2.6x and the device 3x the CPU of 64 KiB reads, the gateway's
            # (benchmarks/nginx_buffers.py). proxy_buffers only has to allow that size.
            f"  proxy_buffer_size {NGINX_BUFFER_KIB}k; proxy_buffers 4 {NGINX_BUFFER_KIB}k;\n"
            + (f"  ssl_certificate {self.dir}/server.pem; ssl_certificate_key {self.dir}/server.key;\n"
               "  ssl_protocols TLSv1.3; ssl_session_cache shared:SSL:64m; ssl_session_tickets on;\n"
               f"  ssl_session_timeout {TLS_SESSION_LIFETIME_S}s;\n"
               if self.opts.tls else "")
            # the mail server at https://, verified as the gateway verifies it; sessions reused
            # (the name on the certificate: an upstream block's name is nginx's default)
            + (f"  proxy_ssl_trusted_certificate {self.dir}/ca.pem; proxy_ssl_verify on;\n"
               f"  proxy_ssl_name {SERVER_NAME}; proxy_ssl_server_name on;\n"
               "  proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;\n"
               if self.opts.upstream_tls else "")
            + "".join(ups) + "".join(servers) + "}\n")

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if self.kind == "gateway" else signal.SIGQUIT)
        for p in self.procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- one path at one N --------------------------------------------------------------

class Shard:
    def __init__(self, spec: ShardSpec, proc: trio.Process):
        self.spec, self.proc = spec, proc
        self.buf = b""
        self.last: dict = {}
        self.sim: tuple[str, int] | None = None
        self.sim_tls: tuple[str, int | None] | None = None
        self.done = False

    async def line(self) -> dict | None:
        while b"\n" not in self.buf:
            data = await self.proc.stdout.receive_some(65536)
            if not data:
                return None
            self.buf += data
        raw, self.buf = self.buf.split(b"\n", 1)
        return msgspec.json.decode(raw)


# nginx reads the mail server's answer in pieces as large as the gateway's (upstream.RECEIVE_SIZE).
NGINX_BUFFER_KIB = 64


# How long a TLS session (ticket) stays resumable: OpenSSL's default for a server, which the
# gateway and the simulator keep. nginx's own default is 5 minutes: a device back after that
# (a foreground request comes ~6 times an hour) got a full handshake through nginx alone (at
# 50,000 devices 24,123 of 91,082 handshakes resumed through nginx, 41,082 through the gateway).
TLS_SESSION_LIFETIME_S = 7200


def shard_limit() -> int:
    """Devices one shard (and one gateway worker) may hold under the per-process
    descriptor limit: a device costs a socket on each side of the process (fleet and
    simulator, or device leg and mail-server leg), its foreground connection now and
    then, plus the process's own files."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(100, int((hard - 1500) / 2.2))


def shard_size(opts: Options) -> int:
    """Devices per shard and per gateway worker: --shard-size, within the descriptor limit."""
    return min(opts.shard_size, shard_limit())


def shards_for(devices: float, opts: Options) -> int:
    """Shards (fleet processes, gateway workers) ``devices`` are cut into."""
    return max(1, math.ceil(devices / shard_size(opts)))


def source_hosts(k: int, devices: int) -> list[str]:
    """Shard k's local addresses for device connections: one per DEVICES_PER_SOURCE
    devices, spread over 127.14-127.29, so no (source, destination) pair needs more
    than a few thousand of its ~28,000 ephemeral ports (TIME_WAIT included)."""
    count = max(1, min(16, math.ceil(devices / DEVICES_PER_SOURCE)))
    return [f"127.{14 + j}.{k // 250}.{k % 250 + 1}" for j in range(count)]


def plan_shards(opts: Options, workdir: Path, tag: str) -> list[ShardSpec]:
    n, count = opts.devices, shards_for(opts.devices, opts)
    ramp = opts.ramp or max(10.0, n / RAMP_RATE)
    # the ramp's tail (late set-ups, the first Syncs) must settle before measuring
    settle = opts.settle if opts.settle >= 0 else max(5.0, min(60.0, ramp / 8))
    specs = []
    for k in range(count):
        first = k * n // count
        last = (k + 1) * n // count
        specs.append(ShardSpec(
            shard=k, first_device=first, devices=last - first, seed=opts.seed,
            ramp=ramp, settle=settle, hold=opts.hold, drain=opts.drain,
            rate_scale=opts.rate_scale, fault=opts.fault, slow_steps=opts.load_steps,
            tls_cert=str(workdir / "server.pem") if opts.tls else "",
            tls_key=str(workdir / "server.key") if opts.tls else "",
            sim_host=f"127.11.{k // 250}.{k % 250 + 1}",
            source_hosts=source_hosts(k, last - first),
            out=str(workdir / f"{tag}-shard{k}.json")))
    return specs


def make_certificate(workdir: Path, hosts: list[str] = ()) -> None:
    """ca.pem, and server.pem/server.key for the name devices ask for (the simulator,
    the gateway and nginx all present it); ``hosts``: addresses it names too (the shards'
    simulators, which the gateway reaches by address with --upstream-tls)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_NAME, *hosts)
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    cert.private_key_pem.write_to_path(str(workdir / "server.key"))
    (workdir / "server.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))


def checks_for(path: str, opts: Options) -> str:
    """Email security acts on the gateway path only: direct and nginx answers pass
    untouched and are checked byte for byte."""
    return "security" if path == "gateway" and opts.security == "on" else "strict"


async def run_path(path: str, opts: Options, workdir: Path, say) -> dict:
    specs = plan_shards(opts, workdir, path)
    if opts.tls and not (workdir / "server.pem").exists():
        make_certificate(workdir, [sp.sim_host for sp in specs] if opts.upstream_tls else [])
    env = child_env()
    # the corpus pool built once here for every shard of the point (unless a directory is set)
    env.setdefault(POOL_CACHE, str(workdir / "corpus"))
    await trio.to_thread.run_sync(PooledCorpus(opts.seed).keep, env[POOL_CACHE])
    shards: list[Shard] = []
    proxy = None
    cgroup = cgroup_info = None
    samples: list[tuple[float, float, int, float, float, float]] = []
    cores: list[tuple[float, dict]] = []
    speeds: list[dict[int, float]] = []
    try:
        for spec in specs:
            cmd = prio(opts, "load" in opts.realtime) + pinned(opts.load_cpu) + [sys.executable, "-m", "seg_fast.sim.fleet",
                                           msgspec.json.encode(spec).decode()]
            proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, env=env)
            shards.append(Shard(spec, proc))
        # every shard loads the corpus pool kept above and builds its answer templates
        # (~1.2 s of CPU each, fleet.shard_main) on the one load core at once: the wait
        # grows with them
        start_limit = 60 + 5 * len(shards)
        for sh in shards:
            with trio.fail_after(start_limit):
                first = await sh.line()
            if not first or not first.get("ready"):
                raise RuntimeError(f"shard {sh.spec.shard} did not start")
            sh.sim = (sh.spec.sim_host, first["sim_port"])
            sh.sim_tls = (sh.spec.sim_host, first.get("sim_tls_port"))
        targets = [sh.sim_tls if opts.tls else sh.sim for sh in shards]
        if path in ("gateway", "nginx"):
            if opts.cgroup_fraction > 0:
                cgroup = CpuLimit(opts.cgroup_fraction, period_us=opts.cgroup_period_us).__enter__()
            proxy = Proxy(path, opts, workdir, [sh.sim_tls if opts.upstream_tls else sh.sim for sh in shards], cgroup)
            await proxy.start()
            targets = proxy.listen
        t0 = time.time() + 1.0
        for sh, (host, port) in zip(shards, targets):
            security = checks_for(path, opts) == "security"
            go = Go(host=host, port=port, t0=t0, path=path, checks="security" if security else "strict",
                    tls_ca=str(workdir / "ca.pem") if opts.tls else "",
                    key_file=str(workdir / "master.key") if security else "",
                    key_state_file=str(workdir / "keys.json") if security else "")
            await sh.proc.stdin.send_all(msgspec.json.encode(go) + b"\n")
        spec0 = specs[0]
        w0 = t0 + spec0.ramp + spec0.settle
        w1 = w0 + spec0.hold
        server_roots = [p.pid for p in proxy.procs] if proxy else []
        server_fds = [0]
        worker_reads: list[tuple[float, dict[int, dict]]] = []
        kernel: dict = {}
        load_roots = [sh.proc.pid for sh in shards]
        server_seen: dict = {}
        load_seen: dict = {}      # pid -> (cpu, wait): an exited process's share stays counted

        async def read_progress(sh: Shard) -> None:
            while True:
                msg = await sh.line()
                if msg is None or msg.get("done"):
                    sh.done = True
                    return
                sh.last = msg

        async def sample() -> None:
            last_say = last_pss = last_speed = 0.0
            spss = 0
            while True:
                spids, lpids = tree(server_roots), tree(load_roots)
                server_fds[0] = max(server_fds[0], max_fds(spids))
                scpu, srss, swait, sruns, ssys = proc_usage(spids, server_seen)
                lcpu, lrss, lwait, _, lsys = proc_usage(lpids, load_seen)
                if time.time() - last_pss >= PSS_EVERY or not samples:
                    # (smaps_rollup walks each process's page tables: every few seconds)
                    spss, last_pss = proc_pss_kib(spids), time.time()
                now = time.time()
                ticks = core_times((opts.gateway_cpu, opts.load_cpu))
                samples.append((now, scpu, srss, lcpu, ticks.get(opts.gateway_cpu, (0.0,))[0],
                                ticks.get(opts.load_cpu, (0.0,))[0], swait, lwait, spss, sruns, ssys, lsys))
                cores.append((now, ticks))
                if w0 <= now < w1 and now - last_speed >= speed.EVERY:
                    last_speed = now
                    timed = {cpu: await trio.to_thread.run_sync(speed.timed_on, cpu)
                             for cpu in sorted({opts.gateway_cpu, opts.load_cpu})}
                    speeds.append({cpu: ms for cpu, ms in timed.items() if ms is not None})
                now = time.time()
                if path == "gateway":
                    worker_reads.append((now, read_loop_lag(workdir / "stats")))
                # The proxy's sockets late in the settle, every device set up: not in the
                # window, where ss over every socket and a readlink of each of the proxy's
                # descriptors held the load core up to ~280 ms (sim/steps.py). A ramp that
                # ran late: near the window's end as before (a drain ends at once).
                settled = (now >= w0 - min(KERNEL_SAMPLE_BEFORE, spec0.settle / 2)
                           and sum(s.last.get("ready", 0) for s in shards) >= opts.devices)
                late = settled or now >= w1 - min(5.0, (w1 - w0) / 4)
                if late and "sched" not in kernel:
                    kernel["sched"] = {"server": sched_policies(spids), "load": sched_policies(lpids)}
                if spids and "at" not in kernel and late:
                    kernel["at"] = now
                    kernel["sockets"] = await trio.to_thread.run_sync(kernel_sockets, spids, PROXY_SOCKETS)
                if now - last_say >= 5 and len(samples) > 1:
                    last_say = now
                    a, b = samples[-2], samples[-1]
                    dt = max(1e-6, b[0] - a[0])
                    tot = lambda k: sum(s.last.get(k, 0) for s in shards)
                    phase = ("ramp" if now < t0 + spec0.ramp else
                             "settle" if now < w0 else "hold" if now < w1 else "drain")
                    say(f"  {path:8} {phase:6} t={now - t0:6.0f}s ready={tot('ready')}/{opts.devices}"
                        f" parked={tot('parked')} req={tot('requests')} fail={tot('failures')}"
                        f" lag={max((s.last.get('lag_max', 0) for s in shards), default=0):.2f}s"
                        f" fds={max((s.last.get('fds', 0) for s in shards), default=0)}"
                        f" | server cpu {100 * (b[1] - a[1]) / dt:5.1f}% rss {b[2] / 1024:7.1f} MiB"
                        f" fds {server_fds[0]}"
                        f" | load cpu {100 * (b[3] - a[3]) / dt:5.1f}%")
                await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            async with trio.open_nursery() as readers:
                for sh in shards:
                    readers.start_soon(read_progress, sh)
            for sh in shards:
                await sh.proc.wait()
            nursery.cancel_scope.cancel()
        server_died = proxy is not None and not proxy.alive()
    finally:
        with trio.CancelScope(shield=True):     # interrupted or not: leave nothing running
            if proxy is not None:
                proxy.stop()
            if cgroup is not None:
                cgroup_info = cgroup.throttling()      # the evidence the limit bit
                cgroup.remove()
            for sh in shards:
                if sh.proc.returncode is None:
                    sh.proc.kill()
                    await sh.proc.wait()
    results = []
    for spec in specs:
        try:
            results.append(msgspec.json.decode(Path(spec.out).read_bytes()))
        except OSError:
            raise RuntimeError(f"shard {spec.shard} wrote no result; see its output") from None
    summary = summarize_path(path, opts, results, samples, w0, w1, server_died)
    summary["server"]["fds_max"] = server_fds[0]
    summary["server"]["kernel_sockets"] = kernel.get("sockets")
    summary["server"]["loop_lag"] = loop_lag_summary(worker_reads, w0, w1)
    summary["sched_policies"] = kernel.get("sched")
    summary["seconds"] = seconds_context(samples, cores, worker_reads, t0, w0, w1,
                                         opts.gateway_cpu, opts.load_cpu)
    summary["speed_ms"] = speed.medians(speeds)
    summary["server"]["cgroup"] = cgroup_info
    return summary


def resident(server: dict) -> tuple[int, int, str]:
    """(most in the window, idle, its name): the memory a path's proxy held, as the memory
    bound judges it. PSS where the run read it (since 2026-12-01), else summed RSS."""
    if server.get("pss_kib_max"):
        return server["pss_kib_max"], server["pss_kib_idle"], "memory (PSS)"
    return server["rss_kib_max"], server["rss_kib_idle"], "RSS"


def _at(samples, t: float):
    """The sample nearest to wall time t."""
    return min(samples, key=lambda s: abs(s[0] - t))


def summarize_path(path, opts, results, samples, w0, w1, server_died) -> dict:
    a, b = _at(samples, w0), _at(samples, w1)
    dt = max(1e-6, b[0] - a[0])
    in_window = [s for s in samples if w0 <= s[0] <= w1] or [b]
    lat: dict[str, list] = {}
    late: dict[str, list] = {}
    for r in results:
        for cmd, pairs in r["latency_ms"].items():
            lat.setdefault(cmd, []).extend(pairs)
        for cmd, pairs in r.get("late_ms", {}).items():
            late.setdefault(cmd, []).extend(pairs)
    failures: dict[str, int] = {}
    for r in results:
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    requests: dict[str, int] = {}
    for r in results:
        for k, v in r["requests"].items():
            requests[k] = requests.get(k, 0) + v
    load_cpu_s = sum(r["cpu_s"] for r in results)
    return {
        "path": path,
        "devices": opts.devices,
        "window_s": round(dt, 1),
        "ready": sum(r["ready"] for r in results),
        "ready_late_s": round(max(r["ready_by"] - r["window_start"] for r in results), 2),
        "parked_min_in_window": sum((r["parked_min_in_window"] or 0) for r in results),
        "parked_at_window_end": sum(r["parked_at_window_end"] for r in results),
        "syncing_at_window_end": sum(r.get("syncing_at_window_end", 0) for r in results),
        "states_at_window_end": dict(sum((collections.Counter(r.get("states_at_window_end", {}))
                                          for r in results), collections.Counter())),
        # devices still short of their mail when the drain ended, by where they stood
        # (each within its own request deadlines: late, not answered wrongly)
        "behind_at_stop": dict(sum((collections.Counter(r.get("behind_at_stop", {}))
                                    for r in results), collections.Counter())),
        "requests": requests,
        "requests_total": sum(requests.values()),
        "requests_in_window": sum(len(v) for v in lat.values()),
        "failures": failures,
        "failure_samples": [s for r in results for s in r["failure_samples"]][:20],
        "pings": {"idle": sum(r["pings_idle"] for r in results),
                  "changes": sum(r["pings_changes"] for r in results)},
        "delivered": sum(r["delivered"] for r in results),
        "received": sum(r["received"] for r in results),
        "bytes_in": sum(r["bytes_in"] for r in results),
        "transformed": sum(r["transformed"] for r in results),
        "tls": {"handshakes": sum(r.get("tls_handshakes", 0) for r in results),
                "resumed": sum(r.get("tls_resumed", 0) for r in results)},
        "checked_bodies": sum(r.get("checked_bodies", 0) for r in results),
        "byte_checked": sum(r.get("byte_checked", 0) for r in results),
        "facts_checked": sum(r.get("facts_checked", 0) for r in results),
        "facts_crosschecked": sum(r.get("facts_crosschecked", 0) for r in results),
        "envelopes_opened": sum(r.get("envelopes_opened", 0) for r in results),
        "checks_offloaded": sum(r.get("checks_offloaded", 0) for r in results),
        "checks_in_loop": sum(r.get("checks_in_loop", 0) for r in results),
        "fetch_skipped": sum(r["fetch_skipped"] for r in results),
        "latency_ms": {cmd: lat_summary([ms for _, ms in pairs]) for cmd, pairs in lat.items()},
        "latency_raw": {cmd: dict(pairs) for cmd, pairs in lat.items()},
        # of each request's latency, the load side's own delay in reading what had arrived
        "load_side_late_ms": {cmd: lat_summary([ms for _, ms in pairs]) for cmd, pairs in late.items()},
        "late_raw": {cmd: dict(pairs) for cmd, pairs in late.items()},
        "timing_raw": {cmd: {k: (t, ttfb) for r in results for k, t, ttfb in r.get("timing", {}).get(cmd, ())}
                       for cmd in {c for r in results for c in r.get("timing", {})}},
        "fetch_sizes": {k: v for r in results for k, v in r.get("fetch_sizes", {}).items()},
        "server": {
            "cpu_s": round(b[1] - a[1], 3),
            "cpu_share": round((b[1] - a[1]) / dt, 4),
            "rss_kib_max": max(s[2] for s in in_window),
            "rss_kib_idle": samples[0][2],      # before the first device connected
            "pss_kib_max": max(s[8] for s in in_window),
            "pss_kib_idle": samples[0][8],
            "runqueue_wait": round((b[6] - a[6]) / dt, 4),
            # times the proxy's processes were put on a CPU in the window: their wake-ups
            "runs_per_s": round((b[9] - a[9]) / dt, 1),
            # of cpu_share, the part spent in the kernel (system time)
            "kernel_cpu_share": round((b[10] - a[10]) / dt, 4),
            "died": server_died,
        },
        "load": {
            "cpu_share": round((b[3] - a[3]) / dt, 4),
            "kernel_cpu_share": round((b[11] - a[11]) / dt, 4),
            "cpu_s_total": round(load_cpu_s, 2),
            "core_busy": round((b[5] - a[5]) / dt, 4),
            "runqueue_wait": round((b[7] - a[7]) / dt, 4),
            "gateway_core_busy": round((b[4] - a[4]) / dt, 4),
            "lag_p99": max((r["lag_p99"] for r in results), default=0.0),
            "lag_max": max((r["lag_max"] for r in results), default=0.0),
            "conn_errors": sum(r["conn_errors"] for r in results),
            "shard_maxrss_kib": max(r["maxrss_kib"] for r in results),
            "fds_max": max(r["fds_max"] for r in results),
            "fd_limit": min(r["fd_limit"] for r in results),
            "sim_accept_shed": sum(r.get("sim_accept_shed", 0) for r in results),
        },
        "timeline": [(round(s[0] - w0, 1), s[1], s[2], s[3]) for s in samples],
    }


# -- one point: all paths at N, judged -----------------------------------------------

def load_problems(p: dict) -> list[str]:
    """Why this path's numbers measure the load generator rather than the server: the
    load side could not drive the point (its CPU, schedule, descriptors or ports)."""
    out = []
    ld = p["load"]
    if ld["cpu_share"] > LOAD_CPU_LIMIT:
        out.append(f"load side used {100 * ld['cpu_share']:.0f}% of its core")
    if ld["lag_p99"] > LAG_P99_LIMIT or ld["lag_max"] > LAG_MAX_LIMIT:
        out.append(f"load side fell behind schedule (p99 {ld['lag_p99']:.2f}s, max {ld['lag_max']:.2f}s)")
    if ld.get("sim_accept_shed"):
        out.append(f"the simulator ran out of descriptors and shed {ld['sim_accept_shed']} connections")
    if ld["fds_max"] >= 0.95 * ld["fd_limit"]:
        out.append(f"a load-side process held {ld['fds_max']} of its {ld['fd_limit']} descriptors")
    fd_port = [k for k in p["failures"] if k.endswith(".connect")]
    samples = " ".join(p["failure_samples"])
    if fd_port and ("Too many open files" in samples or "EMFILE" in samples):
        out.append("load side ran out of file descriptors")
    if fd_port and ("Cannot assign requested address" in samples or "EADDRNOTAVAIL" in samples):
        out.append("load side ran out of ephemeral ports")
    if p["ready"] < p["devices"] and not p["failures"]:
        out.append(f"only {p['ready']} of {p['devices']} devices finished set-up before the end")
    if p["ready_late_s"] > 0:
        out.append(f"the ramp was not done when the hold began (last device ready "
                   f"{p['ready_late_s']:.0f}s into it): lengthen --ramp")
    return out


def claimless_options(opts: Options) -> list[str]:
    """Why the run's options claim nothing whatever it measures (a development run)."""
    out = []
    if opts.rate_scale != 1.0:
        out.append(f"time compressed (rate scale {opts.rate_scale}): development run")
    if not opts.tls:
        out.append("plain HTTP on the device leg (--no-tls): the profile's devices speak TLS")
    if opts.hold < 120:
        out.append(f"hold {opts.hold:.0f}s is shorter than the 120s a claim needs")
    return out


# Failures a device records when its own deadline passed: a request unanswered in
# time, a connection not made in time, a parked Ping unanswered by heartbeat + grace
TIMED_OUT = (".timeout", ".connect-timeout")


def load_overloaded(p: dict) -> str:
    """Why path ``p``'s load side could not keep its own deadlines ('' when it could)."""
    ld = p["load"]
    if ld["lag_p99"] > LAG_P99_LIMIT or ld["lag_max"] > LAG_MAX_LIMIT:
        return f"its schedule ran up to {ld['lag_max']:.1f}s late"
    if ld["cpu_share"] > LOAD_CPU_LIMIT:
        return f"it used {100 * ld['cpu_share']:.0f}% of its core"
    if ld.get("core_busy", 0.0) >= LOAD_CPU_LIMIT:
        return f"its core was {100 * ld['core_busy']:.0f}% busy (other processes included)"
    return ""


def direct_failures(p: dict) -> tuple[list[str], list[str]]:
    """The direct path's failures, as (the load side's limit, wrong answers): no proxy
    is in the way, so each is the fleet's or the simulator's. A device that gave up
    after its own deadline while the load side was overloaded (both ends of the direct
    path are the shard's) shows the load side's limit, not a wrong answer; any other
    failure, or a timeout while the load side kept its schedule, says the fleet or
    the simulator is wrong."""
    limit, out = [], []
    fails = p["failures"]
    timed_out = {k: v for k, v in fails.items() if k.endswith(TIMED_OUT)}
    wrong = {k: v for k, v in fails.items() if k not in timed_out}
    why = load_overloaded(p)
    if timed_out and not why:
        wrong.update(timed_out)
    elif timed_out:
        limit.append(f"direct: {sum(timed_out.values())} requests gave up at their own deadline with no proxy in "
                   f"the way ({', '.join(sorted(timed_out))}) while the load side was overloaded ({why}): "
                   f"the load side's limit, not a wrong answer")
    if wrong:
        out.append(f"direct: {sum(wrong.values())} failures without any proxy "
                   f"({', '.join(sorted(wrong))}): the fleet or simulator is wrong")
    return limit, out


def behind_at_stop(p: dict) -> str:
    """What was still in flight on path ``p`` when its drain ended ('' when nothing)."""
    behind = p.get("behind_at_stop") or {}
    n = sum(v for k, v in behind.items() if k != "foreground request")
    fg = behind.get("foreground request", 0)
    if not n and not fg:
        return ""
    parts = []
    if n:
        where = ", ".join(f"{v} {k}" for k, v in sorted(behind.items()) if k != "foreground request")
        parts.append(f"{n} devices had not synced all their mail ({where})")
    if fg:
        parts.append(f"{fg} foreground requests were still running")
    return " and ".join(parts) + " when the drain ended, each within its own deadline"


def contention(p: dict) -> list[str]:
    """Other people's processes on our cores: it can only make us look worse, so it
    does not void a point that meets the service level, but a miss may be theirs."""
    out = []
    ld = p["load"]
    others_load = ld["core_busy"] - ld["cpu_share"]
    if others_load > OTHERS_LIMIT:
        out.append(f"{p['path']}: other processes used {100 * others_load:.0f}% of the load core "
                   f"(run-queue wait of the shards, summed: {100 * ld['runqueue_wait']:.0f}% of the window)")
    if p["path"] != "direct":
        others_gw = ld["gateway_core_busy"] - p["server"]["cpu_share"]
        if others_gw > OTHERS_LIMIT:
            out.append(f"{p['path']}: other processes used {100 * others_gw:.0f}% of its core "
                       f"(it waited for the core {100 * p['server']['runqueue_wait']:.1f}% of the time)")
    return out


def speed_caveats(paths: dict[str, dict]) -> list[str]:
    """Each path's cores' speed in its window (``speed_ms``: the median time of sim/speed's
    loop on each core, averaged over the cores) set against the direct path's: a path
    measured on a machine that much slower or faster is paired with the direct run of
    another machine. Named, the verdict unchanged."""
    base = host_ms([paths["direct"]]) if "direct" in paths else None
    out = []
    for name, p in paths.items():
        here = host_ms([p])
        if name == "direct" or base is None or here is None:
            continue
        moved = host_moved(here, base)
        if moved > SPEED_DRIFT_NOTED:
            out.append(f"{name}: the cores ran sim/speed's loop {100 * moved:.0f}% "
                       f"{'slower' if here > base else 'faster'} in its window ({here:.1f} ms) than in "
                       f"the direct run's ({base:.1f} ms): the paired latency compares two machines")
    return out


def host_ms(paths) -> float | None:
    """How fast the host ran interpreter work in the windows of ``paths`` (path records with
    ``speed_ms``): sim/speed's loop, ms, averaged over the windows and their cores."""
    vals = [ms for p in paths for ms in (p.get("speed_ms") or {}).values()]
    return sum(vals) / len(vals) if vals else None


def point_host_ms(verdict: dict) -> float | None:
    """host_ms over every run of a point (its ``each_run`` records)."""
    return host_ms([p for r in verdict.get("each_run", []) for p in (r.get("paths") or {}).values()])


def host_moved(here: float, base: float) -> float:
    """How far apart two timings of the host's loop are, as a fraction of the faster."""
    return max(here, base) / min(here, base) - 1.0


def host_caveat(point: dict, earlier: list[dict]) -> str | None:
    """A point of a walk measured on a host that much slower or faster than the points
    before it (the median of theirs; a resumed search may run on another machine, and a
    shared one changes speed by the hour): its verdict is set against theirs across
    machines. Named, the verdict unchanged."""
    here = point_host_ms(point["verdict"])
    base = [ms for p in earlier if (ms := point_host_ms(p["verdict"])) is not None]
    if here is None or not base:
        return None
    ref = statistics.median(base)
    moved = host_moved(here, ref)
    if moved <= SPEED_DRIFT_NOTED:
        return None
    return (f"host: the cores ran sim/speed's loop {100 * moved:.0f}% {'slower' if here > ref else 'faster'} "
            f"over this point's runs ({here:.1f} ms) than over the earlier points' ({ref:.1f} ms, median): "
            "the walk compares points measured on different machines")


def load_burst_caveat(cmd: str, split: dict | None) -> list[str]:
    """A caveat when ``cmd``'s slowest 1% (added_split's ``worst``) were sent in seconds when
    the load side waited for its core LOAD_BURST_CAVEAT times its average, and that ratio is
    LOAD_BURST_OVER_GATEWAY times the gateway's workers' own (each side's mean run-queue wait in
    those seconds against every second's): a tail the load side's bursts are in, not only the
    machine's. [] otherwise or unmeasured."""
    means = ((split or {}).get("worst", {}).get("machine") or {}).get("mean_where_slowest_vs_all", {})
    load, server = means.get("load_wait_ms"), means.get("server_wait_ms")
    if not load or not server or not load[1] or not server[1]:
        return []
    ratio, own = load[0] / load[1], server[0] / server[1]
    if ratio < LOAD_BURST_CAVEAT or ratio < LOAD_BURST_OVER_GATEWAY * own:
        return []
    return [f"{cmd}: its slowest 1% were sent in seconds when the load side's shards waited for their core "
            f"{ratio:.1f}x as long as on average (the gateway's workers {own:.1f}x): the load side's own "
            f"bursts are in that tail"]


def judge(point: dict, opts: Options) -> dict:
    paths = point["paths"]
    direct, gw = paths.get("direct"), paths.get("gateway")
    broke: list[str] = []          # the service level itself
    # why the point is not a measurement, by kind (a search stops at the first two,
    # and walks on past the third: a development run's points claim nothing anyway)
    undriven: list[str] = []       # the load side could not drive it
    unmeasured: list[str] = []     # the measurement is missing or wrong
    claimless = claimless_options(opts)
    caveats: list[str] = []
    held = opts.cgroup_fraction or 1.0     # of core 0: the proxy's allowance
    if opts.cgroup_fraction:
        for name in ("gateway", "nginx"):
            if name in paths and not paths[name]["server"].get("cgroup"):
                unmeasured.append(f"{name}: the cgroup CPU limit was not applied")
    for name, p in paths.items():
        undriven += [f"{name}: {x}" for x in load_problems(p)]
        caveats += contention(p)
    caveats += speed_caveats(paths)
    added = {}
    if direct:                        # nginx's paired figures too when it runs without the gateway
        for name in [n for n in ("gateway", "nginx") if n in paths]:
            p = paths[name]
            added[name] = added_latency(p["latency_raw"], direct["latency_raw"])
            # for reading: the same pairs with the load side's own read delays taken out of
            # each request on both paths (latency.net_of_load_side); the verdict uses the above
            net = added_latency(net_of_load_side(p["latency_raw"], p.get("late_raw", {})),
                                net_of_load_side(direct["latency_raw"], direct.get("late_raw", {})))
            added[name]["net_of_load_side"] = {"classes": net["classes"], "commands": net["commands"]}
            if "ItemOperations" in p["latency_raw"] and "ItemOperations" in direct["latency_raw"]:
                added[name]["ItemOperations_by_size"] = added_by_size(
                    p["latency_raw"]["ItemOperations"], direct["latency_raw"]["ItemOperations"], p.get("fetch_sizes", {}))
            for cmd in sorted(p.get("timing_raw", {}).keys() & direct.get("timing_raw", {}).keys()):
                added[name][f"{cmd}_split"] = added_split(
                    p["latency_raw"].get(cmd, {}), direct["latency_raw"].get(cmd, {}), p["timing_raw"][cmd],
                    direct["timing_raw"][cmd], p.get("fetch_sizes") if cmd == "ItemOperations" else None,
                    {r["sec"]: r for r in p.get("seconds", [])}, {r["sec"]: r for r in direct.get("seconds", [])})
            # for reading only: the difference of the two runs' p99s (what the
            # verdict must not use: a slow direct run flatters it)
            for cmd, c in added[name]["commands"].items():
                if cmd in p["latency_ms"] and cmd in direct["latency_ms"]:
                    c["unpaired_p99_diff"] = round(p["latency_ms"][cmd]["p99"]
                                                   - direct["latency_ms"][cmd]["p99"], 3)
    n = opts.devices
    if gw:
        fails = sum(gw["failures"].values())
        if fails:
            broke.append(f"{fails} failed or wrong answers ({', '.join(sorted(gw['failures']))})")
        if gw["ready"] < gw["devices"]:
            broke.append(f"only {gw['ready']} of {gw['devices']} devices got a Ping parked")
        if gw["server"]["died"]:
            broke.append("the gateway exited during the run")
        classes = added.get("gateway", {}).get("classes", {})
        pooled = added.get("gateway", {}).get("pooled", [])
        for cls, v in sorted(classes.items()):
            label = f"{cls} ({', '.join(pooled)}, pooled)" if cls == OTHER else cls
            missed = False
            for q, rank, bound in (("p99", "p99", SLO_ADDED_P99_MS), ("p999", "p99.9", SLO_ADDED_P999_MS)):
                if v[q] > bound:
                    missed = True
                    broke.append(f"paired added {rank} {v[q]:.1f} ms on {label}, n={v['n']} > {bound:.0f} ms")
                    mirror = v.get(f"mirror_{q}")
                    if mirror is not None and mirror >= NOISE_CAVEAT_SHARE * bound:
                        caveats.append(f"{label}: the direct run was itself {mirror:.1f} ms slower than the "
                                       f"gateway's at the {rank} rank (mirror): the instrument's noise is near "
                                       f"the {bound:.0f} ms bound there")
            if missed:
                for cmd in (pooled if cls == OTHER else [cls]):
                    caveats += load_burst_caveat(cmd, added["gateway"].get(f"{cmd}_split"))
        if gw["server"]["cpu_share"] > SLO_CPU_SHARE * held:
            broke.append(f"gateway CPU {100 * gw['server']['cpu_share']:.0f}% of a core > 80% of the "
                         f"{held:g} core it was held to")
        mem, idle, what = resident(gw["server"])
        if held < 1.0:
            # N devices at F stand for N/F on a whole core, and so must their memory:
            # each device's share N/F times over, and the idle workers N/F devices need
            # (one per shard, as plan_shards cuts them)
            workers_now, workers_then = shards_for(n, opts), shards_for(n / held, opts)
            at_per_core = idle / workers_now * workers_then + (mem - idle) / held
            if at_per_core > SLO_RSS_KIB:
                broke.append(f"gateway {what} {at_per_core / 1024:.0f} MiB projected to {round(n / held)} devices "
                             f"({mem / 1024:.0f} MiB measured at {n}) > 2 GiB")
        elif mem > SLO_RSS_KIB:
            broke.append(f"gateway {what} {mem / 1024:.0f} MiB > 2 GiB")
    if gw and not direct:
        unmeasured.append("no direct path in this run: the added latency was not measured")
    if direct:
        limit, wrong = direct_failures(direct)
        undriven += limit
        unmeasured += wrong
    for name, p in paths.items():
        late = behind_at_stop(p)
        if not late:
            continue
        if name == "direct":
            # no proxy in the way: the load side did not keep up with its own schedule
            undriven.append(f"direct: {late}: the load side fell behind (not a wrong answer); "
                           f"fewer devices, or a longer --drain")
        elif name == "gateway":
            # the gateway may be what held them: counted against it, as a failure is
            broke.append(f"gateway: {late}")
        else:
            caveats.append(f"{name}: {late}")
    hours = opts.hold * opts.rate_scale / 3600.0      # device time, not wall time
    metrics = {}
    for name in ("gateway", "nginx"):
        if name in paths:
            s = paths[name]["server"]
            kernel = (s.get("kernel_sockets") or {}).get("kib")
            lag = s.get("loop_lag") or {}
            metrics[name] = {"cpu_s_per_device_hour": round(s["cpu_s"] / (n * hours), 6),
                             # wake-ups (times put on a CPU) per device-hour: a count, not a
                             # time, so machines of different speeds compare (None: older runs)
                             "wakeups_per_device_hour": (round(s["runs_per_s"] * 3600 / (n * opts.rate_scale), 2)
                                                         if "runs_per_s" in s else None),
                             "kib_per_device": round(s["rss_kib_max"] / n, 2),
                             "kib_per_device_marginal": round((s["rss_kib_max"] - s["rss_kib_idle"]) / n, 2),
                             # resident memory and the kernel's for its sockets (BENCH-PROFILE)
                             "kernel_socket_kib_per_device": round(kernel / n, 2) if kernel is not None else None,
                             "kib_per_device_with_kernel": (round((s["rss_kib_max"] + kernel) / n, 2)
                                                            if kernel is not None else None),
                             "kib_per_device_marginal_with_kernel": (
                                 round((s["rss_kib_max"] - s["rss_kib_idle"] + kernel) / n, 2)
                                 if kernel is not None else None),
                             # the gateway's event loop (nginx has none to read)
                             "loop_lag_max_ms": lag.get("max_ms_window"),
                             "loop_lag_max_ms_run": lag.get("max_ms_run"),
                             "gc_gen2_in_window": lag.get("gc_gen2_in_window"),
                             "cpu_share": s["cpu_share"], "kernel_cpu_share": s.get("kernel_cpu_share"),
                             "rss_mib": round(s["rss_kib_max"] / 1024, 1),
                             # what the memory bound judges: the processes' memory, shared pages once
                             "pss_mib": round(s["pss_kib_max"] / 1024, 1) if s.get("pss_kib_max") else None,
                             "pss_kib_per_device": (round(s["pss_kib_max"] / n, 2) if s.get("pss_kib_max")
                                                    else None),
                             "pss_kib_per_device_with_kernel": (
                                 round((s["pss_kib_max"] + kernel) / n, 2)
                                 if s.get("pss_kib_max") and kernel is not None else None),
                             "held_to_cores": held, "devices_per_core": round(n / held),
                             "cgroup": s.get("cgroup")}
    for name, p in paths.items():
        ld = p["load"]
        metrics.setdefault("load", {})[name] = {
            "cpu_share": ld["cpu_share"], "kernel_cpu_share": ld.get("kernel_cpu_share"),
            # the fleet and simulator shards' own cost, counted as the gateway's is
            # (window CPU over simulated device-hours); issue 11 wants it <= 1/3 of the gateway's
            "cpu_s_per_device_hour": (round(ld["cpu_share"] * p["window_s"] / (n * hours), 6)
                                      if hours and "window_s" in p else None),
            "us_per_request_whole_run": (round(1e6 * ld["cpu_s_total"] / p["requests_total"])
                                         if p.get("requests_total") and "cpu_s_total" in ld else None),
            # a straight-line projection, not a measurement: where the load core hits 80%
            "projected_devices_at_80pct": int(n * 0.8 / ld["cpu_share"]) if ld["cpu_share"] else None}
    if "gateway" in metrics and metrics["gateway"]["cpu_share"]:
        metrics["gateway"]["projected_devices_at_80pct_cpu"] = int(n * SLO_CPU_SHARE / metrics["gateway"]["cpu_share"])
        # Each device's share, and the idle worker each shard's worth of devices adds (one
        # per shard, as plan_shards cuts them): more devices need more workers. Still a
        # straight line: a worker's device snapshot and cache grow with the fleet.
        mem, idle, _ = resident(paths["gateway"]["server"])
        idle_per_worker = idle / shards_for(n, opts)
        per_device = (mem - idle) / n + idle_per_worker / shard_size(opts)
        metrics["gateway"]["idle_kib_per_worker"] = round(idle_per_worker)
        metrics["gateway"]["projected_devices_at_2GiB"] = int(SLO_RSS_KIB / per_device) if per_device > 0 else None
    if ("gateway" in metrics and metrics.get("load", {}).get("gateway", {}).get("cpu_s_per_device_hour")
            and metrics["gateway"]["cpu_s_per_device_hour"]):
        metrics["load_cpu_vs_gateway"] = round(metrics["load"]["gateway"]["cpu_s_per_device_hour"]
                                               / metrics["gateway"]["cpu_s_per_device_hour"], 3)
        # The floor under that ratio: the load side's kernel time alone (its sockets' system
        # calls, and on loopback the receiving end's TCP path its sends carry), which no
        # user-space work on the load side can take away.
        lk, gs = metrics["load"]["gateway"].get("kernel_cpu_share"), metrics["gateway"]["cpu_share"]
        if lk is not None and gs:
            metrics["load_kernel_cpu_vs_gateway"] = round(lk / gs, 3)
    if "gateway" in metrics and "nginx" in metrics and metrics["nginx"]["cpu_s_per_device_hour"]:
        metrics["gateway_cpu_vs_nginx"] = round(metrics["gateway"]["cpu_s_per_device_hour"]
                                                / metrics["nginx"]["cpu_s_per_device_hour"], 2)
    if "gateway" in metrics and "nginx" in metrics and metrics["nginx"]["wakeups_per_device_hour"] \
            and metrics["gateway"]["wakeups_per_device_hour"] is not None:
        metrics["gateway_wakeups_vs_nginx"] = round(metrics["gateway"]["wakeups_per_device_hour"]
                                                    / metrics["nginx"]["wakeups_per_device_hour"], 2)
    speeds = {name: p["speed_ms"] for name, p in paths.items() if p.get("speed_ms")}
    if speeds:
        metrics["speed_ms"] = speeds       # sim/speed's loop per core, median of the window
    invalid = undriven + unmeasured + claimless
    meets = bool(gw) and not broke and not invalid
    return {"devices": n, "held_to_cores": held, "meets": meets, "broke": broke, "invalid": invalid,
            "undriven": undriven, "unmeasured": unmeasured, "claimless": claimless, "caveats": caveats,
            "added_latency_ms": added, "metrics": metrics}


async def run_point(opts: Options, say) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"seg-sizing-{opts.devices}-"))
    point = {"devices": opts.devices, "paths": {}}
    try:
        for path in opts.paths:
            say(f"[N={opts.devices}] {path}: starting")
            point["paths"][path] = await run_path(path, opts, workdir, say)
            p = point["paths"][path]
            say(f"[N={opts.devices}] {path}: {p['requests_total']} requests, "
                f"{sum(p['failures'].values())} failures, server cpu "
                f"{100 * p['server']['cpu_share']:.1f}% (kernel {100 * p['server']['kernel_cpu_share']:.1f}%), "
                f"rss {p['server']['rss_kib_max'] / 1024:.0f} MiB, load cpu {100 * p['load']['cpu_share']:.0f}% "
                f"(kernel {100 * p['load']['kernel_cpu_share']:.0f}%)")
            late = sorted(ms for d in p.get("late_raw", {}).values() for ms in d.values())
            say(f"[N={opts.devices}] {path}: the load side's own read delay in the window's requests: "
                f"p99 {percentile(late, 0.99):.1f} ms, p99.9 {percentile(late, 0.999):.1f} ms")
    finally:
        if opts.keep:
            say(f"[N={opts.devices}] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    point["verdict"] = judge(point, opts)
    for name, a in point["verdict"].get("added_latency_ms", {}).items():
        net = a.get("net_of_load_side", {}).get("classes", {})
        say(f"[N={opts.devices}] {name}: added p99 / p99.9 ms, as judged (net of the load side's read delays): "
            + ", ".join(f"{c} {v['p99']:.1f} / {v['p999']:.1f} ({net[c]['p99']:.1f} / {net[c]['p999']:.1f})"
                        for c, v in a["classes"].items() if c in net))
    return point


# Figures where the larger value is the worse one (quoted from the worse run).
_LOWER_IS_WORSE = ("projected_devices_at_80pct_cpu", "projected_devices_at_2GiB", "projected_devices_at_80pct")


def _worse(a, b, key: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: (_worse(a[k], b[k], k) if k in b else a[k]) for k in a} | {k: b[k] for k in b if k not in a}
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return min(a, b) if key in _LOWER_IS_WORSE else max(a, b)
    return a if a is not None else b


def run_record(i: int, run: dict) -> dict:
    """One run's own verdict with what a reader checks it against (requests,
    failures, the host's speed per path; the tree and time that measured it), so the
    summary keeps every run, not only the worse one's figures."""
    paths = {name: {"requests": p["requests_total"], "failures": sum(p["failures"].values()),
                    "speed_ms": p["speed_ms"], "window_s": p["window_s"]} for name, p in run["paths"].items()}
    return {"run": i + 1} | run["verdict"] | {"paths": paths} | {k: run[k] for k in ("measured",) if k in run}


def combine(runs: list[dict], repeat: int) -> dict:
    """One point's verdict over its runs (repeatability): it meets only if ``repeat``
    runs were made and every one met the service level; figures are the worse of
    the runs (the README quotes the lower capacity), and ``each_run`` keeps every
    run's own."""
    verdicts = [r["verdict"] for r in runs]
    tag = (lambda i: f"run {i + 1}: ") if len(runs) > 1 else (lambda i: "")
    tagged = lambda key: [tag(i) + x for i, v in enumerate(verdicts) for x in v.get(key, [])]
    broke, undriven, unmeasured, caveats = tagged("broke"), tagged("undriven"), tagged("unmeasured"), tagged("caveats")
    claimless = list(verdicts[0].get("claimless", []))     # the options: the same in every run
    if len(runs) < 2 and not broke and not undriven + unmeasured + claimless:
        claimless.append("a single run: a claim needs two runs that both meet the service level (--repeat 2)")
    if len(runs) < repeat and not broke and not undriven + unmeasured + claimless:
        claimless.append(f"{len(runs)} of {repeat} runs made")
    invalid = undriven + unmeasured + claimless
    added, metrics = verdicts[0]["added_latency_ms"], verdicts[0]["metrics"]
    for v in verdicts[1:]:
        added, metrics = _worse(added, v["added_latency_ms"]), _worse(metrics, v["metrics"])
    return {"devices": runs[0]["devices"], "held_to_cores": verdicts[0].get("held_to_cores", 1.0),
            "runs": len(runs),
            "meets": all(v["meets"] for v in verdicts) and not broke and not invalid,
            "broke": broke, "invalid": invalid, "undriven": undriven, "unmeasured": unmeasured,
            "claimless": claimless, "caveats": caveats,
            "runs_meet": [v["meets"] for v in verdicts],
            "added_latency_ms": added, "metrics": metrics,
            "each_run": [run_record(i, r) for i, r in enumerate(runs)]}


def run_kept(run: dict) -> dict:
    """What another session needs of a finished run to finish its point (``combine``,
    ``run_record``): its verdict, per path the counts a reader checks it against, and
    the tree and time that measured it."""
    return {"devices": run["devices"], "verdict": run["verdict"], "measured": run["measured"],
            "paths": {name: {k: p[k] for k in ("requests_total", "failures", "speed_ms", "window_s")}
                      for name, p in run["paths"].items()}}


async def measure(opts: Options, say, done: list[dict] = (), on_run=None) -> dict:
    """One point: up to ``opts.repeat`` runs at N; a run that misses ends it early
    (the claim is lost either way). ``done``: runs an interrupted session finished at
    this point (``run_kept``), taken as they are; ``on_run(kept)`` is given every run
    finished so far while the point still needs another (a run is half an hour at
    60,000 devices: a session that ends in the second keeps the first)."""
    runs = list(done)
    while len(runs) < max(1, opts.repeat) and (not runs or runs[-1]["verdict"]["meets"]):
        if opts.repeat > 1:
            say(f"[N={opts.devices}] run {len(runs) + 1} of {opts.repeat}")
        runs.append(await run_point(opts, say) | {"measured": measured_now()})
        if on_run is not None and runs[-1]["verdict"]["meets"] and len(runs) < opts.repeat:
            on_run([run_kept(r) for r in runs])
    return {"devices": opts.devices, "verdict": combine(runs, opts.repeat),
            "runs": [strip_raw(r) for r in runs]}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def measured_now() -> dict:
    """Which tree measured a point, and when: a resumed search's points span sessions."""
    return {"commit": _git("describe", "--always", "--dirty"),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the commit measured; "-dirty" when the tree had uncommitted changes
    # the interpreter's build matters, not only its version: on Debian's python3 (the README's
    # venv on Debian) the gateway took 7-14% less CPU per connection than on a --enable-shared build
    return {"cpu": model, "cores": os.cpu_count(), "python": sys.version.split()[0],
            "python_executable": os.path.realpath(sys.executable),
            "commit": _git("describe", "--always", "--dirty"), "commit_full": _git("rev-parse", "HEAD"),
            "kernel": os.uname().release, "autogroup": autogroup_of(),
            # how long a real-time worker runs before a ready peer gets the core (--realtime)
            "sched_rr_timeslice_ms": rr_timeslice_ms(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            # settings the gateway took from the environment over its config (an A/B's knob)
            "settings_from_env": settings_from_env()}


def settings_from_env() -> dict[str, str]:
    found = env_overrides(os.environ)
    return {dotted: os.environ[var] for dotted, (_s, _k, var) in sorted(found.items()) if dotted != "state_dir"}


def headline(points: list[dict], security: str) -> dict:
    good = [p for p in points if p["verdict"]["meets"]]
    per_core = lambda p: round(p["devices"] / p["verdict"].get("held_to_cores", 1.0))
    best = max(good, key=per_core, default=None)
    out = {"security": security, "best_devices_per_core": per_core(best) if best else None,
           "devices_per_2_cores": 2 * per_core(best) if best else None,
           "held_to_cores": best["verdict"].get("held_to_cores", 1.0) if best else None,
           "best_devices_driven": best["devices"] if best else None,
           "vendor_v2_per_2_cores": 2 * VENDOR["v2"][security],
           "vendor_classic_per_2_cores": 2 * VENDOR["classic"][security],
           "goal_per_core": GOAL[security]}
    if best:
        out.update(best["verdict"]["metrics"].get("gateway", {}))
    # what broke first: the smallest N that failed, and why
    bad = sorted((p for p in points if not p["verdict"]["meets"]), key=lambda p: p["devices"])
    if bad:
        v = bad[0]["verdict"]
        out["first_limit"] = {"devices": bad[0]["devices"], "broke": v["broke"], "invalid": v["invalid"]}
    return out


def plot(points: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # x: devices per core (N/F for a point held to a fraction F; N on a whole core)
    held = lambda p: p["verdict"].get("held_to_cores", 1.0)
    pts = sorted(points, key=lambda p: p["devices"] / held(p))
    xs = [round(p["devices"] / held(p)) for p in pts]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, style in (("gateway", "-o"), ("nginx", "--s")):
        if not all(name in p["verdict"]["added_latency_ms"] for p in pts):
            continue
        for q, alpha in (("p99", 0.6), ("p999", 1.0)):
            ys = [max((v[q] for v in p["verdict"]["added_latency_ms"][name]["classes"].values()), default=0)
                  for p in pts]
            ax1.plot(xs, ys, style, alpha=alpha, label=f"{name} paired {q} (worst class)")
    ax1.axhline(SLO_ADDED_P99_MS, color="red", lw=0.8, label="SLO p99 50 ms")
    ax1.axhline(SLO_ADDED_P999_MS, color="darkred", lw=0.8, ls="--", label="SLO p99.9 100 ms")
    ax1.set(xlabel="devices per core", ylabel="added latency, ms", title="latency added per request (worse run)")
    ax1.legend(fontsize=7)
    for name, style in (("gateway", "-o"), ("nginx", "--s")):
        ys = [100 * p["verdict"]["metrics"][name]["cpu_share"] / held(p) for p in pts
              if name in p["verdict"]["metrics"]]
        if len(ys) == len(xs):
            ax2.plot(xs, ys, style, label=name)
    ax2.axhline(100 * SLO_CPU_SHARE, color="red", lw=0.8, label="SLO 80%")
    ax2.set(xlabel="devices per core", ylabel="% of its allowance", title="proxy CPU (of the core or fraction held to)")
    ax2.legend(fontsize=7)
    for name, style in (("gateway", "-o"), ("nginx", "--s")):
        ys = [p["verdict"]["metrics"][name]["rss_mib"] for p in pts if name in p["verdict"]["metrics"]]
        if len(ys) == len(xs):
            ax3.plot(xs, ys, style, label=name)
    ax3.set(xlabel="devices per core", ylabel="MiB resident", title="proxy memory (at the devices driven)")
    ax3.legend(fontsize=7)
    for p in pts:
        if not p["verdict"]["meets"]:
            for ax in (ax1, ax2, ax3):
                ax.axvline(round(p["devices"] / held(p)), color="grey", lw=0.5, ls=":")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def strip_raw(point: dict) -> dict:
    """The JSON keeps summaries, not every request's latency."""
    out = dict(point)
    raw = ("latency_raw", "fetch_sizes", "timing_raw", "late_raw")
    out["paths"] = {k: {kk: vv for kk, vv in v.items() if kk not in raw} for k, v in point["paths"].items()}
    return out


# The cgroup cross-check: N devices at a fraction F of core 0 and 2N at 2F; the
# per-core figures of the two points must agree within CROSSCHECK_TOLERANCE.
CROSSCHECK_FRACTION = 0.5          # a bare --cgroup-check
CROSSCHECK_TOLERANCE = 0.10


def crosscheck_plan(fraction: float) -> list[tuple[float, int]]:
    """(fraction of core 0, multiple of N) of the cross-check's two points."""
    return [(fraction, 1), (2 * fraction, 2)]


def crosscheck(points: list[dict]) -> dict:
    """Two points of the same gateway held to different fractions f of a core with
    N proportional to f. Linear scaling and an honest limit give the same gateway
    CPU per device-hour (the same projected devices per core) at both; the N/f
    per-core claim stands only when both meet the service level and they agree."""
    rows = []
    for p in points:
        v = p["verdict"]
        g = v["metrics"].get("gateway", {})
        held = v.get("held_to_cores", 1.0)
        rows.append({"devices": p["devices"], "held_to_cores": held, "meets": v["meets"], "kind": search_step(v),
                     "reasons": v.get("claimless", []) + v.get("undriven", []) + v.get("unmeasured", []),
                     "devices_per_core": round(p["devices"] / held),
                     "cpu_s_per_device_hour": g.get("cpu_s_per_device_hour"),
                     "cpu_share_of_allowance": round(g["cpu_share"] / held, 4) if g.get("cpu_share") else None,
                     "projected_devices_per_core_at_80pct": g.get("projected_devices_at_80pct_cpu"),
                     "cgroup": g.get("cgroup")})
    costs = [r["cpu_s_per_device_hour"] for r in rows]
    spread = (round(abs(costs[0] - costs[1]) / max(costs), 4)
              if len(costs) == 2 and all(costs) else None)
    agree = spread is not None and spread <= CROSSCHECK_TOLERANCE
    why = []
    if spread is None:
        why.append("the gateway's CPU per device-hour was not measured at both fractions")
    elif not agree:
        why.append(f"gateway CPU per device-hour differs by {100 * spread:.1f}% between the fractions "
                   f"(> {100 * CROSSCHECK_TOLERANCE:.0f}%)")
    for r in rows:
        if not r["meets"]:
            said = {"broke": "missed the service level", "passes": "met the service level but claims nothing",
                    "undriven": "was not driven: the load side's limit", "unmeasured": "was not measured"}[r["kind"]]
            why.append(f"{r['devices']} devices at {r['held_to_cores']:g} core {said}"
                       + (f" ({'; '.join(r['reasons'])})" if r["kind"] != "broke" else ""))
    claim = min(r["devices_per_core"] for r in rows) if agree and not why else None
    return {"fractions": [r["held_to_cores"] for r in rows], "devices_driven": [r["devices"] for r in rows],
            "points": rows, "cpu_spread": spread, "tolerance": CROSSCHECK_TOLERANCE, "agree": agree,
            "devices_per_core": claim, "why_not": why}


# -- the search: devices per core, each point driving per_core * F --------------------

def driven(per_core: int, fraction: float) -> int:
    """Devices a point drives to stand for ``per_core`` on a proxy held to ``fraction``."""
    return max(1, round(per_core * fraction))


VERDICT_SAID = {"meets": "MEETS the service level", "passes": "meets the service level, claims nothing",
               "broke": "misses the service level", "undriven": "was not driven: the load side's limit",
               "unmeasured": "was not measured"}


def search_step(v: dict) -> str:
    """What a point's verdict means to the search: "meets"; "passes" (it met the
    service level, but the run's options claim nothing: a development run walks on);
    "broke" (the gateway missed it); "undriven" (the load side could not drive it: the
    search bisects below it, as below a miss, for the largest point the load side can
    drive, and says the load side stopped it) or "unmeasured" (the measurement is missing
    or wrong: the search stops there, since nothing below it is known to measure better)."""
    if v["meets"]:
        return "meets"
    if v.get("undriven"):
        return "undriven"
    if v.get("unmeasured"):
        return "unmeasured"
    return "broke" if v["broke"] else "passes"


def stop_reason(step: str, per_core: int, n: int, fraction: float, v: dict) -> dict:
    """Why the search went no higher than ``per_core`` (``n`` devices driven)."""
    at = f"{per_core} devices per core ({n} driven at {fraction:g} core)"
    why = {"broke": ("gateway", f"the gateway missed the service level at {at}", v.get("broke", [])),
           "undriven": ("load side", f"the load side could not drive {at}", v.get("undriven", [])),
           "unmeasured": ("measurement", f"{at} was not measured", v.get("unmeasured", []))}[step]
    stop = {"by": why[0], "devices_per_core": per_core, "devices_driven": n, "held_to_cores": fraction,
            "said": why[1], "why": why[2]}
    if step == "undriven":
        # what the load side cost against the gateway there, and the part of it no user-space
        # work on the load side can remove (its kernel time): how far a cheaper load side
        # could carry the search on this machine
        m = v.get("metrics") or {}
        stop["load_cpu_vs_gateway"] = m.get("load_cpu_vs_gateway")
        stop["load_kernel_cpu_vs_gateway"] = m.get("load_kernel_cpu_vs_gateway")
    return stop


# how far below its start a search whose first point missed goes looking for one that meets
# (halving: to 1/64 of the start)
HALVINGS = 6


async def search_walk(opts: Options, max_per_core: int, at, say) -> dict:
    """The largest devices per core meeting the service level: from ``opts.devices``
    per core, doubling up to ``max_per_core`` (or, when the start itself misses, halving
    until a point meets, at most ``HALVINGS`` times), then bisecting to a tenth below the
    first point the gateway missed or the load side could not drive (issue 10 asks for the
    largest N the instrument can drive, which may lie below that point); every point
    drives per_core * F devices (F: ``opts.cgroup_fraction``, 1 without a limit).
    ``at(n)`` measures n driven devices. Returns where and why it stopped: at the lowest
    point above the largest met, by what stopped that point."""
    f = opts.cgroup_fraction or 1.0
    lo, hi, stop = 0, None, None

    async def step(per_core: int) -> tuple[str, int, dict | None]:
        n = driven(per_core, f)
        v = (await at(n))["verdict"]
        kind = search_step(v)
        return kind, round(n / f), (None if kind in ("meets", "passes") else stop_reason(kind, round(n / f), n, f, v))

    async def narrow(per_core: int) -> bool:
        """A point below ``hi``: it raises ``lo`` or lowers ``hi``; False when it ends the walk."""
        nonlocal lo, hi, stop
        kind, pc_done, why = await step(per_core)
        if why is None:
            lo = pc_done
        elif kind in ("broke", "undriven"):
            hi, stop = pc_done, why
        else:
            stop = why                  # unmeasured: nothing below it is known to measure better
            return False
        return True

    pc = opts.devices
    while hi is None and pc <= max_per_core:
        kind, pc_done, why = await step(pc)
        if why is None:
            lo, pc = pc_done, pc * 2
        else:
            stop = why
            hi = pc_done if kind in ("broke", "undriven") else lo     # unmeasured: not bisected
    for _ in range(HALVINGS):
        if lo or not hi or hi // 2 < 1 or not await narrow(hi // 2):
            break
    if hi is None:
        hi = max_per_core
        stop = {"by": "bound", "devices_per_core": max_per_core, "devices_driven": driven(max_per_core, f),
                "held_to_cores": f, "said": f"the search's bound, --max-devices {max_per_core} per core",
                "why": []}
    while lo and hi - lo > max(500, lo // 10):
        if not await narrow((lo + hi) // 2):
            break
    stop["largest_met_per_core"] = lo or None
    say(f"search stopped: {stop['said']}" + "".join(f"\n    {w}" for w in stop["why"])
        + (f"\n    largest met: {lo} devices per core ({driven(lo, f)} driven)" if lo else
           "\n    no point met the service level"))
    return stop


async def bench(opts: Options, search: bool, max_devices: int, say, cgroup_check: float = 0.0,
                on_point=None, earlier: list[dict] | None = None, pending: dict | None = None) -> dict:
    """One point (N = opts.devices driven), a search (``max_devices`` and opts.devices
    per core) or, with ``cgroup_check`` = F, the cross-check (N at F and 2N at 2F).
    ``on_point(report)`` is given the report so far after each point (a search runs for
    hours: what it measured survives an interruption). ``earlier``: points an interrupted
    run of the same options measured (``resumable``); the walk, which depends only on the
    verdicts, takes each again where it comes to it instead of measuring it. ``pending``:
    the point it was measuring, with the runs it had finished there (``on_point`` is also
    given the report after each such run, under "pending"); that point takes them and
    makes only the runs it lacks."""
    points: list[dict] = []
    known = {(p["devices"], p["verdict"].get("held_to_cores", 1.0)): p for p in earlier or []}
    now: dict = {"pending": None}

    def report_so_far() -> dict:
        return {"machine": machine(), "options": msgspec.to_builtins(opts), "when": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "headline": headline(points, opts.security), "points": points} | (
            {"pending": now["pending"]} if now["pending"] else {})

    def on_run(n: int, held: float, kept: list[dict]) -> None:
        now["pending"] = {"devices": n, "held_to_cores": held, "runs": kept}
        if on_point is not None:
            on_point(report_so_far())

    async def at(n: int, fraction: float | None = None) -> dict:
        o = msgspec.structs.replace(opts, devices=n)
        if fraction is not None:
            o = msgspec.structs.replace(o, cgroup_fraction=fraction)
        held = o.cgroup_fraction or 1.0
        p = known.pop((n, held), None)
        if p is None:
            done = []
            if pending and (pending["devices"], pending["held_to_cores"]) == (n, held):
                done = pending["runs"]
                say(f"[N={n}] " + ", ".join(f"run {i + 1} met (measured earlier: {r['measured']['commit']}, "
                                            f"{r['measured']['when']})" for i, r in enumerate(done)))
            p = await measure(o, say, done=done, on_run=lambda kept: on_run(n, held, kept))
            p["measured"] = measured_now()
            now["pending"] = None
            if (moved := host_caveat(p, points)) is not None:
                p["verdict"]["caveats"].append(moved)
            earlier_said = ""
        else:
            earlier_said = f" (measured earlier: {p['measured']['commit']}, {p['measured']['when']})"
        v = p["verdict"]
        per_core = f" ({round(n / held)} per core at {held:g} core)" if held != 1.0 else ""
        say(f"[N={n}]{per_core} {VERDICT_SAID[search_step(v)]}{earlier_said}"
            + "".join(f"\n    broke: {b}" for b in v["broke"])
            + "".join(f"\n    not a measurement: {x}" for x in v["invalid"])
            + "".join(f"\n    caveat: {x}" for x in v["caveats"]))
        points.append(p)
        if on_point is not None:
            on_point(report_so_far())
        return p

    cross = stop = None
    if cgroup_check:
        plan = crosscheck_plan(cgroup_check)
        pair = [await at(opts.devices * k, f) for f, k in plan]
        cross = crosscheck(pair)
        say(f"cgroup cross-check ({' and '.join(f'{opts.devices * k} at {f:g} core' for f, k in plan)}): "
            "gateway CPU per device-hour "
            + ("agrees" if cross["agree"] else "does not agree")
            + (f" (spread {100 * cross['cpu_spread']:.1f}%)" if cross["cpu_spread"] is not None else "")
            + (f"; CLAIM {cross['devices_per_core']} devices per core" if cross["devices_per_core"]
               else "; no claim")
            + "".join(f"\n    {w}" for w in cross["why_not"]))
    elif not search:
        await at(opts.devices)
    else:
        stop = await search_walk(opts, max_devices, at, say)
    report = report_so_far()
    head = report["headline"]
    if cross is not None:
        # the cross-check claims only what both fractions agree on
        head["best_devices_per_core"] = cross["devices_per_core"]
        head["devices_per_2_cores"] = 2 * cross["devices_per_core"] if cross["devices_per_core"] else None
        head["best_devices_driven"] = cross["devices_driven"][0] if cross["devices_per_core"] else None
        head["cgroup_crosscheck"] = {k: cross[k] for k in
                                     ("fractions", "devices_driven", "agree", "cpu_spread", "why_not")}
        report["crosscheck"] = cross
    if stop is not None:
        head["search_stop"] = stop | bracket_hosts(points, stop)
        if "caveat" in head["search_stop"]:
            say(f"    caveat: {head['search_stop']['caveat']}")
    return report


def bracket_hosts(points: list[dict], stop: dict) -> dict:
    """The host's speed at the two points that bound a search's answer (the largest met and
    the one that stopped it), and a caveat when they differ: a bracket measured on two
    machines says less about the gateway than about the host."""
    def at(per_core: int | None) -> float | None:
        for p in reversed(points):
            if per_core and round(p["devices"] / p["verdict"].get("held_to_cores", 1.0)) == per_core:
                return point_host_ms(p["verdict"])
        return None

    met, stopped = at(stop.get("largest_met_per_core")), at(stop.get("devices_per_core"))
    out: dict = {"host_ms": {"largest_met": met and round(met, 2), "stopped_at": stopped and round(stopped, 2)}}
    if met is not None and stopped is not None and host_moved(stopped, met) > SPEED_DRIFT_NOTED:
        out["caveat"] = (f"the point that stopped the search ran sim/speed's loop in {stopped:.1f} ms, the largest "
                         f"met in {met:.1f} ms ({100 * host_moved(stopped, met):.0f}% apart): its bound was "
                         "measured on another machine than its answer")
    return out


def security_available() -> bool:
    try:
        import importlib
        importlib.import_module("seg_fast.policy.cli")
        return True
    except ImportError:
        return False


def arg_errors(a: argparse.Namespace) -> list[str]:
    """What is wrong with the options' fractions and bounds (before anything runs)."""
    out = []
    lowest = MIN_QUOTA_US / PERIOD_US
    if a.cgroup_fraction and not lowest <= a.cgroup_fraction <= 1.0:
        out.append(f"--cgroup-fraction {a.cgroup_fraction:g} is out of range ({lowest:g}..1 of the "
                   "gateway's one core)")
    if a.cgroup_check:
        if not lowest <= a.cgroup_check:
            out.append(f"--cgroup-check {a.cgroup_check:g} is below {lowest:g} of a core")
        if 2 * a.cgroup_check > 1.0:
            out.append(f"--cgroup-check {a.cgroup_check:g}: its second point, 2N at {2 * a.cgroup_check:g} "
                       "core, would need more than the gateway's one core (2F <= 1)")
        if a.cgroup_fraction or a.search:
            out.append("--cgroup-check picks its own fractions (N at F, 2N at 2F); it takes no "
                       "--cgroup-fraction or --search")
    if a.devices < 1:
        out.append(f"--devices {a.devices}: at least 1")
    if a.resume and not a.search:
        out.append(f"--resume {a.resume}: only a search goes on from an earlier one (--search)")
    if a.search and a.max_devices < a.devices:
        out.append(f"--max-devices {a.max_devices} is below --devices {a.devices} (both per core with --search)")
    wrong = [side for side in a.realtime.split(",") if side and side not in ("gateway", "load")]
    if wrong:
        out.append(f"--realtime {a.realtime}: {', '.join(wrong)} is not a side (gateway, load)")
    if "gateway" in a.realtime.split(",") and (a.cgroup_fraction or a.cgroup_check):
        # cpu.max is CFS bandwidth: it does not hold real-time tasks to a fraction
        out.append("--realtime gateway: a cgroup's CPU limit does not apply to real-time processes")
    if a.rr_timeslice_ms and not a.realtime:
        out.append(f"--rr-timeslice-ms {a.rr_timeslice_ms}: the slice is the real-time policy's; it needs --realtime")
    if not 0 <= a.rr_timeslice_ms <= 1000:
        out.append(f"--rr-timeslice-ms {a.rr_timeslice_ms}: 1 to 1000 (0: leave the kernel's)")
    return out


_RERUN = "import sys; from seg_fast.sim.sizing import cli; sys.exit(cli(sys.argv[1:]))"


def in_own_session(argv: list[str], code: str = _RERUN) -> int:
    """Run this same command as the leader of a new session (a new autogroup, whose nice it then
    sets): setsid(2) is refused to a process-group leader, as a shell makes every command it
    starts. SIGINT and SIGTERM are passed on (a terminal's Ctrl-C no longer reaches the
    session); the exit status is the run's."""
    child = subprocess.Popen([sys.executable, "-c", code, *argv], start_new_session=True)
    passed = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum))
              for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = child.wait()
                return 128 - rc if rc < 0 else rc      # killed by a signal: as a shell reports it
            except InterruptedError:
                continue
    finally:
        for sig, old in passed.items():
            signal.signal(sig, old)


def cli(argv: list[str]) -> int:
    if not argv or argv[0] != "sizing":
        help_asked = argv[:1] in (["-h"], ["--help"])
        print("usage: seg-fast bench sizing [--devices N] [--search] [--hold S] ...\n"
              "  sizing   devices per core at the BENCH-PROFILE service level (seg-fast bench sizing --help)",
              file=sys.stdout if help_asked else sys.stderr)
        return 0 if help_asked else 2
    from seg_fast.sim import fleet_sogo
    if fleet_sogo.wanted(argv[1:]):   # a small correctness run against a real SOGo (its own options)
        return fleet_sogo.cli(argv[1:])
    ap = argparse.ArgumentParser(prog="seg-fast bench sizing",
                                 description="devices per core at the BENCH-PROFILE service level")
    ap.add_argument("--devices", type=int, default=1000,
                    help="N driven (with --search: devices per core where it starts)")
    ap.add_argument("--search", action="store_true",
                    help="find the largest devices per core meeting the service level (with "
                         "--cgroup-fraction F each point drives per-core x F devices)")
    ap.add_argument("--max-devices", type=int, default=200_000, help="--search's bound, devices per core")
    ap.add_argument("--resume", metavar="REPORT", default="",
                    help="--search: go on from the points an interrupted search of the same options "
                         "measured (its ...partial.json, summary or report); they are not measured again, nor the "
                         "finished runs of the point it was measuring")
    ap.add_argument("--hold", type=float, default=120.0, help="measured steady state, s (>=120 for a claim)")
    ap.add_argument("--ramp", type=float, default=0.0, help=f"ramp-up, s (0: N/{RAMP_RATE:.0f})")
    ap.add_argument("--settle", type=float, default=-1.0, help="s between ramp and hold (<0: ramp/8, 5..60)")
    ap.add_argument("--drain", type=float, default=30.0, help="after the hold: in-flight work may finish")
    ap.add_argument("--paths", default="direct,gateway,nginx")
    ap.add_argument("--security", choices=("off", "on"), default="off")
    ap.add_argument("--shard-size", type=int, default=8000,
                    help="devices per fleet process and per gateway worker (2 fds each)")
    ap.add_argument("--nofile", type=int, default=0, metavar="N",
                    help="descriptors per process for every process of the run (raised by the harness: "
                         "needs root), so --shard-size can put more devices in one gateway worker")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for all processes of the run, and for the run's scheduler autogroup: "
                         "the run leads a session of its own (e.g. -10 on a shared machine)")
    ap.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                    help="devices speak TLS 1.3 to the gateway, nginx and the direct simulator")
    ap.add_argument("--upstream-tls", action=argparse.BooleanOptionalAction, default=False,
                    help="the gateway and nginx reach the simulator at https:// (verified), as a real mail server")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per point; a claim needs two that both meet the service level")
    ap.add_argument("--cgroup-fraction", type=float, default=0.0,
                    help="also hold the proxy to this fraction of its core with a cgroup CPU limit "
                         "(N devices then stand for N/f per core)")
    ap.add_argument("--cgroup-check", type=float, nargs="?", const=CROSSCHECK_FRACTION, default=0.0,
                    metavar="F",
                    help=f"cross-check: N at F core and 2N at 2F core (cgroup; F {CROSSCHECK_FRACTION:g} "
                         "when not given, 2F <= 1); the N/F per-core claim needs both to meet the service "
                         f"level and their CPU per device-hour to agree within {100 * CROSSCHECK_TOLERANCE:.0f}%%")
    ap.add_argument("--slice-us", type=int, default=0,
                    help="every process's scheduler time slice, µs (Linux 6.12+; 0: the kernel's)")
    ap.add_argument("--realtime", default="", metavar="SIDES",
                    help="gateway, load or both (comma-separated): that side's processes run under the "
                         "real-time round-robin policy at priority 1 (the gateway by its own "
                         "limits.realtime_priority; needs CAP_SYS_NICE)")
    ap.add_argument("--rr-timeslice-ms", type=int, default=0, metavar="MS",
                    help="with --realtime: the kernel's round-robin slice for the run "
                         "(kernel.sched_rr_timeslice_ms, machine-wide, put back after; needs root)")
    ap.add_argument("--rate-scale", type=float, default=1.0, help="development only: compress time")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep configs and proxy logs")
    ap.add_argument("--load-steps", action="store_true",
                    help="the fleet shards name their slow loop steps in their results (costs them ~10%% of their CPU)")
    ap.add_argument("--upstream", choices=("sim", "sogo"), default="sim",
                    help="sogo: a correctness run against a real SOGo, not a capacity figure "
                         "(seg-fast bench sizing --upstream sogo --help)")
    a = ap.parse_args(argv[1:])
    for err in arg_errors(a):
        print(f"seg-fast bench sizing: {err}", file=sys.stderr)
        return 2
    # every process the run starts inherits it
    if a.nofile and raise_nofile_limit(a.nofile) < a.nofile:
        print(f"seg-fast bench sizing: --nofile {a.nofile}: the descriptor limit cannot be raised that far "
              f"(it is {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}; raising it needs root, and "
              "/proc/sys/fs/nr_open caps it)", file=sys.stderr)
        return 2
    if a.security == "on" and not security_available():
        print("seg-fast bench sizing: --security on needs `seg-fast policy load`, "
              "which is not in this tree yet", file=sys.stderr)
        return 2
    if a.nice and autogroup_enabled():
        # --nice ranks the run's processes among themselves; against the machine's other
        # sessions and kernel threads their autogroup (one per session) is what weighs.
        if os.getsid(0) != os.getpid():
            return in_own_session(argv)
        why = set_autogroup_nice(a.nice)
        if why:
            print(f"seg-fast bench sizing: --nice {a.nice}: the run's autogroup: {why}", file=sys.stderr)
            return 2
    if a.upstream_tls and not a.tls:
        print("seg-fast bench sizing: --upstream-tls needs --tls (the simulator's TLS listener)", file=sys.stderr)
        return 2
    if a.cgroup_fraction or a.cgroup_check:
        found = find_cpu_controller()
        if isinstance(found, str):
            print(f"seg-fast bench sizing: no cgroup CPU control here: {found}", file=sys.stderr)
            return 2
    opts = Options(devices=a.devices, hold=a.hold, ramp=a.ramp, settle=a.settle, drain=a.drain,
                   paths=[p for p in a.paths.split(",") if p], security=a.security,
                   shard_size=a.shard_size, repeat=a.repeat, tls=a.tls, upstream_tls=a.upstream_tls,
                   rate_scale=a.rate_scale, seed=a.seed, quiet=a.quiet, keep=a.keep, load_steps=a.load_steps,
                   nice=a.nice,
                   cgroup_fraction=a.cgroup_fraction, slice_us=a.slice_us, nofile=a.nofile,
                   realtime=[s for s in a.realtime.split(",") if s], rr_timeslice_ms=a.rr_timeslice_ms,
                   gateway_cpu=0, load_cpu=1 if (os.cpu_count() or 1) > 1 else 0)

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, flush=True)

    resumed = resumable(Path(a.resume), opts) if a.resume else ([], None)
    if isinstance(resumed, str):
        print(f"seg-fast bench sizing: {resumed}", file=sys.stderr)
        return 2

    async def interruptible():
        # SIGINT/SIGTERM stop the run and still stop every process it started
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def watch():
                    async for _ in signals:
                        say("interrupted: stopping the run")
                        nursery.cancel_scope.cancel()
                        return
                nursery.start_soon(watch)
                out = await bench(opts, a.search, a.max_devices, say, cgroup_check=a.cgroup_check,
                                  on_point=lambda r: write_partial(r, partial), earlier=resumed[0],
                                  pending=resumed[1])
                nursery.cancel_scope.cancel()
                return out

    # every point measured so far, rewritten after each (gitignored: *.raw.json; its summary,
    # *.partial.json, is what --resume reads in a later session); removed once the whole
    # report is written
    partial = Path(a.out) / f"sizing-{a.security}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.partial.raw.json"
    cpus = os.sched_getaffinity(0)
    if opts.load_cpu != opts.gateway_cpu and pinned(opts.gateway_cpu):     # (taskset pins what it starts)
        # The harness (its /proc sampling each second, the workers' stats it reads, ss) is
        # part of the instrument: on the load core, never on the core it measures. Left to
        # the scheduler it ran wherever it woke, the gateway's core included.
        os.sched_setaffinity(0, {opts.load_cpu})
    rr_slice_before = rr_timeslice_ms()
    try:
        if opts.rr_timeslice_ms:
            why = set_rr_timeslice_ms(opts.rr_timeslice_ms)
            if why:
                print(f"seg-fast bench sizing: --rr-timeslice-ms: {why}", file=sys.stderr)
                return 2
        if opts.slice_us:
            why = set_sched_slice(0, opts.slice_us)    # inherited by every process started from here
            if why:
                print(f"seg-fast bench sizing: --slice-us {opts.slice_us}: {why}", file=sys.stderr)
                return 2
        report = trio.run(interruptible)
    finally:
        # a caller in this process (the tests run the CLI in-process) gets its CPUs back;
        # left pinned, every later test ran on one CPU
        os.sched_setaffinity(0, cpus)
        if opts.rr_timeslice_ms and rr_slice_before and rr_timeslice_ms() != rr_slice_before:
            set_rr_timeslice_ms(rr_slice_before)    # machine-wide: the next run finds the kernel's own
    if report is None:
        return 130
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_results(report, out)
    partial.unlink(missing_ok=True)
    partial_summary(partial).unlink(missing_ok=True)
    try:
        plot([p for p in report["points"]], written[0].with_suffix(".png"))
    except Exception as exc:  # the numbers matter more than the picture
        say(f"(no plot: {exc})")
    h = report["headline"]
    print(msgspec.json.format(msgspec.json.encode(h)).decode())
    print("wrote " + ", ".join(str(w) for w in written) + f" and {written[0].with_suffix('.png').name}")
    return 0


def summary(report: dict) -> dict:
    """The small record kept in git: machine, commit, options, headline and every
    point's verdict (the worse run's figures and each run's own), and the point still
    being measured with its finished runs (``pending``, in a partial one); no timelines."""
    return {k: report[k] for k in ("machine", "options", "when", "headline", "crosscheck", "pending")
            if k in report} | {
        "points": [{k: p[k] for k in ("devices", "measured", "verdict") if k in p} for p in report["points"]]}


def write_partial(report: dict, path: Path) -> None:
    """The report so far, replaced whole (a reader never sees half a file): ``path``
    (``...partial.raw.json``, everything) and its summary beside it (``...partial.json``,
    small enough to commit: what ``--resume`` needs to go on in another session)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, obj in ((path, report), (partial_summary(path), summary(report))):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(obj)))
        os.replace(tmp, target)


def partial_summary(raw: Path) -> Path:
    return raw.with_name(raw.name.removesuffix(".raw.json") + ".json")


# Options that make no difference to what a point measures: a resumed search may change them.
NOT_MEASURED = frozenset({"devices", "quiet", "keep"})


def resumable(path: Path, opts: Options) -> tuple[list[dict], dict | None] | str:
    """The points an earlier search (a report, its summary or a partial one) measured,
    each with its ``measured`` commit and time, and the point it left half measured
    (its finished runs) or None; or what forbids resuming it: a point measured with
    other options would not be this search's."""
    try:
        report = msgspec.json.decode(path.read_bytes())
        before, points = report["options"], report["points"]
        assert isinstance(before, dict) and isinstance(points, list)
    except (OSError, msgspec.DecodeError, KeyError, TypeError, AssertionError) as exc:
        return f"--resume {path}: not a sizing report ({type(exc).__name__}: {exc})"
    now = msgspec.to_builtins(opts)
    before = msgspec.to_builtins(Options()) | before      # an option it predates: its default then
    differ = sorted(k for k in now if k not in NOT_MEASURED and before[k] != now[k])
    if differ:
        return (f"--resume {path}: its points were measured with "
                + ", ".join(f"{k}={before[k]!r}" for k in differ) + "; this search has "
                + ", ".join(f"{k}={now[k]!r}" for k in differ))
    out = []
    for p in points:
        if not isinstance(p, dict) or not isinstance(p.get("verdict"), dict) or "devices" not in p:
            return f"--resume {path}: a point without its devices and verdict"
        m = p.get("measured") or {"commit": report.get("machine", {}).get("commit", "?"),
                                  "when": report.get("when", "?")}
        out.append(p | {"measured": m})
    pending = report.get("pending")
    if pending is not None:
        try:
            assert isinstance(pending["devices"], int) and isinstance(pending["held_to_cores"], (int, float))
            assert pending["runs"] and all(r["verdict"]["meets"] and isinstance(r["paths"], dict)
                                           and r["measured"]["commit"] for r in pending["runs"])
        except (KeyError, TypeError, AssertionError):
            return f"--resume {path}: its half-measured point is not one (devices, held_to_cores, met runs)"
    return out, pending


def write_results(report: dict, out: Path) -> list[Path]:
    """``sizing-{off,on}-STAMP.json`` (summary, committed), ``...raw.json`` (everything,
    gitignored) and one ``sizing-{off,on}-N{devices}-STAMP.json`` per claimed point."""
    out.mkdir(parents=True, exist_ok=True)
    sec = report["options"]["security"]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    stem = out / f"sizing-{sec}-{stamp}"
    enc = lambda obj: msgspec.json.format(msgspec.json.encode(obj))
    written = [stem.with_suffix(".json")]
    written[0].write_bytes(enc(summary(report)))
    raw = out / f"sizing-{sec}-{stamp}.raw.json"
    raw.write_bytes(enc(report))
    written.append(raw)
    for p in report["points"]:
        if p["verdict"]["meets"]:
            claim = out / f"sizing-{sec}-N{p['devices']}-{stamp}.json"
            claim.write_bytes(enc({k: report[k] for k in ("machine", "options", "when")}
                                  | {"devices": p["devices"], "security": sec, "verdict": p["verdict"]}))
            written.append(claim)
    return written
