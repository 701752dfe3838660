"""A fleet shard's slow loop steps, named, for its result JSON.

The shard's schedule lag (``Stats.lag``: how late a due delivery or foreground request
ran) says *that* its loop was late, not *who* held it. This trio Instrument times every
task step in the thread's CPU time (``time.thread_time``: what the step itself cost,
robust to a shared machine) and in wall time (the two apart: the process waited for its
core, or for the GIL held by the oracle's thread), and keeps each step over ``over_ms``
of either, with the task's name, the line it parked at, the collector's time inside it
and a ``note`` the step left of what it did (the Parker and the simulator's Reactor
name their sockets and events handled). Batches (every ready task run once between two
I/O waits) are timed too: many short steps ready at once hold the loop as one long one.

Records are kept per phase of the run (ramp, settle, hold, drain), at most ``keep``
each, and summed per (kind, task, where) without bound.
"""
from __future__ import annotations

import gc
import time

import trio

from seg_fast.proxy.slowsteps import _where

OVER_MS = 10.0
KEEP = 200

current: "SlowSteps | None" = None      # the installed record: tasks leave notes on it


def note(what) -> None:
    """Say what the running step did (kept if the step turns out slow): a string, or
    a tuple (format string, values...) formatted only then."""
    rec = current
    if rec is not None:
        rec.note = what


def _short(task_name: str) -> str:
    """A task's name without its module path: ``Device.foreground``."""
    return ".".join(task_name.rsplit(".", 2)[-2:])


def _text(what) -> str | None:
    if what is None or type(what) is str:
        return what
    return what[0].format(*what[1:])


class SlowSteps(trio.abc.Instrument):
    def __init__(self, phase_of, over_ms: float = OVER_MS, keep: int = KEEP) -> None:
        self.phase_of = phase_of          # () -> (shard time, phase name)
        self.over_ms = over_ms
        self.keep = keep
        self.note = None
        self.records: dict[str, list] = {}
        self.groups: dict[tuple, list] = {}   # (phase, kind, task, where) -> [n, max wall, max cpu, sum cpu]
        self.steps = 0
        self.full_gc: dict[str, list] = {}    # phase -> [full collections, longest ms]
        self._t0 = self._c0 = 0.0
        self._gc_ms = 0.0
        self._gc_t0 = 0.0
        self._gc_worst = (0.0, -1)
        self._b0: float | None = None
        self._bc0 = 0.0
        self._bsteps = 0
        self._btop = (0.0, "")            # the batch's longest step: (ms, task name)

    # -- collections: their wall time inside the step ------------------------------------
    def _gc(self, phase, info) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._gc_t0) * 1000.0
            self._gc_ms += ms
            if ms > self._gc_worst[0]:   # the step's longest collection: (ms, generation)
                self._gc_worst = (ms, info["generation"])
            if info["generation"] == 2:   # full collections: how many and the longest, per phase
                full = self.full_gc.setdefault(self.phase_of()[1], [0, 0.0])
                full[0] += 1
                full[1] = max(full[1], round(ms, 2))

    # -- steps ------------------------------------------------------------------------
    def before_task_step(self, task) -> None:
        self.note = None
        self._gc_ms = 0.0
        self._gc_worst = (0.0, -1)
        self._c0 = time.thread_time()
        self._t0 = time.perf_counter()

    def after_task_step(self, task) -> None:
        ms = (time.perf_counter() - self._t0) * 1000.0
        cpu = (time.thread_time() - self._c0) * 1000.0
        self.steps += 1
        self._bsteps += 1
        if ms > self._btop[0]:
            self._btop = (ms, task.name)
        if ms > self.over_ms or cpu > self.over_ms:
            self._record("step", ms, cpu, _short(task.name), _where(task), self.note)

    # -- batches ------------------------------------------------------------------------
    def after_io_wait(self, timeout) -> None:
        self._bc0 = time.thread_time()
        self._b0 = time.perf_counter()
        self._bsteps = 0
        self._btop = (0.0, "")

    def before_io_wait(self, timeout) -> None:
        b0 = self._b0
        if b0 is None:
            return
        self._b0 = None
        ms = (time.perf_counter() - b0) * 1000.0
        if ms > self.over_ms:
            cpu = (time.thread_time() - self._bc0) * 1000.0
            top_ms, top = self._btop
            self._record("batch", ms, cpu, f"{self._bsteps} steps", f"longest {_short(top)}",
                         f"{top_ms:.1f} ms")

    def _record(self, kind: str, ms: float, cpu: float, name: str, where: str, what) -> None:
        t, phase = self.phase_of()
        g = self.groups.get((phase, kind, name, where))
        if g is None:
            g = self.groups[(phase, kind, name, where)] = [0, 0.0, 0.0, 0.0]
        g[0] += 1
        g[1] = max(g[1], ms)
        g[2] = max(g[2], cpu)
        g[3] += cpu
        kept = self.records.setdefault(phase, [])
        if len(kept) < self.keep:
            kept.append({"t": round(t, 3), "kind": kind, "wall_ms": round(ms, 2), "cpu_ms": round(cpu, 2),
                         "gc_ms": round(self._gc_ms, 2) if kind == "step" else None,
                         # the step's longest collection: its generation and wall ms
                         "gc_longest": ([self._gc_worst[1], round(self._gc_worst[0], 2)]
                                        if kind == "step" and self._gc_worst[1] >= 0 else None),
                         "task": name, "at": where, "note": _text(what)})

    def report(self) -> dict:
        """For the shard's result: per phase, every kind of slow step (count, longest
        wall and CPU, CPU summed) and the first ``keep`` records."""
        groups: dict[str, list] = {}
        for (phase, kind, name, where), (n, wall, cpu, cpu_sum) in sorted(
                self.groups.items(), key=lambda kv: -kv[1][1]):
            groups.setdefault(phase, []).append(
                {"kind": kind, "task": name, "at": where, "n": n, "wall_ms_max": round(wall, 2),
                 "cpu_ms_max": round(cpu, 2), "cpu_ms_sum": round(cpu_sum, 1)})
        return {"over_ms": self.over_ms, "steps": self.steps, "full_gc": self.full_gc, "groups": groups,
                "records": self.records}

    def install(self) -> "SlowSteps":
        global current
        gc.callbacks.append(self._gc)
        # installed inside a step: that step is timed from here
        self._c0 = time.thread_time()
        self._t0 = time.perf_counter()
        trio.lowlevel.add_instrument(self)
        current = self
        return self

    def uninstall(self) -> None:
        global current
        trio.lowlevel.remove_instrument(self)
        gc.callbacks.remove(self._gc)
        if current is self:
            current = None
