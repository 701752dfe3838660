"""A worker that has held its core for limits.max_run_ms lets a sibling go first (proxy/coreshare.py).

The rule is checked on a fake clock (when it yields, what counts as having slept), in a real
trio loop (a task that never sleeps is interrupted by yields between its steps, a sleeping
one is not), and through `seg-fast serve`: the yields reach /metrics, 0 turns them off, and
a negative value is refused naming the key and where it came from.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import trio

from http_client import request
from processes import REPO, start_serve, stop_process
from redis_server import free_port
from seg_fast.policy.model import DeviceRecord, ManagedDevicePolicies, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.proxy.coreshare import CoreShare
from seg_fast.sim.mailbox import MailboxSimulator
from test_metrics import TOKEN, device_requests, families, samples


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_yields_after_max_run_without_a_sleep_and_not_before():
    clock, calls = FakeClock(), []
    share = CoreShare(2.0, clock=clock, yield_core=lambda: calls.append(clock.t))
    share.before_io_wait(0.5)
    clock.t += 0.010                          # slept 10 ms in epoll: the core was given up
    share.after_io_wait(0.5)
    for _ in range(3):                        # 3 steps of 0.6 ms: 1.8 ms, under the bound
        clock.t += 0.0006
        share.after_task_step(None)
    assert calls == []
    clock.t += 0.0006                         # 2.4 ms since the sleep
    share.after_task_step(None)
    assert calls == [pytest.approx(100.0124)] and share.yields == 1
    clock.t += 0.0019                         # counted again from the yield
    share.after_task_step(None)
    assert share.yields == 1
    clock.t += 0.0002
    share.after_task_step(None)
    assert share.yields == 2


def test_a_poll_that_found_events_at_once_is_not_a_sleep():
    clock, calls = FakeClock(), []
    share = CoreShare(2.0, clock=clock, yield_core=lambda: calls.append(1))
    for _ in range(5):                        # batches back to back: each I/O wait returned at once
        share.before_io_wait(0)
        clock.t += 0.00001
        share.after_io_wait(0)
        clock.t += 0.0006
        share.after_task_step(None)
    assert share.yields == 1                  # 3 ms of batches without a sleep: one yield


async def test_a_task_that_never_sleeps_is_interrupted_and_a_sleeping_one_is_not():
    yields: list[int] = []
    share = CoreShare(2.0, yield_core=lambda: yields.append(1))
    trio.lowlevel.add_instrument(share)
    try:
        end = time.perf_counter() + 0.05      # 50 ms of steps, none sleeping
        steps = 0
        while time.perf_counter() < end:
            await trio.lowlevel.checkpoint()
            steps += 1
        busy = len(yields)
        assert busy >= 1 and busy < steps     # between steps, not at every one
    finally:
        trio.lowlevel.remove_instrument(share)
    # (the sleeping case is the fake clock's first test: a real one could be preempted mid-step)


def _policy_store(path) -> None:
    async def fill():
        store = SqliteStore(path)
        await store.open()
        await store.replace_all(PolicyDocument(managed=ManagedDevicePolicies(compromised=True)),
                                [DeviceRecord(device_id="GOOD", managed=True, compromised=False)])
        await store.aclose()
    trio.run(fill)


def _config(tmp_path, gw_port: int, admin_port: int, sim_port: int, max_run_ms: float):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n'
        f'[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n'
        f'[limits]\nmax_run_ms = {max_run_ms}\n'
        f'[policy]\nsqlite_path = "{tmp_path / "policy.db"}"\n'
        f'[security]\nmaster_key_file = "{tmp_path / "mk"}"\nkey_state_file = "{tmp_path / "ks.json"}"\n')
    return cfg


async def _yields_after_traffic(tmp_path, max_run_ms: float):
    """FolderSyncs through a running serve; the worker's yields family from /metrics (None if absent)."""
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=1)
    gw_port, admin_port = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        proc = start_serve(_config(tmp_path, gw_port, admin_port, sim.port, max_run_ms), tmp_path)
        try:
            with trio.fail_after(30):
                while True:
                    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                    try:
                        status, _, body = await request(admin_port, "GET", "/metrics", token=TOKEN)
                        if status == 200 and samples(families(body.decode()), "seg_fast_workers") == 1:
                            break
                    except OSError:
                        pass
                    await trio.sleep(0.1)
            assert await device_requests(gw_port, "GOOD", 5) == ["1"] * 5     # answers unchanged
            with trio.fail_after(30):
                while True:                   # the worker's stats file is written once a second
                    _, _, body = await request(admin_port, "GET", "/metrics", token=TOKEN)
                    fams = families(body.decode())
                    if samples(fams, "seg_fast_requests", "_total", command="FolderSync") >= 5:
                        break
                    await trio.sleep(0.2)
            fam = fams.get("seg_fast_worker_core_yields")
            return None if fam is None else sum(s.value for s in fam.samples)
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()


def test_serve_counts_its_yields_in_metrics(tmp_path):
    _policy_store(tmp_path / "policy.db")
    # 1 us: every step after a sleep passes it, so yields happen on any request (2 ms needs load)
    got = trio.run(_yields_after_traffic, tmp_path, 0.001)
    assert got is not None and got >= 1


def test_serve_with_max_run_0_never_yields(tmp_path):
    _policy_store(tmp_path / "policy.db")
    assert trio.run(_yields_after_traffic, tmp_path, 0) is None


@pytest.mark.parametrize("where", ["file", "environment"])
def test_a_negative_max_run_is_refused_naming_the_key(tmp_path, where):
    cfg = tmp_path / "gw.toml"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp_path / "state"))
    if where == "file":
        cfg.write_text('[limits]\nmax_run_ms = -1\n')
    else:
        cfg.write_text('')
        env["SEG_FAST_LIMITS_MAX_RUN_MS"] = "-1"
    out = subprocess.run([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env,
                         cwd=tmp_path, capture_output=True, timeout=60)
    assert out.returncode != 0
    err = out.stderr.decode()
    assert "limits.max_run_ms" in err
    assert (str(cfg) if where == "file" else "SEG_FAST_LIMITS_MAX_RUN_MS") in err


def test_the_sizing_run_records_the_knob_it_was_given(monkeypatch):
    from seg_fast.sim import sizing
    monkeypatch.setenv("SEG_FAST_LIMITS_MAX_RUN_MS", "0")
    monkeypatch.setenv("SEG_FAST_STATE_DIR", "/tmp/x")          # the run's own, not a knob
    monkeypatch.setenv("SEG_FAST_SLOW", "1")                    # not a setting
    assert sizing.settings_from_env() == {"limits.max_run_ms": "0"}
    assert sizing.machine()["settings_from_env"] == {"limits.max_run_ms": "0"}
