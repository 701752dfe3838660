"""What the sizing verdict reports beside CPU (BENCH-PROFILE): memory per device with the
kernel's socket memory counted, and the gateway's event-loop lag maximum.

- ``kernel_sockets``: real TCP connections held by this process, with bytes left unread
  in their receive queues, are found by their inodes and counted with those bytes and
  their kernel objects (``ss`` and /proc/slabinfo, on Linux).
- ``loop_lag_summary``: the largest lag of any second inside the window, from stats
  files each carrying their last seconds' maxima, with what happened outside the
  window left out of the window figure; gen-2 collections counted in the window.
- ``judge`` puts them into each proxy's metrics (KiB per device with the kernel's
  part, loop-lag maximum).
"""
from __future__ import annotations

import os
import shutil
import socket

import pytest

from seg_fast.sim import sizing

SS = """\
ESTAB 0      0      127.0.0.1:5000 127.0.0.1:40000 ino:111 sk:1 cgroup:/ <->
\t skmem:(r4096,rb131072,t0,tb2626560,f0,w0,o0,bl0,d0)
TIME-WAIT 0 0 127.0.0.1:5001 127.0.0.1:40001 timer:(timewait,59sec,0)
LISTEN 0      4096   127.0.0.1:5000 0.0.0.0:* ino:222 sk:2 cgroup:/ <->
\t skmem:(r0,rb131072,t0,tb16384,f0,w0,o0,bl0,d0)
ESTAB 0      10     127.0.0.1:40000 127.0.0.1:5000 ino:333 sk:3 cgroup:/ <->
\t skmem:(r0,rb131072,t1280,tb2626560,f2816,w1280,o64,bl0,d0)
"""


def test_skmem_counts_queues_and_reservations_not_limits():
    got = sizing.parse_skmem(SS)
    # r + w + f + o; rb and tb are limits; a TIME-WAIT line with no inode is nobody's
    assert got == {111: 4096, 222: 0, 333: 1280 + 2816 + 64}


@pytest.mark.skipif(shutil.which("ss") is None or not os.path.exists("/proc/self/fd"),
                    reason="needs ss (iproute2) and /proc")
def test_kernel_socket_memory_of_a_process_holding_tcp_connections():
    unread = 200_000
    before = sizing.kernel_sockets([os.getpid()])   # whatever this test process holds already
    ln = socket.socket()
    ln.bind(("127.0.0.1", 0))
    ln.listen(16)
    pairs = []
    try:
        for _ in range(5):
            c = socket.create_connection(ln.getsockname())
            s, _ = ln.accept()
            pairs.append((c, s))
        pairs[0][0].sendall(b"x" * unread)          # left unread in the other end's queue
        got = sizing.kernel_sockets([os.getpid()])
    finally:
        for c, s in pairs:
            c.close()
            s.close()
        ln.close()
    assert got is not None and before is not None
    assert got["tcp_sockets"] - before["tcp_sockets"] == 11     # 5 pairs and the listener
    # the unread bytes are held by the kernel for this process (skb overhead on top)
    assert (got["buffers_kib"] - before["buffers_kib"]) * 1024 >= unread
    if got["objects_bytes_per_socket"]:            # /proc/slabinfo readable (root)
        assert got["objects_kib"] == round(got["tcp_sockets"] * got["objects_bytes_per_socket"] / 1024, 1)
    assert got["kib"] == pytest.approx(got["buffers_kib"] + got["objects_kib"], abs=0.2)


def _snap(pid: int, max_ms: float, series: list, gen2: int) -> dict:
    # a worker's ``loop_lag`` as its stats file carries it (seg_fast.stats)
    return {"max_ms": max_ms, "max_per_second": series,
            "gc": {"collections": [50, 5, gen2], "max_ms": [0.1, 1.0, 180.0]}}


def test_loop_lag_maximum_is_the_windows_not_the_runs():
    # window: seconds 100 .. 110. Worker 1 stalled 900 ms in the ramp (second 95) and
    # 40 ms inside the window; worker 2's worst second in the window is 75 ms, seen
    # only in the series of a later read (each file carries its last seconds).
    reads = [
        (95.5, {1: _snap(1, 900.0, [[94, 3.0], [95, 900.0]], 2), 2: _snap(2, 5.0, [[95, 5.0]], 1)}),
        (100.5, {1: _snap(1, 900.0, [[99, 2.0], [100, 4.0]], 3), 2: _snap(2, 5.0, [[100, 1.0]], 1)}),
        (105.5, {1: _snap(1, 900.0, [[104, 40.0], [105, 2.0]], 3), 2: _snap(2, 75.0, [[103, 75.0], [105, 1.0]], 1)}),
        (111.5, {1: _snap(1, 900.0, [[110, 300.0], [111, 1.0]], 5), 2: _snap(2, 75.0, [[111, 1.0]], 2)}),
    ]
    got = sizing.loop_lag_summary(reads, 100.0, 110.0)
    assert got["max_ms_window"] == 75.0             # not 900 (ramp) nor 300 (second 110: after)
    assert got["notable_seconds"] == [[3, 75.0]]     # second 103: 3 s into the window, >= 50 ms
    assert got["max_ms_run"] == 900.0
    assert got["workers"] == 2
    # gen-2 collections between the last read before w0 (95.5) and the last before w1
    # (105.5): worker 1 went 2 -> 3, worker 2 stayed at 1
    assert got["gc_gen2_in_window"] == 1
    assert got["gc_gen2_max_ms_run"] == 180.0
    assert sizing.loop_lag_summary([], 0.0, 1.0) is None


def test_loop_lag_window_ends_before_the_fleets_stop():
    # The hold ends 0.4 s into wall second 110; the rest of that second is the fleet's stop
    # (every parked Ping closed at once: 300 ms here). Only whole seconds inside count.
    reads = [
        (105.5, {1: _snap(1, 40.0, [[104, 40.0], [105, 2.0]], 3)}),
        (111.5, {1: _snap(1, 300.0, [[109, 12.0], [110, 300.0], [111, 1.0]], 3)}),
    ]
    got = sizing.loop_lag_summary(reads, 100.0, 110.4)
    assert got["max_ms_window"] == 40.0
    assert got["seconds_in_window"] == 3            # 104, 105, 109 (110 is cut by the stop)
    assert got["notable_seconds"] == []
    assert got["max_ms_run"] == 300.0               # the stop still shows in the run's maximum
    assert sizing.loop_lag_summary(reads, 100.0, 111.0)["max_ms_window"] == 300.0


def test_judge_reports_memory_with_the_kernel_and_the_loop_lag_per_device(monkeypatch):
    from tests.test_fleet_failures import _path

    monkeypatch.setattr(sizing, "shard_limit", lambda: 20_000)     # (whatever this machine's descriptors allow)

    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    gw = _path("gateway", {})
    gw["server"].update(rss_kib_max=10_000, rss_kib_idle=4_000,
                        kernel_sockets={"tcp_sockets": 200, "buffers_kib": 100.0, "objects_kib": 700.0,
                                        "objects_bytes_per_socket": 3584, "kib": 800.0},
                        loop_lag={"max_ms_window": 12.5, "max_ms_run": 300.0, "gc_gen2_in_window": 0})
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", {}), "gateway": gw}}, opts)
    m = v["metrics"]["gateway"]
    assert m["kib_per_device"] == 100.0
    assert m["kernel_socket_kib_per_device"] == 8.0
    assert m["kib_per_device_with_kernel"] == 108.0
    assert m["kib_per_device_marginal_with_kernel"] == 68.0
    assert (m["loop_lag_max_ms"], m["loop_lag_max_ms_run"], m["gc_gen2_in_window"]) == (12.5, 300.0, 0)
    # 2 GiB reached with the workers more devices need: one idle worker per shard's worth
    # (here 4,000 KiB idle for 1 worker of 8,000 devices: 0.5 KiB per device beside 60)
    assert m["idle_kib_per_worker"] == 4000
    assert m["projected_devices_at_2GiB"] == int(2 * 1024 * 1024 / (60 + 4000 / 8000))
    assert m["pss_mib"] is None and m["pss_kib_per_device"] is None     # (a run before PSS was read)
    # with the workers' PSS read (shared pages counted once), the projection is made on it
    gw["server"].update(pss_kib_max=7_000, pss_kib_idle=2_000)
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", {}), "gateway": gw}}, opts)
    m = v["metrics"]["gateway"]
    assert m["kib_per_device"] == 100.0 and m["pss_kib_per_device"] == 70.0
    assert m["pss_kib_per_device_with_kernel"] == 78.0
    assert m["idle_kib_per_worker"] == 2000
    assert m["projected_devices_at_2GiB"] == int(2 * 1024 * 1024 / (50 + 2000 / 8000))
    # nothing measured (nginx has no loop to read; ss missing): None, not a made-up zero
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", {}), "gateway": _path("gateway", {})}},
                     opts)
    m = v["metrics"]["gateway"]
    assert m["kib_per_device_with_kernel"] is None and m["loop_lag_max_ms"] is None


def test_a_workers_stats_file_carries_its_last_seconds_of_loop_lag(tmp_path):
    """What the sizing run reads: a worker's stats file (seg_fast.stats) with its loop
    lag, whose last seconds' maxima come along (ten: a reader once a second misses none)."""
    from types import SimpleNamespace

    from seg_fast import stats
    from seg_fast.proxy.looplag import LoopLag

    lag = LoopLag()
    for sec in range(1000, 1030):
        lag.record(float(sec - 1000), now=sec + 0.5)   # second s: a lag of s - 1000 ms
    lag.record(250.0, now=1030.2)
    gw = SimpleNamespace(active=0, pool=None, incidents=SimpleNamespace(counts={}), looplag=lag)
    stats.write_snapshot(tmp_path, stats.Stats().snapshot(gw))
    (got,) = sizing.read_loop_lag(tmp_path).values()
    assert got["max_ms"] == 250.0
    assert got["max_per_second"][-1] == [1030, 250.0]
    assert [s for s, _ in got["max_per_second"]] == list(range(1021, 1031))
    # and the window's maximum follows from it exactly
    summary = sizing.loop_lag_summary([(1030.5, {1: got})], 1021.0, 1030.0)
    assert summary["max_ms_window"] == 29.0 and summary["max_ms_run"] == 250.0


def test_the_run_records_settings_the_gateway_took_from_the_environment(monkeypatch):
    # an A/B of a gateway setting runs the same command with SEG_FAST_<SECTION>_<KEY> set:
    # the JSON must say which arm it is
    monkeypatch.setenv("SEG_FAST_LIMITS_MAX_PING_BODY", "4096")
    monkeypatch.setenv("SEG_FAST_STATE_DIR", "/tmp/x")          # the run's own, not a knob
    monkeypatch.setenv("SEG_FAST_SLOW", "1")                    # not a setting
    assert sizing.settings_from_env() == {"limits.max_ping_body": "4096"}
    assert sizing.machine()["settings_from_env"] == {"limits.max_ping_body": "4096"}
