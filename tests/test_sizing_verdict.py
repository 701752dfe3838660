"""The sizing verdict's arithmetic: paired added latency, pooling of thin commands,
two runs per claim. Pure functions against hand-computed examples."""
from __future__ import annotations

from seg_fast.sim import sizing
from seg_fast.sim.latency import OTHER, added_latency, diff_summary, judged_classes, paired_differences, percentile


def test_percentile_is_nearest_rank():
    v = list(range(1, 1001))                       # 1..1000
    assert percentile(v, 0.99) == 990
    assert percentile(v, 0.999) == 999
    assert percentile(v, 0.5) == 500
    assert percentile([7.0], 0.999) == 7.0
    assert percentile([], 0.99) == 0.0


def test_paired_differences_by_request_not_by_run():
    # Three requests on both paths, one only on the gateway path (left out), one
    # only on the direct path (left out). Direct had one slow request (d2): the
    # per-request difference there is negative, and it cannot hide the gateway's
    # slow request g3.
    direct = {"Sync": {"a": 10.0, "b": 200.0, "c": 12.0, "x": 5.0}}
    gateway = {"Sync": {"a": 11.0, "b": 201.0, "c": 95.0, "y": 1.0},
               "Ping": {"a": 585000.0}}
    diffs = paired_differences(gateway, direct)
    assert sorted(diffs["Sync"]) == [1.0, 1.0, 83.0]
    assert "Ping" not in diffs                       # parked Pings are not latency
    out = added_latency(gateway, direct, pool_min=1)
    assert out["classes"]["Sync"]["p99"] == 83.0     # the slow gateway request
    assert out["classes"]["Sync"]["n"] == 3
    # the difference of the two runs' p99s would be 201 - 200 = 1 ms: flattering
    assert max(gateway["Sync"].values()) - max(direct["Sync"].values()) == 1.0


def test_thin_commands_are_pooled_into_other():
    diffs = {"Sync": [1.0] * 1200, "Settings": [60.0] * 10, "FolderSync": [2.0] * 990,
             "SendMail": [3.0] * 1000}
    classes = judged_classes(diffs)
    assert set(classes) == {"Sync", "SendMail", OTHER}
    assert len(classes[OTHER]) == 1000               # Settings + FolderSync
    # Settings' 10 slow requests are 1% of the pool: p99 is the 990th value (2 ms),
    # p99.9 the 999th (60 ms)
    raw_d = {c: {str(i): 0.0 for i in range(len(v))} for c, v in diffs.items()}
    raw_g = {c: {str(i): x for i, x in enumerate(v)} for c, v in diffs.items()}
    out = added_latency(raw_g, raw_d)
    assert out["pooled"] == ["FolderSync", "Settings"]
    assert out["classes"][OTHER]["p99"] == 2.0
    assert out["classes"][OTHER]["p999"] == 60.0
    assert out["commands"]["Settings"]["p99"] == 60.0   # reported, not judged alone


def _run(meets: bool, p99: float, cpu: float) -> dict:
    return {"devices": 100, "paths": {}, "verdict": {
        "meets": meets, "broke": [] if meets else ["paired added p99 too high"], "invalid": [],
        "caveats": [], "added_latency_ms": {"gateway": {"classes": {"Sync": {"p99": p99, "n": 5000}}}},
        "metrics": {"gateway": {"cpu_share": cpu, "projected_devices_at_80pct_cpu": int(80 / cpu)}}}}


def test_a_claim_needs_two_runs_and_quotes_the_worse():
    one = sizing.combine([_run(True, 10.0, 0.2)], repeat=2)
    assert not one["meets"] and any("two runs" in x for x in one["invalid"])
    both = sizing.combine([_run(True, 10.0, 0.2), _run(True, 30.0, 0.1)], repeat=2)
    assert both["meets"] and both["runs_meet"] == [True, True]
    assert both["added_latency_ms"]["gateway"]["classes"]["Sync"]["p99"] == 30.0
    assert both["metrics"]["gateway"]["cpu_share"] == 0.2
    assert both["metrics"]["gateway"]["projected_devices_at_80pct_cpu"] == 400   # the lower
    second_misses = sizing.combine([_run(True, 10.0, 0.2), _run(False, 90.0, 0.2)], repeat=2)
    assert not second_misses["meets"] and second_misses["broke"] == ["run 2: paired added p99 too high"]


def test_the_summary_keeps_each_runs_own_figures():
    # the combined verdict quotes the worse run; each_run keeps both, with the
    # requests, failures and host speed of each path, and survives summary()
    first, second = _run(True, 10.0, 0.2), _run(True, 30.0, 0.1)
    first["paths"] = {"gateway": {"requests_total": 500, "failures": {"503": 2}, "speed_ms": 6.3,
                                  "window_s": 120.0, "latency_raw": {"Sync": {"a": 1.0}}}}
    both = sizing.combine([first, second], repeat=2)
    runs = both["each_run"]
    assert [r["run"] for r in runs] == [1, 2]
    assert runs[0]["added_latency_ms"]["gateway"]["classes"]["Sync"]["p99"] == 10.0
    assert runs[1]["added_latency_ms"]["gateway"]["classes"]["Sync"]["p99"] == 30.0
    assert runs[0]["metrics"]["gateway"]["cpu_share"] == 0.2
    assert runs[1]["metrics"]["gateway"]["cpu_share"] == 0.1
    assert runs[0]["paths"] == {"gateway": {"requests": 500, "failures": 2, "speed_ms": 6.3, "window_s": 120.0}}
    assert runs[1]["paths"] == {}
    report = {"machine": {}, "options": {}, "when": "", "headline": {},
              "points": [{"devices": 100, "verdict": both, "runs": [first, second]}]}
    kept = sizing.summary(report)["points"][0]["verdict"]["each_run"]
    assert [r["metrics"]["gateway"]["cpu_share"] for r in kept] == [0.2, 0.1]


def _path(name: str, raw: dict) -> dict:
    return {"path": name, "devices": 100, "ready": 100, "ready_late_s": 0.0, "failures": {},
            "failure_samples": [], "latency_raw": raw,
            "latency_ms": {c: {"p50": 0.0, "p99": max(v.values())} for c, v in raw.items()},
            "server": {"cpu_s": 10.0, "cpu_share": 0.1, "rss_kib_max": 1000, "rss_kib_idle": 500,
                       "runqueue_wait": 0.0, "died": False},
            "load": {"cpu_share": 0.2, "core_busy": 0.2, "runqueue_wait": 0.0, "gateway_core_busy": 0.3,
                     "lag_p99": 0.0, "lag_max": 0.0, "fds_max": 10, "fd_limit": 20000, "conn_errors": 0}}


def test_judge_uses_paired_classes_and_names_the_pooled_commands():
    keys = [str(i) for i in range(2000)]
    direct = {"Sync": {k: 10.0 for k in keys}, "Settings": {k: 10.0 for k in keys[:129]},
              "GetItemEstimate": {k: 10.0 for k in keys[:900]}}
    # Sync adds 1 ms everywhere; Settings (129 samples) adds 70 ms on 20 requests,
    # which is 2% of the pooled "other" class (1,029): its p99 is then 70 ms
    gateway = {"Sync": {k: 11.0 for k in keys},
               "Settings": {k: (80.0 if i < 20 else 11.0) for i, k in enumerate(keys[:129])},
               "GetItemEstimate": {k: 11.0 for k in keys[:900]}}
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", direct),
                                                 "gateway": _path("gateway", gateway)}}, opts)
    classes = v["added_latency_ms"]["gateway"]["classes"]
    assert set(classes) == {"Sync", "other"} and classes["other"]["n"] == 1029
    assert classes["Sync"]["p99"] == 1.0
    # p99.9 (70 ms) is within its 100 ms: only the p99 breaks
    assert v["broke"] == ["paired added p99 70.0 ms on other (GetItemEstimate, Settings, pooled), n=1029 > 50 ms"]
    assert v["invalid"] == [] and not v["meets"]


def test_nginx_gets_its_paired_figures_without_the_gateway_in_the_run():
    # --paths direct,nginx: the peer's added latency is paired with the direct run as the
    # gateway's would be (it was left out when the gateway did not run)
    keys = [str(i) for i in range(1500)]
    direct = {"Sync": {k: 10.0 for k in keys}}
    nginx = {"Sync": {k: (10.0 + (30.0 if i < 3 else 2.0)) for i, k in enumerate(keys)}}
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", direct),
                                                 "nginx": _path("nginx", nginx)}}, opts)
    sync = v["added_latency_ms"]["nginx"]["classes"]["Sync"]
    assert sync["n"] == 1500 and sync["p99"] == 2.0 and sync["p999"] == 30.0
    assert "gateway" not in v["added_latency_ms"]


def test_results_keep_a_small_summary_per_claim_with_the_commit(tmp_path):
    met = {"devices": 5000, "verdict": {"meets": True, "broke": [], "invalid": [], "runs_meet": [True, True]},
           "runs": [{"paths": {"gateway": {"timeline": [[0, 1, 2, 3]] * 500}}}] * 2}
    missed = {"devices": 10000, "verdict": {"meets": False, "broke": ["x"], "invalid": []}, "runs": []}
    report = {"machine": sizing.machine(), "options": {"security": "off"}, "when": "now",
              "headline": {"best_devices_per_core": 5000}, "points": [met, missed]}
    written = sizing.write_results(report, tmp_path)
    names = sorted(p.name for p in written)
    assert len(names) == 3 and sum(n.endswith(".raw.json") for n in names) == 1
    claim = [p for p in written if "-N5000-" in p.name]
    assert len(claim) == 1 and not any("-N10000-" in n for n in names)
    import json
    c = json.loads(claim[0].read_text())
    assert c["devices"] == 5000 and c["verdict"]["runs_meet"] == [True, True]
    assert len(c["machine"]["commit_full"]) == 40          # the commit it measured
    summary = json.loads(written[0].read_text())
    assert "runs" not in summary["points"][0]               # no timelines in the kept summary
    assert written[0].stat().st_size < claim[0].stat().st_size * 4


def test_the_mirrored_tail_is_read_at_the_same_rank_from_the_other_end():
    # 1,000 paired differences: 10 where the gateway was slower (+40 ms), 2 where
    # the direct run was (-30 ms, the instrument's noise), the rest 0
    diffs = [40.0] * 10 + [-30.0] * 2 + [0.0] * 988
    s = diff_summary(diffs)
    assert s["p99"] == 0.0 and s["p999"] == 40.0          # 10 of 1,000 is not above p99's rank
    assert s["mirror_p99"] == 0.0 and s["mirror_p999"] == 30.0
    # the same list turned around swaps the two ends exactly
    t = diff_summary([-d for d in diffs])
    assert (t["p99"], t["p999"]) == (s["mirror_p99"], s["mirror_p999"])
    assert (t["mirror_p99"], t["mirror_p999"]) == (s["p99"], s["p999"])
    # and it reaches the report of every class and command
    raw_d = {"Sync": {str(i): 30.0 for i in range(1000)}}
    raw_g = {"Sync": {str(i): 30.0 + d for i, d in enumerate(diffs)}}
    out = added_latency(raw_g, raw_d, pool_min=1)
    assert out["classes"]["Sync"]["mirror_p999"] == 30.0
    assert out["commands"]["Sync"]["mirror_p999"] == 30.0


def test_itemoperations_tail_split_by_the_size_fetched():
    """The verdict judges ItemOperations whole; beside it, the paired added latency by the size
    each request fetched says which fetches make the tail (here the 10 MiB ones)."""
    keys = [str(i) for i in range(1200)]
    sizes = {k: (10 << 20 if i % 100 == 0 else 49_000 + i) for i, k in enumerate(keys)}   # near the profile's
    direct = {"ItemOperations": {k: 5.0 for k in keys}, "Sync": {k: 1.0 for k in keys}}
    gateway = {"ItemOperations": {k: (5.0 + (150.0 if sizes[k] > 1 << 20 else 2.0)) for k in keys},
               "Sync": {k: 2.0 for k in keys}}
    gw = _path("gateway", gateway) | {"fetch_sizes": sizes}
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", direct), "gateway": gw}}, opts)
    split = v["added_latency_ms"]["gateway"]["ItemOperations_by_size"]
    assert list(split) == ["~50 KiB", "~10 MiB"]
    assert split["~50 KiB"]["n"] == 1188 and split["~50 KiB"]["max"] == 2.0
    assert split["~10 MiB"]["n"] == 12 and split["~10 MiB"]["p50"] == 150.0
    # the whole command is what breaks the bound
    assert any("ItemOperations" in b for b in v["broke"])


def test_added_latency_splits_at_the_answers_first_byte():
    """Beside the verdict: each paired request's added latency split at the answer's head
    (before it: through the proxy and back; after it: the body streaming), by size; and the
    slowest 1% located in the schedule, so one stall that caught many shows as few seconds."""
    keys = [str(i) for i in range(1000)]
    sizes = {k: (2 << 20 if i % 10 == 0 else 50_000) for i, k in enumerate(keys)}
    direct = {"ItemOperations": {k: 10.0 for k in keys}}
    # the 2 MiB fetches stream 30 ms slower; ten small ones (sent in second 7) wait 80 ms for their head
    slow_head = {str(i) for i in range(1, 100, 10)}
    gateway = {"ItemOperations": {k: 10.0 + (30.0 if sizes[k] > 1 << 20 else 0.0) + (80.0 if k in slow_head else 0.0)
                                  for k in keys}}
    d_timing = {k: (float(i % 60), 2.0) for i, k in enumerate(keys)}
    g_timing = {k: (7.5 if k in slow_head else float(i % 60), 2.0 + (80.0 if k in slow_head else 0.0))
                for i, k in enumerate(keys)}
    gw = _path("gateway", gateway) | {"fetch_sizes": sizes, "timing_raw": {"ItemOperations": g_timing}}
    dr = _path("direct", direct) | {"timing_raw": {"ItemOperations": d_timing}}
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    v = sizing.judge({"devices": 100, "paths": {"direct": dr, "gateway": gw}}, opts)
    split = v["added_latency_ms"]["gateway"]["ItemOperations_split"]
    assert split["~2 MiB"]["head"]["max"] == 0.0 and split["~2 MiB"]["body"]["p50"] == 30.0
    assert split["~50 KiB"]["head"]["max"] == 80.0 and split["~50 KiB"]["body"]["max"] == 0.0
    assert split["worst"] == {"n": 10, "seconds": 1, "most_in_one_second": 10, "added_ms_min": 80.0,
                              "busiest_seconds": [[7, 10]]}
    # the direct run was never the slower one here: its slowest 1% are ties at 0 ms
    assert split["mirror_worst"]["added_ms_min"] == 0.0


def test_the_slowest_seconds_are_set_beside_what_the_machine_did_in_them():
    """The split's slowest 1% located in time, with each run's own per-second machine figures:
    here ten Syncs sent in second 7, where the hypervisor stole 40 ms of the gateway's core and
    five workers lagged; the direct run's own slow seconds are read against the direct run's rows."""
    keys = [str(i) for i in range(1000)]
    slow = {str(i) for i in range(1, 100, 10)}
    direct = {"Sync": {k: 10.0 + (5.0 if k == "2" else 0.0) for k in keys}}
    gateway = {"Sync": {k: 10.0 + (80.0 if k in slow else 0.0) for k in keys}}
    g_timing = {k: (7.2 if k in slow else float(i % 60), 2.0 + (80.0 if k in slow else 0.0))
                for i, k in enumerate(keys)}
    d_timing = {k: (float(i % 60), 2.0) for i, k in enumerate(keys)}
    g_seconds = [{"sec": s, "steal_ms_gw": 40.0 if s == 7 else 2.0, "lag_max_ms": 45.0 if s == 7 else 3.0,
                  "workers_lagging": 5 if s == 7 else 0} for s in range(60)]
    d_seconds = [{"sec": s, "steal_ms_load": 1.0} for s in range(60)]
    gw = _path("gateway", gateway) | {"timing_raw": {"Sync": g_timing}, "seconds": g_seconds}
    dr = _path("direct", direct) | {"timing_raw": {"Sync": d_timing}, "seconds": d_seconds}
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    split = sizing.judge({"devices": 100, "paths": {"direct": dr, "gateway": gw}}, opts)[
        "added_latency_ms"]["gateway"]["Sync_split"]
    machine = split["worst"]["machine"]
    assert split["worst"]["busiest_seconds"] == [[7, 10]]
    assert machine["busiest"] == [g_seconds[7]]
    # where the slowest were sent against every second of the window (59 at 2.0, one at 40.0)
    assert machine["mean_where_slowest_vs_all"]["steal_ms_gw"] == [40.0, round((59 * 2.0 + 40.0) / 60, 2)]
    assert machine["mean_where_slowest_vs_all"]["workers_lagging"] == [5.0, round(5 / 60, 2)]
    # the direct run's slowest 1% (ten, led by key "2": 5 ms slower there) against its own rows
    mirror = split["mirror_worst"]["machine"]
    assert set(mirror["mean_where_slowest_vs_all"]) == {"steal_ms_load"}
    assert mirror["busiest"][0]["sec"] == split["mirror_worst"]["busiest_seconds"][0][0]


def test_seconds_context_reads_the_samples_by_schedule_second():
    """Once-a-second samples (time, cumulative counters) become per-second rates, each interval
    given to the schedule second its middle falls in; the workers' lag is read by wall second."""
    t0 = 1000.25
    w0, w1 = t0 + 10, t0 + 13
    # (time, proxy cpu, rss, load cpu, core0 busy, core1 busy, proxy wait s, load wait s, pss, runs)
    samples = [(t0 + 9.5 + i, 0.4 * i, 0, 0.3 * i, 0, 0, 0.01 * i * i, 0.002 * i, 0, 0) for i in range(5)]
    cores = [(t0 + 9.5 + i, {0: (0.5 * i, 0.05 * i, 0.01 * i), 1: (0.3 * i, 0.0, 0.0)}) for i in range(5)]
    reads = [(0.0, {11: {"max_per_second": [[1010, 30.0], [1011, 4.0]]},
                    12: {"max_per_second": [[1010, 25.0], [1011, 2.0]]}})]
    rows = sizing.seconds_context(samples, cores, reads, t0, w0, w1, 0, 1)
    assert [r["sec"] for r in rows] == [10, 11, 12]
    assert rows[0]["steal_ms_gw"] == 50.0 and rows[0]["irq_ms_gw"] == 10.0 and rows[0]["steal_ms_load"] == 0.0
    assert [r["server_wait_ms"] for r in rows] == [10.0, 30.0, 50.0]       # (i+1)^2 - i^2, x 10 ms
    assert rows[0]["load_wait_ms"] == 2.0
    assert rows[2]["server_cpu_ms"] == 400.0 and rows[2]["load_cpu_ms"] == 300.0
    # wall second 1010 is schedule second 10 (its middle, 1010.5, is 10.25 after t0)
    assert rows[0]["lag_max_ms"] == 30.0 and rows[0]["workers_lagging"] == 2
    assert rows[1]["lag_max_ms"] == 4.0 and rows[1]["workers_lagging"] == 0


def test_a_miss_inside_the_instruments_noise_gets_a_caveat_and_still_misses():
    """A bound missed where the direct run is as often as much slower than the gateway (the
    mirror at that rank) is named as near the instrument's noise; the verdict does not move."""
    keys = [str(i) for i in range(2000)]
    direct = {"Sync": {k: (70.0 if i % 50 == 1 else 10.0) for i, k in enumerate(keys)},
              "SendMail": {k: 10.0 for k in keys}}
    gateway = {"Sync": {k: (70.0 if i % 50 == 0 else 10.0) for i, k in enumerate(keys)},
               "SendMail": {k: (70.0 if i % 50 == 0 else 10.0) for i, k in enumerate(keys)}}
    opts = sizing.Options(devices=100, hold=120.0, repeat=1)
    v = sizing.judge({"devices": 100, "paths": {"direct": _path("direct", direct),
                                                "gateway": _path("gateway", gateway)}}, opts)
    assert not v["meets"]
    assert any(b.startswith("paired added p99 60.0 ms on Sync") for b in v["broke"])
    assert any(b.startswith("paired added p99 60.0 ms on SendMail") for b in v["broke"])
    noisy = [c for c in v["caveats"] if "mirror" in c]
    assert len(noisy) == 1 and noisy[0].startswith("Sync: the direct run was itself 60.0 ms slower")


def test_shards_time_their_steps_only_when_asked(tmp_path):
    """--load-steps: the fleet shards' step timer (a trio Instrument, ~10% of their CPU) is a
    diagnostic; a plain run's shards go without it."""
    plain = sizing.plan_shards(sizing.Options(devices=20000, tls=False), tmp_path, "direct")
    asked = sizing.plan_shards(sizing.Options(devices=20000, tls=False, load_steps=True), tmp_path, "direct")
    assert len(plain) == len(asked) > 1
    assert not any(s.slow_steps for s in plain) and all(s.slow_steps for s in asked)


def _burst_run(load_wait_at_7: float, server_wait_at_7: float) -> dict:
    """A gateway run whose ten slow Syncs (150 ms added: p99.9 misses) were all sent in second 7, with
    the two sides' run-queue waits in that second given (every other second: 100 and 100)."""
    keys = [str(i) for i in range(1000)]
    slow = {str(i) for i in range(1, 100, 10)}
    direct = {"Sync": {k: 10.0 for k in keys}}
    gateway = {"Sync": {k: 10.0 + (150.0 if k in slow else 0.0) for k in keys}}
    g_timing = {k: (7.2 if k in slow else float(i % 60), 2.0) for i, k in enumerate(keys)}
    d_timing = {k: (float(i % 60), 2.0) for i, k in enumerate(keys)}
    g_seconds = [{"sec": s, "load_wait_ms": load_wait_at_7 if s == 7 else 100.0,
                  "server_wait_ms": server_wait_at_7 if s == 7 else 100.0} for s in range(60)]
    gw = _path("gateway", gateway) | {"timing_raw": {"Sync": g_timing}, "seconds": g_seconds}
    dr = _path("direct", direct) | {"timing_raw": {"Sync": d_timing}}
    return sizing.judge({"devices": 100, "paths": {"direct": dr, "gateway": gw}},
                        sizing.Options(devices=100, hold=120.0, repeat=1))


def test_a_miss_sent_in_the_load_sides_busiest_seconds_gets_a_caveat_and_still_misses():
    """A missed class whose slowest 1% were sent when the load side waited for its core far
    longer than on average, and far more so than the gateway's workers, names the load side's
    bursts; the same wait on both sides (the machine's) or a small one names nothing."""
    def burst(v):
        return [c for c in v["caveats"] if "load side's shards waited" in c]

    v = _burst_run(load_wait_at_7=700.0, server_wait_at_7=160.0)
    assert not v["meets"] and any(b.startswith("paired added p99.9 150.0 ms on Sync") for b in v["broke"])
    # 700 in second 7 against (59 x 100 + 700) / 60 = 110 on average: 6.4x; the workers 1.6x
    assert burst(v) == ["Sync: its slowest 1% were sent in seconds when the load side's shards waited for "
                        "their core 6.4x as long as on average (the gateway's workers 1.6x): the load side's "
                        "own bursts are in that tail"]
    assert burst(_burst_run(load_wait_at_7=700.0, server_wait_at_7=700.0)) == []    # both sides: the machine
    assert burst(_burst_run(load_wait_at_7=140.0, server_wait_at_7=100.0)) == []    # 1.4x: not a burst
    assert not _burst_run(load_wait_at_7=700.0, server_wait_at_7=160.0)["meets"]
