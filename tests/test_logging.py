"""The gateway's own log and the transaction log of a running `seg-fast serve`: JSON lines,
`log.level` applied, SIGUSR1 reopens both files after logrotate moved them, and neither
holds a password or a body."""
from __future__ import annotations

import json
import os
import signal

import trio

from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, text

PASSWORD = "s3cret-Pa55"


async def folder_sync(port: int) -> str:
    c = EasClient("127.0.0.1", port, "jdoe", PASSWORD, "PHONE1", version="14.1")
    try:
        r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
        return text(r.doc, "FolderHierarchy:Status")
    finally:
        await c.aclose()


async def poll(predicate, what: str):
    with trio.fail_after(30):
        while not predicate():
            await trio.sleep(0.1)


def lines(path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except FileNotFoundError:
        return []


async def test_json_log_levels_and_reopen_on_sigusr1(tmp_path):
    sim = MailboxSimulator(password=PASSWORD, initial_messages=1, require_provisioning=False)
    log, tx = tmp_path / "gw.log", tmp_path / "tx.jsonl"
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                       f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n[admin]\nenabled = false\n'
                       f'[policy]\nallow_if_no_policies = true\n'
                       f'[log]\nfile = "{log}"\ntransactions = "{tx}"\nlevel = "info"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            # The worker's policy area says at INFO that it loaded its (empty) snapshot.
            await poll(lambda: any(r["area"] == "policy.cache" for r in lines(log)), "policy log line")
            with trio.fail_after(30):
                while True:
                    try:
                        assert await folder_sync(port) == "1"
                        break
                    except OSError:
                        await trio.sleep(0.1)
            await poll(lambda: any(r.get("command") == "FolderSync" for r in lines(tx)), "transaction")
            for r in lines(log):
                assert {"ts", "level", "area", "pid", "msg"} <= r.keys()
            # logrotate: move both files away, signal, and the next records land in new files.
            log.rename(tmp_path / "gw.log.1")
            tx.rename(tmp_path / "tx.jsonl.1")
            os.kill(proc.pid, signal.SIGUSR1)
            await poll(lambda: log.exists() and tx.exists(), "reopened files")
            assert await folder_sync(port) == "1"
            await poll(lambda: any(r.get("command") == "FolderSync" for r in lines(tx)), "transaction after reopen")
            everything = b"".join(p.read_bytes() for p in tmp_path.glob("*.[lj]*") if p.is_file())
            assert PASSWORD.encode() not in everything
            nursery.cancel_scope.cancel()
        finally:
            stop_process(proc)


def test_log_level_is_validated_with_file_and_key(tmp_path):
    from seg_fast.config import load_config
    from seg_fast.errors import ConfigError

    cfg = tmp_path / "gw.toml"
    cfg.write_text('[log]\nlevel = "verbose"\n')
    try:
        load_config(cfg, env={})
    except ConfigError as exc:
        assert "gw.toml" in str(exc) and "log.level" in str(exc)
    else:
        raise AssertionError("log.level = verbose was accepted")


def test_log_level_warn_drops_info_lines(tmp_path):
    import logging

    from seg_fast import logsetup
    from seg_fast.config import load_config

    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[log]\nfile = "{tmp_path / "x.log"}"\nlevel = "warn"\n')
    logsetup.configure(load_config(cfg, env={}))
    try:
        logging.getLogger("seg_fast.policy.updates").info("not written")
        logging.getLogger("seg_fast.policy.updates").warning("written")
        got = lines(tmp_path / "x.log")
        assert [r["msg"] for r in got] == ["written"] and got[0]["area"] == "policy.updates"
    finally:
        logging.getLogger("seg_fast").removeHandler(logsetup._handler)
        logsetup._handler = None
        logging.getLogger("seg_fast").setLevel(logging.NOTSET)
        logging.getLogger("seg_fast").propagate = True
