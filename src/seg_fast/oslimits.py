"""Process limits the gateway and the simulator both need lifted, and the sizing run's scheduler slice."""
from __future__ import annotations

import ctypes
import os
import resource
import struct


NR_OPEN = "/proc/sys/fs/nr_open"       # the kernel's ceiling for any process's RLIMIT_NOFILE


def raise_nofile_limit(want: int = 0) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (a parked Ping holds a descriptor
    on each leg), or both to ``want`` when that is higher (limits.max_descriptors, as
    nginx's worker_rlimit_nofile: raising the hard limit needs CAP_SYS_RESOURCE; the
    kernel's fs.nr_open caps it); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard:
        try:
            with open(NR_OPEN) as f:
                want = max(hard, min(want, int(f.read())))
        except (OSError, ValueError):
            pass
        try:
            if want > hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
                return want
        except (ValueError, OSError):
            pass        # not permitted: the hard limit as it is (the caller says so)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# Descriptors a worker keeps for itself (listener, log files, store, pipes) beyond its devices'.
RESERVED_FDS = 256


def device_connections_within(nofile: int, idle_pool: int = 0) -> int:
    """Device connections one worker can carry under ``nofile`` descriptors: each may hold
    a mail-server connection as well (a parked Ping holds both), beside RESERVED_FDS and
    up to ``idle_pool`` idle pooled mail-server connections."""
    return max(1, (nofile - RESERVED_FDS - idle_pool) // 2)


def workers_for(devices_per_core: int, cores: int, nofile: int, idle_pool: int = 0) -> int:
    """Workers to start: one per core, or more where one process's descriptor limit cannot
    hold a core's share of devices (a parked Ping holds a descriptor on each leg)."""
    per_worker = device_connections_within(nofile, idle_pool)
    per_core = max(1, -(-devices_per_core // per_worker)) if devices_per_core > 0 else 1
    return cores * per_core


PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_ports() -> int:
    """Ports the kernel picks from for an outgoing connection (net.ipv4.ip_local_port_range):
    how many connections one local address can hold toward one remote address and port."""
    try:
        with open(PORT_RANGE) as f:
            low, high = map(int, f.read().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28_232                    # Linux's default range, 32768-60999


def source_ports_short(devices: int, sources: int, ports: int) -> bool:
    """Whether ``devices`` parked Pings (one mail-server connection each) would need more
    ports toward one mail server address than ``sources`` local addresses have."""
    return devices > ports * max(1, sources)


# sched_setattr(2): no wrapper in Python's os module
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}
_SCHED_ATTR = struct.Struct("IIQiIQQQII")          # struct sched_attr, version 1 (56 bytes)


def set_sched_slice(tid: int, slice_us: int) -> str:
    """Ask the kernel (EEVDF, Linux 6.12+) for a ``slice_us`` time slice for thread ``tid``
    (0: the caller), keeping its policy (SCHED_OTHER) and niceness. A task with a short
    slice gets an earlier deadline when it wakes, so it preempts one running a long batch;
    measured for the gateway's workers at 250 us it cost CPU and doubled the tail
    (benchmarks/README.md), so only `bench sizing --slice-us` uses it. Returns "" or why
    it was not set (an older kernel, another arch)."""
    nr = _SYS_SCHED_SETATTR.get(os.uname().machine)
    if nr is None:
        return f"no sched_setattr number for {os.uname().machine}"
    try:
        nice = os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as exc:
        return str(exc)
    attr = ctypes.create_string_buffer(_SCHED_ATTR.pack(
        _SCHED_ATTR.size, 0, 0, nice, 0, slice_us * 1000, 0, 0, 0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, tid, attr, 0) != 0:
        err = ctypes.get_errno()
        return f"sched_setattr: {os.strerror(err)}"
    return ""


def set_realtime(priority: int) -> str:
    """Run the calling thread, and every thread or process it starts from now on, under
    SCHED_RR at ``priority`` (limits.realtime_priority): it runs until it waits, ahead of
    every time-shared task, and only a peer of its priority takes turns with it, after
    the kernel's round-robin slice (kernel.sched_rr_timeslice_ms). Returns "" or why not
    (no CAP_SYS_NICE, an RLIMIT_RTPRIO below it, a kernel without the policy)."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(priority))
    except (OSError, AttributeError) as exc:
        return f"SCHED_RR {priority}: {getattr(exc, 'strerror', None) or exc}"
    return ""


_RR_TIMESLICE = "/proc/sys/kernel/sched_rr_timeslice_ms"


def rr_timeslice_ms() -> int:
    """The kernel's round-robin slice (0 where it cannot be read)."""
    try:
        with open(_RR_TIMESLICE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def set_rr_timeslice_ms(ms: int) -> str:
    """Set the round-robin slice for the whole machine (kernel.sched_rr_timeslice_ms): how
    long a SCHED_RR task runs before a peer of its priority that is ready gets the core.
    Returns "" or why not (not root, no such file)."""
    try:
        with open(_RR_TIMESLICE, "w") as f:
            f.write(f"{ms}\n")
    except OSError as exc:
        return f"kernel.sched_rr_timeslice_ms {ms}: {exc.strerror or exc}"
    return ""


# The scheduler's autogroups (CONFIG_SCHED_AUTOGROUP): every session is one group, weighed
# as a whole against the other sessions and the kernel's threads. A process's niceness ranks it
# only inside its group, so a run that wants the core ahead of the machine's other work sets
# its session's group nice as well.
_AUTOGROUP_SWITCH = "/proc/sys/kernel/sched_autogroup_enabled"


def autogroup_enabled() -> bool:
    try:
        with open(_AUTOGROUP_SWITCH) as f:
            return f.read().strip() == "1" and os.path.exists("/proc/self/autogroup")
    except OSError:
        return False


def autogroup_of(pid: int = 0) -> str:
    """``/autogroup-N nice K`` for the process (0: the caller); "" without autogroups, or
    when the process is in none: the kernel prints nothing for the root group (a session
    that never called setsid since boot, as a CI runner's can be) or a cpu cgroup."""
    try:
        with open(f"/proc/{pid or 'self'}/autogroup") as f:
            return f.read().strip()
    except OSError:
        return ""


def set_autogroup_nice(nice: int, pid: int = 0) -> str:
    """Set the nice of the autogroup (the session) ``pid`` belongs to (0: the caller's);
    every process of that session, present and future, is weighed by it. Returns "" or why
    not (no autogroups, a negative value without CAP_SYS_NICE)."""
    path = f"/proc/{pid or 'self'}/autogroup"
    try:
        with open(path, "w") as f:
            f.write(str(nice))
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return ""
