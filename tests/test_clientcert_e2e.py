"""Client certificates without KCD, through a running `seg-fast serve`: the certificate's user
is the verified user the policy engine decides on (listener.client_cert = "optional").

The proof is the decision logged for the same request with and without a certificate: with a
user policy on and no credential, a bare User= is not believed ("blocked.user_unverified");
with alice's certificate the same request is decided as alice, and mallory's certificate is
blocked by the user policy whatever User= says.
"""
from __future__ import annotations

import json
import ssl

import trio

from kcd_certs import TestCA
from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.policy.model import GeneralAccess, ListPolicy, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, text

FOLDERSYNC = E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))


async def test_certificate_user_is_the_verified_user_for_policies(tmp_path):
    store = SqliteStore(tmp_path / "policy.db")
    await store.open()
    await store.replace_all(PolicyDocument(general=GeneralAccess(
        user=ListPolicy(enabled=True, mode="block", values=["mallory"]))), [])
    await store.aclose()
    ca = TestCA(tmp_path)
    certs = {name: ca.client_cert(name, upn=f"{name}@kcd.test") for name in ("alice", "mallory")}
    certs["old"] = ca.client_cert("old", upn="alice@kcd.test", valid_days=(-30, -2))
    server = ca.server_cert("gateway")
    sim = MailboxSimulator(password="secret", seed=4, initial_messages=1, require_provisioning=False)
    port, tx_log = free_port(), tmp_path / "tx.log"
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
            f'tls_cert = "{server[0]}"\ntls_key = "{server[1]}"\n'
            f'client_cert = "optional"\nclient_ca = "{ca.ca_file}"\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'[admin]\nenabled = false\n'
            f'[log]\ntransactions = "{tx_log}"\n'
            f'[policy]\nsqlite_path = "{tmp_path / "policy.db"}"\n')
        proc = start_serve(cfg, tmp_path)

        def device(cert: str | None, user: str, device_id: str) -> EasClient:
            ctx = ssl.create_default_context(cafile=str(ca.ca_file))
            if cert:
                ctx.load_cert_chain(str(certs[cert][0]), str(certs[cert][1]))
            return EasClient("127.0.0.1", port, user, "secret", device_id, ssl_context=ctx,
                             server_hostname="localhost")

        async def folder_sync(cert, user, device_id, auth):
            async with device(cert, user, device_id) as dev:
                return await dev.request("FolderSync", FOLDERSYNC, auth=auth)

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
                while True:
                    try:
                        r = await folder_sync("alice", "alice", "CERTBASIC", True)
                        break
                    except OSError:
                        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                        await trio.sleep(0.2)
            # Every request first, then the log once (the worker writes it every second, in order).
            before = sum(sim.counts.values())
            answers = {"CERTBASIC": r}
            answers["NOCERT"] = await folder_sync(None, "alice", "NOCERT", False)
            answers["CERTONLY"] = await folder_sync("alice", "alice", "CERTONLY", False)
            answers["MALLORY"] = await folder_sync("mallory", "mallory", "MALLORY", False)
            answers["MALLORYASALICE"] = await folder_sync("mallory", "alice", "MALLORYASALICE", True)
            answers["OLDCERT"] = await folder_sync("old", "alice", "OLDCERT", True)
            await logged("OLDCERT")
            tx = {name: await logged(name) for name in answers}
            # Certificate and Basic agree: the mail server's answer, decided as the certificate's user.
            r = answers["CERTBASIC"]
            assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "1"
            assert tx["CERTBASIC"]["user"] == "alice@kcd.test" and tx["CERTBASIC"]["decision"] == "allowed.compliant"
            # No credential at all: without a certificate User= is a claim the policy does not take ...
            assert tx["NOCERT"]["decision"] == "blocked.user_unverified"
            # ... with alice's certificate the same request is alice's (the mail server then asks for
            # credentials: the certificate identifies, it does not log in to the mail server).
            assert tx["CERTONLY"]["decision"] == "allowed.compliant" and tx["CERTONLY"]["user"] == "alice@kcd.test"
            assert answers["CERTONLY"].status == 401
            # mallory's certificate is blocked by the user policy, whatever the device claims to be.
            assert tx["MALLORY"]["decision"] == "blocked.user"
            assert answers["MALLORYASALICE"].status == 403
            assert "another user than the client certificate" in tx["MALLORYASALICE"]["error"]
            # An expired certificate is refused even where certificates are optional.
            assert answers["OLDCERT"].status == 403
            assert tx["OLDCERT"]["error"].startswith("client certificate expired: subject ")
            # The refused requests with valid Basic credentials (MALLORYASALICE, OLDCERT) never reached
            # the simulator (it counts only authenticated commands).
            assert sum(sim.counts.values()) == before
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()


def test_serve_refuses_to_start_with_a_crl_another_ca_signed(tmp_path):
    """Every worker would fail on it: `serve` says so once, naming the key and the file, and exits."""
    import subprocess

    ca = TestCA(tmp_path)
    (tmp_path / "other").mkdir()
    other = TestCA(tmp_path / "other")
    server = ca.server_cert("gateway")
    crl = other.crl([ca.client_cert("x", upn="x@kcd.test")[2]], tmp_path / "other.crl")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'tls_cert = "{server[0]}"\ntls_key = "{server[1]}"\n'
        f'client_cert = "required"\nclient_ca = "{ca.ca_file}"\nclient_crl = "{crl}"\n'
        '[admin]\nenabled = false\n[policy]\nallow_if_no_policies = true\n')
    proc = start_serve(cfg, tmp_path)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop_process(proc)
    assert proc.returncode == 1
    assert f"{cfg}: key listener.client_crl: {crl}: a CRL not signed by a CA of listener.client_ca" in err.decode()
    assert b"Traceback" not in err
