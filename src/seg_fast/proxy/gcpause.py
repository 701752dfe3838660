"""No stop-the-world garbage collection in a worker.

Reference counting frees a connection's objects when it ends (tests/test_gc_cycles.py
checks that no cycle keeps them), so the cyclic collector has little to find; what
it costs is its full (generation 2) pass, which walks every live object: ~20 µs per
parked Ping, 200 ms at 9,000. So a worker

- freezes what start-up built (``tune``): frozen objects are never walked again;
- raises the generation-2 threshold so a full pass never starts by itself in steady
  state (generations 0 and 1 still run: they only walk young objects);
- freezes again after each ramp of connections (``refreeze_on_ramp``), so the objects
  of long-lived connections (parked Pings) leave the generations the collector walks;
- collects the young generations itself, often and from a task of its own
  (``collect_young``), not when CPython's allocation count says so.

Why the last. A young collection walks every live object of its generations and, for each,
the objects it refers to (old ones too: a cache miss each), ~1 µs per young object in a
worker. CPython starts one when allocations minus deallocations pass 700, and frees of
*old* objects (a parked Ping's state when it is answered, a connection that ends) count
against it: with old connections replaced by new ones the count stays low while generation
0 fills up, so a gen-0 pass found 5,000-23,000 live objects and a gen-1 pass (every 10th)
14,000-40,000: 10-48 ms of CPU inside some connection's step (3,000 TLS devices, time
compressed 10x). Timed collections bound what accumulates between two: each walks what
was allocated since the last and is still alive, and its interval adapts so that stays
near ``YOUNG_TARGET_MS``. Survivors go to generation 2, as before.
"""
from __future__ import annotations

import gc
import time

from seg_fast import ticker

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
        await ticker.every(every)
        now, count = time.monotonic(), gw.active
        if count >= max(min_connections, 2 * last_count) and now - last_at >= min_interval:
            gc.collect(1)             # young garbage goes now, not frozen with the rest
            freeze()                  # not counted: see ``frozen``
            refreezes += 1
            last_count, last_at = count, now
        elif count < last_count // 2:
            last_count = count


# Young collections: their length aimed at (ms), and the interval's bounds (s). Not shorter
# than 20 ms: at a 5 ms floor a ramp of devices (many young survivors) made collections run
# back to back, and the ramp's loop lag went from ~45 to 120-180 ms in 1,000-device dev runs.
YOUNG_TARGET_MS = 2.0
YOUNG_EVERY = (0.02, 0.05, 1.0)       # least, first, most
young_collections = 0


async def collect_young(*, target_ms: float = YOUNG_TARGET_MS, every: tuple = YOUNG_EVERY) -> None:
    """Automatic collection off while this runs; generations 0 and 1 collected here instead,
    at an interval halved after a collection over ``target_ms`` and doubled after one under
    a quarter of it (what survives a collection is walked once: the total work hardly changes,
    each pause is shorter)."""
    global young_collections
    least, interval, most = every
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            await ticker.every(interval)     # (under TICK, on a deadline of its own)
            t0 = time.perf_counter()
            gc.collect(1)
            ms = (time.perf_counter() - t0) * 1000.0
            young_collections += 1
            if ms > target_ms:
                interval = max(least, interval / 2)
            elif ms < target_ms / 4:
                interval = min(most, interval * 2)
    finally:
        if was_enabled:
            gc.enable()


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
                "refreezes": refreezes, "young_collections": young_collections,
                "threshold": list(gc.get_threshold())}
