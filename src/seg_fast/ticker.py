"""One clock for a worker's periodic duties: they wake together, on a grid of TICK seconds.

A worker's housekeeping (the loop-lag sample, the policy clock and its flush, the transaction
log's flush, the stats file, the policy store's poll, the GC's re-freeze check and young
collections) each slept on a deadline of its own: an idle worker woke ~23 times a second, each
time a pass through trio's scheduler and a Cancelled raised out of trio.sleep, ~0.65% of a core
per worker (six workers per core at 50,000 devices, twelve at 100,000). Here a wait of at least
TICK is filed under the first grid point at or after its deadline, and one system task per run
sleeps until the earliest such point and reschedules every task filed there: the duties share
one wake-up, ~10 a second, and waking a task costs a reschedule instead of a Cancelled.

A wait ends at most TICK late, never early (to float rounding). Shorter waits keep trio.sleep.
"""
from __future__ import annotations

import heapq
import math

import trio

TICK = 0.1


class _Ticker:
    def __init__(self):
        self.slots: dict[int, list] = {}   # grid point -> waiting tasks (None: cancelled)
        self.heap: list[int] = []
        self.scope: trio.CancelScope | None = None
        self.idle = trio.Event()
        self.wakeups = 0                   # the ticker's own (each reschedules all that is due)
        trio.lowlevel.spawn_system_task(self._run, name="seg_fast.ticker")

    async def sleep(self, seconds: float) -> float:
        # (less a hair: woken at grid point k, a wait of TICK is due at k + 1, not at k + 2
        # because (k + 1) * TICK / TICK came out as k + 1.0000000000000004)
        due = math.ceil((trio.current_time() + seconds) / TICK - 1e-6)
        waiting = self.slots.get(due)
        if waiting is None:
            waiting = self.slots[due] = []
            heapq.heappush(self.heap, due)
            if self.heap[0] == due:
                if self.scope is not None:
                    self.scope.deadline = due * TICK
                self.idle.set()
        task = trio.lowlevel.current_task()
        i = len(waiting)
        waiting.append(task)

        def abort(_raise_cancel):
            waiting[i] = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return trio.current_time() - due * TICK

    async def _run(self) -> None:
        heap, slots = self.heap, self.slots
        while True:
            if not heap:
                self.idle = trio.Event()
                await self.idle.wait()
                continue
            with trio.CancelScope(deadline=heap[0] * TICK) as self.scope:
                await trio.sleep_forever()
            self.scope = None
            self.wakeups += 1
            now = trio.current_time()
            while heap and heap[0] * TICK <= now:
                for task in slots.pop(heapq.heappop(heap)):
                    if task is not None:
                        trio.lowlevel.reschedule(task)


_ticker = trio.lowlevel.RunVar("seg_fast.ticker")


async def sleep(seconds: float) -> float:
    """Sleep at least ``seconds``; returns how late it woke (seconds past the grid point, or
    past the deadline for a wait shorter than TICK): the loop's lag as this task saw it."""
    if seconds < TICK:
        deadline = trio.current_time() + seconds
        await trio.sleep_until(deadline)
        return trio.current_time() - deadline
    try:
        ticker = _ticker.get()
    except LookupError:
        ticker = _Ticker()
        _ticker.set(ticker)
    return await ticker.sleep(seconds)
