"""`seg-fast sim` as a child process: its ready line, HTTPS, and the side door."""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys

import trustme

from conftest import REPO
from seg_fast.sim.client import EasClient
from seg_fast.sim.tree import E, text


async def test_sim_command_runs_https_and_delivers(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--initial", "2",
                             "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.pem")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["url"].startswith("https://127.0.0.1:")
        c = EasClient("127.0.0.1", ready["sim_port"], "jdoe", "secret", "CLI1", ssl_context=client_ctx)
        await c.provision()
        r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E(
            "AirSync:Collection", E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", "1")))))
        assert text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Status") == "1"
        r = await c.send("POST", "/sim/deliver?user=jdoe&count=2", [("host", "x")], b"")
        assert r.status == 200
        r = await c.send("GET", "/sim/stats", [("host", "x")], b"")
        stats = json.loads(r.body)
        assert stats["delivered"] == 4 and stats["answers"]["Provision"] == 2
        await c.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_sim_on_a_busy_port_says_so_in_one_line(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "seg_fast", "sim", "--port", str(port)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 1
    assert r.stderr.strip() == f"seg-fast sim: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_sim_stops_cleanly_on_sigterm_and_sigint():
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        try:
            assert json.loads(proc.stdout.readline())["sim_port"] > 0
            proc.send_signal(sig)
            assert proc.wait(30) == 0
            err = proc.stderr.read()
            assert "Traceback" not in err and err.strip().splitlines()[-1] == "seg-fast sim: stopped", err
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_sim_reactor_parks_and_releases_a_ping():
    # `seg-fast sim --reactor`: the shards' server (one epoll set, no task per parked
    # Ping) behind the same command line; a Ping parks there and the side door's
    # delivery releases it with Status 2
    import trio

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--reactor"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        port = ready["sim_port"]
        c = EasClient("127.0.0.1", port, "jdoe", "secret", "CLI2")
        await c.provision()
        r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E(
            "AirSync:Collection", E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", "1")))))
        assert text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Status") == "1"
        side = EasClient("127.0.0.1", port, "jdoe", "secret", "CLI3")
        got = []
        async with trio.open_nursery() as nursery:
            async def ping():
                got.append(await c.request("Ping", E("Ping:Ping", E("Ping:HeartbeatInterval", 600), E(
                    "Ping:Folders", E("Ping:Folder", E("Ping:Id", "1"), E("Ping:Class", "Email"))))))
            nursery.start_soon(ping)
            with trio.fail_after(20):
                while json.loads((await side.send("GET", "/sim/stats", [("host", "x")], b"")).body)["parked"] < 1:
                    await trio.sleep(0.05)
            assert not got
            assert (await side.send("POST", "/sim/deliver?user=jdoe", [("host", "x")], b"")).status == 200
        assert text(got[0].doc, "Ping:Status") == "2"
        await side.aclose()
        await c.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
