"""Debug aid: log every task step of a worker longer than a bound (env SEG_FAST_SLOW_STEP_MS).

A loop-lag spike says *that* the loop stalled, not *who* held it. A trio Instrument
times each task step and, for a step over the bound, writes the task's name, the
code line where the step began and where it parked again, the step's duration and the
garbage collector's time and the thread's CPU time inside it (a step whose wall
time is far above its CPU time was the machine's doing: the process was preempted), to stderr (the worker's log). Off (not installed)
unless the variable is set, so it costs nothing in production.
"""
from __future__ import annotations

import gc
import os
import sys
import time

import trio

ENV = "SEG_FAST_SLOW_STEP_MS"


def _where(task) -> str:
    """The innermost frame the task's coroutine is suspended in (file:line function)."""
    coro = task.coro
    frame = None
    while coro is not None:
        f = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if f is None:
            break
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if "/trio/" not in f.f_code.co_filename:
            frame = f                 # the innermost frame of our code, not trio's traps
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


class SlowSteps(trio.abc.Instrument):
    """Records steps longer than ``over_ms``; ``longest`` is the longest step seen (ms)."""

    def __init__(self, over_ms: float = 10.0, *, out=None, keep: int = 200):
        self.over_ms = over_ms
        self.out = out
        self.keep = keep
        self.longest = 0.0
        self.longest_batch = 0.0
        self.slow: list[tuple[float, float, str, str, float]] = []   # (ms, cpu_ms, task, at, gc_ms)
        self._t0 = time.perf_counter()
        self._c0 = time.thread_time()
        self._gc_ms = 0.0
        self._gc_t0 = 0.0
        self._gc_worst = (0.0, -1, 0, 0, 0.0, 0)
        self._gc_c0 = 0.0
        self._gc_young = 0
        self._b0: float | None = None       # when the current batch began (None: outside one)
        self._bc0 = 0.0
        self._bsteps = 0
        self._bgroups: dict[str, tuple[int, float]] = {}

    def _gc(self, phase, info) -> None:
        if phase == "start":
            # The objects the collection will walk (its generation and the younger ones): a young
            # collection is slow only if they are many. Counting them walks them once more:
            # a debug cost, like the rest of this instrument.
            gen = info["generation"]
            self._gc_young = sum(len(gc.get_objects(g)) for g in range(gen + 1)) if gen < 2 else -1
            self._gc_c0 = time.thread_time()
            self._gc_t0 = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._gc_t0) * 1000.0
            self._gc_ms += ms
            if ms > self._gc_worst[0]:        # which collection: generation, garbage found, CPU, walked
                cpu = (time.thread_time() - self._gc_c0) * 1000.0
                self._gc_worst = (ms, info["generation"], info["collected"], info["uncollectable"], cpu,
                                  self._gc_young)

    # A loop-lag spike is usually a batch (trio runs every ready task once between two
    # I/O waits), not one step: many ~1 ms steps ready at once. So batches are timed too,
    # and a batch over the bound is logged with its steps over 0.5 ms, grouped.
    def after_io_wait(self, timeout) -> None:
        self._b0 = time.perf_counter()
        self._bc0 = time.thread_time()
        self._bsteps = 0
        self._bgroups = {}

    def before_io_wait(self, timeout) -> None:
        b0 = self._b0
        if b0 is None:
            return
        ms = (time.perf_counter() - b0) * 1000.0
        self.longest_batch = max(self.longest_batch, ms)
        if ms > self.over_ms and self.out is not None:
            cpu = (time.thread_time() - self._bc0) * 1000.0
            top = sorted(self._bgroups.items(), key=lambda kv: -kv[1][1])[:4]
            groups = "; ".join(f"{n}x {t:.1f}ms {k}" for k, (n, t) in top)
            print(f"{time.time():.3f} slow batch {ms:.1f} ms cpu {cpu:.1f} ms steps {self._bsteps}: {groups}",
                  file=self.out, flush=True)
        self._b0 = None

    def before_task_step(self, task) -> None:
        self._gc_ms = 0.0
        self._gc_worst = (0.0, -1, 0, 0, 0.0, 0)
        self._t0 = time.perf_counter()
        self._c0 = time.thread_time()

    def after_task_step(self, task) -> None:
        ms = (time.perf_counter() - self._t0) * 1000.0
        self.longest = max(self.longest, ms)
        self._bsteps += 1
        if ms > 0.5 and self.out is not None and self._b0 is not None:
            key = f"{task.name.rsplit('.', 1)[-1]} @ {_where(task)}"
            n, t = self._bgroups.get(key, (0, 0.0))
            self._bgroups[key] = (n + 1, t + ms)
        if ms > self.over_ms:
            cpu = (time.thread_time() - self._c0) * 1000.0
            rec = (round(ms, 2), round(cpu, 2), task.name, _where(task), round(self._gc_ms, 2))
            if len(self.slow) < self.keep:
                self.slow.append(rec)
            if self.out is not None:
                worst = self._gc_worst
                gcs = (f" (gen {worst[1]}: {worst[0]:.1f} ms, cpu {worst[4]:.1f} ms, {worst[5]} objects walked, "
                       f"{worst[2]} collected)" if worst[1] >= 0 else "")
                print(f"{time.time():.3f} slow step {rec[0]} ms cpu {rec[1]} ms gc {rec[4]} ms{gcs} "
                      f"task={rec[2]} at {rec[3]}", file=self.out, flush=True)

    def install(self) -> SlowSteps:
        gc.callbacks.append(self._gc)
        trio.lowlevel.add_instrument(self)
        return self

    def uninstall(self) -> None:
        trio.lowlevel.remove_instrument(self)
        gc.callbacks.remove(self._gc)


def install_from_env() -> SlowSteps | None:
    """In a running trio loop: install the instrument if SEG_FAST_SLOW_STEP_MS is set."""
    value = os.environ.get(ENV)
    if not value:
        return None
    return SlowSteps(float(value), out=sys.stderr).install()
