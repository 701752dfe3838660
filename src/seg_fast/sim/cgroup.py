"""A CPU-limited cgroup for the sizing benchmark's second method.

``seg-fast bench sizing --cgroup-fraction f`` holds the gateway's processes to a
fraction ``f`` of one core (on top of the taskset pin to core 0), so a point of N
devices at ``f`` stands for N/f devices per core; ``--cgroup-check F`` runs N at F
and 2N at 2F and says whether the two per-core figures agree (sizing.crosscheck).

The limit is CFS bandwidth control: cgroup v2 ``cpu.max`` when the unified
hierarchy has the cpu controller (delegated to us), else cgroup v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``. The period is the kernel's default,
100 ms: measured (benchmarks/cfs_period.py, results/cfs_period.json), shorter ones
charge more latency to the process held, not less. A step of work longer than the
quota (f x period) is stretched to ~1/f of its length, and that dominates the tail;
the longer sit-out of a long period (up to 100·(1-f) ms) comes only when the quota
runs out, which a process below its allowance on average seldom does.

A process is put in the group by a ``sh -c 'echo $$ > cgroup.procs; exec ...'``
prefix (``CpuLimit.prefix``), so it is inside before its first instruction and its
children (nginx's workers) inherit it. Needs write access to the hierarchy (root,
or a delegated subtree); ``find_cpu_controller`` says why not when it is missing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

PERIOD_US = 100_000         # the kernel's default; see above and benchmarks/README.md
MIN_QUOTA_US = 1_000        # the kernel refuses a smaller quota (cpu.max and cfs_quota_us alike)
MOUNTS = "/proc/self/mounts"


def _mounts() -> list[tuple[str, str, list[str]]]:
    out = []
    try:
        with open(MOUNTS) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 4:
                    out.append((parts[1], parts[2], parts[3].split(",")))
    except OSError:
        pass
    return out


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def find_cpu_controller() -> tuple[str, Path] | str:
    """("v2" or "v1", the directory new groups go under), or why there is none.
    v2 is preferred; v1's cpu hierarchy is the fall-back (e.g. a machine whose
    unified hierarchy has no controllers delegated)."""
    why = []
    mounts = _mounts()
    for mnt, fstype, _opts in mounts:
        if fstype != "cgroup2":
            continue
        root = Path(mnt)
        try:
            controllers = (root / "cgroup.controllers").read_text().split()
        except OSError:
            controllers = []
        if "cpu" not in controllers:
            why.append(f"cgroup v2 at {mnt} has no cpu controller ({' '.join(controllers) or 'none'})")
            continue
        if not _writable_dir(root):
            why.append(f"cgroup v2 at {mnt} is not writable")
            continue
        try:     # groups under root need the controller enabled for children
            if "cpu" not in (root / "cgroup.subtree_control").read_text().split():
                (root / "cgroup.subtree_control").write_text("+cpu")
        except OSError as exc:
            why.append(f"cgroup v2 at {mnt}: cannot enable cpu for child groups ({exc.strerror})")
            continue
        return "v2", root
    for mnt, fstype, opts in mounts:
        if fstype == "cgroup" and "cpu" in opts:
            root = Path(mnt)
            if (root / "cpu.cfs_quota_us").exists() and _writable_dir(root):
                return "v1", root
            why.append(f"cgroup v1 cpu at {mnt} is not writable or has no CFS quota")
    if not why:
        why.append("no cgroup cpu controller is mounted")
    return "; ".join(why)


class CpuLimit:
    """One cgroup holding its processes to ``fraction`` of a core. Use as a context
    manager (the group is removed on exit, its processes gone by then)."""

    def __init__(self, fraction: float, name: str | None = None, period_us: int = PERIOD_US):
        if not 0 < fraction <= 64 or fraction * period_us < MIN_QUOTA_US:
            # below the kernel's 1 ms quota the limit would not be the fraction asked for
            raise ValueError(f"CPU fraction {fraction} out of range ({MIN_QUOTA_US / period_us:g}..64 cores "
                             f"with a {period_us / 1000:g} ms period)")
        found = find_cpu_controller()
        if isinstance(found, str):
            raise OSError(f"no cgroup CPU control here: {found}")
        self.version, root = found
        self.fraction = fraction
        self.period_us = period_us
        self.quota_us = round(fraction * period_us)
        self.path = root / (name or f"seg-fast-sizing-{os.getpid()}-{time.monotonic_ns()}")

    def __enter__(self) -> "CpuLimit":
        self.path.mkdir()
        try:
            if self.version == "v2":
                (self.path / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
            else:
                (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
                (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        except OSError:
            self.path.rmdir()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def prefix(self) -> list[str]:
        """A command prefix that moves the process into the group, then execs."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', self.procs_file]

    def add(self, pid: int) -> None:
        with open(self.procs_file, "w") as fh:
            fh.write(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in Path(self.procs_file).read_text().split()]
        except OSError:
            return []

    def stat(self) -> dict[str, int]:
        """The group's cpu.stat: throttling counts (both versions; v1 in ns, v2 in
        µs as the kernel writes them) and, on v2, its usage."""
        out: dict[str, int] = {}
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                k, _, v = line.partition(" ")
                if v.strip().isdigit():
                    out[k] = int(v)
        except OSError:
            pass
        return out

    def throttling(self) -> dict:
        s = self.stat()
        throttled_s = (s.get("throttled_usec", 0) / 1e6 if self.version == "v2"
                       else s.get("throttled_time", 0) / 1e9)
        return {"version": self.version, "fraction": self.fraction, "quota_us": self.quota_us,
                "period_us": self.period_us, "nr_periods": s.get("nr_periods", 0),
                "nr_throttled": s.get("nr_throttled", 0), "throttled_s": round(throttled_s, 3)}

    def remove(self) -> None:
        # a v1/v2 group can only go once empty: anything left is moved to the root
        root_procs = self.path.parent / "cgroup.procs"
        for pid in self.pids():
            try:
                root_procs.write_text(str(pid))
            except OSError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
