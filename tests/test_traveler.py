"""IBM (HCL) Traveler and GroupWise behind the gateway: whole device sessions on their own
EAS paths, through a running `seg-fast serve`, to `seg-fast sim` run as a process that
serves only that path (`--path /servlet/traveler`, `--path /EAS`).

The mail server's front is a small server of the test's own, doing what the vendors' docs
say such a front does: it answers an unauthenticated request 401 with a Basic challenge
(never a login page), and sends an authenticated device to the server holding its mailbox
with a 302 (Traveler's HA pool, Domino's redirect to TLS) or MS-ASHTTP's 451 with
X-MS-Location. The device must be sent back to the gateway's external URL on the same
path, and its later requests reach the mailbox server through the gateway.

What the sessions prove, per path: OPTIONS answered with the protocol versions; Provision,
FolderSync, Sync with the mailbox's items; a Ping parked by the gateway and woken by new
mail; the policy applies (a compromised device gets Status 129); the path is forwarded as
the device sent it (the standard path, which the server lacks, gets the server's 404);
a path not in eas.paths never leaves the gateway.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import asynccontextmanager

import h11
import pytest
import trio

from conftest import REPO
from redis_server import free_port
from seg_fast.policy.model import DeviceRecord, ManagedDevicePolicies, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.client import EasClient
from seg_fast.sim.state import INBOX
from seg_fast.sim.tree import E, find, kids, text
from processes import start_serve, stop_process

PASSWORD = "pw-traveler-31"
EXTERNAL = "https://seg.example.com"


class Front:
    """The mail server's front: 401 without credentials, else 302 / 451 to the mailbox server."""

    def __init__(self, status: int, backend: str):
        self.status, self.backend = status, backend
        self.seen: list[tuple[str, str]] = []          # (method, target) of every request
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, stream):
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = None
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                target = req.target.decode()
                self.seen.append((req.method.decode(), target))
                authed = any(k == b"authorization" for k, _ in req.headers)
                if not authed:
                    status, headers = 401, [(b"WWW-Authenticate", b'Basic realm="Traveler"')]
                elif self.status == 451:
                    status, headers = 451, [(b"X-MS-Location", f"{self.backend}{target.split('?')[0]}".encode())]
                else:
                    status, headers = 302, [(b"Location", f"{self.backend}{target}".encode())]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers + [
                    (b"Content-Length", b"0")])) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)


def start_sim(path: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--initial", "3",
                             "--password", PASSWORD, "--path", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    ready = json.loads(proc.stdout.readline())
    assert ready["url"].endswith(path)
    return proc, ready["sim_port"]


async def sim_stats(port: int) -> dict:
    c = EasClient("127.0.0.1", port, "x", "x", "x")
    try:
        return json.loads((await c.send("GET", "/sim/stats", [("host", "sim")], b"")).body)
    finally:
        await c.aclose()


@asynccontextmanager
async def traveler_site(tmp_path, path: str, redirect: int):
    store = SqliteStore(tmp_path / "policy.db")
    await store.open()
    await store.replace_all(PolicyDocument(managed=ManagedDevicePolicies(compromised=True)),
                            [DeviceRecord(device_id="GOODPHONE", user="jdoe", managed=True, compromised=False),
                             DeviceRecord(device_id="BADPHONE", user="jdoe", managed=True, compromised=True)])
    await store.aclose()
    sim, sim_port = start_sim(path)
    front = Front(redirect, f"http://127.0.0.1:{sim_port}")
    gw_port = free_port()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(front.serve)
            cfg = tmp_path / "gw.toml"
            cfg.write_text(
                f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\nexternal_url = "{EXTERNAL}"\n'
                f'[upstream]\nurl = "http://127.0.0.1:{front.port}"\n'
                f'[eas]\npaths = ["/Microsoft-Server-ActiveSync", "{path}"]\n'
                f'[admin]\nenabled = false\n[log]\ntransactions = ""\n'
                f'[policy]\nsqlite_path = "{tmp_path / "policy.db"}"\n')
            gw = start_serve(cfg, tmp_path)
            try:
                with trio.fail_after(20):
                    while True:
                        assert gw.poll() is None, gw.stderr.read().decode()[-2000:]
                        try:
                            await (await trio.open_tcp_stream("127.0.0.1", gw_port)).aclose()
                            break
                        except OSError:
                            await trio.sleep(0.1)
                yield gw_port, sim_port, front
            finally:
                stop_process(gw)
                nursery.cancel_scope.cancel()
    finally:
        sim.terminate()
        sim.wait(10)


def folder_sync():
    return E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))


def sync_req(key):
    return E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", INBOX),
        E("AirSync:GetChanges") if key != "0" else None, E("AirSync:WindowSize", 50) if key != "0" else None)))


PING = E("Ping:Ping", E("Ping:HeartbeatInterval", "300"),
         E("Ping:Folders", E("Ping:Folder", E("Ping:Id", INBOX), E("Ping:Class", "Email"))))


@pytest.mark.parametrize("path,redirect", [("/servlet/traveler", 302), ("/EAS", 451)],
                         ids=["traveler-302", "groupwise-451"])
async def test_session_on_the_servers_own_path(tmp_path, path, redirect):
    async with traveler_site(tmp_path, path, redirect) as (gw_port, sim_port, front):
        with trio.fail_after(40):
            dev = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "GOODPHONE", path=path)
            # Unauthenticated: the server's 401 and its Basic challenge reach the device as they are.
            r = await dev.request("", method="OPTIONS", auth=False)
            assert r.status == 401 and r.headers["www-authenticate"] == 'Basic realm="Traveler"'
            # Authenticated: sent to the mailbox server, which the device is told is the gateway
            # itself (external_url), on the same path; the gateway remembers jdoe's server.
            r = await dev.request("", method="OPTIONS")
            assert r.status == redirect
            where = r.headers["location" if redirect == 302 else "x-ms-location"]
            assert where.startswith(EXTERNAL + path) and str(sim_port) not in where
            assert front.seen[-1] == ("OPTIONS", path)
            seen_by_front = len(front.seen)
            # The device follows: OPTIONS answered by the mailbox server through the gateway.
            r = await dev.request("", method="OPTIONS")
            assert r.status == 200 and "14.1" in r.headers["ms-asprotocolversions"].split(",")
            assert "Ping" in r.headers["ms-asprotocolcommands"].split(",")
            # A whole session on the server's path.
            await dev.provision()
            r = await dev.request("FolderSync", folder_sync())
            assert text(r.doc, "FolderHierarchy:Status") == "1"
            r = await dev.request("Sync", sync_req("0"))
            key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
            r = await dev.request("Sync", sync_req(key))
            coll = find(r.doc, "AirSync:Collections", "AirSync:Collection")
            assert text(coll, "AirSync:Status") == "1"
            assert len(list(kids(find(coll, "AirSync:Commands"), "AirSync:Add"))) == 3       # --initial 3
            # Push: a Ping parked (the server holds it), woken by new mail.
            async with trio.open_nursery() as nursery:
                got = []

                async def ping():
                    got.append(await dev.request("Ping", PING))
                nursery.start_soon(ping)
                while (await sim_stats(sim_port))["parked"] < 1:
                    await trio.sleep(0.05)
                assert not got
                poke = EasClient("127.0.0.1", sim_port, "x", "x", "x")
                assert (await poke.send("POST", "/sim/deliver?user=jdoe", [("host", "sim")], b"")).status == 200
                await poke.aclose()
            assert got[0].status == 200 and text(got[0].doc, "Ping:Status") == "2"
            await dev.aclose()
            # Policy on this path as on the standard one: the compromised device is refused.
            bad = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "BADPHONE", path=path)
            r = await bad.request("FolderSync", folder_sync())
            assert text(r.doc, "FolderHierarchy:Status") == "129"
            await bad.aclose()
            # The path goes as the device sent it: this server has no /Microsoft-Server-ActiveSync.
            std = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "GOODPHONE")
            assert (await std.request("FolderSync", folder_sync())).status == 404
            # A path the gateway does not serve never leaves it.
            before = await sim_stats(sim_port)
            other = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "GOODPHONE", path="/traveler")
            assert (await other.request("FolderSync", folder_sync())).status == 404
            await std.aclose()
            await other.aclose()
            assert (await sim_stats(sim_port))["answers"] == before["answers"]
            # Only the unauthenticated and the first authenticated request went to the front.
            assert len(front.seen) == seen_by_front
            stats = await sim_stats(sim_port)
            assert stats["answers"]["Ping"] == 1 and stats["answers"]["Sync"] == 2
