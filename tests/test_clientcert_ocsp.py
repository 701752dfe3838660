"""OCSP for device certificates through a running `seg-fast serve`, against a real responder:
`openssl ocsp` serving an index of the test CA's certificates, signing with the CA's key.

Good: the request passes. Revoked, or unknown to the responder: 403, logged with subject and
serial. Answers are remembered (the responder is told to exit after three requests: the
revoked certificate is still refused afterwards), and a responder that is gone leaves a new
certificate to the other checks (soft fail).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import ssl
import subprocess

import pytest
import trio

from kcd_certs import TestCA
from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, text

FOLDERSYNC = E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))


def _index_line(cert, revoked: bool) -> str:
    fmt = "%y%m%d%H%M%SZ"
    expiry = cert.not_valid_after_utc.strftime(fmt)
    when = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)).strftime(fmt) \
        if revoked else ""
    serial = f"{cert.serial_number:X}"
    serial = ("0" + serial) if len(serial) % 2 else serial
    subject = "/" + "/".join(reversed(cert.subject.rfc4514_string().split(",")))
    return "\t".join(("R" if revoked else "V", expiry, when, serial, "unknown", subject))


async def test_ocsp_revoked_unknown_good_cached_and_soft_fail(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl not installed (scripts/test.sh installs it)")
        pytest.skip("openssl not installed")
    ca = TestCA(tmp_path)
    ca_key = tmp_path / "ca.key"
    ca.trustme.private_key_pem.write_to_path(str(ca_key))
    certs = {name: ca.client_cert(name, upn=f"{name}@kcd.test", cn=name) for name in ("good", "lost", "stranger", "later")}
    (tmp_path / "index.txt.attr").write_text("unique_subject = no\n")
    (tmp_path / "index.txt").write_text(
        _index_line(certs["good"][2], False) + "\n" + _index_line(certs["lost"][2], True) + "\n"
        + _index_line(certs["later"][2], False) + "\n")
    ocsp_port = free_port()
    responder = subprocess.Popen(
        [openssl, "ocsp", "-index", str(tmp_path / "index.txt"), "-port", str(ocsp_port),
         "-rsigner", str(ca.ca_file), "-rkey", str(ca_key), "-CA", str(ca.ca_file), "-ndays", "1",
         "-nrequest", "3"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "ocsp.err", "wb"))
    server = ca.server_cert("gateway")
    sim = MailboxSimulator(password="secret", seed=6, initial_messages=1, require_provisioning=False)
    port, tx_log = free_port(), tmp_path / "tx.log"
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
            f'tls_cert = "{server[0]}"\ntls_key = "{server[1]}"\n'
            f'client_cert = "required"\nclient_ca = "{ca.ca_file}"\n'
            f'client_ocsp = "http://127.0.0.1:{ocsp_port}/"\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'[admin]\nenabled = false\n'
            f'[log]\ntransactions = "{tx_log}"\nfile = "{tmp_path / "gateway.log"}"\n'
            f'[policy]\nallow_if_no_policies = true\n')
        proc = start_serve(cfg, tmp_path)

        async def folder_sync(name: str, device_id: str):
            ctx = ssl.create_default_context(cafile=str(ca.ca_file))
            ctx.load_cert_chain(str(certs[name][0]), str(certs[name][1]))
            async with EasClient("127.0.0.1", port, f"{name}@kcd.test", "secret", device_id, ssl_context=ctx,
                                 server_hostname="localhost") as dev:
                return await dev.request("FolderSync", FOLDERSYNC)

        async def logged(device_id: str) -> dict:
            with trio.fail_after(15):
                while True:
                    for line in (tx_log.read_text().splitlines() if tx_log.exists() else []):
                        tx = json.loads(line)
                        if tx.get("device_id") == device_id:
                            return tx
                    await trio.sleep(0.1)

        try:
            with trio.fail_after(30):
                while b"waiting for OCSP client connections" not in (tmp_path / "ocsp.err").read_bytes():
                    assert responder.poll() is None
                    await trio.sleep(0.05)
                while True:
                    try:
                        r = await folder_sync("good", "OCSPGOOD")          # OCSP request 1
                        break
                    except OSError:
                        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                        await trio.sleep(0.2)
            assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "1"
            before = sum(sim.counts.values())
            r = await folder_sync("lost", "OCSPLOST")                      # 2: revoked
            cert = certs["lost"][2]
            assert r.status == 403
            assert (await logged("OCSPLOST"))["error"] == (
                f"client certificate revoked (OCSP): subject {cert.subject.rfc4514_string()}, "
                f"serial {cert.serial_number:x}")
            r = await folder_sync("stranger", "OCSPSTRANGER")              # 3: not in the index
            assert r.status == 403
            assert (await logged("OCSPSTRANGER"))["error"].startswith(
                "client certificate revocation status unknown (OCSP): subject ")
            assert sum(sim.counts.values()) == before                     # nothing refused went upstream
            with trio.fail_after(20):                                      # it answered three: gone
                while responder.poll() is None:
                    await trio.sleep(0.05)
            # Remembered: the revoked certificate stays refused with the responder gone ...
            r = await folder_sync("lost", "OCSPLOST2")
            assert r.status == 403 and "revoked (OCSP)" in (await logged("OCSPLOST2"))["error"]
            # ... and a certificate it was never asked about passes on the other checks (soft fail).
            r = await folder_sync("later", "OCSPLATER")
            assert r.status == 200
            assert not (await logged("OCSPLATER")).get("error")
        finally:
            stop_process(proc)
            if responder.poll() is None:
                stop_process(responder, grace=5)
            nursery.cancel_scope.cancel()
    # The soft fail is not silent: the worker's incident line (stderr) names it.
    assert b'"incident":"client_cert_ocsp_unavailable"' in proc.stderr.read()
