"""The sizing benchmark's short mode: a few hundred devices, every request checked.

It runs the real thing (fleet shards as processes, the mailbox simulator, the
gateway as `seg-fast serve`, pinned with taskset where there are two cores) with
time compressed, so it claims nothing; it asserts correctness only, never timings.
"""
from __future__ import annotations

import importlib.util

import pytest
import trio

from seg_fast.sim import sizing

DEVICES = 300


def _paths() -> list[str]:
    paths = ["direct"]
    if importlib.util.find_spec("seg_fast.proxy.server") is not None:
        paths.append("gateway")
    return paths


@pytest.fixture(scope="module")
def report():
    # rate_scale 40: the busy hour's requests of 300 devices in ~90 s of device
    # time pass in ~12 s; the first Ping heartbeats stay real (>= 60 s). Plain HTTP
    # here (TLS costs the load side more than a shared machine spares in 12 s):
    # test_sizing_tls.py runs the device leg over TLS.
    opts = sizing.Options(devices=DEVICES, ramp=3.0, settle=1.0, hold=8.0, drain=20.0,
                          paths=_paths(), shard_size=200, rate_scale=40.0, seed=7, repeat=1, tls=False)
    return trio.run(sizing.bench, opts, False, DEVICES, lambda _msg: None)


def test_every_request_answered_correctly(report):
    (point,) = report["points"]
    (run,) = point["runs"]
    assert set(run["paths"]) == set(_paths())
    for name, p in run["paths"].items():
        assert p["failures"] == {}, (name, p["failure_samples"])
        assert p["ready"] == DEVICES, name                  # every device set up and parked
        # parked again after each return: at the window's end a device set up by then
        # has its Ping parked or is in the Sync its last Ping announced (a 10 MB
        # message takes a while); a few are between the two. On a busy machine the
        # ramp itself can run late: devices still in set-up are not counted (the
        # verdict says the ramp was late). Pings cut early are failures above.
        set_up = DEVICES - p["states_at_window_end"].get("setup", 0)
        assert set_up >= DEVICES // 4, (name, p["states_at_window_end"])
        assert p["parked_at_window_end"] + p["syncing_at_window_end"] >= 0.9 * set_up, (
            name, p["states_at_window_end"])
        # every message the simulator delivered was synced by its device, once
        assert p["delivered"] > 50 and p["received"] == p["delivered"], name
        for cmd in ("Provision", "FolderSync", "Sync", "Ping", "SendMail", "ItemOperations"):
            assert p["requests"].get(cmd, 0) > 0, (name, cmd, p["requests"])
        assert p["pings"]["changes"] > 0, name
        assert p["latency_ms"]["Sync"]["n"] > 0, name


def test_every_process_time_shared_without_realtime(report):
    for path, p in report["points"][0]["runs"][0]["paths"].items():
        pol = p["sched_policies"]
        assert set(pol["load"]) == {"SCHED_OTHER"}, (path, pol)
        assert set(pol["server"]) <= {"SCHED_OTHER"}, (path, pol)     # (direct: no proxy)


def test_same_schedule_on_every_path(report):
    (point,) = report["points"]
    paths = list(point["runs"][0]["paths"].values())
    # the seed fixes the schedule: every path is asked the same foreground requests
    for p in paths[1:]:
        assert p["requests"]["SendMail"] == paths[0]["requests"]["SendMail"]
        assert p["delivered"] == paths[0]["delivered"]


def test_time_compressed_run_claims_nothing(report):
    (point,) = report["points"]
    v = point["verdict"]
    assert not v["meets"]
    assert any("time compressed" in x for x in v["invalid"])
    assert report["headline"]["best_devices_per_core"] is None


def test_load_side_cost_reported_beside_the_gateways(report):
    (point,) = report["points"]
    m = point["verdict"]["metrics"]
    for name, p in point["runs"][0]["paths"].items():
        load = m["load"][name]
        # the shards' CPU in the window over the simulated device-hours, as the gateway's
        hours = report["options"]["hold"] * report["options"]["rate_scale"] / 3600
        want = p["load"]["cpu_share"] * p["window_s"] / (report["options"]["devices"] * hours)
        assert load["cpu_s_per_device_hour"] == pytest.approx(want, rel=1e-3) and want > 0
        assert load["us_per_request_whole_run"] == round(1e6 * p["load"]["cpu_s_total"] / p["requests_total"])
        # the kernel's part of each side's CPU: part of it, never more
        assert 0 <= load["kernel_cpu_share"] <= load["cpu_share"] and p["load"]["kernel_cpu_share"] > 0
    if "gateway" in m:
        assert m["load_cpu_vs_gateway"] == pytest.approx(
            m["load"]["gateway"]["cpu_s_per_device_hour"] / m["gateway"]["cpu_s_per_device_hour"], rel=1e-2)
        g = m["gateway"]
        assert 0 < g["kernel_cpu_share"] <= g["cpu_share"]
        assert m["load_kernel_cpu_vs_gateway"] == pytest.approx(
            m["load"]["gateway"]["kernel_cpu_share"] / g["cpu_share"], abs=1e-3)


def test_gateway_memory_with_its_sockets_and_loop_lag_reported(report):
    # BENCH-PROFILE: KiB per device with the kernel's socket memory, and the event-loop
    # lag maximum, measured on the running gateway (its stats files and its sockets)
    (point,) = report["points"]
    if "gateway" not in point["runs"][0]["paths"]:
        pytest.skip("no gateway in this tree")
    server = point["runs"][0]["paths"]["gateway"]["server"]
    ks = server["kernel_sockets"]
    # every device held its parked Ping's connection, and the gateway one upstream each
    assert ks is not None and ks["tcp_sockets"] >= DEVICES, ks
    lag = server["loop_lag"]
    assert lag["workers"] >= 1 and lag["seconds_in_window"] > 0, lag
    assert 0 <= lag["max_ms_window"] <= lag["max_ms_run"]
    m = point["verdict"]["metrics"]["gateway"]
    assert m["kib_per_device_with_kernel"] == pytest.approx(
        (server["rss_kib_max"] + ks["kib"]) / DEVICES, abs=0.01)
    assert m["kib_per_device_with_kernel"] > m["kib_per_device"]
    # the workers' memory with shared pages once: read, and never more than their summed RSS
    assert 0 < server["pss_kib_max"] <= server["rss_kib_max"]
    assert m["pss_kib_per_device"] == pytest.approx(server["pss_kib_max"] / DEVICES, abs=0.01)
    assert m["loop_lag_max_ms"] == lag["max_ms_window"]
    assert isinstance(m["gc_gen2_in_window"], int)


def test_fetches_split_by_the_size_each_one_fetched(report):
    (point,) = report["points"]
    added = point["verdict"]["added_latency_ms"]
    if "gateway" not in added:
        pytest.skip("no gateway in this tree")
    split = added["gateway"]["ItemOperations_by_size"]
    # every paired fetch lands in one of the profile's sizes
    assert split and set(split) <= {"~50 KiB", "~300 KiB", "~2 MiB", "~10 MiB"}, split
    assert sum(s["n"] for s in split.values()) == added["gateway"]["commands"]["ItemOperations"]["n"]


def test_the_load_sides_own_read_delay_measured_and_taken_out_for_reading(report):
    # sim/stamps.py: per request, how long its bytes sat in a load-side socket unread
    (point,) = report["points"]
    for name, p in point["runs"][0]["paths"].items():
        late, lat = p["load_side_late_ms"], p["latency_ms"]
        assert set(late) == set(lat), name              # every timed command has its delays
        for cmd, s in late.items():
            assert s["n"] == lat[cmd]["n"], (name, cmd)
            assert 0.0 <= s["max"] <= lat[cmd]["max"], (name, cmd, s, lat[cmd])
        # the kernel stamped what the load side read: delays were measured, not all 0.0
        assert late["Sync"]["max"] > 0.0, (name, late["Sync"])
    added = point["verdict"]["added_latency_ms"]
    if "gateway" not in added:
        pytest.skip("no gateway in this tree")
    net = added["gateway"]["net_of_load_side"]
    assert set(net["classes"]) == set(added["gateway"]["classes"])
    for cls, s in net["classes"].items():
        assert s["n"] == added["gateway"]["classes"][cls]["n"], cls
