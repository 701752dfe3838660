"""No stop-the-world garbage collection in a worker.

Reference counting frees a connection's objects when it ends (tests/test_gc_cycles.py
checks that no cycle keeps them), so the cyclic collector has little to find; what
it costs is its full (generation 2) pass, which walks every live object: ~20 µs per
parked Ping, 200 ms at 9,000. So a worker

- freezes what start-up built (``tune``): frozen objects are never walked again;
- raises the generation-2 threshold so a full pass never starts by itself in steady
  state (generations 0 and 1 still run: they only walk young objects);
- freezes again after each ramp of connections (``refreeze_on_ramp``), so the objects
  of long-lived connections (parked Pings) leave the generations the collector walks.
"""
from __future__ import annotations

import gc
import time

import trio

# A full collection after 10**8 generation-1 passes: never, in practice.
GEN2_THRESHOLD = 100_000_000
# Objects in the permanent generation after start-up's freeze: counted then, not per snapshot
# nor per ramp (gc.get_freeze_count() walks them all: ~10 ms with a worker's start-up heap,
# ~70 ms per million objects, so seconds in one step with 100,000 parked Pings frozen).
frozen = 0
refreezes = 0     # freezes after ramps of connections (gc.freeze itself is O(1): a list splice)


def freeze(count: bool = False) -> None:
    global frozen
    gc.freeze()
    if count:
        frozen = gc.get_freeze_count()


def tune() -> None:
    """Once, after the worker has started (imports done, policies loaded)."""
    gc.collect()
    freeze(count=True)
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, GEN2_THRESHOLD)


async def refreeze_on_ramp(gw, *, every: float = 1.0, min_interval: float = 5.0, min_connections: int = 256):
    """Freeze again whenever the worker's connections have doubled since the last freeze
    (or since the lowest count after it: a fleet that leaves and comes back is a new ramp)."""
    global refreezes
    last_count, last_at = 0, time.monotonic()
    while True:
        await trio.sleep(every)
        now, count = time.monotonic(), gw.active
        if count >= max(min_connections, 2 * last_count) and now - last_at >= min_interval:
            gc.collect(1)             # young garbage goes now, not frozen with the rest
            freeze()                  # not counted: see ``frozen``
            refreezes += 1
            last_count, last_at = count, now
        elif count < last_count // 2:
            last_count = count


class GCWatch:
    """Pauses of the cyclic collector by generation (gc.callbacks): count, total and max ms."""

    def __init__(self):
        self.count = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        gen = info["generation"]
        ms = (time.perf_counter() - self._t0) * 1000.0
        self.count[gen] += 1
        self.total_ms[gen] += ms
        if ms > self.max_ms[gen]:
            self.max_ms[gen] = ms

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def snapshot(self) -> dict:
        return {"collections": list(self.count), "total_ms": [round(x, 3) for x in self.total_ms],
                "max_ms": [round(x, 3) for x in self.max_ms], "frozen": frozen,
                "refreezes": refreezes,
                "threshold": list(gc.get_threshold())}
