"""`seg-fast serve`'s control process with the admin API off: the policy API pull
still runs (full snapshot into the store, which the workers follow)."""
from __future__ import annotations

import json

import trio

from http_client import JsonServer
from redis_server import free_port
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.client import EasClient
from seg_fast.sim.tree import E, text
from processes import start_serve, stop_process


async def folder_sync_status(port: int) -> str:
    c = EasClient("127.0.0.1", port, "jdoe", "secret", "PHONE", version="14.1")
    try:
        r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
        return text(r.doc, "FolderHierarchy:Status")
    finally:
        await c.aclose()

SNAPSHOT = {"token": "t1", "policies": {"managed": {"compromised": True}},
            "devices": [{"device_id": "PHONE", "managed": True, "compromised": True}]}


async def test_policy_pull_runs_with_admin_api_off(tmp_path):
    api = JsonServer({"/api/snapshot": (200, json.dumps(SNAPSHOT).encode()),
                      "/api/changes": (200, b'{"token": "t1"}')})
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=1)
    gw_port = free_port()
    async with trio.open_nursery() as nursery:
        api_port = await nursery.start(api.serve)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 1\n'
            f'[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'[admin]\nenabled = false\n'
            f'[log]\ntransactions = ""\n'
            f'[policy]\nallow_if_no_policies = true\napi_url = "http://127.0.0.1:{api_port}/api"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            with trio.fail_after(20):
                while not any(p == "/api/snapshot" for p, _ in api.seen):
                    assert proc.poll() is None
                    await trio.sleep(0.1)
            # Only the pulled snapshot blocks the device (no policies: allowed), so a 129
            # means it reached the store the workers read.
            with trio.fail_after(20):
                while True:
                    try:
                        if await folder_sync_status(gw_port) == "129":
                            break
                    except OSError:
                        pass       # the worker is not listening yet
                    await trio.sleep(0.2)
            store = SqliteStore(tmp_path / "state" / "seg-fast-policy.db")
            await store.open()
            try:
                snap = await store.snapshot()
            finally:
                await store.aclose()
            assert snap.document.managed.compromised and [d.device_id for d in snap.devices] == ["PHONE"]
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()
