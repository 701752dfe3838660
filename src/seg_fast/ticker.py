"""One clock for a worker's periodic duties: they wake together, on a grid of TICK seconds.

A worker's housekeeping (the loop-lag sample, the policy clock and its flush, the transaction
log's flush, the stats file, the policy store's poll, the GC's re-freeze check and young
collections) each slept on a deadline of its own: an idle worker woke ~23 times a second, each
time a pass through trio's scheduler and a Cancelled raised out of trio.sleep, ~0.65% of a core
per worker (six workers per core at 50,000 devices, twelve at 100,000). Here a duty's wait is
filed under a grid point, and one system task per run sleeps until the earliest such point and
reschedules every task filed there: waking a task costs a reschedule instead of a Cancelled.

A duty of period P (rounded to whole ticks) waits for the next grid point that is a multiple
of P, so duties whose periods divide one another wake at the same points: 0.2 s and 1 s
duties share every fifth 0.2 s wake-up. (Counting the next point from the moment a duty woke,
as this did at first, put them on scattered points: woken a hair late, a 0.1 s duty next woke
0.2 s on and a 1 s duty 1.1 s on, and the 1 s duties drifted apart.) A wait therefore ends
within one period, on the period's grid, at most TICK late to that point; a loop of period P
wakes every P seconds unless a step holds it past a point. Shorter waits keep trio.sleep.
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

    async def every(self, seconds: float) -> float:
        period = max(1, round(seconds / TICK))
        # (plus a hair: woken at grid point k, the point just passed is k, not k - 1 because
        # k * TICK / TICK came out as k - 0.0000000000000004)
        due = (math.floor(trio.current_time() / TICK + 1e-6) // period + 1) * period
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


async def every(seconds: float) -> float:
    """Wait for the next point of this worker's grid of ``seconds`` (a duty run in a loop
    wakes once per period, together with the duties whose periods it shares); returns how
    late it woke (past the grid point, or past the deadline for a wait shorter than TICK,
    which sleeps ``seconds`` on a deadline of its own): the loop's lag as this task saw it."""
    if seconds < TICK:
        deadline = trio.current_time() + seconds
        await trio.sleep_until(deadline)
        return trio.current_time() - deadline
    try:
        ticker = _ticker.get()
    except LookupError:
        ticker = _Ticker()
        _ticker.set(ticker)
    return await ticker.every(seconds)
