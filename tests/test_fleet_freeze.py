"""A fleet shard freezes what its ramp built once every device is set up (before the
measured window), so later collections never walk it (fleet.Fleet._freeze_after_ramp),
and while it runs its young generations are collected by a task on a timer, automatic
collection off (proxy/gcpause.collect_young); its result carries the slow-step record."""
from __future__ import annotations

import time

import gc

import trio

from seg_fast.proxy import gcpause
from seg_fast.sim import fleet as fleet_mod
from seg_fast.sim.fleet import Fleet, Go, PooledCorpus, ShardSpec

DEVICES = 40


class _Gc:
    """Stands in for the gc module in fleet.py: records each freeze, freezes nothing."""

    def __init__(self, fleet_ref: list) -> None:
        self.fleet_ref = fleet_ref
        self.freezes: list[tuple[float, int]] = []

    def freeze(self) -> None:
        fleet = self.fleet_ref[0]
        self.freezes.append((fleet.clock.now(), sum(d.ready.is_set() for d in fleet.devices)))


def _fleet(monkeypatch, devices: int, slow_steps: bool = False, **times) -> tuple[Fleet, _Gc]:
    """A small fleet with its simulator, the gc module in fleet.py replaced by a _Gc."""
    from seg_fast.sim.mailbox import MailboxSimulator

    spec = ShardSpec(devices=devices, seed=11, rate_scale=30.0, source_hosts=["127.0.0.1"], slow_steps=slow_steps,
                     **times)
    sim = MailboxSimulator(password=spec.password, seed=spec.seed, corpus=PooledCorpus(11, pool=40),
                           initial_messages=fleet_mod.INITIAL_MESSAGES)
    fleet = Fleet(spec, sim)
    fake = _Gc([fleet])
    monkeypatch.setattr(fleet_mod, "gc", fake)
    return fleet, fake


async def _run(fleet: Fleet, *also) -> dict:
    """The fleet run against its own simulator; ``also``: tasks run beside it."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(fleet.sim.serve, "127.0.0.1", 0)
        t0 = time.time() + 0.2
        fleet.clock = fleet_mod.Clock(t0)          # run() sets the same one
        for task in also:
            nursery.start_soon(task)
        result = await fleet.run(Go(host="127.0.0.1", port=port, t0=t0))
        nursery.cancel_scope.cancel()
    return result


async def test_heap_frozen_once_after_the_ramp(monkeypatch):
    fleet, fake = _fleet(monkeypatch, DEVICES, slow_steps=True, ramp=1.0, settle=4.0, hold=2.0, drain=10.0)
    spec = fleet.spec
    fleet.shard_gc = True
    young = gcpause.young_collections
    automatic: list[bool] = []

    async def watch():
        while True:
            await trio.sleep(0.25)
            if fleet.clock.now() > spec.ramp:
                automatic.append(gc.isenabled())

    assert gc.isenabled()
    result = await _run(fleet, watch)
    # automatic collection was off while the fleet ran, young ones made by the task
    assert automatic and not any(automatic), automatic
    assert gcpause.young_collections > young
    assert gc.isenabled()
    assert result["failures"] == {}, result["failure_samples"]
    assert len(fake.freezes) == 1, fake.freezes
    at, ready = fake.freezes[0]
    # after the ramp, every device set up, before the window opened
    assert ready == DEVICES
    assert spec.ramp <= at < spec.ramp + spec.settle
    assert result["frozen_at"] is not None
    assert result["slow_steps"]["steps"] > 0


async def test_no_freeze_unless_a_shard(monkeypatch):
    """A fleet run inside another process (tests) leaves its collector alone."""
    fleet, fake = _fleet(monkeypatch, 5, ramp=0.5, settle=0.5, hold=0.5, drain=5.0)
    result = await _run(fleet)
    assert fake.freezes == [] and result["frozen_at"] is None
    # The loop's steps are timed only when asked (--load-steps): a trio Instrument costs the
    # shard ~10% of its CPU at real rates.
    assert result["slow_steps"] is None
