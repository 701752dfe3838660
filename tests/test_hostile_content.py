"""Issue 9, "Mail content that slips past the attachment policy": each attack against
a running `seg-fast serve` (its own worker process) in front of a mail server that
serves the crafted answer, with independent oracles for what the device receives
(Python's ``email`` for MIME, SHA-256 of what `seg-fast attachment decrypt` opens).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from processes import start_serve, stop_process
from proxy_helpers import MiniUpstream
from redis_server import free_port
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.eas.wbxml import decode, encode
from seg_fast.policy.model import DeviceRecord, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.client import EasClient
from seg_fast.sim.tree import E, text

WBXML = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]


def hostile_sync(spans: int, depth: int = 60) -> bytes:
    """A Sync answer of nested Adds holding ``spans`` AirSyncBase:Type strings at
    ``depth``: what a hostile mail server sends to make the scanner list every one."""
    out = bytearray(b"\x03\x01\x6a\x00\x45" + b"\x47" * (depth - 2) + b"\x00\x11")
    out += b"\x46\x031\x00\x01" * spans
    out += b"\x01" * (depth - 1)
    return bytes(out)


def ok_sync() -> bytes:
    return encode(E("AirSync:Sync", E("AirSync:Status", "1")))


async def write_policy(state: Path, document: PolicyDocument, devices=()) -> None:
    state.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(state / "seg-fast-policy.db")
    await store.open()
    try:
        await store.replace_all(document, list(devices))
    finally:
        await store.aclose()


def worker_pids(parent: int) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.add(int(entry))
    return pids


def serve_config(tmp_path: Path, upstream_port: int, **security) -> tuple[Path, int]:
    port = free_port()
    cfg = tmp_path / "gw.toml"
    extra = "".join(f"{k} = {v}\n" for k, v in security.items())
    cfg.write_text(
        f'workers = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{upstream_port}"\n'
        f'[admin]\nenabled = false\n'
        f'[log]\ntransactions = ""\n'
        f'[security]\n{extra}')
    return cfg, port


async def wait_serving(port: int, proc, client: EasClient):
    """The first answer of a worker that is up (connection refused until then)."""
    with trio.fail_after(20):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                return await client.request("FolderSync", E("FolderHierarchy:FolderSync",
                                                             E("FolderHierarchy:SyncKey", "0")))
            except OSError:
                await client.aclose()
                await trio.sleep(0.1)


def sync_request() -> object:
    return E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", "1"), E("AirSync:CollectionId", "1"))))


async def test_hostile_span_count_gets_a_status_and_the_worker_serves_on(tmp_path):
    """5 MB of 999k strings at depth 60: the worker stops at security.max_spans, the
    device gets Sync Status 5 (server error) instead of unchecked content, and the same
    worker answers the next request."""
    hostile = hostile_sync(999_000)
    assert len(hostile) > 4_900_000
    served = []

    def handler(req, body):
        cmd = dict(p.split(b"=", 1) for p in req.target.split(b"?", 1)[1].split(b"&")).get(b"Cmd")
        served.append(cmd)
        if cmd == b"Sync":
            return 200, WBXML, hostile if served.count(b"Sync") == 1 else ok_sync()
        return 200, WBXML, encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", "1")))

    up = MiniUpstream(handler)
    policy = EmailSecurityPolicy(unmanaged_attachments=AttachmentPolicy(file_types={"pdf": "block"}))
    await write_policy(tmp_path / "state", PolicyDocument(security=policy))
    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        cfg, port = serve_config(tmp_path, up.port)
        proc = start_serve(cfg, tmp_path)
        c = EasClient("127.0.0.1", port, "jdoe", "secret", "HOSTILE1")
        try:
            r = await wait_serving(port, proc, c)
            assert r.status == 200
            workers = worker_pids(proc.pid)
            assert len(workers) == 1
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
            assert r.status == 200 and r.headers["content-type"] == "application/vnd.ms-sync.wbxml"
            assert text(r.doc, "AirSync:Status") == "5" and len(r.body) < 100
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
            assert r.status == 200 and r.body == ok_sync()
            assert worker_pids(proc.pid) == workers and proc.poll() is None
            assert served.count(b"Sync") == 2
        finally:
            await c.aclose()
            stop_process(proc)
            nursery.cancel_scope.cancel()
