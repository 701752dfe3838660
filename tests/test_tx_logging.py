"""The admin API's transaction logging areas drive the transaction log of every worker
of a running `seg-fast serve` (two workers, one SQLite store) within a second."""
from __future__ import annotations

import json
from pathlib import Path

import trio

from http_client import request
from redis_server import free_port
from seg_fast.policy.model import DeviceRecord, ManagedDevicePolicies, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.mailbox import MailboxSimulator
from processes import start_serve, stop_process
from seg_fast.stats import STATS_DIR, read_snapshots



async def _statuses(port: int, device: str, n: int) -> list[str]:
    from seg_fast.sim.client import EasClient
    from seg_fast.sim.tree import E, text

    out = []
    for _ in range(n):       # a new connection each: the kernel spreads them over the workers
        c = EasClient("127.0.0.1", port, "jdoe", "secret", device, version="14.1")
        try:
            r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
            out.append(text(r.doc, "FolderHierarchy:Status"))
        finally:
            await c.aclose()
    return out


def _counted(snaps) -> int:
    return sum(n for s in snaps for by_status in s.requests.values() for n in by_status.values())


async def _store_version(path: Path) -> int:
    store = SqliteStore(path)
    await store.open()
    try:
        return await store.version()
    finally:
        await store.aclose()


def _lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


async def test_transaction_areas_through_running_gateway(tmp_path):
    store = SqliteStore(tmp_path / "policy.db")
    await store.open()
    await store.replace_all(PolicyDocument(managed=ManagedDevicePolicies(compromised=True)),
                            [DeviceRecord(device_id="GOOD", managed=True),
                             DeviceRecord(device_id="START", managed=True),
                             DeviceRecord(device_id="BAD", managed=True, compromised=True)])
    await store.aclose()
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=1, require_provisioning=False)
    gw_port, admin_port = free_port(), free_port()
    tx = tmp_path / "tx.jsonl"
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 2\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'[admin]\nport = {admin_port}\ntoken = "adm"\n'
            f'[log]\ntransactions = "{tx}"\n'
            f'[policy]\nsqlite_path = "{tmp_path / "policy.db"}"\n')
        proc = start_serve(cfg, tmp_path)
        answered = 0          # requests the gateway has answered (every one is counted by a worker)

        async def workers_reached(check) -> None:
            # Each worker's stats snapshot (once a second) follows a flush of its transaction
            # log, so a transaction a snapshot counts is in the file already.
            with trio.fail_after(20):
                while True:
                    snaps = read_snapshots(tmp_path / "state" / STATS_DIR)
                    if len(snaps) == 2 and check(snaps):
                        return
                    await trio.sleep(0.05)

        async def set_levels(levels: dict) -> None:
            status, _, body = await request(admin_port, "PUT", "/seg/logging", token="adm",
                                            body=json.dumps(levels).encode())
            assert status == 200, body
            version = await _store_version(tmp_path / "policy.db")
            await workers_reached(lambda snaps: all(s.policy_store_version >= version for s in snaps))

        async def logged(device: str, n: int, want: str) -> list[dict]:
            nonlocal answered
            before = len(_lines(tx))
            assert await _statuses(gw_port, device, n) == [want] * n
            answered += n
            await workers_reached(lambda snaps: _counted(snaps) >= answered)
            return [r for r in _lines(tx)[before:] if r.get("device_id") == device]

        try:
            with trio.fail_after(20):
                while True:
                    try:
                        got = await _statuses(gw_port, "START", 1)
                    except OSError:
                        await trio.sleep(0.1)      # not listening yet
                        continue
                    answered += 1
                    if got == ["1"]:
                        break
            # Default: a summary line for every transaction.
            assert len(await logged("GOOD", 4, "1")) == 4
            # Transaction summary off: no lines at all, allowed or blocked.
            await set_levels({"transaction_summary": "off"})
            assert await logged("GOOD", 6, "1") == []
            assert await logged("BAD", 6, "129") == []
            # Device transactions: blocked only.
            await set_levels({"device_transactions_blocked": "info"})
            assert await logged("GOOD", 6, "1") == []
            bad = await logged("BAD", 6, "129")
            assert len(bad) == 6 and all(r["decision"] == "blocked.device_compromised" for r in bad)
            # Device transactions: all.
            await set_levels({"device_transactions_all": "debug", "device_transactions_blocked": "off"})
            assert len(await logged("GOOD", 3, "1")) == 3
            # Back to the summary alone.
            await set_levels({"device_transactions_all": "off", "transaction_summary": "info"})
            assert len(await logged("GOOD", 3, "1")) == 3
            status, _, body = await request(admin_port, "GET", "/seg/logging", token="adm")
            assert json.loads(body)["transaction_summary"] == "info"
        finally:
            stop_process(proc)
            print(proc.stderr.read().decode()[-3000:])
            nursery.cancel_scope.cancel()
