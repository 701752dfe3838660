"""/healthz and /readyz of a running `seg-fast serve`, as a load balancer and an attacker see them."""
from __future__ import annotations

import json
import subprocess
import sys

import trio

from processes import REPO, start_serve, stop_process
from redis_server import free_port
from seg_fast.sim.mailbox import MailboxSimulator


async def get(port: int, path: str, raw: bytes | None = None) -> tuple[int, dict]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw or f"GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(4096):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body.startswith(b"{") else {})


async def wait_for(port: int, path: str, status: int, why: str | None = None) -> dict:
    """Poll until ``path`` answers ``status`` (and names ``why``); a generous bound, as
    readiness is checked every 0.2 s."""
    with trio.fail_after(30):
        while True:
            try:
                got, body = await get(port, path)
                if got == status and (why is None or why in body.get("why", ())):
                    return body
            except OSError:
                pass                      # not listening yet
            await trio.sleep(0.1)


async def test_health_and_readiness_follow_policies_and_the_mail_server(tmp_path):
    sim = MailboxSimulator(password="secret", initial_messages=0)
    health = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 1\n'
            f'[listener]\nhost = "127.0.0.1"\nport = {free_port()}\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'[admin]\nenabled = false\n'
            f'[log]\ntransactions = ""\n'
            f'[health]\nhost = "127.0.0.1"\nport = {health}\ncheck_interval = 0.2\n')
        proc = start_serve(cfg, tmp_path)
        try:
            await wait_for(health, "/healthz", 200)
            # Fail closed and not ready: no policies yet.
            why = await wait_for(health, "/readyz", 503, "no policies loaded")
            assert why == {"status": "not ready", "why": ["no policies loaded"]}
            load = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "seg_fast", "policy", "--config", str(cfg), "load",
                 str(REPO / "examples" / "policies" / "baseline.json")],
                env={**__import__("os").environ, "SEG_FAST_STATE_DIR": str(tmp_path / "state")},
                capture_output=True, text=True))
            assert load.returncode == 0, load.stderr
            assert await wait_for(health, "/readyz", 200) == {"status": "ready"}
            # Hostile probes: garbage, a slow head, other paths and methods; none ends the listener.
            assert (await get(health, "", raw=b"\x16\x03\x01garbage\r\n\r\n"))[0] == 400
            assert (await get(health, "/seg/admin"))[0] == 404
            assert (await get(health, "", raw=b"POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"))[0] \
                == 405
            slow = await trio.open_tcp_stream("127.0.0.1", health)
            await slow.send_all(b"GET /healthz HTTP/1.1\r\n")      # never finishes its head
            assert (await get(health, "/healthz"))[0] == 200         # others are still answered
            with trio.fail_after(20):                              # the head deadline closes it
                assert await slow.receive_some(100) == b""
            await slow.aclose()
            # The mail server goes away: not ready, and it says why.
            nursery.cancel_scope.cancel()
        except BaseException:
            stop_process(proc)
            raise
    try:
        why = await wait_for(health, "/readyz", 503, "mail server unreachable")
        assert why["why"] == ["mail server unreachable"]
        assert (await get(health, "/healthz"))[0] == 200          # alive all the same
    finally:
        stop_process(proc)


def test_health_port_taken_fails_the_start(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                       f'[admin]\nenabled = false\n[health]\nhost = "127.0.0.1"\nport = {port}\n')
        proc = start_serve(cfg, tmp_path)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                stop_process(proc)
        err = proc.stderr.read().decode()
        assert proc.returncode != 0
        assert "health.port" in err and "gw.toml" in err
