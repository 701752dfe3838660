"""Which worker of a running `seg-fast serve` holds a connection, read from the kernel.

/proc/net/tcp gives the inode of the gateway's socket for a client's port; /proc/<pid>/fd
says which worker (a child of the control process) holds it. Nothing the gateway says is used.
"""
from __future__ import annotations

import os
import socket

from seg_fast.proxy.forked import worker_pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workers_of(control_pid: int) -> list[int]:
    """The control process's workers (its children but its template process)."""
    return worker_pids(control_pid)


def worker_holding(port: int, client_port: int, workers: list[int]) -> int | None:
    """The worker holding the gateway's end of 127.0.0.1:client_port -> 127.0.0.1:port; None if no
    worker has accepted it yet (it may still wait in the listen queue)."""
    want_local, want_remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    inodes = {row[9] for row in rows if row[1] == want_local and row[2] == want_remote}
    assert len(inodes) == 1, f"the gateway's socket for client port {client_port} not found once"
    target = f"socket:[{inodes.pop()}]"
    for pid in workers:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                pass
    return None
