"""Process limits the gateway and the simulator both need lifted."""
from __future__ import annotations

import resource


def raise_nofile_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (a parked Ping holds a descriptor
    on each leg); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
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
