"""seg_fast.ticker: a worker's periodic duties share one wake-up on a grid of TICK seconds."""
from __future__ import annotations

import math

import pytest
import trio

from seg_fast import ticker

TICK = ticker.TICK


def _grid_at_or_after(t: float) -> float:
    return math.ceil(round(t / TICK, 9)) * TICK


@pytest.mark.parametrize("seconds", [0.1, 0.2, 0.35, 0.5, 1.0, 2.25])
async def test_a_wait_ends_at_the_first_grid_point_at_or_after_its_deadline(seconds, autojump_clock):
    await trio.sleep(0.037)                  # off the grid
    t0 = trio.current_time()
    late = await ticker.sleep(seconds)
    now = trio.current_time()
    assert now >= t0 + seconds                               # never early
    assert now - (t0 + seconds) <= TICK + 1e-9               # at most a tick late
    assert now == pytest.approx(_grid_at_or_after(t0 + seconds))
    assert late == pytest.approx(0.0, abs=1e-9)              # nothing held the loop


async def test_a_short_wait_keeps_its_own_deadline(autojump_clock):
    await trio.sleep(0.037)
    t0 = trio.current_time()
    late = await ticker.sleep(0.02)
    assert trio.current_time() == pytest.approx(t0 + 0.02)
    assert late == pytest.approx(0.0, abs=1e-9)


async def test_duties_of_different_periods_wake_together(autojump_clock):
    """Loops of 0.1, 0.2, 0.5 and 1 s started at different moments: over 10 s the ticker's
    task wakes once per grid point (100 times, not once per loop's wake-up: 180), and every
    loop's wake-up lands on a grid point."""
    wakes: list[float] = []

    async def duty(period: float, start: float):
        await trio.sleep(start)
        while True:
            await ticker.sleep(period)
            wakes.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for period, start in ((0.1, 0.013), (0.2, 0.051), (0.5, 0.077), (1.0, 0.029), (1.0, 0.093)):
            nursery.start_soon(duty, period, start)
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    # every loop kept its period: 0.1 s ~100 times, 0.2 s ~50, 0.5 s ~20, 1 s ~10 twice
    assert 180 <= len(wakes) <= 190
    assert all(t == pytest.approx(_grid_at_or_after(t)) for t in wakes)
    assert 99 <= ticker._ticker.get().wakeups <= 101


async def test_a_cancelled_wait_is_forgotten_and_the_others_still_wake(autojump_clock):
    woke = []
    scope = trio.CancelScope()

    async def gone():
        with scope:
            await ticker.sleep(1.0)
        woke.append(("gone", trio.current_time()))

    async def sleeper(name, seconds):
        await ticker.sleep(seconds)
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
    assert woke[1][1] == pytest.approx(_grid_at_or_after(t0 + 1.0))
    assert woke[2][1] == pytest.approx(_grid_at_or_after(t0 + 2.0))


async def test_lateness_is_what_held_the_loop(autojump_clock):
    """A step that holds the loop past the grid point shows as the sleep's lateness, as
    trio.sleep's overshoot did for the loop-lag sample."""
    async def long_step():
        await trio.sleep(0.05)
        autojump_clock.jump(0.3)     # the mock clock does not move in a step: as a 300 ms step would

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_step)
        t0 = trio.current_time()
        late = await ticker.sleep(0.1)
    assert late == pytest.approx(trio.current_time() - _grid_at_or_after(t0 + 0.1))
    assert late >= 0.2 - 1e-9
