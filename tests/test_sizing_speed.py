"""The sizing run's speed probe: the fixed work runs in full on the core asked for, and a
core that cannot be probed is named, not fatal. (Its timings are recorded, never judged.)"""
from __future__ import annotations

import os

from seg_fast.sim import speed


def test_the_probe_runs_the_whole_work_pinned_to_each_core():
    cpu = sorted(os.sched_getaffinity(0))[0]
    got = speed.probe([cpu])
    assert set(got) == {f"cpu{cpu}"}
    one = got[f"cpu{cpu}"]
    # the child's results are the work's own, computed here independently
    assert one["python_result"] == speed.python_work()
    assert one["sha256_result"] == speed.hash_work() == "55c7e25571a69216"
    assert one["python_ms"] > 0 and one["sha256_ms"] > 0


def test_a_core_that_cannot_be_probed_is_named():
    got = speed.probe([4095])            # no such CPU: the child cannot pin itself
    assert set(got["cpu4095"]) == {"error"}


def test_drift_is_the_largest_change_of_a_cores_interpreter_time():
    before = {"cpu0": {"python_ms": 80.0}, "cpu1": {"python_ms": 100.0}}
    after = {"cpu0": {"python_ms": 140.0}, "cpu1": {"python_ms": 80.0}, "cpu2": {"python_ms": 1.0}}
    assert speed.drift(before, after) == 0.75            # cpu0: 140 against 80
    assert speed.drift(after, before) == 0.75            # the faster is the base either way
    assert speed.drift(before, {"cpu0": {"error": "x"}}) is None
