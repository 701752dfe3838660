"""Faults that must fail safe, not closed for everyone (issue 9), each against a running
`seg-fast serve`: Redis down at start, a read-only or full state dir, state file modes,
`kill -9` of the control process, a second serve on the same port, a taken admin port,
the MDM push listener's exposure.

Mount-based tests (read-only bind mount, a small tmpfs) need root and mount(2); they
skip with the reason when this machine does not allow them.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from http_client import request
from processes import REPO, start_serve, stop_process
from redis_server import free_port, running_redis
from seg_fast.config import load_config
from seg_fast.errors import ConfigError
from seg_fast.policy.model import DeviceRecord, ManagedDevicePolicies, PolicyDocument
from seg_fast.policy.store import RedisStore, SqliteStore
from seg_fast.proxy.forked import worker_pids
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, text

ADMIN_TOKEN = "adm"
DOC = PolicyDocument(managed=ManagedDevicePolicies(compromised=True))
ALLOWED = [DeviceRecord(device_id="PHONE", user="jdoe", managed=True)]
BLOCKED = [DeviceRecord(device_id="PHONE", user="jdoe", managed=True, compromised=True)]


def write_config(tmp_path: Path, sim_port: int, gw_port: int, admin_port: int, *, extra_policy: str = "",
                 workers: int = 1, name: str = "gw.toml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(
        f'workers = {workers}\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n'
        f'[admin]\nport = {admin_port}\ntoken = "{ADMIN_TOKEN}"\n'
        f'[log]\ntransactions = ""\n'
        f'[policy]\n{extra_policy}\n')
    return cfg


async def device_status(port: int) -> str:
    """FolderSync Status for PHONE over a new connection ("1" allowed, "129" blocked)."""
    c = EasClient("127.0.0.1", port, "jdoe", "secret", "PHONE", version="14.1")
    try:
        try:
            await c.provision()
        except ConnectionError:
            pass       # blocked: the FolderSync below says so
        r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
        return text(r.doc, "FolderHierarchy:Status")
    finally:
        await c.aclose()


async def wait_status(port: int, want: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    last = None
    with trio.fail_after(timeout):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                last = await device_status(port)
                if last == want:
                    return
            except OSError:
                pass        # not listening yet
            await trio.sleep(0.2)


async def admin_get(port: int, path: str) -> dict:
    status, _, body = await request(port, "GET", path, token=ADMIN_TOKEN)
    assert status == 200, body
    return json.loads(body)


async def wait_admin(port: int, proc, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                await admin_get(port, "/seg/diagnostic/cluster")
                return
            except OSError:
                await trio.sleep(0.1)


def children(pid: int) -> set[int]:
    """The control process's workers."""
    return set(worker_pids(pid))


def alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] != "Z"


def listening(port: int) -> list[str]:
    """Local addresses in LISTEN state on ``port`` (from /proc/net/tcp, not our code)."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, st = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and st == "0A":
            out.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


# -- 1. Redis down at start: the local copy of the last snapshot serves ---------------

async def test_redis_down_at_start_serves_the_local_copy_then_follows_redis_again(tmp_path):
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=1)
    redis_port, gw_port, admin_port = free_port(), free_port(), free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = write_config(tmp_path, sim.port, gw_port, admin_port,
                           extra_policy=f'store = "redis"\nredis_url = "redis://127.0.0.1:{redis_port}/0"\n')
        with running_redis(tmp_path, redis_port) as url:
            store = RedisStore(url)
            await store.open()
            version = await store.replace_all(DOC, ALLOWED)
            await store.aclose()
            first = start_serve(cfg, tmp_path)
            try:
                await wait_status(gw_port, "1", first)
                # The control process keeps the local copy of the Redis snapshot.
                with trio.fail_after(20):
                    while (await admin_get(admin_port, "/seg/diagnostic/cluster"))["store_status"] \
                            .get("local_copy", {}).get("version") != version:
                        await trio.sleep(0.2)
            finally:
                stop_process(first)
        # Redis is gone: a new serve would block everyone (no snapshot) without the copy.
        second = start_serve(cfg, tmp_path)
        try:
            await wait_status(gw_port, "1", second)
            diag = await admin_get(admin_port, "/seg/diagnostic/cluster")
            st = diag["store_status"]
            assert st["reachable"] is False and st["serving"] == "local copy", st
            assert st["local_copy"]["version"] == version and st["local_copy"]["age_s"] >= 0
            assert diag["policies_loaded"] is True and diag["snapshot_version"] == version
            # Writes are refused with the cause while the copy serves.
            status, _, body = await request(admin_port, "POST", "/seg/device/PHONE/override",
                                            b'{"override": "blacklist"}', token=ADMIN_TOKEN)
            assert status == 503 and b"Redis unreachable" in body and b"not written" in body
            # Redis back (empty, on the same port): updates flow again, to the workers too.
            with running_redis(tmp_path, redis_port) as url:
                store = RedisStore(url)
                await store.open()
                await store.replace_all(DOC, BLOCKED)
                await store.aclose()
                await wait_status(gw_port, "129", second)
                with trio.fail_after(20):
                    while (await admin_get(admin_port, "/seg/diagnostic/cluster"))["store_status"][
                            "serving"] != "redis":
                        await trio.sleep(0.2)
        finally:
            stop_process(second)
        nursery.cancel_scope.cancel()


async def test_local_copy_serves_only_its_own_redis_and_refuses_writes(tmp_path):
    from seg_fast.errors import SegFastError
    from seg_fast.policy.settings import PolicySettings
    from seg_fast.policy.store import StoreError, keep_local_copy

    copy = tmp_path / "copy.db"
    port = free_port()
    with running_redis(tmp_path, port) as url:
        store = RedisStore(url)
        await store.open()
        await store.replace_all(DOC, ALLOWED)
        await store.set_meta("test_mode", "1")
        version = await store.version()
        await store.aclose()
        settings = PolicySettings(store="redis", redis_url=url, sqlite_path=str(copy))
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_local_copy, settings)
            with trio.fail_after(20):
                while not copy.exists() or (await RedisStore(url, local_copy=copy).status()).get(
                        "local_copy", {}).get("version") != version:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    served = RedisStore(url, local_copy=copy)
    await served.open()                               # Redis is down: the copy serves
    snap = await served.snapshot()
    assert snap.version == version and snap.document == DOC and snap.devices == ALLOWED
    assert await served.get_meta("test_mode") == "1" and served.writable is False
    with pytest.raises(StoreError, match="Redis unreachable.*not written"):
        await served.put_devices(BLOCKED)
    await served.aclose()
    with pytest.raises(SegFastError, match="cannot connect"):
        await RedisStore(url, prefix="other:", local_copy=copy).open()    # not a copy of that data
    with pytest.raises(SegFastError, match="cannot connect"):
        await RedisStore(url).open()                                       # no copy configured


# -- 2, 3. Read-only and full state dirs: serve, refuse writes with the cause ---------

def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=20)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


def _can_mount(tmp_path: Path) -> str:
    if os.geteuid() != 0:
        return "needs root to mount"
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        return f"mount not allowed here: {getattr(exc, 'stderr', b'').decode(errors='replace') or exc}"
    _umount(probe)
    return ""


async def _seed_sqlite(state: Path) -> None:
    store = SqliteStore(state / "seg-fast-policy.db")
    await store.open()
    await store.replace_all(DOC, ALLOWED)
    await store.aclose()


async def test_read_only_state_dir_serves_and_refuses_writes_with_the_cause(tmp_path):
    why = _can_mount(tmp_path)
    if why:
        pytest.skip(why)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    await _seed_sqlite(state)
    _mount("--bind", str(state), str(state))
    try:
        _mount("-o", "remount,bind,ro", str(state))
        sim = MailboxSimulator(password="secret", seed=5, initial_messages=1)
        gw_port, admin_port = free_port(), free_port()
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.serve, "127.0.0.1", 0)
            proc = start_serve(write_config(tmp_path, sim.port, gw_port, admin_port), tmp_path)
            try:
                await wait_status(gw_port, "1", proc)      # the read-only DB's policies decide
                st = (await admin_get(admin_port, "/seg/diagnostic/cluster"))["store_status"]
                assert st["writable"] is False and "Read-only file system" in st["read_only_reason"]
                status, _, body = await request(admin_port, "PUT", "/seg/policy/document", b"{}",
                                                token=ADMIN_TOKEN)
                assert status == 503, body
                err = json.loads(body)["error"]
                assert "read-only" in err and "Read-only file system" in err
                assert await device_status(gw_port) == "1"  # still serving after the refused write
            finally:
                stop_process(proc)
                nursery.cancel_scope.cancel()
        assert "opened read-only" in proc.stderr.read().decode()
    finally:
        _umount(state)


async def test_full_disk_reports_the_cause_and_keeps_serving(tmp_path):
    why = _can_mount(tmp_path)
    if why:
        pytest.skip(why)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    _mount("-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(state))
    try:
        await _seed_sqlite(state)
        sim = MailboxSimulator(password="secret", seed=5, initial_messages=1)
        gw_port, admin_port = free_port(), free_port()
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.serve, "127.0.0.1", 0)
            proc = start_serve(write_config(tmp_path, sim.port, gw_port, admin_port), tmp_path)
            try:
                await wait_status(gw_port, "1", proc)
                fd = os.open(state / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    while True:
                        os.write(fd, b"\0" * 65536)
                except OSError as exc:
                    assert exc.errno == 28          # ENOSPC: the disk is full now
                finally:
                    os.close(fd)
                # The WAL may still have room for a few small writes: write until the store is full.
                status, err = 200, ""
                for i in range(500):
                    status, _, body = await request(admin_port, "POST", f"/seg/device/D{i:04d}{'x' * 200}/override",
                                                    b'{"override": "whitelist"}', token=ADMIN_TOKEN)
                    if status != 200:
                        err = json.loads(body)["error"]
                        break
                assert status == 503, body
                assert "No space left on device" in err and "SQLITE_FULL" in err, err
                assert "no transaction is active" not in err
                assert await device_status(gw_port) == "1"   # still serving
                st = (await admin_get(admin_port, "/seg/diagnostic/cluster"))["store_status"]
                assert "No space left on device" in st["last_write_error"]
            finally:
                stop_process(proc)
                nursery.cancel_scope.cancel()
    finally:
        _umount(state)


# -- 4. Every state file 0600, a warning about an open state dir --------------------

def _cli(args: list[str], state: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(state))
    return subprocess.run([sys.executable, "-m", "seg_fast", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.slow
async def test_state_files_are_0600_and_an_open_state_dir_is_warned_about(tmp_path):
    import base64

    import msgspec

    from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE
    from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy
    from seg_fast.sim.state import INBOX, Item
    from seg_fast.sim.tree import find, kids

    old = os.umask(0o022)       # the usual umask: files would be 0644 without care
    try:
        state = tmp_path / "state"
        state.mkdir()
        os.chmod(state, 0o755)  # e.g. made by a package or by hand
        doc = PolicyDocument(security=EmailSecurityPolicy(
            managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt"})))
        policy_file = tmp_path / "policies.json"
        policy_file.write_bytes(msgspec.json.encode({"policies": doc, "devices": [
            DeviceRecord(device_id="MANAGED1", user="jdoe", managed=True)]}))
        r = _cli(["policy", "load", str(policy_file)], state, tmp_path)
        assert r.returncode == 0, r.stderr
        sim = MailboxSimulator(password="secret", seed=5)
        gw_port, admin_port = free_port(), free_port()
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.serve, "127.0.0.1", 0)
            cfg = tmp_path / "gw.toml"
            cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
                           f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
                           f'[admin]\nport = {admin_port}\n[log]\ntransactions = ""\n')   # token generated
            proc = start_serve(cfg, tmp_path)
            try:
                pdf_i = next(i for i in range(400) if (m := sim.corpus.message(i)) and not m.signed
                             and m.attachments and m.attachments[0][0].endswith(".pdf"))
                sid = sim.mailbox("jdoe").add(INBOX, Item(pdf_i))
                c = EasClient("127.0.0.1", gw_port, "jdoe", "secret", "MANAGED1", version="14.1")
                with trio.fail_after(30):
                    while True:
                        try:
                            await c.provision()
                            break
                        except OSError:
                            await trio.sleep(0.2)
                sync = lambda key, more: E("AirSync:Sync", E("AirSync:Collections", E(  # noqa: E731
                    "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", INBOX), *more)))
                r = await c.request("Sync", sync("0", []))
                key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
                r = await c.request("Sync", sync(key, [E("AirSync:GetChanges"), E("AirSync:WindowSize", 100)]))
                cmds = find(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Commands")
                item = next(a for a in kids(cmds, "AirSync:Add") if text(a, "AirSync:ServerId") == sid)
                ref = text(find(item, "AirSync:ApplicationData", "AirSyncBase:Attachments", "AirSyncBase:Attachment"),
                           "AirSyncBase:FileReference")
                r = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E(
                    "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                    E("AirSyncBase:FileReference", ref))))
                props = find(r.doc, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Properties")
                assert text(props, "AirSyncBase:ContentType") == ENVELOPE_CONTENT_TYPE   # encrypted
                assert base64.b64decode(text(props, "ItemOperations:Data"))
                await c.aclose()
                r = _cli(["keys", "rotate", "--device", "MANAGED1"], state, tmp_path)     # keys.json
                assert r.returncode == 0, r.stderr
                await trio.sleep(1.5)    # one sightings flush into the WAL (a write, not an assertion)
            finally:
                stop_process(proc)
                nursery.cancel_scope.cancel()
        stderr = proc.stderr.read().decode()
        assert f"state_dir {state} is mode 0755" in stderr
        names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir() if p.is_file()}
        for must in ("seg-fast-policy.db", "seg-fast-policy.db.admin-token", "seg-fast-master.key",
                     "seg-fast-keys.json", f"listener-127.0.0.1-{gw_port}.lock"):
            assert must in names, sorted(names)
        assert {n: m for n, m in names.items() if m != 0o600} == {}
    finally:
        os.umask(old)


async def test_state_files_made_in_process_are_0600(tmp_path):
    """The same modes without a running serve (quick): store + WAL, admin token, keys."""
    from seg_fast.admin.server import admin_token
    from seg_fast.config import Config, AdminSettings
    from seg_fast.content.keys import Keyring
    from seg_fast.content.settings import ContentSettings
    from seg_fast.policy.settings import PolicySettings
    from seg_fast.statedir import exposure_warnings

    old = os.umask(0o022)
    try:
        state = tmp_path / "state"
        state.mkdir(mode=0o755)
        os.chmod(state, 0o755)
        store = SqliteStore(state / "p.db")
        await store.open()
        await store.replace_all(DOC, ALLOWED)       # the -wal and -shm files exist while open
        admin_token(Config(state_dir=str(state), admin=AdminSettings(),
                           policy=PolicySettings(sqlite_path=str(state / "p.db"))))
        keys = Keyring.from_settings(ContentSettings(master_key_file=str(state / "mk"),
                                                     key_state_file=str(state / "keys.json")))
        keys.rotate("DEV1")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
        await store.aclose()
        assert set(modes) >= {"p.db", "p.db-wal", "p.db-shm", "p.db.admin-token", "mk", "keys.json"}
        assert {n: m for n, m in modes.items() if m != 0o600} == {}
        warnings = exposure_warnings(state)
        assert len(warnings) == 1 and "mode 0755" in warnings[0]
        os.chmod(state, 0o700)
        assert exposure_warnings(state) == []
    finally:
        os.umask(old)


# -- 5. kill -9 of the control process: the workers go too ----------------------------

async def test_workers_exit_when_the_control_process_is_killed_during_start_up(tmp_path):
    gw_port, admin_port = free_port(), free_port()
    proc = start_serve(write_config(tmp_path, free_port(), gw_port, admin_port, workers=2), tmp_path)
    try:
        with trio.fail_after(20):          # as soon as the workers exist (still importing)
            while len(workers := children(proc.pid)) < 2:
                assert proc.poll() is None
                await trio.sleep(0.01)
        # Its template process too (a child of its own, left out of the workers by its name).
        everyone = {int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()}
        assert len(everyone - workers) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with trio.fail_after(30):
            while any(alive(w) for w in everyone):
                await trio.sleep(0.1)
        assert listening(gw_port) == []
    finally:
        for w in children(proc.pid):
            os.kill(w, signal.SIGKILL)


def test_a_worker_whose_control_process_is_gone_exits_at_once(tmp_path):
    # The window before PR_SET_PDEATHSIG: the parent the worker finds is not the one named.
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_CONTROL_PID="1",
               SEG_FAST_STATE_DIR=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-m", "seg_fast.proxy.worker"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "control process gone" in r.stderr
    assert "seg_fast.proxy.gateway" not in r.stderr


# -- 6. One serve per listener address -------------------------------------------------

@pytest.mark.slow
async def test_a_second_serve_on_the_same_address_is_refused(tmp_path):
    gw_port, admin_port = free_port(), free_port()
    first = start_serve(write_config(tmp_path, free_port(), gw_port, admin_port), tmp_path)
    try:
        await wait_admin(admin_port, first)
        with trio.fail_after(20):
            while not listening(gw_port):
                await trio.sleep(0.1)
        # Same state_dir: the lock names the first serve's PID.
        second = start_serve(write_config(tmp_path, free_port(), gw_port, free_port(), name="b.toml"), tmp_path)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1
        assert f"key listener.port: 127.0.0.1:{gw_port} is already served by seg-fast serve PID {first.pid}" \
            in err.decode()
        # Another state_dir (no shared lock): the probe bind without SO_REUSEPORT refuses it.
        other = tmp_path / "other"
        other.mkdir()
        third = start_serve(write_config(other, free_port(), gw_port, free_port()), other)
        _, err = third.communicate(timeout=60)
        assert third.returncode == 1
        assert f"key listener.port: cannot listen on 127.0.0.1:{gw_port}: Address already in use" in err.decode()
        assert first.poll() is None
    finally:
        stop_process(first)
    # Once the first is gone (workers too), the address is free again.
    again = start_serve(write_config(tmp_path, free_port(), gw_port, admin_port), tmp_path)
    try:
        await wait_admin(admin_port, again)
    finally:
        stop_process(again)


@pytest.mark.slow
async def test_orphaned_workers_keep_the_address_locked(tmp_path):
    """Workers that outlive their control process (here: stopped, so the parent-death
    SIGTERM waits) still hold the inherited lock: a new serve is refused, naming them."""
    gw_port, admin_port = free_port(), free_port()
    proc = start_serve(write_config(tmp_path, free_port(), gw_port, admin_port), tmp_path)
    workers: set[int] = set()
    try:
        await wait_admin(admin_port, proc)
        with trio.fail_after(20):
            while not listening(gw_port):
                await trio.sleep(0.1)
        workers = children(proc.pid)
        assert workers
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        second = start_serve(write_config(tmp_path, free_port(), gw_port, free_port(), name="b.toml"), tmp_path)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1
        assert f"workers left behind by seg-fast serve PID {proc.pid} (which is gone)" in err.decode()
    finally:
        for w in workers:
            os.kill(w, signal.SIGCONT)        # the pending parent-death SIGTERM drains them
    with trio.fail_after(30):
        while any(alive(w) for w in workers):
            await trio.sleep(0.1)


def test_listener_lock_names_the_holder(tmp_path):
    from seg_fast.errors import StartupError
    from seg_fast.proxy.instance import lock_listener

    fd = lock_listener(str(tmp_path), "127.0.0.1", 8443)
    try:
        with pytest.raises(StartupError, match=f"already served by seg-fast serve PID {os.getpid()}"):
            lock_listener(str(tmp_path), "127.0.0.1", 8443)
        lock_listener_other = lock_listener(str(tmp_path), "127.0.0.1", 8444)   # another address is free
        os.close(lock_listener_other)
    finally:
        os.close(fd)
    os.close(lock_listener(str(tmp_path), "127.0.0.1", 8443))                  # released with the fd


# -- 7. A taken admin port fails the start ---------------------------------------------

def test_a_taken_admin_port_fails_the_start(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    admin_port = holder.getsockname()[1]
    try:
        gw_port = free_port()
        proc = start_serve(write_config(tmp_path, free_port(), gw_port, admin_port), tmp_path)
        _, err = proc.communicate(timeout=60)
        err = err.decode()
        assert proc.returncode == 1
        assert f"key admin.port: cannot listen on 127.0.0.1:{admin_port}: Address already in use" in err
        assert "worker listening" not in err and listening(gw_port) == []
    finally:
        holder.close()


# -- 8. The MDM push listener: loopback by default, TLS off loopback -----------------

def test_push_listener_config(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[policy]\npush_token = "p"\npush_port = 8444\n')
    assert load_config(cfg, env={}).policy.push_host == "127.0.0.1"
    cfg.write_text('[policy]\npush_token = "p"\npush_port = 8444\npush_host = "0.0.0.0"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(cfg, env={})
    assert str(exc.value).startswith(f"{cfg}: key policy.push_host:") and "plain HTTP" in str(exc.value)
    cfg.write_text('[policy]\npush_token = "p"\npush_port = 8444\npush_host = "0.0.0.0"\npush_allow_plain = true\n')
    assert load_config(cfg, env={}).policy.push_allow_plain is True
    cfg.write_text('[listener]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n'
                   '[policy]\npush_token = "p"\npush_port = 8444\npush_host = "0.0.0.0"\n')
    assert load_config(cfg, env={}).policy.push_host == "0.0.0.0"


async def test_push_listener_binds_loopback_by_default(tmp_path):
    gw_port, admin_port, push_port = free_port(), free_port(), free_port()
    proc = start_serve(write_config(tmp_path, free_port(), gw_port, admin_port,
                                    extra_policy=f'push_token = "p"\npush_port = {push_port}\n'), tmp_path)
    try:
        await wait_admin(admin_port, proc)
        assert listening(push_port) == ["127.0.0.1"]
        status, _, _ = await request(push_port, "POST", "/seg/push", b'{"devices": []}', token="p")
        assert status == 200
    finally:
        stop_process(proc)
