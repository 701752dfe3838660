"""Worker statistics and Prometheus /metrics: counted per transaction in each worker,
written to state_dir/stats, rendered by the control process's admin listener, and
read back with prometheus_client's own parser (an independent oracle of the format).
"""
from __future__ import annotations

import json
import os
import stat

import pytest
import trio

from http_client import request
from redis_server import free_port
from seg_fast.admin.api import masked
from seg_fast.admin.metrics import render
from seg_fast.admin.server import AdminServer
from seg_fast.config import AdminSettings, Config, UpstreamSettings
from seg_fast.observe import Transaction
from seg_fast.policy.model import DeviceRecord, ManagedDevicePolicies, PolicyDocument
from seg_fast.policy.settings import PolicySettings
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, text
from seg_fast.stats import Stats, WorkerSnapshot, read_snapshots, remove_snapshot, write_snapshot
from seg_fast.statedir import exchange
from processes import start_serve, stop_process

parser = pytest.importorskip("prometheus_client.parser")
TOKEN = "adm"


def families(text_: str) -> dict:
    return {f.name: f for f in parser.text_string_to_metric_families(text_)}


def samples(fams: dict, family: str, suffix: str = "", **labels) -> float:
    """Sum of the family's samples (name = family + suffix) whose labels include ``labels``."""
    fam = fams[family]
    return sum(s.value for s in fam.samples if s.name == family + suffix
               and all(s.labels.get(k) == v for k, v in labels.items()))


RECORDS = [
    Transaction(ts=1.0, method="POST", command="Sync", status=200, decision="allowed.managed", bytes_in=10,
                bytes_out=100, total_ms=3.0, upstream_ms=2.0),
    Transaction(ts=1.0, method="POST", command="Sync", status=200, decision="allowed.managed", bytes_in=5,
                bytes_out=50, total_ms=30.0),
    Transaction(ts=1.0, method="POST", command="FolderSync", status=200, decision="blocked.compromised",
                total_ms=1.0),
    Transaction(ts=1.0, method="POST", command="Ping", status=503, decision="allowed.managed",
                error="mail server down", total_ms=60000.0),
    Transaction(ts=1.0, method="GET", status=404, error="not an EAS path"),
]


def test_snapshot_file_and_render_parse(tmp_path):
    stats = Stats()
    for r in RECORDS:
        stats.tx(r)
    stats.transform("Sync", 1000, 1300)
    stats.transform("ItemOperations", 500, 200)
    d = tmp_path / "stats"
    d.mkdir()
    path = write_snapshot(d, stats.snapshot())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [n for n in os.listdir(d) if n.startswith(".")]       # the temp file was renamed
    other = stats.snapshot()
    other.pid = os.getpid() + 1
    write_snapshot(d, other)
    snaps = read_snapshots(d)
    assert sorted(s.pid for s in snaps) == sorted([os.getpid(), os.getpid() + 1])
    fams = families(render(snaps))
    # Every figure checked against the records themselves, per worker and summed.
    for cmd in ("Sync", "FolderSync", "Ping"):
        for st in (200, 503):
            want = sum(1 for r in RECORDS if r.command == cmd and r.status == st)
            assert samples(fams, "seg_fast_requests", "_total", command=cmd, status=str(st)) == 2 * want
            assert samples(fams, "seg_fast_worker_requests", "_total", command=cmd, status=str(st),
                           worker=str(os.getpid())) == want
    assert samples(fams, "seg_fast_requests", "_total", command="GET", status="404") == 2
    assert samples(fams, "seg_fast_decisions", "_total", reason="blocked.compromised") == 2
    assert samples(fams, "seg_fast_gateway_answers", "_total", kind="upstream_unavailable") == 2
    assert samples(fams, "seg_fast_request_bytes", "_total") == 2 * sum(r.bytes_in for r in RECORDS)
    assert samples(fams, "seg_fast_answer_bytes", "_total") == 2 * sum(r.bytes_out for r in RECORDS)
    # The transaction histogram leaves Pings out; its buckets are cumulative.
    not_ping = [r for r in RECORDS if r.command != "Ping"]
    assert samples(fams, "seg_fast_transaction_seconds", "_count") == 2 * len(not_ping)
    assert samples(fams, "seg_fast_transaction_seconds", "_bucket", le="0.01") == \
        2 * sum(1 for r in not_ping if r.total_ms <= 10)
    assert samples(fams, "seg_fast_workers") == 2
    assert samples(fams, "seg_fast_transformed_answers", "_total", command="Sync") == 2
    assert samples(fams, "seg_fast_transform_bytes_in", "_total") == 2 * 1500
    assert samples(fams, "seg_fast_worker_transform_bytes_out", "_total", worker=str(os.getpid())) == 1500


def test_rewritten_snapshot_is_whole_and_the_spare_holds_the_one_before(tmp_path):
    """Each rewrite goes over the spare file and the names are exchanged: the worker's file
    is always one whole snapshot (a shorter one keeps nothing of a longer one's tail), the
    spare the one before it, and both go when the worker does."""
    import msgspec

    stats = Stats()
    big = stats.snapshot()
    big.decisions = {f"allowed.rule{i}": i for i in range(300)}
    small = stats.snapshot()
    small.ts = big.ts + 1
    path = write_snapshot(tmp_path, big)
    spare = tmp_path / f".worker-{big.pid}.tmp"
    for newest, before in ((small, big), (big, small), (small, big)):
        write_snapshot(tmp_path, newest)
        assert msgspec.json.decode(path.read_bytes(), type=WorkerSnapshot) == newest
        assert msgspec.json.decode(spare.read_bytes(), type=WorkerSnapshot) == before
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert [s.ts for s in read_snapshots(tmp_path)] == [newest.ts]      # the spare is not a worker
    remove_snapshot(tmp_path, big.pid)
    assert os.listdir(tmp_path) == []


def test_exchange_swaps_names_and_refuses_a_missing_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    inode_a = os.stat(a).st_ino
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this file system")
    assert (a.read_bytes(), b.read_bytes()) == (b"second", b"first")
    assert os.stat(b).st_ino == inode_a
    with pytest.raises(FileNotFoundError):
        exchange(a, tmp_path / "missing")
    assert a.read_bytes() == b"second"


def test_stale_snapshot_is_ignored(tmp_path):
    snap = Stats().snapshot()
    snap.ts -= 60
    write_snapshot(tmp_path, snap)
    assert read_snapshots(tmp_path) == []


def test_masked_settings():
    cfg = {"admin": {"token": "s3cret"}, "policy": {"api_token": "", "redis_url": "redis://u:pw@h:6379/0",
                                                    "api_proxy_url": "http://proxy:3128"},
           "upstream": {"proxy_url": "http://bob:hunter2@proxy:3128"}, "security": {"master_key_file": "/k"}}
    out = json.dumps(masked(cfg))
    for secret in ("s3cret", "hunter2", ":pw@"):
        assert secret not in out
    m = masked(cfg)
    assert m["admin"]["token"] == "(set)" and m["policy"]["api_token"] == ""
    assert m["upstream"]["proxy_url"] == "http://bob:****@proxy:3128"
    assert m["policy"]["api_proxy_url"] == "http://proxy:3128" and m["security"]["master_key_file"] == "/k"


async def test_metrics_auth_and_segconfig(tmp_path, nursery):
    token = "Zq8-admin-token-Zq8"
    cfg = Config(state_dir=str(tmp_path), admin=AdminSettings(port=0, token=token),
                 upstream=UpstreamSettings(proxy_url="http://bob:hunter2@proxy:3128"),
                 policy=PolicySettings(sqlite_path=str(tmp_path / "p.db"), api_token="apitok"))
    server = AdminServer(cfg)
    await nursery.start(server.gate.run)
    server.port = await nursery.start(server.listen, "127.0.0.1", 0)
    # From loopback a scraper needs no token; from elsewhere it does.
    status, headers, body = await request(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert samples(families(body.decode()), "seg_fast_workers") == 0
    status, _, _ = await server.answer("GET", b"/metrics", [], b"", peer="192.0.2.7")
    assert status == 401
    status, _, _ = await server.answer("GET", b"/metrics", [(b"authorization", b"Bearer " + token.encode())], b"",
                                       peer="192.0.2.7")
    assert status == 200
    # Other admin endpoints still want the token from loopback.
    assert (await request(server.port, "GET", "/seg/stats"))[0] == 401
    status, _, body = await request(server.port, "GET", "/seg/policy/segconfig", token=token)
    seg = json.loads(body)
    assert status == 200
    for section in ("listener", "upstream", "eas", "timeouts", "limits", "admin", "health", "log", "policy",
                    "security"):
        assert section in seg, section
    for secret in (token, "hunter2", "apitok"):
        assert secret not in body.decode()
    assert seg["admin"]["token"] == "(set)" and seg["policy"]["api_token"] == "(set)"


FOLDERSYNC = E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))


async def device_requests(port: int, device_id: str, n: int) -> list[str]:
    """Provision (when allowed) and n FolderSyncs; the FolderSync Status of each."""
    c = EasClient("127.0.0.1", port, "jdoe", "secret", device_id, version="14.1")
    out = []
    try:
        for _ in range(n):
            r = await c.request("FolderSync", FOLDERSYNC)
            status = text(r.doc, "FolderHierarchy:Status")
            if status == "142":            # provisioning required: allowed devices provision once
                await c.provision()
                r = await c.request("FolderSync", FOLDERSYNC)
                status = text(r.doc, "FolderHierarchy:Status")
            out.append(status)
    finally:
        await c.aclose()
    return out


async def test_metrics_after_real_traffic(tmp_path):
    """Two workers, real device sessions through seg-fast serve: /metrics sums what the
    transaction log recorded, per worker and in total, and parses with prometheus_client."""
    store = SqliteStore(tmp_path / "policy.db")
    await store.open()
    await store.replace_all(PolicyDocument(managed=ManagedDevicePolicies(compromised=True)),
                            [DeviceRecord(device_id="BAD", managed=True, compromised=True),
                             DeviceRecord(device_id="GOOD", managed=True, compromised=False)])
    await store.aclose()
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=1)
    gw_port, admin_port = free_port(), free_port()
    txlog = tmp_path / "tx.jsonl"
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 2\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n'
            f'[log]\ntransactions = "{txlog}"\n'
            f'[policy]\nsqlite_path = "{tmp_path / "policy.db"}"\n'
            f'[security]\nmaster_key_file = "{tmp_path / "mk"}"\nkey_state_file = "{tmp_path / "ks.json"}"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            with trio.fail_after(20):
                while True:
                    assert proc.poll() is None
                    try:
                        status, _, body = await request(admin_port, "GET", "/metrics")
                        if status == 200 and samples(families(body.decode()), "seg_fast_workers") == 2:
                            break
                    except OSError:
                        pass
                    await trio.sleep(0.2)
            good, bad = [], []
            for _ in range(3):      # new connections: the kernel spreads them over both workers
                good += await device_requests(gw_port, "GOOD", 2)
                bad += await device_requests(gw_port, "BAD", 2)
            assert set(good) == {"1"} and set(bad) == {"129"}

            def logged():
                if not txlog.exists():
                    return []
                return [json.loads(line) for line in txlog.read_text().splitlines() if line.strip()]

            fams = None
            with trio.fail_after(20):
                while True:
                    recs = logged()
                    _, _, body = await request(admin_port, "GET", "/metrics", token=TOKEN)
                    fams = families(body.decode())
                    total = samples(fams, "seg_fast_requests", "_total")
                    started = fams.get("seg_fast_worker_start_time_seconds")
                    syncs = [r for r in recs if r.get("command") == "FolderSync"]
                    blocked_syncs = sum(1 for r in syncs if r.get("decision", "").startswith("blocked"))
                    # Each worker writes its log and its stats on its own schedule: wait for every
                    # FolderSync the devices made, counted by outcome (GOOD's provisioning retries
                    # alone can reach a plain total while the other worker's BAD lines are unwritten),
                    # and for the metrics to agree with the log.
                    # The loop-lag sampler's first sample (0.2 s into a worker's life) can come after
                    # the worker's first stats write: forked workers start fast enough to see it.
                    if (blocked_syncs >= len(bad) and len(syncs) - blocked_syncs >= len(good)
                            and total == len(recs) and started and len(started.samples) == 2
                            and samples(fams, "seg_fast_worker_loop_lag_seconds", "_count") > 0):
                        break                      # every request counted, both workers reporting
                    await trio.sleep(0.2)
            by_key: dict = {}
            for r in recs:
                key = (r.get("command") or r["method"], str(r["status"]))
                by_key[key] = by_key.get(key, 0) + 1
            for (cmd, st), n in by_key.items():
                assert samples(fams, "seg_fast_requests", "_total", command=cmd, status=st) == n
            assert samples(fams, "seg_fast_requests", "_total", command="FolderSync") >= len(good) + len(bad)
            blocked = sum(1 for r in recs if r.get("decision", "").startswith("blocked"))
            assert blocked >= len(bad)
            assert sum(s.value for s in fams["seg_fast_decisions"].samples
                       if s.labels["reason"].startswith("blocked")) == blocked
            # Per worker: both report, and their figures add up to the sum.
            # (SO_REUSEPORT may hand every connection to one worker, so both report a start
            # time, and whichever served requests counts them.)
            workers = {s.labels["worker"] for s in fams["seg_fast_worker_start_time_seconds"].samples}
            assert len(workers) == 2
            assert {s.labels["worker"] for s in fams["seg_fast_worker_requests"].samples} <= workers
            assert samples(fams, "seg_fast_worker_requests", "_total") == samples(fams, "seg_fast_requests", "_total")
            assert samples(fams, "seg_fast_worker_loop_lag_seconds", "_count") > 0
            assert samples(fams, "seg_fast_policy_snapshot_version") > 0
            assert samples(fams, "seg_fast_worker_policies_loaded") == 2
            # The files are the workers' own, private.
            for name in os.listdir(tmp_path / "state" / "stats"):
                assert stat.S_IMODE(os.stat(tmp_path / "state" / "stats" / name).st_mode) == 0o600
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()
