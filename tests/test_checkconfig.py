"""`seg-fast check-config [--connect]` run as an administrator runs it: a real process,
real certificate files, a real port held by another socket, a real mail server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import trio
import trustme

from seg_fast.sim.mailbox import MailboxSimulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"


def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    # The config file's state_dir, not the suite's shared one, is what is checked.
    env = {k: v for k, v in os.environ.items() if k != "SEG_FAST_STATE_DIR"} | extra_env
    return subprocess.run([sys.executable, "-m", "seg_fast", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def write_config(tmp_path: Path, **sections: dict) -> Path:
    base = {
        "": {"state_dir": str(tmp_path / "state")},
        "listener": {"host": "127.0.0.1", "port": 0},
        "admin": {"enabled": False},
        "upstream": {"url": "http://127.0.0.1:9"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        if name:
            lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, bool)
                         else f"{k} = {'true' if v else 'false'}")
    path = tmp_path / "gw.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tls_files(tmp_path: Path, name: str = "gw") -> tuple[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("gateway.example.org")
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


def test_good_config_passes_and_says_what_it_checked(tmp_path):
    cert, key = tls_files(tmp_path)
    cfg = write_config(tmp_path, listener={"tls_cert": cert, "tls_key": key})
    assert run("policy", "--config", str(cfg), "load", str(EXAMPLES / "baseline.json")).returncode == 0
    r = run("check-config", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"config: {cfg}" in r.stdout
    assert "valid until" in r.stdout and "matches the certificate" in r.stdout
    assert "policy snapshot version" in r.stdout and " 0 failed" in r.stdout


def test_mismatched_key_missing_policies_and_busy_port_fail(tmp_path):
    cert, _ = tls_files(tmp_path, "a")
    _, other_key = tls_files(tmp_path, "b")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = write_config(tmp_path, listener={"tls_cert": cert, "tls_key": other_key, "port": port})
        r = run("check-config", "--config", str(cfg))
    assert r.returncode == 1
    fails = [line for line in r.stdout.splitlines() if "FAIL" in line]
    assert any("listener.tls_key" in f and "does not match" in f for f in fails), r.stdout
    assert any("listener.port" in f and f"127.0.0.1:{port}" in f for f in fails), r.stdout
    assert any("policy.sqlite_path" in f and "every device is blocked" in f for f in fails), r.stdout


def test_config_error_names_file_and_key(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("[listener]\nport = \"eighty\"\n")
    r = run("check-config", "--config", str(cfg))
    assert r.returncode == 1
    assert str(cfg) in r.stderr and "listener.port" in r.stderr


async def test_connect_reaches_the_mail_server_and_reports_an_unreachable_one(tmp_path):
    sim = MailboxSimulator(password="pw", initial_messages=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = write_config(tmp_path, upstream={"url": f"http://127.0.0.1:{sim.port}"},
                           policy={"allow_if_no_policies": True})
        r = await trio.to_thread.run_sync(run, "check-config", "--config", str(cfg), "--connect")
        assert r.returncode == 0, r.stdout + r.stderr
        line = next(x for x in r.stdout.splitlines() if "upstream.url" in x)
        assert "ok" in line and f"127.0.0.1:{sim.port}/Microsoft-Server-ActiveSync: HTTP " in line and " ms)" in line
        nursery.cancel_scope.cancel()
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = write_config(tmp_path, upstream={"url": f"http://127.0.0.1:{dead}"}, policy={"allow_if_no_policies": True})
    r = run("check-config", "--config", str(cfg), "--connect")
    assert r.returncode == 1
    line = next(x for x in r.stdout.splitlines() if "upstream.url" in x)
    assert "FAIL" in line and f"127.0.0.1:{dead}" in line


def test_misspelt_environment_variable_fails_the_check(tmp_path):
    cfg = write_config(tmp_path, policy={"allow_if_no_policies": True})
    r = run("check-config", "--config", str(cfg), SEG_FAST_LISTNER_PORT="443")
    assert r.returncode == 1
    assert any("FAIL" in x and "SEG_FAST_LISTNER_PORT" in x for x in r.stdout.splitlines()), r.stdout
