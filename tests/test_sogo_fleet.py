"""`seg-fast bench sizing --upstream sogo`: the fleet's correctness run against SOGo 5.8.

The command runs each device's session straight to SOGo and through the gateway and holds
every gateway answer to SOGo's own direct answer. The tests run the command line itself
(a child process) against the suite's SOGo stack:
- through a `seg-fast serve` the test starts, whose way to SOGo crosses a recording relay
  (``Tap``): the run passes, its counts are what the session sends, and the relay saw as
  many ActiveSync exchanges from the gateway as the command says it compared (so the
  gateway path really went through the gateway to SOGo);
- through the gateway the command starts itself, with a relay between it and SOGo that
  changes one letter of the seeded message's subject in SOGo's answers: the run fails,
  naming the answers that carry it (Sync, ItemOperations, Search) and no others.
"""
from __future__ import annotations

import json
import os
import sys
from urllib.parse import parse_qs, urlsplit

import trio

from processes import REPO, start_serve, stop_process
from redis_server import free_port
from sogo_server import USERS, Tap

DEVICES = 4           # two per account: each account's Ping round parks 4 Pings (SOGo has 6 workers)


def users_file(tmp_path):
    p = tmp_path / "users.txt"
    p.write_text("# the suite's SOGo accounts\n" + "".join(f"{u}:{pw}\n" for u, pw in USERS.items()))
    return p


async def run_fleet(*args: str) -> tuple[int, str, dict]:
    """The command line, as an administrator runs it; (exit code, stdout, the JSON report)."""
    done = await trio.run_process([sys.executable, "-m", "seg_fast", "bench", "sizing", "--upstream", "sogo",
                                   *args], capture_stdout=True, capture_stderr=True, check=False,
                                  cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    out = done.stdout.decode()
    wrote = [ln for ln in out.splitlines() if ln.startswith("wrote ")]
    assert wrote, out + done.stderr.decode()[-3000:]
    return done.returncode, out, json.loads(open(wrote[-1][len("wrote "):]).read())


async def wait_listening(port: int, proc) -> None:
    with trio.fail_after(20):
        while True:
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.aclose()
                return
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                await trio.sleep(0.05)


async def test_fleet_through_a_running_gateway_agrees_with_sogo(sogo, tmp_path):
    async with trio.open_nursery() as nursery:
        tap = Tap(sogo.front_port)
        await nursery.start(tap.serve)
        gw_port = free_port()
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            'workers = 1\n[admin]\nenabled = false\n[timeouts]\nshutdown_grace = 1\n'
            f'[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
            f'[upstream]\nurl = "http://127.0.0.1:{tap.port}"\n'
            f'[log]\ntransactions = "{tmp_path / "tx.jsonl"}"\n'
            f'[policy]\nallow_if_no_policies = true\nsqlite_path = "{tmp_path / "policy.db"}"\n'
            '[security]\nblock_attachments_without_policy = false\n'
            f'master_key_file = "{tmp_path / "mk"}"\nkey_state_file = "{tmp_path / "ks.json"}"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            await wait_listening(gw_port, proc)
            with trio.fail_after(90):
                rc, out, report = await run_fleet(
                    "--sogo-url", sogo.url, "--users", str(users_file(tmp_path)), "--gateway",
                    f"http://127.0.0.1:{gw_port}", "--imap", f"127.0.0.1:{sogo.imap_port}",
                    "--devices", str(DEVICES), "--park-wait", "1", "--out", str(tmp_path), "--quiet")
        finally:
            stop_process(proc)
        nursery.cancel_scope.cancel()
    assert rc == 0, out
    assert "sogo correctness: PASS" in out
    assert report["pass"] and report["mismatches"] == [] and report["errors"] == []
    # What the session sends per device: OPTIONS, Provision (SOGo hands out no policy, so
    # no acknowledgement), FolderSync, 3 x (Sync 0 + Sync with a Body Type), ItemOperations
    # by ServerId, inline and multipart (the seeded message has an attachment), Search;
    # then per Ping round a catch-up Sync, the Ping and the Sync after it.
    # (The catch-up Sync runs again while SOGo still hands out a new key, e.g. after a fetch.)
    per_device = {"OPTIONS": 1, "Provision": 1, "FolderSync": 1, "ItemOperations": 3, "Search": 1, "Ping": 1}
    want = {cmd: {"compared": n * DEVICES, "equal": n * DEVICES, "mismatch": 0, "errors": 0}
            for cmd, n in per_device.items()}
    syncs = report["commands"].pop("Sync")
    assert report["commands"] == want
    assert syncs["compared"] == syncs["equal"] and 8 * DEVICES <= syncs["compared"] <= 10 * DEVICES, syncs
    assert report["compared"] == sum(per_device.values()) * DEVICES + syncs["compared"]
    # every Ping (direct and gateway) woken by one delivery per account
    assert report["pings"]["woken"] == 2 * DEVICES and report["pings"]["deliveries"] == len(USERS)
    assert report["pings"]["parked_at_delivery"] == 2 * DEVICES      # none answered before its mail came
    # The gateway's side of each comparison crossed the gateway to SOGo: the relay between
    # them saw one ActiveSync exchange per answer compared, Pings among them.
    seen = [e for e in tap.exchanges() if e.target.lower().startswith(b"/microsoft-server-activesync")]
    assert len(seen) == report["compared"]
    assert sum(b"Cmd=Ping" in e.target for e in seen) == DEVICES
    ids = {parse_qs(urlsplit(e.target.decode()).query)["DeviceId"][0] for e in seen if b"?" in e.target}
    assert len(ids) == DEVICES and all(i.endswith("G") for i in ids), ids       # the gateway devices only


class Flipper:
    """A relay between the gateway and SOGo that changes one letter of a subject in
    SOGo's answers (same length: the HTTP framing and the WBXML stay valid)."""

    def __init__(self, target: int, old: bytes, new: bytes):
        self.target, self.old, self.new = target, old, new
        self.port = 0
        self.flipped = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._relay, listeners, task_status=task_status)

    async def _relay(self, down):
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await down.aclose()
            return

        async def pump(src, dst, flip: bool):
            try:
                while True:
                    data = await src.receive_some(65536)
                    if not data:
                        break
                    if flip and self.old in data:
                        self.flipped += data.count(self.old)
                        data = data.replace(self.old, self.new)
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                with trio.move_on_after(1) as cs:
                    cs.shield = True
                    try:
                        await dst.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass

        async with up, down:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, down, up, False)
                nursery.start_soon(pump, up, down, True)


async def test_fleet_fails_when_the_gateway_path_changes_an_answer(sogo, tmp_path):
    flipper = Flipper(sogo.front_port, b"fleet check", b"fleet chock")
    async with trio.open_nursery() as nursery:
        await nursery.start(flipper.serve)
        with trio.fail_after(60):
            rc, out, report = await run_fleet(
                "--sogo-url", sogo.url, "--users", str(users_file(tmp_path)),
                "--gateway-upstream", f"http://127.0.0.1:{flipper.port}",     # the gateway it starts
                "--imap", f"127.0.0.1:{sogo.imap_port}", "--no-pings", "--devices", "2",
                "--out", str(tmp_path), "--quiet")
        nursery.cancel_scope.cancel()
    assert flipper.flipped > 0
    assert rc == 1, out
    assert "sogo correctness: FAIL" in out
    assert not report["pass"] and report["mismatches"]
    # The changed subject is in the Syncs' items, the fetched MIME and the search results;
    # nothing else differs, and only in the body.
    assert {m["command"] for m in report["mismatches"]} == {"Sync", "ItemOperations", "Search"}
    assert all(m["differs_in"] == ["body"] for m in report["mismatches"])
    for cmd in ("OPTIONS", "Provision", "FolderSync"):
        assert report["commands"][cmd]["mismatch"] == 0 and report["commands"][cmd]["equal"] == 2
    # no mail content in the report: digests and lengths only
    assert b"fleet c" not in json.dumps(report["mismatches"]).encode()


async def test_fleet_fails_when_sogo_refuses_both_paths_alike(sogo, tmp_path):
    # A wrong password: SOGo answers the direct and the gateway device the same (401),
    # so nothing mismatches; the run still fails, on what a working server says.
    with trio.fail_after(60):
        rc, out, report = await run_fleet(
            "--sogo-url", sogo.url, "--user", "jdoe:not-the-password", "--devices", "1",
            "--out", str(tmp_path), "--quiet")
    assert rc == 1, out
    assert "sogo correctness: FAIL" in out and "no Pings (no --imap" in out
    assert report["mismatches"] == [] and report["commands"]["OPTIONS"]["equal"] == 1
    assert {e["step"] for e in report["errors"]} >= {"provision", "foldersync"}
    assert all(e["path"] == "direct" for e in report["errors"])
    assert "not-the-password" not in json.dumps(report)
