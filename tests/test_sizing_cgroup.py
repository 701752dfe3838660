"""The sizing benchmark's second method: the gateway held to a fraction of a core by a
cgroup CPU limit (seg_fast.sim.cgroup), and the two-fraction cross-check.

The limit tests need a cgroup CPU controller we may write to (root, or a delegated
subtree): cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``. Where there is none they
skip, naming why; this is the one reason they may skip under CI too (CI=true): a CI
runner's container often has no cgroup CPU control delegated, and that is a property
of the machine, not a missing install.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import trio

from seg_fast.sim import sizing
from seg_fast.sim.cgroup import CpuLimit, find_cpu_controller

_found = find_cpu_controller()
needs_cgroup = pytest.mark.skipif(isinstance(_found, str),
                                  reason=f"no cgroup CPU control on this machine: {_found}")

BUSY = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < {s}: pass\n"


@needs_cgroup
@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_busy_loops_get_their_fraction_and_no_more(fraction):
    # three busy loops in one group: they ask for three cores, so even on a busy shared
    # machine they ask for more than the quota and the kernel has to hold them to it
    wall_s = 2.5
    with CpuLimit(fraction) as cg:
        t = time.monotonic()
        procs = [subprocess.Popen(cg.prefix() + [sys.executable, "-c", BUSY.format(s=wall_s)])
                 for _ in range(3)]
        # each is in the group from its first instruction (the prefix moved itself)
        deadline = time.monotonic() + 20
        while (any(p.pid not in cg.pids() and p.poll() is None for p in procs)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert all(p.pid in cg.pids() for p in procs)
        used_s = 0.0
        for p in procs:
            _pid, status, ru = os.wait4(p.pid, 0)
            assert status == 0
            used_s += ru.ru_utime + ru.ru_stime          # from their own rusage
        wall = time.monotonic() - t
        info = cg.throttling()
    used = used_s / wall                                # of one core
    # never more than the quota (plus one period of slack and the interpreters'
    # start); other load on the machine can only make it less
    assert used <= fraction * 1.15 + 0.03, (used, info)
    # the kernel throttled them: the limit, not luck, held them there
    assert info["nr_throttled"] > 0 and info["throttled_s"] > 0, info
    assert info["quota_us"] == round(fraction * info["period_us"])
    assert not cg.path.exists()                         # the group is gone afterwards


@needs_cgroup
def test_unlimited_busy_loop_is_not_throttled():
    # the control: one loop (at most one core) in a group allowed two cores is never
    # throttled (at exactly one core, CFS's per-CPU runtime slices can throttle a
    # task that moves between CPUs now and then)
    with CpuLimit(2.0) as cg:
        proc = subprocess.Popen(cg.prefix() + [sys.executable, "-c", BUSY.format(s=0.5)])
        proc.wait()
        info = cg.throttling()
    assert info["nr_periods"] > 0 and info["nr_throttled"] == 0, info


def test_fraction_out_of_range_is_refused():
    with pytest.raises(ValueError):
        CpuLimit(0.0)


def _point(devices: int, held: float, cpu_s_per_device_hour: float, meets: bool = True) -> dict:
    share = cpu_s_per_device_hour * devices / 3600.0
    return {"devices": devices, "verdict": {
        "meets": meets, "held_to_cores": held,
        "metrics": {"gateway": {"cpu_s_per_device_hour": cpu_s_per_device_hour, "cpu_share": share,
                                "projected_devices_at_80pct_cpu": int(devices * 0.8 / share),
                                "cgroup": {"fraction": held}}}}}


def test_crosscheck_claims_n_over_f_only_when_both_agree():
    ok = sizing.crosscheck([_point(10_000, 0.5, 0.0200), _point(20_000, 1.0, 0.0210)])
    assert ok["agree"] and ok["cpu_spread"] == pytest.approx(0.0476, abs=1e-3)
    assert ok["devices_per_core"] == 20_000 and ok["why_not"] == []
    # 12% apart: the limit (or the scaling) is not what it seems; nothing claimed
    off = sizing.crosscheck([_point(10_000, 0.5, 0.0200), _point(20_000, 1.0, 0.0228)])
    assert not off["agree"] and off["devices_per_core"] is None
    assert "12.3%" in off["why_not"][0]
    # agreeing costs, but one fraction missed the service level
    miss = sizing.crosscheck([_point(10_000, 0.5, 0.0200), _point(20_000, 1.0, 0.0200, meets=False)])
    assert miss["agree"] and miss["devices_per_core"] is None
    assert "20000 devices at 1 core missed" in miss["why_not"][0]


def test_headline_divides_by_the_fraction():
    p = _point(10_000, 0.5, 0.02)
    h = sizing.headline([p], "off")
    assert h["best_devices_per_core"] == 20_000 and h["held_to_cores"] == 0.5


@needs_cgroup
def test_gateway_runs_inside_the_limit():
    # a real (time-compressed, so claim-less) run through `seg-fast serve --worker`
    # held to 0.5 of its core: the summary carries the group's counters, which move
    # only when the gateway's own processes ran inside it
    opts = sizing.Options(devices=60, ramp=2.0, settle=1.0, hold=4.0, drain=10.0, paths=["gateway"],
                          shard_size=100, rate_scale=40.0, seed=5, repeat=1, tls=False,
                          cgroup_fraction=0.5)
    report = trio.run(sizing.bench, opts, False, 60, lambda _msg: None)
    (point,) = report["points"]
    gw = point["runs"][0]["paths"]["gateway"]
    assert gw["failures"] == {}, gw["failure_samples"]
    cg = gw["server"]["cgroup"]
    assert cg["fraction"] == 0.5 and cg["nr_periods"] > 0, cg
    v = point["verdict"]
    assert v["held_to_cores"] == 0.5
    assert v["metrics"]["gateway"]["devices_per_core"] == 120
    assert not v["meets"]                        # time compressed: claims nothing
