"""How long bytes sat in a load-side socket before the load side read them.

The sizing run times each request from the fleet's send to the answer's end. Through
the gateway that span holds two wake-ups of the load core's processes which the
direct path does not have: the simulator (in the requesting shard's own process)
reading the request the gateway forwarded, and the fleet reading the answer the
gateway wrote back. On the direct path the shard answers itself without sleeping in
between. A wake-up that waits behind the other shards on the load core is the
instrument's delay, not the gateway's.

The kernel stamps each received segment (SO_TIMESTAMPNS, CLOCK_REALTIME); a
``recvmsg`` with MSG_PEEK | MSG_TRUNC walks the unread segments without copying or
consuming them and reports the stamp of the last one it walked. ``late(sock)`` is
the time since that segment arrived: for a message that came in one segment, how
long it waited to be read. For one that came in several, it is measured from the
latest, so it can only understate the wait (the correction never flatters a path).
Stamping, once a socket asks for it, is on for every socket of the machine (the
proxy's too: one clock read per received segment in the kernel).
"""
from __future__ import annotations

import socket
import struct
import time

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)    # == SCM_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")
_CMSG = socket.CMSG_SPACE(_TIMESPEC.size)
_PEEK = socket.MSG_PEEK | socket.MSG_TRUNC | socket.MSG_DONTWAIT
# with MSG_TRUNC the kernel copies nothing into it: only its length (how far to walk) counts
_WALK = memoryview(bytearray(1 << 20))


def enable(sock: socket.socket) -> None:
    """Have the kernel stamp what ``sock`` receives (the first stamps of a process may
    lag: the kernel turns stamping on in deferred work)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def late(sock: socket.socket) -> float | None:
    """Seconds since the latest unread segment of ``sock`` arrived; 0.0 when what is
    there carries no stamp (or the socket is at its end); None when nothing is there."""
    try:
        n, anc, _flags, _addr = sock.recvmsg_into((_WALK,), _CMSG, _PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return 0.0
    now = time.time_ns()
    if n <= 0:
        return 0.0
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return max(0, now - (sec * 1_000_000_000 + nsec)) / 1e9
    return 0.0
