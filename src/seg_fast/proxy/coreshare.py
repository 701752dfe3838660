"""A worker that has held its core for a while lets a sibling worker go first.

Several workers share one core (the descriptor limit sets how many per core). A worker
that never blocks — a 10 MB answer streamed, a batch of hundreds of resumed Pings — ran
on for up to 30 ms while a sibling with one small request waited behind it (the
50,000-device run: waits up to 103 ms, benchmarks/README "The 50,000 tail, seen from
the scheduler"). So once ``max_run_ms`` of wall time have passed since the worker last
slept in its I/O wait, it calls sched_yield between two task steps: the kernel's EEVDF
moves its deadline one slice back and a waiting sibling runs first. With nobody waiting
the call returns at once (one system call); the worker's own order of work is unchanged.
"""
from __future__ import annotations

import os
import time

import trio

# An I/O wait this long was a sleep (the core went to others), not a poll that found events.
SLEPT = 0.0001


class CoreShare(trio.abc.Instrument):
    """Yields the core after ``max_run_ms`` without a sleep; ``yields`` counts the calls."""

    def __init__(self, max_run_ms: float, *, clock=time.perf_counter, yield_core=os.sched_yield):
        self.max_run = max_run_ms / 1000.0
        self.clock = clock
        self.yield_core = yield_core
        self.since = clock()          # when the worker last had the core back
        self.waited_from = 0.0
        self.yields = 0

    def before_io_wait(self, timeout) -> None:
        self.waited_from = self.clock()

    def after_io_wait(self, timeout) -> None:
        now = self.clock()
        if now - self.waited_from >= SLEPT:
            self.since = now

    def after_task_step(self, task) -> None:
        if self.clock() - self.since >= self.max_run:
            self.yield_core()
            self.yields += 1
            self.since = self.clock()


def install(max_run_ms: float) -> CoreShare | None:
    """In the running trio loop; None (nothing installed) for 0."""
    if max_run_ms <= 0:
        return None
    share = CoreShare(max_run_ms)
    trio.lowlevel.add_instrument(share)
    return share
