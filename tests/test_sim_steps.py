"""The fleet shard's slow-step record (sim/steps.py): a step over the bound is kept with
its task's name, its CPU time and the note it left; short steps are not."""
from __future__ import annotations

import gc
import time

import trio

from seg_fast.sim import steps


def _spin(seconds: float) -> None:
    # CPU, not a sleep: the record's CPU figure must see it
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def slow_task() -> None:
    await trio.lowlevel.checkpoint()
    steps.note(("{} things {:.1f}", 3, 2.25))
    _spin(0.03)
    await trio.lowlevel.checkpoint()


async def quick_task() -> None:
    for _ in range(20):
        await trio.lowlevel.checkpoint()


def test_slow_step_named_with_cpu_and_note():
    phase = ["ramp"]

    async def main():
        rec = steps.SlowSteps(lambda: (1.0, phase[0]), over_ms=10.0).install()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(quick_task)
                phase[0] = "hold"
                n.start_soon(slow_task)
        finally:
            rec.uninstall()
        return rec.report()

    report = trio.run(main)
    held = report["records"]["hold"]
    kept = [r for r in held if r["kind"] == "step"]
    assert len(kept) == 1, held
    r = kept[0]
    assert r["task"].endswith("slow_task")
    assert "test_sim_steps.py" in r["at"]
    assert r["cpu_ms"] >= 25.0 and r["wall_ms"] >= r["cpu_ms"] * 0.9
    assert r["note"] == "3 things 2.2"
    groups = report["groups"]["hold"]
    assert any(g["kind"] == "step" and g["task"].endswith("slow_task") and g["n"] == 1 for g in groups)
    # the batch the slow step ran in is kept too, naming it as its longest step
    assert any(r["kind"] == "batch" and "slow_task" in r["at"] for r in held)
    assert report["steps"] > 20
    assert steps.current is None


def test_note_without_a_record_is_ignored():
    assert steps.current is None
    steps.note("nothing listens")


def test_full_collections_counted_per_phase():
    phase = ["settle"]

    async def main():
        rec = steps.SlowSteps(lambda: (1.0, phase[0])).install()
        try:
            await trio.lowlevel.checkpoint()
            gc.collect()
            phase[0] = "hold"
            gc.collect(1)             # a young collection: not a full one
        finally:
            rec.uninstall()
        return rec.report()

    report = trio.run(main)
    assert report["full_gc"]["settle"][0] == 1
    assert "hold" not in report["full_gc"]


def test_slow_step_names_its_longest_collection():
    async def collecting():
        await trio.lowlevel.checkpoint()
        gc.collect(1)
        _spin(0.015)
        await trio.lowlevel.checkpoint()

    async def main():
        rec = steps.SlowSteps(lambda: (1.0, "hold")).install()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(collecting)
        finally:
            rec.uninstall()
        return rec.report()

    kept = [r for r in trio.run(main)["records"]["hold"] if r["kind"] == "step" and "collecting" in r["task"]]
    assert len(kept) == 1 and kept[0]["gc_longest"][0] == 1, kept
