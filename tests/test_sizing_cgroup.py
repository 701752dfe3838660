"""The sizing benchmark's second method: the gateway held to a fraction of a core by a
cgroup CPU limit (seg_fast.sim.cgroup), and the two-fraction cross-check.

The limit tests need a cgroup CPU controller we may write to (root, or a delegated
subtree): cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``. Where there is none they
skip, naming why; this is the one reason they may skip under CI too (CI=true): a CI
runner's container often has no cgroup CPU control delegated, and that is a property
of the machine, not a missing install.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import msgspec
import pytest
import trio

from seg_fast.sim import sizing
from seg_fast.sim.cgroup import MIN_QUOTA_US, PERIOD_US, CpuLimit, find_cpu_controller

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
    # a quota under the kernel's 1 ms would be clamped to another fraction than asked
    with pytest.raises(ValueError, match="out of range"):
        CpuLimit(0.5 * MIN_QUOTA_US / PERIOD_US)


def _point(devices: int, held: float, cpu_s_per_device_hour: float, meets: bool = True) -> dict:
    share = cpu_s_per_device_hour * devices / 3600.0
    return {"devices": devices, "verdict": {
        "meets": meets, "held_to_cores": held, "broke": [] if meets else ["paired added p99 60.0 ms on Sync"],
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


def test_crosscheck_at_a_quarter_claims_n_over_a_quarter():
    assert sizing.crosscheck_plan(0.25) == [(0.25, 1), (0.5, 2)]
    ok = sizing.crosscheck([_point(5_000, 0.25, 0.0200), _point(10_000, 0.5, 0.0190)])
    assert ok["agree"] and ok["devices_per_core"] == 20_000
    assert ok["fractions"] == [0.25, 0.5] and ok["devices_driven"] == [5_000, 10_000]
    assert [r["devices_per_core"] for r in ok["points"]] == [20_000, 20_000]
    off = sizing.crosscheck([_point(5_000, 0.25, 0.0200), _point(10_000, 0.5, 0.0240)])
    assert not off["agree"] and off["devices_per_core"] is None and "16.7%" in off["why_not"][0]
    miss = sizing.crosscheck([_point(5_000, 0.25, 0.0200, meets=False), _point(10_000, 0.5, 0.0200)])
    assert miss["devices_per_core"] is None
    assert miss["why_not"] == ["5000 devices at 0.25 core missed the service level"]
    # a development pair: both met the bounds, neither claims anything, and it says so
    dev = [_point(5_000, 0.25, 0.0200), _point(10_000, 0.5, 0.0200)]
    for p in dev:
        p["verdict"].update(meets=False, claimless=["time compressed (rate scale 10.0): development run"])
    assert sizing.crosscheck(dev)["why_not"][0] == ("5000 devices at 0.25 core met the service level but claims "
                                                    "nothing (time compressed (rate scale 10.0): development run)")


def _verdict(devices: int, held: float, kind: str) -> dict:
    """A combined verdict of one of search_step's kinds."""
    v = {"devices": devices, "held_to_cores": held, "meets": kind == "meets", "broke": [], "undriven": [],
         "unmeasured": [], "claimless": [], "caveats": [],
         "metrics": {"gateway": {"cpu_s_per_device_hour": 0.06, "cpu_share": 0.3 * held}}}
    if kind == "broke":
        v["broke"] = ["paired added p99.9 120.0 ms on ItemOperations, n=1500 > 100 ms"]
    elif kind == "undriven":
        v["undriven"] = ["gateway: load side fell behind schedule (p99 1.40s, max 3.00s)"]
        v["metrics"].update(load_cpu_vs_gateway=1.12, load_kernel_cpu_vs_gateway=0.41)
    elif kind == "unmeasured":
        v["unmeasured"] = ["gateway: the cgroup CPU limit was not applied"]
    elif kind == "passes":
        v["claimless"] = ["time compressed (rate scale 10.0): development run"]
    v["invalid"] = v["undriven"] + v["unmeasured"] + v["claimless"]
    return v


def _fake_measure(monkeypatch, kind_at):
    """sizing.measure replaced by ``kind_at(per_core, driven, fraction)`` -> kind; returns
    the (driven, fraction) of every point measured, in order."""
    asked = []

    async def measure(o, say, done=(), on_run=None):
        f = o.cgroup_fraction or 1.0
        asked.append((o.devices, o.cgroup_fraction))
        return {"devices": o.devices, "verdict": _verdict(o.devices, f, kind_at(round(o.devices / f), o.devices, f)),
                "runs": []}
    monkeypatch.setattr(sizing, "measure", measure)
    return asked


def _search(per_core_start: int, max_per_core: int, fraction: float, lines=None) -> dict:
    opts = sizing.Options(devices=per_core_start, cgroup_fraction=fraction)
    say = lines.append if lines is not None else (lambda _m: None)
    return trio.run(sizing.bench, opts, True, max_per_core, say)


def test_search_walks_per_core_and_drives_a_fraction_of_it(monkeypatch):
    # the gateway meets up to 150,000 per core: at a quarter of a core the search
    # reaches it driving at most 40,000 devices (the brief's command line)
    asked = _fake_measure(monkeypatch, lambda pc, n, f: "meets" if pc <= 150_000 else "broke")
    lines: list[str] = []
    report = _search(20_000, 160_000, 0.25, lines)
    assert [n for n, _ in asked] == [5_000, 10_000, 20_000, 40_000, 30_000, 35_000, 37_500]
    assert all(f == 0.25 for _, f in asked)
    h = report["headline"]
    assert h["best_devices_per_core"] == 150_000 and h["best_devices_driven"] == 37_500
    assert h["held_to_cores"] == 0.25
    stop = h["search_stop"]
    assert stop["by"] == "gateway" and stop["devices_per_core"] == 160_000 and stop["devices_driven"] == 40_000
    assert stop["why"] == ["paired added p99.9 120.0 ms on ItemOperations, n=1500 > 100 ms"]
    assert stop["largest_met_per_core"] == 150_000
    said = "\n".join(lines)
    assert "[N=37500] (150000 per core at 0.25 core) MEETS" in said
    assert "search stopped: the gateway missed the service level at 160000 devices per core (40000 driven" in said
    assert "ItemOperations" in said


def test_search_without_a_fraction_walks_driven_devices(monkeypatch):
    asked = _fake_measure(monkeypatch, lambda pc, n, f: "meets" if pc <= 12_000 else "broke")
    report = _search(5_000, 200_000, 0.0)
    # doubling, then bisection to a tenth of the largest met (500 at least)
    assert [n for n, _ in asked] == [5_000, 10_000, 20_000, 15_000, 12_500, 11_250, 11_875]
    assert report["headline"]["best_devices_per_core"] == 11_875
    assert report["headline"]["search_stop"]["devices_per_core"] == 12_500


def test_search_bisects_below_where_the_load_side_cannot_drive_and_says_it_stopped_it(monkeypatch):
    # the load side drives up to 17,000 devices; the gateway would meet anything
    asked = _fake_measure(monkeypatch, lambda pc, n, f: "meets" if n <= 17_000 else "undriven")
    lines: list[str] = []
    report = _search(20_000, 200_000, 0.25, lines)
    assert [n for n, _ in asked] == [5_000, 10_000, 20_000, 15_000, 17_500, 16_250]
    assert lines[2].startswith("[N=20000] (80000 per core at 0.25 core) was not driven: the load side's limit")
    stop = report["headline"]["search_stop"]
    # the lowest point above the largest met stopped it, and the load side stopped that one
    assert stop["by"] == "load side" and stop["devices_driven"] == 17_500
    assert stop["said"].startswith("the load side could not drive 70000 devices per core")
    assert "fell behind schedule" in stop["why"][0]
    # with what the load side cost there, and its kernel's part alone
    assert stop["load_cpu_vs_gateway"] == 1.12 and stop["load_kernel_cpu_vs_gateway"] == 0.41
    assert stop["largest_met_per_core"] == 65_000
    assert report["headline"]["best_devices_per_core"] == 65_000
    # a miss below an undriven point: the gateway stopped it
    asked = _fake_measure(monkeypatch, lambda pc, n, f: ("meets" if pc <= 40_000 else
                                                         "broke" if pc <= 60_000 else "undriven"))
    report = _search(20_000, 200_000, 0.25)
    assert [n for n, _ in asked] == [5_000, 10_000, 20_000, 15_000, 12_500, 11_250, 10_625]
    stop = report["headline"]["search_stop"]
    assert stop["by"] == "gateway" and stop["devices_per_core"] == 42_500
    assert stop["largest_met_per_core"] == 40_000


def test_search_stops_at_an_unmeasured_point_and_at_its_bound(monkeypatch):
    _fake_measure(monkeypatch, lambda pc, n, f: "unmeasured" if pc > 20_000 else "meets")
    stop = _search(20_000, 200_000, 0.5)["headline"]["search_stop"]
    assert stop["by"] == "measurement" and stop["why"] == ["gateway: the cgroup CPU limit was not applied"]
    # every point meets: the bound (per core) is where it ends, never driven past it
    asked = _fake_measure(monkeypatch, lambda pc, n, f: "meets")
    report = _search(20_000, 100_000, 0.25)
    assert max(n for n, _ in asked) <= 25_000
    stop = report["headline"]["search_stop"]
    assert stop["by"] == "bound" and stop["said"] == "the search's bound, --max-devices 100000 per core"
    assert stop["largest_met_per_core"] >= 90_000


def test_a_development_search_walks_on_but_claims_nothing(monkeypatch):
    # time compressed points that met the service level: the walk goes on (the load
    # side drove them), the headline claims nothing
    asked = _fake_measure(monkeypatch, lambda pc, n, f: "passes" if pc <= 1_000 else "broke")
    lines: list[str] = []
    report = _search(400, 10_000, 0.25, lines)
    assert [n for n, _ in asked] == [100, 200, 400, 300]
    assert lines[0].startswith("[N=100] (400 per core at 0.25 core) meets the service level, claims nothing")
    h = report["headline"]
    assert h["best_devices_per_core"] is None and h["search_stop"]["by"] == "gateway"
    assert h["search_stop"]["largest_met_per_core"] == 800 and h["search_stop"]["devices_per_core"] == 1_200


def test_cgroup_check_at_a_fraction_runs_n_at_f_and_2n_at_2f(monkeypatch):
    asked = _fake_measure(monkeypatch, lambda pc, n, f: "meets")
    lines: list[str] = []
    opts = sizing.Options(devices=10_000)
    report = trio.run(sizing.bench, opts, False, 0, lines.append, 0.25)
    assert asked == [(10_000, 0.25), (20_000, 0.5)]
    h = report["headline"]
    assert h["best_devices_per_core"] == 40_000 and h["best_devices_driven"] == 10_000
    assert h["cgroup_crosscheck"]["fractions"] == [0.25, 0.5] and h["cgroup_crosscheck"]["agree"]
    assert report["crosscheck"]["devices_driven"] == [10_000, 20_000]
    assert any(x.startswith("cgroup cross-check (10000 at 0.25 core and 20000 at 0.5 core)") for x in lines)


@pytest.mark.parametrize("args, error", [
    (["--cgroup-fraction", "1.5"], "--cgroup-fraction 1.5 is out of range"),
    (["--cgroup-fraction", "0.005"], "--cgroup-fraction 0.005 is out of range"),   # quota < 1 ms
    (["--cgroup-check", "0.6"], "2F <= 1"),
    (["--cgroup-check", "0.005"], "--cgroup-check 0.005 is below"),
    (["--cgroup-check", "--search"], "--cgroup-check picks its own fractions"),
    (["--cgroup-check", "0.25", "--cgroup-fraction", "0.25"], "--cgroup-check picks its own fractions"),
    (["--search", "--devices", "20000", "--max-devices", "10000"], "--max-devices 10000 is below --devices 20000"),
    (["--realtime", "gateway,nginx"], "--realtime gateway,nginx: nginx is not a side"),
    (["--realtime", "gateway", "--cgroup-fraction", "0.5"], "a cgroup's CPU limit does not apply"),
    (["--rr-timeslice-ms", "10"], "--rr-timeslice-ms 10: the slice is the real-time policy's; it needs --realtime"),
    (["--realtime", "gateway", "--rr-timeslice-ms", "1001"], "--rr-timeslice-ms 1001: 1 to 1000"),
])
def test_bad_fractions_and_bounds_are_refused_before_anything_runs(args, error, capsys, monkeypatch):
    async def no_bench(*_a, **_k):
        raise AssertionError("nothing may run")
    monkeypatch.setattr(sizing, "bench", no_bench)
    assert sizing.cli(["sizing", *args]) == 2
    assert error in capsys.readouterr().err


def test_a_bare_cgroup_check_is_a_half(monkeypatch, tmp_path):
    got = {}

    async def bench(opts, search, max_devices, say, cgroup_check=0.0, on_point=None, earlier=None, pending=None):
        got["check"] = cgroup_check
        report = {"machine": {}, "options": {"security": "off"}, "when": "now", "headline": {}, "points": []}
        on_point(report)
        got["partial"] = sorted(p.name for p in tmp_path.glob("*.partial*.json"))
        return report
    monkeypatch.setattr(sizing, "bench", bench)
    monkeypatch.setattr(sizing, "find_cpu_controller", lambda: ("v1", tmp_path))
    cpus = os.sched_getaffinity(0)
    assert sizing.cli(["sizing", "--cgroup-check", "--out", str(tmp_path), "--quiet"]) == 0
    assert got["check"] == 0.5
    # the report so far was on disk during the run, and gave way to the whole one
    assert len(got["partial"]) == 2 and got["partial"][0].startswith("sizing-off-")
    assert got["partial"][1] == got["partial"][0].replace(".partial.json", ".partial.raw.json")
    assert not list(tmp_path.glob("*.partial*.json")) and list(tmp_path.glob("sizing-off-*.raw.json"))
    assert os.sched_getaffinity(0) == cpus      # the CLI pinned its harness for the run only
    assert sizing.cli(["sizing", "--cgroup-check", "0.25", "--out", str(tmp_path), "--quiet"]) == 0
    assert got["check"] == 0.25


def test_memory_at_a_fraction_is_judged_at_the_devices_it_stands_for(monkeypatch):
    # 20,000 devices at a quarter core on 3 workers use 700 MiB (90 of it idle): the
    # 80,000 per core they stand for would use 610 / 0.25 = 2,440 MiB for the devices and
    # 10 idle workers (300 MiB), over the 2 GiB bound; on a whole core 700 is fine
    from tests.test_fleet_failures import _path
    monkeypatch.setattr(sizing, "shard_limit", lambda: 100_000)     # 8,000 per worker here too

    def judged(fraction: float) -> dict:
        gw = _path("gateway", {})
        gw["server"].update(rss_kib_max=700 * 1024, rss_kib_idle=90 * 1024, cgroup={"fraction": fraction})
        opts = sizing.Options(devices=20_000, hold=120.0, repeat=1, cgroup_fraction=fraction, shard_size=8000)
        return sizing.judge({"devices": 20_000, "paths": {"direct": _path("direct", {}), "gateway": gw}}, opts)

    assert judged(0.25)["broke"] == ["gateway RSS 2740 MiB projected to 80000 devices (700 MiB measured at 20000) "
                                     "> 2 GiB"]
    assert not any("RSS" in b for b in judged(1.0)["broke"])
    assert not any("RSS" in b for b in judged(0.5)["broke"])        # 1,220 + 150 MiB at 40,000
    # where the run read the workers' PSS (shared pages once), that is what is judged: 500 MiB
    # (60 idle) at a quarter core is 440 / 0.25 + 10 x 20 = 1,960 MiB at 80,000, within 2 GiB
    gw = _path("gateway", {})
    gw["server"].update(rss_kib_max=700 * 1024, rss_kib_idle=90 * 1024, pss_kib_max=500 * 1024,
                        pss_kib_idle=60 * 1024, cgroup={"fraction": 0.25})
    opts = sizing.Options(devices=20_000, hold=120.0, repeat=1, cgroup_fraction=0.25, shard_size=8000)
    v = sizing.judge({"devices": 20_000, "paths": {"direct": _path("direct", {}), "gateway": gw}}, opts)
    assert not any("MiB" in b for b in v["broke"]), v["broke"]
    gw["server"]["pss_kib_max"] = 540 * 1024        # 480 / 0.25 + 200 = 2,120 MiB
    v = sizing.judge({"devices": 20_000, "paths": {"direct": _path("direct", {}), "gateway": gw}}, opts)
    assert [b for b in v["broke"] if "MiB" in b] == [
        "gateway memory (PSS) 2120 MiB projected to 80000 devices (540 MiB measured at 20000) > 2 GiB"]


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


def test_realtime_sides_run_round_robin_and_answer_everything():
    # --realtime gateway,load: the gateway's workers by their own limits.realtime_priority,
    # the shards by chrt; the summary says which policy each side's processes ran under
    import os
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import os; "
                            "os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no CAP_SYS_NICE here: real-time policies are refused")
    opts = sizing.Options(devices=60, ramp=2.0, settle=1.0, hold=4.0, drain=10.0, paths=["gateway"],
                          shard_size=100, rate_scale=40.0, seed=5, repeat=1, tls=False,
                          realtime=["gateway", "load"])
    report = trio.run(sizing.bench, opts, False, 60, lambda _msg: None)
    (point,) = report["points"]
    gw = point["runs"][0]["paths"]["gateway"]
    assert gw["failures"] == {}, gw["failure_samples"]
    policies = gw["sched_policies"]
    # the gateway's worker (one for 60 devices) round-robin, the process it was forked from
    # (as serve's control process) time-shared; every shard round-robin
    assert policies["server"] == {"SCHED_RR": 1, "SCHED_OTHER": 1}, policies
    assert set(policies["load"]) == {"SCHED_RR"}, policies
    assert os.sched_getscheduler(0) == os.SCHED_OTHER       # the harness itself stays time-shared


def test_rr_timeslice_holds_for_the_run_is_recorded_and_put_back(monkeypatch, tmp_path):
    # --rr-timeslice-ms is machine-wide: set while the run measures, in the report's machine
    # record, and the kernel's own value back afterwards. The test writes a file of its own in
    # the sysctl's place: a test must not change the machine's scheduler under a sizing run
    # measuring beside it.
    from seg_fast import oslimits
    sysctl = tmp_path / "sched_rr_timeslice_ms"
    sysctl.write_text("100\n")
    monkeypatch.setattr(oslimits, "_RR_TIMESLICE", str(sysctl))
    before, want = 100, 7
    seen = {}

    async def bench(opts, search, max_devices, say, cgroup_check=0.0, on_point=None, earlier=None, pending=None):
        seen["during"] = oslimits.rr_timeslice_ms()
        return {"machine": sizing.machine(), "options": {"security": "off"}, "when": "now",
                "headline": {}, "points": []}
    monkeypatch.setattr(sizing, "bench", bench)
    monkeypatch.setattr(sizing, "plot", lambda *_a: None)
    assert sizing.cli(["sizing", "--realtime", "gateway,load", "--rr-timeslice-ms", str(want),
                       "--out", str(tmp_path), "--quiet"]) == 0
    assert seen["during"] == want
    assert oslimits.rr_timeslice_ms() == before and sysctl.read_text() == "100\n"
    (summary,) = [p for p in tmp_path.glob("sizing-off-*.json") if ".raw." not in p.name]
    assert json.loads(summary.read_text())["machine"]["sched_rr_timeslice_ms"] == want


def test_a_search_hands_over_what_it_measured_after_each_point(monkeypatch, tmp_path):
    # a search runs for hours: after each point the report so far is written, so an
    # interrupted search keeps every point it measured
    _fake_measure(monkeypatch, lambda pc, n, f: "meets" if pc <= 12_000 else "broke")
    path = tmp_path / "sizing-off-x.partial.raw.json"
    seen = []

    def on_point(report):
        sizing.write_partial(report, path)
        seen.append(json.loads(path.read_text()))

    opts = sizing.Options(devices=5_000)
    final = trio.run(lambda: sizing.bench(opts, True, 200_000, lambda _m: None, on_point=on_point))
    assert [len(r["points"]) for r in seen] == list(range(1, 8))
    assert [p["devices"] for p in seen[2]["points"]] == [5_000, 10_000, 20_000]
    assert seen[1]["headline"]["best_devices_per_core"] == 10_000
    assert seen[-1]["points"] == json.loads(json.dumps(final["points"]))
    assert not path.with_name(path.name + ".tmp").exists()
    # and its summary beside it, each point with the tree that measured it
    small = json.loads(sizing.partial_summary(path).read_text())
    assert [p["devices"] for p in small["points"]] == [p["devices"] for p in final["points"]]
    assert all(p["measured"]["commit"] and p["measured"]["when"] for p in small["points"])


def test_a_resumed_search_measures_only_what_the_interrupted_one_had_not(monkeypatch, tmp_path):
    # the whole walk, uninterrupted, and the report after its third point
    kind = lambda pc, n, f: "meets" if pc <= 130_000 else "broke"
    asked = _fake_measure(monkeypatch, kind)
    raw = tmp_path / "sizing-off-x.partial.raw.json"

    def on_point(report):
        if len(report["points"]) == 3:
            sizing.write_partial(report, raw)
    whole = trio.run(lambda: sizing.bench(sizing.Options(devices=40_000, cgroup_fraction=0.5), True, 160_000,
                                          lambda _m: None, on_point=on_point))
    walk = list(asked)
    assert walk == [(20_000, 0.5), (40_000, 0.5), (80_000, 0.5), (60_000, 0.5), (70_000, 0.5), (65_000, 0.5)]
    # the small summary beside the raw report (what a session commits) is enough to go on
    path = sizing.partial_summary(raw)
    assert path.name == "sizing-off-x.partial.json" and "runs" not in json.loads(path.read_text())["points"][0]
    # a new session goes on from it: the three are not measured again, the rest are
    earlier, pending = sizing.resumable(path, sizing.Options(devices=40_000, cgroup_fraction=0.5, quiet=True))
    assert [p["devices"] for p in earlier] == [20_000, 40_000, 80_000] and pending is None
    assert all(p["measured"]["when"] for p in earlier)
    asked = _fake_measure(monkeypatch, kind)
    lines: list[str] = []
    resumed = trio.run(lambda: sizing.bench(sizing.Options(devices=40_000, cgroup_fraction=0.5), True, 160_000,
                                            lines.append, earlier=earlier))
    assert asked == walk[3:]
    assert resumed["headline"] == whole["headline"]
    assert [p["devices"] for p in resumed["points"]] == [n for n, _ in walk]
    assert lines[0].startswith("[N=20000] (40000 per core at 0.5 core) MEETS the service level (measured earlier: ")
    assert "measured earlier" not in lines[3]


def test_a_search_is_resumed_only_with_the_options_it_measured_with(tmp_path, capsys):
    report = {"machine": {"commit": "abc1234"}, "when": "2026-12-06T03:00:00Z",
              "options": msgspec.to_builtins(sizing.Options(devices=40_000, cgroup_fraction=0.5)),
              "points": [{"devices": 20_000, "verdict": _verdict(20_000, 0.5, "meets")}]}
    path = tmp_path / "earlier.json"
    path.write_bytes(msgspec.json.encode(report))
    # the start, the bound and the output may differ; a point measured elsewise may not
    same, _ = sizing.resumable(path, sizing.Options(devices=80_000, cgroup_fraction=0.5, keep=True))
    assert same[0]["measured"] == {"commit": "abc1234", "when": "2026-12-06T03:00:00Z"}   # the report's own
    other = sizing.resumable(path, sizing.Options(devices=40_000, cgroup_fraction=0.25, security="on"))
    assert other == (f"--resume {path}: its points were measured with cgroup_fraction=0.5, security='off'; "
                     "this search has cgroup_fraction=0.25, security='on'")
    # an option the report predates is taken at its default
    del report["options"]["rr_timeslice_ms"]
    path.write_bytes(msgspec.json.encode(report))
    assert isinstance(sizing.resumable(path, sizing.Options(devices=40_000, cgroup_fraction=0.5)), tuple)
    assert "rr_timeslice_ms=0; this search has rr_timeslice_ms=10" in sizing.resumable(
        path, sizing.Options(devices=40_000, cgroup_fraction=0.5, rr_timeslice_ms=10))
    # a half-measured point must be one: its runs met and each says what measured it
    report["pending"] = {"devices": 40_000, "held_to_cores": 0.5, "runs": [{"verdict": {"meets": False}}]}
    path.write_bytes(msgspec.json.encode(report))
    assert sizing.resumable(path, sizing.Options(devices=40_000, cgroup_fraction=0.5)) == (
        f"--resume {path}: its half-measured point is not one (devices, held_to_cores, met runs)")
    path.write_text("{not json")
    assert sizing.resumable(path, sizing.Options()).startswith(f"--resume {path}: not a sizing report (")
    # from the command line: refused before anything runs, naming the file
    assert sizing.cli(["sizing", "--search", "--resume", str(path), "--out", str(tmp_path)]) == 2
    assert f"--resume {path}: not a sizing report" in capsys.readouterr().err
    assert sizing.cli(["sizing", "--resume", str(path)]) == 2
    assert "only a search goes on from an earlier one (--search)" in capsys.readouterr().err


def test_a_search_whose_start_misses_halves_until_a_point_meets(monkeypatch):
    # started above what the gateway meets at half a core: it goes down, then bisects up
    asked = _fake_measure(monkeypatch, lambda pc, n, f: "meets" if pc <= 30_000 else "broke")
    lines: list[str] = []
    report = _search(100_000, 150_000, 0.5, lines)
    per_core = [round(n / f) for n, f in asked]
    assert per_core[:3] == [100_000, 50_000, 25_000]
    h = report["headline"]
    assert 27_000 <= h["best_devices_per_core"] <= 30_000
    stop = h["search_stop"]
    assert stop["by"] == "gateway" and stop["largest_met_per_core"] == h["best_devices_per_core"]
    assert stop["devices_per_core"] - stop["largest_met_per_core"] <= max(500, stop["largest_met_per_core"] // 10)
    # nothing meets: it gives up after HALVINGS halvings and says so
    asked = _fake_measure(monkeypatch, lambda pc, n, f: "broke")
    lines = []
    report = _search(64_000, 150_000, 1.0, lines)
    assert [n for n, _ in asked] == [64_000, 32_000, 16_000, 8_000, 4_000, 2_000, 1_000]
    assert report["headline"]["best_devices_per_core"] is None
    assert report["headline"]["search_stop"]["devices_per_core"] == 1_000
    assert lines[-1].endswith("no point met the service level")


class _SessionEnded(Exception):
    pass


def _fake_run_point(monkeypatch, meets_at, end_at=None, speed_ms=lambda n: 6.0):
    """sizing.run_point replaced by one run meeting when ``meets_at(devices)``, its host's
    loop timed at ``speed_ms(devices)`` on both cores; raises _SessionEnded at the
    ``end_at``-th run. Returns the devices of every run made."""
    made = []

    async def run_point(o, say):
        made.append(o.devices)
        if len(made) == end_at:
            raise _SessionEnded
        v = _verdict(o.devices, o.cgroup_fraction or 1.0, "meets" if meets_at(o.devices) else "broke")
        v["added_latency_ms"] = {"gateway": {"classes": {"Sync": {"p99": float(len(made)), "n": 2000}}}}
        return {"devices": o.devices, "verdict": v, "paths": {"gateway": {
            "requests_total": 1000 + len(made), "failures": {},
            "speed_ms": {"cpu0": speed_ms(o.devices), "cpu1": speed_ms(o.devices)}, "window_s": 120.0,
            "latency_raw": {"Sync": {"1": 1.0}}}}}
    monkeypatch.setattr(sizing, "run_point", run_point)
    return made


def test_a_point_left_half_measured_is_finished_with_only_the_runs_it_lacks(monkeypatch, tmp_path):
    # a session ends in the second run of the second point: the first run is kept...
    made = _fake_run_point(monkeypatch, lambda n: n <= 40_000, end_at=4)
    raw = tmp_path / "sizing-off-x.partial.raw.json"
    opts = sizing.Options(devices=20_000, repeat=2)
    with pytest.raises(_SessionEnded):
        trio.run(lambda: sizing.bench(opts, True, 100_000, lambda _m: None,
                                      on_point=lambda r: sizing.write_partial(r, raw)))
    assert made == [20_000, 20_000, 40_000, 40_000]
    small = json.loads(sizing.partial_summary(raw).read_text())
    assert [p["devices"] for p in small["points"]] == [20_000]
    pending = small["pending"]
    assert (pending["devices"], pending["held_to_cores"], len(pending["runs"])) == (40_000, 1.0, 1)
    first = pending["runs"][0]
    assert first["verdict"]["meets"] and first["measured"]["commit"] and first["measured"]["when"]
    assert first["paths"] == {"gateway": {"requests_total": 1003, "failures": {},
                                          "speed_ms": {"cpu0": 6.0, "cpu1": 6.0}, "window_s": 120.0}}  # no timelines
    # ... and the next session makes only the second run there, then walks on
    earlier, pending = sizing.resumable(sizing.partial_summary(raw), sizing.Options(devices=20_000, repeat=2))
    made = _fake_run_point(monkeypatch, lambda n: n <= 30_000)
    lines: list[str] = []
    resumed = trio.run(lambda: sizing.bench(opts, True, 100_000, lines.append, earlier=earlier, pending=pending))
    assert made == [40_000, 30_000, 30_000, 35_000, 32_500]        # 40,000's second run, then the walk
    assert "[N=40000] run 1 met (measured earlier: " in "\n".join(lines)
    assert "[N=40000] run 2 of 2" in lines and "[N=40000] run 1 of 2" not in lines
    p40 = next(p for p in resumed["points"] if p["devices"] == 40_000)
    runs = p40["verdict"]["each_run"]
    assert [r["paths"]["gateway"]["requests"] for r in runs] == [1003, 1001]     # the kept run, then the new
    assert runs[0]["measured"] == first["measured"] and runs[1]["measured"]["when"]
    assert p40["verdict"]["runs"] == 2 and not p40["verdict"]["meets"]            # its second run missed
    assert resumed["headline"]["best_devices_per_core"] == 30_000
    assert "pending" not in resumed


def test_a_run_that_finishes_its_point_leaves_nothing_pending(monkeypatch, tmp_path):
    made = _fake_run_point(monkeypatch, lambda n: True)
    seen = []
    trio.run(lambda: sizing.bench(sizing.Options(devices=10_000, repeat=2), False, 0, lambda _m: None,
                                  on_point=lambda r: seen.append(r.get("pending"))))
    # after run 1 the point is pending with one run; after run 2 it is a point
    assert made == [10_000, 10_000]
    assert [None if x is None else len(x["runs"]) for x in seen] == [1, None]


def test_a_walk_names_a_point_measured_on_a_slower_host_and_a_bound_from_another_machine(monkeypatch):
    # the walk's last point ran the host's loop twice as slow as the points before it (as
    # 2026-12-06's security-on search did when it was resumed on another machine)
    _fake_run_point(monkeypatch, lambda n: n <= 30_000, speed_ms=lambda n: 14.0 if n == 32_500 else 7.0)
    lines: list[str] = []
    report = trio.run(lambda: sizing.bench(sizing.Options(devices=20_000), True, 100_000, lines.append))
    by_n = {p["devices"]: p["verdict"] for p in report["points"]}
    assert list(by_n) == [20_000, 40_000, 30_000, 35_000, 32_500]
    slow = [c for c in by_n[32_500]["caveats"] if c.startswith("host: ")]
    assert slow == ["host: the cores ran sim/speed's loop 100% slower over this point's runs (14.0 ms) than "
                    "over the earlier points' (7.0 ms, median): the walk compares points measured on different "
                    "machines"]
    assert not [c for n, v in by_n.items() if n != 32_500 for c in v["caveats"]]
    assert f"    caveat: {slow[0]}" in "\n".join(lines)
    stop = report["headline"]["search_stop"]
    assert (stop["largest_met_per_core"], stop["devices_per_core"]) == (30_000, 32_500)
    assert stop["host_ms"] == {"largest_met": 7.0, "stopped_at": 14.0}
    assert stop["caveat"].startswith("the point that stopped the search ran sim/speed's loop in 14.0 ms, "
                                     "the largest met in 7.0 ms (100% apart)")
    assert lines[-1] == f"    caveat: {stop['caveat']}"
    # one host throughout: no caveat, the speeds still recorded
    _fake_run_point(monkeypatch, lambda n: n <= 30_000, speed_ms=lambda n: 7.0)
    same = trio.run(lambda: sizing.bench(sizing.Options(devices=20_000), True, 100_000, lambda _m: None))
    assert "caveat" not in same["headline"]["search_stop"]
    assert same["headline"]["search_stop"]["host_ms"] == {"largest_met": 7.0, "stopped_at": 7.0}
    assert not [c for p in same["points"] for c in p["verdict"]["caveats"]]
