"""The sizing run's speed samples: the fixed loop runs pinned to the core asked for (and the
thread's affinity is put back), medians per core, and the verdict names a path measured on
a machine much slower or faster than the direct run's. (Timings are recorded, never judged.)"""
from __future__ import annotations

import os

from seg_fast.sim import sizing, speed


def test_the_loop_is_timed_pinned_and_the_affinity_put_back():
    mine = os.sched_getaffinity(0)
    cpu = sorted(mine)[0]
    ms = speed.timed_on(cpu)
    assert ms is not None and ms > 0
    assert os.sched_getaffinity(0) == mine
    assert speed.timed_on(4095) is None          # no such CPU: nothing timed, nothing raised
    assert os.sched_getaffinity(0) == mine


def test_medians_per_core():
    got = speed.medians([{0: 80.0, 1: 90.0}, {0: 140.0}, {0: 100.0, 1: 70.0}])
    assert got == {"cpu0": 100.0, "cpu1": 80.0}
    assert speed.medians([]) == {}


def test_a_path_measured_on_a_slower_or_faster_machine_than_the_direct_one_is_named():
    paths = {"direct": {"speed_ms": {"cpu0": 80.0, "cpu1": 90.0}},
             "nginx": {"speed_ms": {"cpu0": 100.0, "cpu1": 130.0}},
             "gateway": {"speed_ms": {"cpu0": 140.0, "cpu1": 150.0}}}
    assert sizing.speed_caveats(paths) == [
        "nginx: the cores ran sim/speed's loop 35% slower in its window (115.0 ms) than in the "
        "direct run's (85.0 ms): the paired latency compares two machines",
        "gateway: the cores ran sim/speed's loop 71% slower in its window (145.0 ms) than in the "
        "direct run's (85.0 ms): the paired latency compares two machines"]
    within = {"direct": {"speed_ms": {"cpu0": 80.0}}, "gateway": {"speed_ms": {"cpu0": 95.0}}}
    assert sizing.speed_caveats(within) == []
    # paths without samples (an older JSON, a window too short) say nothing
    assert sizing.speed_caveats({"direct": {}, "gateway": {"speed_ms": {"cpu0": 200.0}}}) == []
