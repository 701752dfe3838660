"""The listener's certificate from a PKCS#12 (PFX) file, end to end through `seg-fast serve`,
and what `check-config` says about it.

Oracles: the certificate a TLS client receives from the running gateway must be the
PFX's leaf (DER compared), verified against the trustme CA that issued it; the
PFX is made by ``cryptography`` from trustme's key and chain. The password comes from
a file or an environment variable and must never appear in argv, in the log, or in
a file left behind.
"""
from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.proxy.forked import worker_pids
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, text

PASSWORD = "pfx pässword 1"          # a space and a non-ASCII letter: read as bytes, whole line


def make_pfx(path: Path, password: str, *, ca: trustme.CA | None = None, days: int | None = None) -> bytes:
    """A PFX holding key, leaf and chain; returns the leaf's DER. ``days``: a self-signed leaf
    valid that many more days (negative: expired) instead of a trustme one."""
    if days is None:
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        certs = [x509.load_pem_x509_certificate(p.bytes()) for p in leaf.cert_chain_pems]
        cert, chain = certs[0], certs[1:] + [x509.load_pem_x509_certificate(ca.cert_pem.bytes())]
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail.example.test")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(7).not_valid_before(now - datetime.timedelta(days=400))
                .not_valid_after(now + datetime.timedelta(days=days, hours=12))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("mail.example.test"),
                                                            x509.DNSName("eas.example.test")]), critical=False)
                .sign(key, hashes.SHA256()))
        chain = []
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"gateway", key, cert, chain, serialization.BestAvailableEncryption(password.encode())))
    return cert.public_bytes(serialization.Encoding.DER)


def write_config(tmp_path: Path, port: int, sim_port: int, listener: str) -> Path:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n{listener}'
                   f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n'
                   f'[admin]\nenabled = false\n[log]\ntransactions = ""\n[policy]\nallow_if_no_policies = true\n')
    return cfg


def workers_of(pid: int) -> set[int]:
    return set(worker_pids(pid))


async def until_serving(proc, port: int) -> None:
    with trio.fail_after(30):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return
            except OSError:
                await trio.sleep(0.1)


async def test_serve_speaks_tls_with_the_pfx_certificate(tmp_path):
    ca = trustme.CA()
    leaf_der = make_pfx(tmp_path / "gw.pfx", PASSWORD, ca=ca)
    (tmp_path / "pfx.pw").write_text(PASSWORD + "\n")
    secret = f'tls_pfx_password_file = "{tmp_path}/pfx.pw"\n'
    sim = MailboxSimulator(password="secret", initial_messages=1, require_provisioning=False)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        port = free_port()
        cfg = write_config(tmp_path, port, sim.port, f'tls_pfx = "{tmp_path}/gw.pfx"\n{secret}')
        proc = start_serve(cfg, tmp_path)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(x.decode("utf-8", "replace") for x in proc.stderr),
                         daemon=True).start()
        try:
            await until_serving(proc, port)
            # The certificate the running gateway presents is the PFX's leaf, and it verifies.
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            tls = trio.SSLStream(raw, client_ctx, server_hostname="localhost")
            await tls.do_handshake()
            assert tls.getpeercert(binary_form=True) == leaf_der
            await trio.aclose_forcefully(tls)
            # A device session over it.
            c = EasClient("127.0.0.1", port, "jdoe", "secret", "PFXDEV", ssl_context=client_ctx,
                          server_hostname="localhost")
            try:
                r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
                assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "1"
            finally:
                await c.aclose()
            # Attack the listener: garbage instead of a ClientHello, then a TLS client that stops mid-handshake.
            for junk in (b"\x16\x03\x01\xff\xff" + b"\x00" * 4000, b"GET / HTTP/1.1\r\n\r\n"):
                with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                    s.sendall(junk)
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):
                        pass
            # Nothing of the password anywhere a local user could read it, nothing left on disk.
            pids = [proc.pid, *workers_of(proc.pid)]
            assert len(pids) == 2
            for pid in pids:
                assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
                links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir() if f.is_symlink()]
                assert not any("seg-fast-listener-key" in x or "seg-fast-pfx" in x for x in links), links
            assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("seg-fast-pfx-*"))
            r2 = await EasClient("127.0.0.1", port, "jdoe", "secret", "PFXDEV2", ssl_context=client_ctx,
                                 server_hostname="localhost").request(
                "FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
            assert r2.status == 200 and workers_of(proc.pid) == set(pids[1:])
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()
        assert not any(PASSWORD in line for line in lines)


def test_wrong_password_or_damaged_file_stops_serve_and_names_the_key(tmp_path, monkeypatch):
    from seg_fast.checkconfig import check_tls
    from seg_fast.config import load_config
    from seg_fast.errors import ConfigError

    ca = trustme.CA()
    make_pfx(tmp_path / "gw.pfx", PASSWORD, ca=ca)
    (tmp_path / "bad.pw").write_text("not the password\n")
    port = free_port()
    cases = {
        "wrong password": f'tls_pfx = "{tmp_path}/gw.pfx"\ntls_pfx_password_file = "{tmp_path}/bad.pw"\n',
        "damaged": f'tls_pfx = "{tmp_path}/cut.pfx"\ntls_pfx_password_file = "{tmp_path}/bad.pw"\n',
        "garbage": f'tls_pfx = "{tmp_path}/junk.pfx"\ntls_pfx_password_file = "{tmp_path}/bad.pw"\n',
        "missing": f'tls_pfx = "{tmp_path}/nope.pfx"\ntls_pfx_password_file = "{tmp_path}/bad.pw"\n',
        "unset variable": f'tls_pfx = "{tmp_path}/gw.pfx"\ntls_pfx_password_env = "H7_UNSET_PFX_PW"\n',
    }
    (tmp_path / "cut.pfx").write_bytes((tmp_path / "gw.pfx").read_bytes()[:300])
    (tmp_path / "junk.pfx").write_bytes(b"\x30\x84\xff\xff\xff\xff" + os.urandom(2000))
    monkeypatch.delenv("H7_UNSET_PFX_PW", raising=False)
    for name, listener in cases.items():
        findings = check_tls(load_config(write_config(tmp_path, port, 1, listener)))
        bad = [f for f in findings if not f.ok]
        assert bad and bad[0].what.startswith("listener.tls_pfx"), (name, findings)
        assert "not the password" not in bad[0].text
    # No password source at all: the config itself is refused, naming the key.
    with pytest.raises(ConfigError, match="listener.tls_pfx_password_file"):
        load_config(write_config(tmp_path, port, 1, f'tls_pfx = "{tmp_path}/gw.pfx"\n'))
    # And a running serve refuses to start on the wrong password (before any worker), saying why.
    proc = start_serve(write_config(tmp_path, port, 1, cases["wrong password"]), tmp_path)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise AssertionError("serve started with a wrong PFX password")
    err = proc.stderr.read().decode()
    assert proc.returncode != 0 and "key listener.tls_pfx" in err and "password does not open it" in err, err
    assert "Traceback" not in err and "not the password" not in err


def test_check_config_shows_subject_sans_expiry_and_warns_30_days_ahead(tmp_path, monkeypatch, capsys):
    from seg_fast.checkconfig import cli

    monkeypatch.setenv("SEG_FAST_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "pw").write_text(PASSWORD)
    port = free_port()
    for days, label, code in ((400, "ok", 0), (10, "warn", 0), (-2, "FAIL", 1)):
        make_pfx(tmp_path / "gw.pfx", PASSWORD, days=days)
        cfg = write_config(tmp_path, port, 1, f'tls_pfx = "{tmp_path}/gw.pfx"\n'
                                              f'tls_pfx_password_file = "{tmp_path}/pw"\n')
        assert cli(["--config", str(cfg)]) == code, capsys.readouterr().out
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if "listener.tls_pfx:" in x and "valid until" in x)
        assert line.split()[0] == label, (days, line)
        assert "CN=mail.example.test" in line and "SANs mail.example.test, eas.example.test" in line
        until = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days, hours=12))
        assert f"valid until {until:%Y-%m-%d}" in line and f"({days} days)" in line
        assert ("expires in 10 days" in line) == (days == 10)
        assert "converted in memory: memfd" in out


async def test_sighup_rotates_the_pfx_and_keeps_the_running_one_when_the_new_does_not_open(tmp_path, monkeypatch):
    """The password from the environment here (the other test reads it from a file)."""
    import signal

    ca = trustme.CA()
    first = make_pfx(tmp_path / "gw.pfx", PASSWORD, ca=ca)
    monkeypatch.setenv("H7_TEST_PFX_PASSWORD", PASSWORD)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def presented(port) -> bytes:
        tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ctx, server_hostname="localhost")
        try:
            await tls.do_handshake()
            return tls.getpeercert(binary_form=True)
        finally:
            await trio.aclose_forcefully(tls)

    port = free_port()
    cfg = write_config(tmp_path, port, 1, f'tls_pfx = "{tmp_path}/gw.pfx"\n'
                                          'tls_pfx_password_env = "H7_TEST_PFX_PASSWORD"\n')
    proc = start_serve(cfg, tmp_path)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(x.decode("utf-8", "replace") for x in proc.stderr),
                     daemon=True).start()
    try:
        await until_serving(proc, port)
        assert await presented(port) == first
        pids = workers_of(proc.pid)
        # The admin's renewal: a new PFX in place, then a reload.
        second = make_pfx(tmp_path / "next.pfx", PASSWORD, ca=ca)
        os.replace(tmp_path / "next.pfx", tmp_path / "gw.pfx")
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(20):
            while await presented(port) != second:
                await trio.sleep(0.1)
        # A PFX with another password: refused, the running certificate and workers stay.
        make_pfx(tmp_path / "other.pfx", "another password", ca=ca)
        os.replace(tmp_path / "other.pfx", tmp_path / "gw.pfx")
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(20):
            while not any("reload refused" in x for x in lines):
                await trio.sleep(0.1)
        assert any("listener.tls_pfx" in x for x in lines if "reload refused" in x)
        assert await presented(port) == second
        assert workers_of(proc.pid) == pids and proc.poll() is None
        assert not any("Traceback" in x for x in lines), "".join(lines)[-3000:]
    finally:
        stop_process(proc)
