"""The policy cache's shared strings and id spellings, attacked through a running `seg-fast serve`.

The engine stores a mail client or device type many devices send as one object per worker
(policy/engine.py ``Shared``, bounded) and a device's cached decision under each spelling
of its DeviceId. Against a real serve with a mail-client allow list: a device allowed under
one spelling is blocked under another when its User-Agent is not allowed (no cached answer
crosses over); hundreds of devices sending a new, long User-Agent each are all decided and
the worker still answers; an MDM update (a device record written to the store, followed by
the worker) blocks the device under every spelling it had been cached under.
"""
from __future__ import annotations

import os

import trio

from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.policy.model import DeviceRecord, GeneralAccess, ListPolicy, PolicyDocument
from seg_fast.policy.store import SqliteStore
from test_hostile_identity import Recorder, basic, blocked_129, exchange, request, target

ALLOWED = "Apple-iPhone15C2/2104.100"


async def fetch(port: int, device: str, agent: str, marker_user: str = "alice") -> tuple[int, bytes]:
    status, _, body = await exchange(port, request(target(marker_user, device), [
        ("Authorization", basic(marker_user)), ("User-Agent", agent)]))
    return status, body


async def test_shared_strings_and_spellings_through_serve(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = state / "seg-fast-policy.db"
    store = SqliteStore(db)
    await store.open()
    await store.replace_all(PolicyDocument(general=GeneralAccess(
        mail_client=ListPolicy(enabled=True, mode="allow", values=["Apple-iPhone*"]))), [])
    os.chmod(db, 0o600)
    rec = Recorder()
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.up.serve)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                       f'[upstream]\nurl = "http://127.0.0.1:{rec.up.port}"\n[admin]\nenabled = false\n')
        proc = start_serve(cfg, tmp_path)
        try:
            with trio.fail_after(30):       # ready once the policy is loaded (fail closed before)
                while not rec.seen("READY"):
                    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                    try:
                        await fetch(port, "READY", ALLOWED)
                    except OSError:
                        pass
                    await trio.sleep(0.2)

            # One device, two spellings: allowed with an allowed mail client (forwarded: the
            # simulator answers), blocked with another (129, never forwarded).
            status, body = await fetch(port, "PHONEA", ALLOWED)
            assert not blocked_129(status, body) and len(rec.seen("PHONEA")) == 1
            status, body = await fetch(port, "phonea", "curl/8.5.0")
            assert blocked_129(status, body) and not rec.seen("phonea")
            status, body = await fetch(port, "PHONEA", ALLOWED)     # its own cached answer still stands
            assert not blocked_129(status, body) and len(rec.seen("PHONEA")) == 2

            # Devices each sending a new, long User-Agent (past what the table shares): all decided.
            for i in range(300):
                agent = f"Apple-iPhone{i}/" + "x" * 200 if i % 2 else f"Evil-{i}-" + "y" * 200
                status, body = await fetch(port, f"FLOOD{i}", agent)
                assert blocked_129(status, body) != bool(i % 2)
            assert len(rec.seen("FLOOD")) == 150
            status, body = await fetch(port, "AFTER", ALLOWED)
            assert not blocked_129(status, body) and rec.seen("AFTER") and proc.poll() is None

            # An MDM update blocks the device under every spelling it was cached under.
            spellings = ("PHONEB", "phoneb", "PhoneB")
            for dev in spellings:
                status, body = await fetch(port, dev, ALLOWED)
                assert not blocked_129(status, body) and len(rec.seen(dev)) == 1
            await store.put_devices([DeviceRecord(device_id="pHONEb", override="blacklist")])
            with trio.fail_after(30):       # the worker follows the store's changes (0.2 s polls)
                for dev in spellings:
                    while True:
                        status, body = await fetch(port, dev, ALLOWED)
                        if blocked_129(status, body):
                            break
                        await trio.sleep(0.1)
            forwarded = sum(len(rec.seen(d)) for d in spellings)
            status, body = await fetch(port, "PHONEB", ALLOWED)
            assert blocked_129(status, body) and sum(len(rec.seen(d)) for d in spellings) == forwarded
        finally:
            stop_process(proc)
            await store.aclose()
            nursery.cancel_scope.cancel()
