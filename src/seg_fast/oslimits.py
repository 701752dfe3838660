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
