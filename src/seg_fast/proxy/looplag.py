"""Event-loop lag of one worker: how late a tiny task wakes, kept as a histogram and a
maximum per second, plus the garbage collector's pauses (gcpause.GCWatch).

A stall of the loop (a long task step, a full GC, a drain done in one go) delays every
connection of the worker at once; this makes it visible to operators (metrics, the
incident log) and to the sizing run, which reads ``Gateway.looplag.snapshot()``.
"""
from __future__ import annotations

import bisect
import collections
import time

import trio

from seg_fast import ticker
from seg_fast.proxy.gcpause import GCWatch

# Histogram bucket upper bounds, in ms (the last bucket is everything above).
BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class LoopLag:
    """Waits ``interval`` again and again (on the worker's ticker, so the sample costs no
    wake-up of its own); the wake-up's delay is the loop's lag."""

    # 0.2 s: on the grid the store's poll wakes on anyway (a 0.1 s sample woke the worker
    # five more times a second, for a lag its 0.2 s neighbours see as well)
    def __init__(self, incidents=None, *, interval: float = 0.2, log_over_ms: float = 50.0,
                 keep_seconds: int = 300):
        self.incidents = incidents            # a lag over log_over_ms is noted (rate-limited) there
        self.interval = interval
        self.log_over_ms = log_over_ms
        self.histogram = [0] * (len(BOUNDS_MS) + 1)
        self.samples = 0
        self.max_ms = 0.0
        self.per_second: collections.deque[tuple[int, float]] = collections.deque(maxlen=keep_seconds)
        self._second = 0
        self._second_max = 0.0
        self.gc = GCWatch()

    def record(self, lag_ms: float, now: float | None = None) -> None:
        lag_ms = max(lag_ms, 0.0)
        self.samples += 1
        self.histogram[bisect.bisect_left(BOUNDS_MS, lag_ms)] += 1
        if lag_ms > self.max_ms:
            self.max_ms = lag_ms
        second = int(time.time() if now is None else now)
        if second != self._second:
            if self._second:
                self.per_second.append((self._second, round(self._second_max, 3)))
            self._second, self._second_max = second, 0.0
        if lag_ms > self._second_max:
            self._second_max = lag_ms
        if lag_ms > self.log_over_ms and self.incidents is not None:
            self.incidents.note("loop_lag", lag_ms=round(lag_ms, 1))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.gc.start()
        try:
            task_status.started()
            interval = self.interval
            while True:
                self.record(await ticker.every(interval) * 1000.0)
        finally:
            self.gc.stop()

    def snapshot(self) -> dict:
        """Plain data for metrics and the sizing run."""
        recent = list(self.per_second)
        if self._second:
            recent.append((self._second, round(self._second_max, 3)))
        return {
            "interval_s": self.interval,
            "samples": self.samples,
            "max_ms": round(self.max_ms, 3),
            "histogram_ms": {**{f"le_{b}": n for b, n in zip(BOUNDS_MS, self.histogram)},
                             "inf": self.histogram[-1]},
            "max_per_second": recent,
            "gc": self.gc.snapshot(),
        }


async def in_slices(items, action, *, step_ms: float = 5.0, first: int = 16, most: int = 256) -> None:
    """``action(item)`` for each item, a slice per loop step, so other connections are served
    between slices. The slice size adapts: whatever an action starts (a task that answers and
    closes a connection) runs in the next loop step, whose length is measured across the
    ``sleep(0)`` together with the slice's own actions; the size halves when that took longer
    than ``step_ms`` and doubles when it took less than half.

    ``items`` (a list) is consumed: each entry is set to None once its action ran. The list is
    often the last holder of what an action finished with (a released Ping's record: its TLS
    connection, sockets, buffers), and dropping it whole freed thousands of TLS connections
    in one step (SSL_free: 41-65 ms of CPU for 1,400-3,000 devices leaving together,
    benchmarks/park_leave.py); entry by entry, each is freed where its own work ends."""
    size, i, n = first, 0, len(items)
    while i < n:
        # Timed from before the slice's actions: starting 1,024 tasks is itself ~50 ms of one
        # step, and half of the time (trio reverses a batch at random) this task runs before
        # the tasks it started, so the wait across sleep(0) alone measured nothing.
        # The slice also ends once its own actions have used the step's share: the size is
        # learnt from past slices, and a slice of up to 256 whose actions cost more than those
        # did held the loop for all of them in one step.
        t0 = time.perf_counter()
        end = t0 + step_ms / 1000.0
        stop = min(i + size, n)
        while i < stop:
            item = items[i]
            items[i] = None
            i += 1
            action(item)
            if time.perf_counter() > end:
                break
        item = None
        # The tasks the actions started run in the next batch, before or after this task
        # (trio reverses a batch at random): timed across two passes, the slice's time
        # includes them whatever the order (across one, half of the first slices were timed
        # without them and doubled: 32 tasks in a batch where 16 were meant).
        await trio.sleep(0)
        await trio.sleep(0)
        took = (time.perf_counter() - t0) * 1000.0
        if took > step_ms and size > 1:
            size //= 2
        elif took < step_ms / 2 and size < most:
            size *= 2
