"""seg_fast.ticker: a worker's periodic duties share one wake-up on a grid of TICK seconds,
each on the points of its own period."""
from __future__ import annotations

import math

import pytest
import trio

from seg_fast import ticker

TICK = ticker.TICK


def _on_grid(t: float, period: float = TICK) -> bool:
    return abs(t / period - round(t / period)) < 1e-6


def _next_point(t: float, period: float) -> float:
    """The first multiple of ``period`` after ``t`` (t itself taken as on the grid within a hair)."""
    return (math.floor(round(t / period, 6)) + 1) * period


@pytest.mark.parametrize("seconds", [0.1, 0.2, 0.4, 0.5, 1.0, 2.3])
@pytest.mark.parametrize("start", [0.0, 0.037, 0.5, 0.63])
async def test_a_wait_ends_at_the_next_point_of_its_periods_grid(seconds, start, autojump_clock):
    await trio.sleep_until(math.floor(trio.current_time()) + 10.0 + start)   # at or off grid points
    t0 = trio.current_time()
    late = await ticker.every(seconds)
    now = trio.current_time()
    assert now == pytest.approx(_next_point(t0, seconds))
    assert t0 < now <= t0 + seconds + 1e-9                  # within one period, never at once
    assert late == pytest.approx(0.0, abs=1e-9)              # nothing held the loop


async def test_a_loop_woken_late_keeps_its_period(autojump_clock):
    """Woken a little after its point (as a busy worker always wakes), a 0.1 s duty next
    wakes 0.1 s on and a 1 s duty 1 s on: the point just passed counts, not the late moment
    (counting from it made them 0.2 s and 1.1 s loops)."""
    await trio.sleep_until(math.floor(trio.current_time()) + 10.0)
    for seconds in (0.1, 1.0):
        late = await ticker.every(seconds)
        point = trio.current_time() - late
        autojump_clock.jump(0.004)           # as a 4 ms step after the wake-up would
        nxt_late = await ticker.every(seconds)
        assert trio.current_time() - nxt_late == pytest.approx(point + seconds)


async def test_a_short_wait_keeps_its_own_deadline(autojump_clock):
    await trio.sleep(0.037)
    t0 = trio.current_time()
    late = await ticker.every(0.02)
    assert trio.current_time() == pytest.approx(t0 + 0.02)
    assert late == pytest.approx(0.0, abs=1e-9)


async def test_duties_whose_periods_divide_one_another_wake_together(autojump_clock):
    """Loops of 0.2, 0.4 and 1 s (twice) started at different moments: over 10 s the
    ticker's task wakes once per 0.2 s point (50 times, not once per loop's wake-up: 100),
    and every loop's wake-up lands on a point of its own period."""
    wakes: list[tuple[float, float]] = []

    async def duty(period: float, start: float):
        await trio.sleep(start)
        while True:
            await ticker.every(period)
            wakes.append((period, trio.current_time()))

    await trio.sleep_until(math.floor(trio.current_time()) + 10.0)
    async with trio.open_nursery() as nursery:
        for period, start in ((0.2, 0.051), (0.4, 0.077), (1.0, 0.029), (1.0, 0.093)):
            nursery.start_soon(duty, period, start)
        await trio.sleep(10.05)            # (past 20.0: its wake-ups are counted)
        nursery.cancel_scope.cancel()
    # every loop kept its period: 0.2 s 50 times, 0.4 s 25, 1 s 10 twice
    counts = {p: sum(1 for q, _ in wakes if q == p) for p in (0.2, 0.4, 1.0)}
    assert counts == {0.2: 50, 0.4: 25, 1.0: 20}
    assert all(_on_grid(t, period) for period, t in wakes)
    assert ticker._ticker.get().wakeups == 50


async def test_a_cancelled_wait_is_forgotten_and_the_others_still_wake(autojump_clock):
    woke = []
    scope = trio.CancelScope()

    async def gone():
        with scope:
            await ticker.every(1.0)
        woke.append(("gone", trio.current_time()))

    async def sleeper(name, seconds):
        await ticker.every(seconds)
        woke.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(gone)
        nursery.start_soon(sleeper, "same slot", 1.0)
        nursery.start_soon(sleeper, "later", 2.0)
        await trio.sleep(0.5)
        scope.cancel()
    assert [name for name, _ in woke] == ["gone", "same slot", "later"]
    assert woke[0][1] == pytest.approx(t0 + 0.5)          # the cancel ends the wait at once
    assert woke[1][1] == pytest.approx(_next_point(t0, 1.0))
    assert woke[2][1] == pytest.approx(_next_point(t0, 2.0))


async def test_lateness_is_what_held_the_loop(autojump_clock):
    """A step that holds the loop past the grid point shows as the sleep's lateness, as
    trio.sleep's overshoot did for the loop-lag sample."""
    async def long_step():
        await trio.sleep(0.05)
        autojump_clock.jump(0.3)     # the mock clock does not move in a step: as a 300 ms step would

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_step)
        t0 = trio.current_time()
        late = await ticker.every(0.1)
    assert late == pytest.approx(trio.current_time() - _next_point(t0, 0.1))
    assert late >= 0.2 - 1e-9
