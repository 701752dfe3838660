"""The dashboard's last 24 hours (admin/series.py): per-bucket increases of the workers'
counters, gauges, bounds, restarts of workers and of the control process.

The oracle is the sum of what was fed in: every bucket's counts are checked against
the increments the test made, not against the code's own arithmetic.
"""
from __future__ import annotations

import os
import stat

from hypothesis import given, settings, strategies as st

from seg_fast.admin.series import MAX_KEYS, OTHER, Series
from seg_fast.stats import WorkerSnapshot

T0 = 1_800_000_000.0            # a bucket boundary (divisible by 300)


def snap(pid=1, started=1.0, *, sync=0, ping=0, errors=0, blocked=0, enc=0, links=0, parked=0):
    return WorkerSnapshot(
        pid=pid, ts=T0, started=started,
        requests={k: v for k, v in (("Sync", {"200": sync}), ("Ping", {"200": ping})) if sum(v.values())},
        decisions={"blocked.device_compromised": blocked} if blocked else {},
        gateway_answers={"upstream_unavailable": errors} if errors else {},
        attachments={"encrypt": enc} if enc else {}, links_rewritten=links, parked_pings=parked)


def test_increases_land_in_their_buckets():
    s = Series(step=300, span=3600)
    s.sample([snap(sync=5, links=2)], now=T0 + 10)
    s.sample([snap(sync=8, links=2, enc=1, parked=3)], now=T0 + 200)
    s.sample([snap(sync=10, links=7, enc=1, errors=4, parked=1)], now=T0 + 310)     # the next bucket
    v = s.view(now=T0 + 320, hours=1)
    assert v["buckets"] == 12 and v["step"] == 300 and v["start"] == T0 + 300 - 11 * 300
    series = v["series"]
    assert series["requests_by_command"]["Sync"][-2:] == [8, 2]
    assert series["requests_by_status"]["200"][-2:] == [8, 2]
    assert series["links_rewritten"]["links"][-2:] == [2, 5]
    assert series["attachments"]["encrypt"][-2:] == [1, 0]
    assert series["mail_server_errors"]["unavailable"][-2:] == [0, 4]
    assert series["parked_pings"]["parked"][-3:] == [None, 3, 1]      # highest in the bucket; none before
    assert sum(series["requests_by_command"]["Sync"]) == 10


def test_two_workers_a_restart_and_a_worker_gone():
    s = Series(step=300, span=3600)
    s.sample([snap(pid=1, sync=3), snap(pid=2, sync=4)], now=T0)
    # Worker 2 restarted (new start time: its count starts again), worker 1 counted on.
    s.sample([snap(pid=1, sync=5), snap(pid=2, started=9.0, sync=1)], now=T0 + 1)
    # Worker 1 gone; worker 3 new.
    s.sample([snap(pid=2, started=9.0, sync=2), snap(pid=3, sync=6)], now=T0 + 2)
    assert s.view(now=T0 + 3, hours=1)["series"]["requests_by_command"]["Sync"][-1] == 3 + 4 + 2 + 1 + 1 + 6


def test_old_buckets_go_and_keys_are_bounded():
    s = Series(step=300, span=3600)
    for i in range(30):
        s.sample([snap(sync=i + 1)], now=T0 + i * 300)
    assert len(s.buckets) == 12
    assert min(s.buckets) == T0 + 18 * 300
    many = WorkerSnapshot(pid=5, ts=T0, requests={f"Cmd{i}": {"200": 1} for i in range(MAX_KEYS + 50)})
    s.sample([many], now=T0 + 30 * 300)
    got = s.view(now=T0 + 30 * 300, hours=1)["series"]["requests_by_command"]
    # Bounded per bucket (the 100 first keys and "(other)") and over the view (with "Sync" of
    # the earlier buckets: the largest keys and "(other)"); nothing counted is lost.
    last = s.buckets[int(T0 + 30 * 300)].counters["requests_by_command"]
    assert len(last) == MAX_KEYS + 1 and last[OTHER] == 50
    assert len(got) == MAX_KEYS and OTHER in got and "Sync" in got
    assert sum(v[-1] for v in got.values()) == MAX_KEYS + 50
    assert sum(got["Sync"]) == 11          # one a bucket in the 11 before (older ones are gone)


def test_device_gauges():
    s = Series(step=300, span=3600)
    s.sample([], devices={"by_status": {"allowed": 3, "blocked": 2},
                          "by_reason": {"allowed.managed": 3, "blocked.device_compromised": 2}}, now=T0)
    s.sample([], devices={"by_status": {"allowed": 4, "blocked": 1},
                          "by_reason": {"allowed.managed": 4, "blocked.device_compromised": 1}}, now=T0 + 400)
    v = s.view(now=T0 + 400, hours=1)["series"]
    assert v["devices_by_status"]["allowed"][-2:] == [3, 4]
    assert v["devices_by_status"]["blocked"][-2:] == [2, 1]
    assert set(v["devices_by_reason"]) == {"blocked.device_compromised"}     # the blocking reasons


def test_saved_and_read_back(tmp_path):
    path = tmp_path / "state" / "series.json"
    s = Series(path, step=300, span=86400)
    s.sample([snap(sync=5, enc=2)], now=T0)
    s.save()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    t = Series(path, step=300, span=86400)
    t.load()
    assert t.buckets == s.buckets
    # The same worker still running: only its increase counts after the reload.
    t.sample([snap(sync=6, enc=2)], now=T0 + 1)
    assert t.view(now=T0 + 1, hours=1)["series"]["requests_by_command"]["Sync"][-1] == 6
    # A damaged file costs the history, not the start.
    path.write_bytes(b"{not json")
    u = Series(path)
    u.load()
    assert u.buckets == {}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 900)), max_size=40))
def test_sum_of_buckets_is_what_the_workers_counted(steps):
    """Any interleaving of increments over three workers and time: the buckets add up to the
    workers' final counts, and each increment lands in its own bucket."""
    s = Series(step=300, span=86400)
    counts = {1: 0, 2: 0, 3: 0}
    per_bucket: dict[int, int] = {}
    now = T0
    for worker, inc, dt in steps:
        now += dt
        if worker:
            counts[worker] += inc
            b = int(now // 300 * 300)
            per_bucket[b] = per_bucket.get(b, 0) + inc
        s.sample([snap(pid=p, sync=n) for p, n in counts.items()], now=now)
    v = s.view(now=now, hours=24)
    got = v["series"]["requests_by_command"].get("Sync", [0] * v["buckets"])
    assert sum(got) == sum(counts.values())
    for b, n in per_bucket.items():
        i = int((b - v["start"]) // 300)
        assert got[i] == n
