"""A Linux timerfd (CLOCK_MONOTONIC, trio's clock): a deadline as a readable descriptor.

The gateway's parking lot (proxy/parking.py) and the fleet's poller (sim/fleet.Parker) each
sleep on one epoll set; with a timer in the same set they wake for a deadline the way they
wake for a socket, instead of from a trio cancel scope's deadline (a CancelScope entered and
left per pass, ~20 of trio's functions at every wake-up, and for a timer that fires a
Cancelled raised through the task: at real rates, where each request is a loop pass of its
own, that machinery cost more than the wake-up). Python 3.11 has
no os.timerfd_create (3.13 does), hence ctypes.
"""
from __future__ import annotations

import ctypes
import math
import os

import trio

_CLOCK_MONOTONIC = 1            # what time.perf_counter (trio's SystemClock) reads on Linux
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Timer:
    """One timerfd, non-blocking. ``arm(deadline)`` (trio time; math.inf disarms) makes
    the descriptor readable once the deadline has passed; ``clear()`` reads it."""
    __slots__ = ("fd", "armed", "_spec")

    def __init__(self) -> None:
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self.armed = math.inf
        self._spec = _Itimerspec()

    def arm(self, deadline: float) -> None:
        """Fire at ``deadline`` (relative to now on trio's clock: both CLOCK_MONOTONIC)."""
        spec = self._spec
        if deadline == math.inf:
            spec.it_value.tv_sec = spec.it_value.tv_nsec = 0          # disarmed
        else:
            ns = max(1, int((deadline - trio.current_time()) * 1e9))   # 0 would disarm
            spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self.armed = deadline

    def clear(self) -> None:
        """It fired: read the expiry count (readable no more) and note it disarmed."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed = math.inf

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:        # a Parker dropped without close() (tests, load_request_cost)
        self.close()
