"""Event-loop stalls: work that used to happen for thousands of connections in one task step.

A worker's loop lag is the length of a scheduler batch (every ready task runs once
between two I/O waits). Parked Pings answered together (a mail server's wave, or
heartbeats that expire together after a ramp of devices) were all handed back in one
step of the parking task, and the tasks that answer them all ran in the next batch:
hundreds of ms with TLS at a few thousand devices. These tests count, with a trio
Instrument, how many Pings are handed back per batch (no timings are asserted).
"""
from __future__ import annotations

import collections
import socket
import types

import trio
import trio.lowlevel

from batches import Batches
from seg_fast.proxy import parking
from seg_fast.proxy.parking import ANSWER, TIMEOUT, Parked, PingPark
from seg_fast.proxy.slowsteps import SlowSteps

N = 300


def _parked(deadline: float):
    up_local, up_peer = socket.socketpair()
    dev_local, dev_peer = socket.socketpair()
    p = Parked(types.SimpleNamespace(socket=dev_local), "127.0.0.1", b"http", False,
               types.SimpleNamespace(sock=up_local), None, None, None, b"gw", deadline, 0.0, 0.0)
    return p, (up_local, up_peer, dev_local, dev_peer)


async def _release_together(why: str, n: int = N) -> tuple[collections.Counter, list]:
    """Park n Pings, make all of them due at once, count the hand-backs per batch."""
    batches = Batches()
    trio.lowlevel.add_instrument(batches)
    released: list = []
    per_batch: collections.Counter = collections.Counter()

    def spawn(p, reason):
        released.append((p, reason))
        per_batch[batches.n] += 1

    park = PingPark(spawn)
    socks = []
    # One deadline for all: every heartbeat expires together (TIMEOUT), or never (ANSWER).
    deadline = trio.current_time() + (3600 if why == ANSWER else 1.0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(park.run)
            for _ in range(n):
                p, s = _parked(deadline)
                socks.extend(s)
                park.park(p)
            if why == ANSWER:
                for i in range(0, len(socks), 4):
                    socks[i + 1].send(b"H")         # every mail server answers, in this one step
            with trio.fail_after(30):
                while len(released) < n:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(batches)
        for s in socks:
            s.close()
    assert park.count == 0 and not park._by_fd        # every Ping left the parking lot
    return per_batch, released


async def test_answers_arriving_together_are_handed_back_in_slices():
    per_batch, released = await _release_together(ANSWER)
    assert sorted(id(p) for p, _ in released) == sorted({id(p) for p, _ in released})    # each once
    assert {why for _, why in released} == {ANSWER}
    # Before: all N in one step and one batch. Now a slice per batch, starting at 16 and at
    # most doubling per slice: 16+32+64+128 < N, so no batch gets more than 128.
    assert max(per_batch.values()) <= 128, per_batch
    assert len(per_batch) >= 4


async def test_heartbeats_expiring_together_are_handed_back_in_slices():
    per_batch, released = await _release_together(TIMEOUT)
    assert len({id(p) for p, _ in released}) == N
    assert {why for _, why in released} == {TIMEOUT}
    assert max(per_batch.values()) <= 128, per_batch


async def test_a_few_due_are_handed_back_in_the_step_that_found_them():
    """Up to RELEASE_AT_ONCE nothing is deferred: the common case costs no extra step."""
    per_batch, released = await _release_together(ANSWER, parking.RELEASE_AT_ONCE)
    assert len(released) == parking.RELEASE_AT_ONCE
    assert len(per_batch) == 1, per_batch


async def test_slow_step_instrument_names_the_task_and_its_line():
    """The debug instrument (SEG_FAST_SLOW_STEP_MS) records a step over its bound with the
    task's name and where it parked; a short step is not recorded."""
    steps = SlowSteps(over_ms=5.0).install()
    try:
        async def hog():
            await trio.lowlevel.checkpoint()
            end = trio.current_time() + 0.02
            while trio.current_time() < end:        # a step of >= 20 ms, by the clock
                pass
            await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
    finally:
        steps.uninstall()
    names = [rec[2] for rec in steps.slow]
    assert any(name.endswith("hog") for name in names), steps.slow
    rec = next(r for r in steps.slow if r[2].endswith("hog"))
    assert rec[0] >= 5.0 and "test_loop_stalls.py" in rec[3]
    assert steps.longest >= rec[0] - 0.01          # rec is rounded


async def test_refreeze_after_a_ramp_does_not_walk_the_frozen_objects(monkeypatch):
    """gc.get_freeze_count() walks every frozen object (seconds in one step with 100,000
    parked Pings frozen): a worker counts them once, at start-up, never after a ramp."""
    import gc

    from seg_fast.proxy import gcpause

    walks = []
    freezes = []
    monkeypatch.setattr(gc, "get_freeze_count", lambda: walks.append(1) or 0)
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(1))
    monkeypatch.setattr(gcpause, "frozen", gcpause.frozen)     # restored after the test
    gw = types.SimpleNamespace(active=0)
    before = gcpause.refreezes
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: gcpause.refreeze_on_ramp(gw, every=0.001, min_interval=0.0,
                                                                min_connections=4))
            for active in (8, 16, 32):                 # three ramps: connections double each time
                gw.active = active
                while len(freezes) < active.bit_length() - 3:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert len(freezes) == 3 and gcpause.refreezes - before == 3
    assert walks == []
    gcpause.freeze(count=True)                         # start-up's freeze counts, once
    assert walks == [1]


async def test_in_slices_counts_the_slices_own_work(monkeypatch):
    """in_slices sizes a slice by how long the step took, the slice's own actions included:
    with each action costing 1 ms (a fake clock, no real timing) and a 5 ms step, no slice
    grows past 2 x 5 actions. Before, only the wait across sleep(0) was timed: a slice's own
    actions counted for nothing and the size doubled up to its cap (1,024)."""
    from seg_fast.proxy import looplag

    clock = [0.0]
    monkeypatch.setattr(looplag.time, "perf_counter", lambda: clock[0])
    steps = _PerBatch()

    def action(item):
        clock[0] += 0.001            # each action: 1 ms of the loop
        steps.tick()

    with steps:
        await looplag.in_slices(list(range(2000)), action, step_ms=5.0)
    slices = steps.batches
    assert sum(slices) == 2000
    assert max(slices) <= 16, slices           # the first slice (16), then at most 2 x 5


class _Node:
    pass


class _PerBatch(trio.abc.Instrument):
    """Counts ``tick()``s per scheduler batch (between two I/O waits) while entered."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.current = 0

    def tick(self) -> None:
        self.current += 1

    def after_io_wait(self, timeout) -> None:
        if self.current:
            self.batches.append(self.current)
        self.current = 0

    def __enter__(self) -> "_PerBatch":
        trio.lowlevel.add_instrument(self)
        return self

    def __exit__(self, *exc) -> None:
        trio.lowlevel.remove_instrument(self)
        self.batches.append(self.current)


async def test_young_collections_come_from_their_own_task_not_inside_other_steps():
    """CPython starts a young collection inside whatever step allocates past its count (and
    frees of old objects hold the count down while generation 0 fills: 10-48 ms passes in
    connection steps). With gcpause.collect_young running, automatic collection is off and
    the young generations are collected by that task alone; cyclic garbage is still freed.
    Counted with gc.callbacks (which task each collection ran in), not timed."""
    import functools
    import gc
    import weakref

    from seg_fast.proxy import gcpause

    starts: list[tuple[int, str]] = []

    def callback(phase, info):
        if phase == "start":
            try:
                name = trio.lowlevel.current_task().name
            except RuntimeError:          # not in this run's thread
                name = "?"
            starts.append((info["generation"], name))

    def allocating_step() -> tuple[list, weakref.ref]:
        """One step making 50,000 reference cycles (garbage) and one more to watch."""
        before = len(starts)
        for _ in range(50_000):
            node = _Node()
            node.me = node
        node = _Node()
        node.me = node
        return starts[before:], weakref.ref(node)

    gc.callbacks.append(callback)
    assert gc.isenabled()
    try:
        inside, _ = allocating_step()
        assert inside, "the control: CPython collects inside an allocating step"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(gcpause.collect_young, every=(0.001, 0.001, 0.001)))
            with trio.fail_after(20):
                while gc.isenabled():                 # until collect_young has started
                    await trio.sleep(0)
            inside, ref = allocating_step()
            assert inside == []                       # no collection inside this step
            with trio.fail_after(20):
                while ref() is not None:              # the cycle is freed, by the task's collection
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert gc.isenabled()                         # as it was before the task
    finally:
        gc.callbacks.remove(callback)
        gc.enable()
    by_task = [(gen, name) for gen, name in starts if name.endswith("collect_young")]
    assert by_task and {gen for gen, _ in by_task} == {1}


async def test_young_collection_interval_adapts_to_their_length(monkeypatch):
    """Halved after a collection over the target, doubled after one under a quarter of it,
    within its bounds (a fake clock: each gc.collect 'takes' the next cost)."""
    import gc

    from seg_fast.proxy import gcpause

    costs = [5.0, 5.0, 5.0, 5.0, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1]       # ms
    clock = [0.0]
    slept: list[float] = []
    collected: list[int] = []

    async def sleep(seconds):
        slept.append(seconds)
        if len(slept) > len(costs):
            raise trio.Cancelled._create()
        await trio.lowlevel.checkpoint()

    def collect(generation):
        collected.append(generation)
        clock[0] += costs[len(collected) - 1] / 1000.0

    monkeypatch.setattr(gcpause.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(gcpause.ticker, "every", sleep)
    monkeypatch.setattr(gcpause.gc, "collect", collect)
    try:
        with trio.CancelScope():
            try:
                await gcpause.collect_young(target_ms=1.0, every=(0.01, 0.04, 0.1))
            except trio.Cancelled:
                pass
    finally:
        gc.enable()
    assert collected == [1] * len(costs)
    assert slept == [0.04, 0.02, 0.01, 0.01, 0.01, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1]


async def test_in_slices_counts_the_work_of_the_tasks_it_started(monkeypatch):
    """A slice's actions start tasks (a resumed Ping's answer) that run in the next batch,
    before or after in_slices' own task (trio reverses a batch at random). With each started
    task costing 1 ms in its first step (a fake clock) and a 5 ms step, no batch runs more than
    16 of them (the first slice, then at most 2 x 5), however trio orders the batches. Timed
    across one pass only, the first slice was timed without its tasks about half of the time
    and doubled (32 in a batch)."""
    from seg_fast.proxy import looplag

    clock = [0.0]
    monkeypatch.setattr(looplag.time, "perf_counter", lambda: clock[0])
    steps = _PerBatch()

    async def answer():
        clock[0] += 0.001            # its first step: 1 ms of the loop
        steps.tick()

    with steps:
        async with trio.open_nursery() as nursery:
            await looplag.in_slices(list(range(2000)), lambda item: nursery.start_soon(answer), step_ms=5.0)
    per_batch = steps.batches
    assert sum(per_batch) == 2000
    assert max(per_batch) <= 16, per_batch


async def test_in_slices_ends_a_slice_once_its_own_actions_used_the_step(monkeypatch):
    """A slice sized by cheaper past actions ends early when its own actions pass the step's
    share: with each action costing 1 ms (a fake clock), a 5 ms step and a first slice of
    256, no step runs more than 6 of them. Before, the whole slice ran in one step (256 ms)."""
    from seg_fast.proxy import looplag

    clock = [0.0]
    monkeypatch.setattr(looplag.time, "perf_counter", lambda: clock[0])
    steps = _PerBatch()
    done: list[int] = []

    def action(item):
        clock[0] += 0.001
        steps.tick()
        done.append(item)

    with steps:
        await looplag.in_slices(list(range(1000)), action, step_ms=5.0, first=256)
    slices = steps.batches
    assert done == list(range(1000))              # each item once, in order
    assert max(slices) <= 6, slices
