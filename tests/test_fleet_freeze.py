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


async def test_heap_frozen_once_after_the_ramp(monkeypatch):
    from seg_fast.sim.mailbox import MailboxSimulator

    corpus = PooledCorpus(11, pool=40)
    spec = ShardSpec(devices=DEVICES, seed=11, ramp=1.0, settle=4.0, hold=2.0, drain=10.0,
                     rate_scale=30.0, source_hosts=["127.0.0.1"])
    sim = MailboxSimulator(password=spec.password, seed=spec.seed, corpus=corpus,
                           initial_messages=fleet_mod.INITIAL_MESSAGES)
    fleet = Fleet(spec, sim)
    fake = _Gc([fleet])
    monkeypatch.setattr(fleet_mod, "gc", fake)
    fleet.shard_gc = True
    young = gcpause.young_collections
    automatic: list[bool] = []

    async def watch():
        while True:
            await trio.sleep(0.25)
            if fleet.clock.now() > spec.ramp:
                automatic.append(gc.isenabled())

    assert gc.isenabled()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        t0 = time.time() + 0.2
        fleet.clock = fleet_mod.Clock(t0)
        nursery.start_soon(watch)
        result = await fleet.run(Go(host="127.0.0.1", port=port, t0=t0))
        nursery.cancel_scope.cancel()
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
    from seg_fast.sim.mailbox import MailboxSimulator

    corpus = PooledCorpus(11, pool=40)
    spec = ShardSpec(devices=5, seed=11, ramp=0.5, settle=0.5, hold=0.5, drain=5.0,
                     rate_scale=30.0, source_hosts=["127.0.0.1"])
    sim = MailboxSimulator(password=spec.password, seed=spec.seed, corpus=corpus,
                           initial_messages=fleet_mod.INITIAL_MESSAGES)
    fleet = Fleet(spec, sim)
    fake = _Gc([fleet])
    monkeypatch.setattr(fleet_mod, "gc", fake)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        t0 = time.time() + 0.2
        fleet.clock = fleet_mod.Clock(t0)
        result = await fleet.run(Go(host="127.0.0.1", port=port, t0=t0))
        nursery.cancel_scope.cancel()
    assert fake.freezes == [] and result["frozen_at"] is None
