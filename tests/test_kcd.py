"""Certificate authentication with Kerberos constrained delegation, end to end with real parts:
a running `seg-fast serve` (TLS with client certificates, kcd on), a real MIT KDC
(tests/kdc_server.py: krb5kdc + LDAP module in a throw-away slapd), and the mailbox
simulator taking only Negotiate tokens it verifies with the mail server's keytab.

What can fail here: the gateway must reach the simulator as the certificate's user (the
simulator names the Kerberos client it accepted), keep the KDC out of repeated requests
(the KDC's own log counts AS/TGS requests), and refuse expired, revoked, unmappable and
foreign certificates, and users the KDC will not delegate for, without any upstream request.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from kcd_certs import TestCA
from kdc_server import GATEWAY, MAIL, OTHER, REALM, Realm, running_realm
from processes import REPO, start_serve, stop_process
from redis_server import free_port
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, text

try:
    import gssapi  # noqa: F401 - python-gssapi (the test extra) builds against libkrb5-dev
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("python-gssapi not installed (pip install -e '.[test]')", allow_module_level=True)


class SimThread:
    """The simulator in its own thread and trio run, so one gateway serves the whole module."""

    def __init__(self, sim: MailboxSimulator):
        self.sim = sim
        self._ready = threading.Event()
        self._token = self._scope = None
        self.thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    async def _main(self):
        async with trio.open_nursery() as nursery:
            self._scope, self._token = nursery.cancel_scope, trio.lowlevel.current_trio_token()
            await nursery.start(self.sim.serve, "127.0.0.1", 0)
            self._ready.set()

    def start(self) -> int:
        self.thread.start()
        assert self._ready.wait(20), "simulator did not start"
        return self.sim.port

    def stop(self) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self.thread.join(20)

    def upstream_requests(self) -> int:
        """Requests the simulator authenticated or refused: anything that reached it."""
        neg = self.sim.negotiate
        return sum(neg.clients.values()) + neg.refused + neg.mismatched


@dataclass
class Kcd:
    realm: Realm
    ca: TestCA
    sim: SimThread
    port: int
    tx_log: Path
    dir: Path
    certs: dict

    def tls(self, name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.ca_file))
        cert, key = self.certs[name][:2]
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def device(self, name: str, user: str = "alice@kcd.test", device_id: str = "KCDPHONE1") -> EasClient:
        return EasClient("127.0.0.1", self.port, user, "not-sent-upstream", device_id,
                         ssl_context=self.tls(name), server_hostname="localhost")

    def transactions(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.tx_log.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    async def transaction(self, match, timeout: float = 15) -> dict:
        """The first logged transaction ``match`` accepts (the worker flushes its log every second)."""
        with trio.fail_after(timeout):
            while True:
                for tx in self.transactions():
                    if match(tx):
                        return tx
                await trio.sleep(0.1)


def gateway_config(path: Path, *, port: int, sim_port: int, realm: Realm, ca: TestCA, server: tuple,
                   crl: Path, tx_log: Path, test_user: str = "", keytab: Path | None = None) -> Path:
    path.write_text(
        "workers = 1\n"
        "[listener]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'tls_cert = "{server[0]}"\ntls_key = "{server[1]}"\n'
        f'client_cert = "required"\nclient_ca = "{ca.ca_file}"\nclient_crl = "{crl}"\n'
        f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n'
        "[admin]\nenabled = false\n"
        f'[log]\ntransactions = "{tx_log}"\nfile = "{tx_log.parent / "gateway.log"}"\n'
        "[policy]\nallow_if_no_policies = true\n"
        f'[cert_map]\nsource = "upn"\nrealm = "{REALM}"\n'
        "[kcd]\nenabled = true\n"
        f'keytab = "{keytab or realm.gateway_keytab}"\n'
        f'service_principal = "{GATEWAY}@{REALM}"\n'
        f'target_spn = "{MAIL}@{REALM}"\n'
        f'kerberos_config = "{realm.krb5_conf}"\n'
        f'test_user = "{test_user}"\n')
    return path


@pytest.fixture(scope="module")
def kcd(tmp_path_factory):
    base = tmp_path_factory.mktemp("kcd")
    with running_realm(base / "realm") as realm:
        saved = {k: os.environ.get(k) for k in ("KRB5_CONFIG", "KRB5RCACHEDIR")}
        # The simulator's acceptor (this process): the realm's krb5.conf, a replay cache in the temp dir.
        os.environ.update(KRB5_CONFIG=str(realm.krb5_conf), KRB5RCACHEDIR=str(base))
        from seg_fast.sim.negotiate import NegotiateAcceptor

        ca = TestCA(base)
        certs = {
            "alice": ca.client_cert("alice", upn="alice@kcd.test", cn="Alice"),
            "bob": ca.client_cert("bob", upn="bob@kcd.test", cn="Bob"),
            "carol": ca.client_cert("carol", upn="carol@kcd.test", cn="Carol"),
            "expired": ca.client_cert("expired", upn="alice@kcd.test", cn="Alice old", valid_days=(-60, -1)),
            "revoked": ca.client_cert("revoked", upn="alice@kcd.test", cn="Alice lost phone"),
            "nomap": ca.client_cert("nomap", email="alice@kcd.test", cn="Alice no UPN"),
        }
        crl = ca.crl([certs["revoked"][2]])
        (base / "foreign").mkdir()
        foreign = TestCA(base / "foreign")
        certs["foreign"] = foreign.client_cert("foreign", upn="alice@kcd.test", cn="Alice elsewhere")
        sim = MailboxSimulator(password="never-used", seed=3, initial_messages=2)
        sim.negotiate = NegotiateAcceptor(str(realm.mail_keytab))
        thread = SimThread(sim)
        sim_port = thread.start()
        port = free_port()
        tx_log = base / "tx.log"
        cfg = gateway_config(base / "gw.toml", port=port, sim_port=sim_port, realm=realm, ca=ca,
                             server=ca.server_cert("gateway"), crl=crl, tx_log=tx_log)
        proc = start_serve(cfg, base)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if proc.poll() is not None:
                        pytest.fail(f"seg-fast serve exited: {proc.stderr.read().decode()[-2000:]}")
                    if time.monotonic() > deadline:
                        pytest.fail("seg-fast serve did not listen")
                    time.sleep(0.1)
            yield Kcd(realm, ca, thread, port, tx_log, base, certs)
        finally:
            stop_process(proc)
            thread.stop()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def folder_sync():
    return E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))


async def test_device_session_reaches_the_mail_server_as_the_certificate_user(kcd):
    neg = kcd.sim.sim.negotiate
    kdc_before = kcd.realm.kdc_requests()
    async with kcd.device("alice") as dev:
        await dev.provision()
        r = await dev.request("FolderSync", folder_sync())
        assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "1"
        r = await dev.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E(
            "AirSync:Collection", E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", "5")))))
        assert r.status == 200
    # Every request reached the simulator as alice's Kerberos principal, with a ticket its
    # keytab accepted; the device's own Basic header never got there.
    assert dict(neg.clients) == {f"alice@{REALM}": 4}
    assert neg.refused == 0 and neg.mismatched == 0
    assert "alice" in kcd.sim.sim.mailboxes
    kdc_after_first = kcd.realm.kdc_requests()
    # The gateway's own TGT, S4U2Self, S4U2Proxy (fewer if another test fetched them first).
    assert kdc_after_first - kdc_before <= 3
    assert f"PROTOCOL-TRANSITION s4u-client=alice@{REALM}" in kcd.realm.kdc_log_text()

    # A storm of Pings on fresh connections: every one authenticated upstream, none reaches the KDC.
    async def pings(n: int, device_id: str):
        async with kcd.device("alice", device_id=device_id) as dev:
            await dev.provision()
            for _ in range(n):
                r = await dev.request("Ping")
                assert r.status == 200 and text(r.doc, "Ping:Status") == "3"

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(pings, 10, f"KCDPING{k}")
    assert neg.clients[f"alice@{REALM}"] == 4 + 4 * 12
    assert kcd.realm.kdc_requests() == kdc_after_first

    tx = await kcd.transaction(lambda t: t.get("command") == "Sync")
    assert tx["user"] == "alice@kcd.test" and tx["status"] == 200 and not tx.get("error")
    raw = kcd.tx_log.read_text()
    assert "Negotiate" not in raw and "not-sent-upstream" not in raw


@pytest.mark.parametrize("name, why", [
    ("expired", "client certificate expired"),
    ("revoked", "client certificate revoked"),
    ("nomap", "client certificate no user in it (cert_map.source = upn)"),
])
async def test_refused_certificate_gets_403_without_upstream_request(kcd, name, why):
    reached, kdc = kcd.sim.upstream_requests(), kcd.realm.kdc_requests()
    device_id = f"KCD{name.upper()}"
    async with kcd.device(name, device_id=device_id) as dev:
        r = await dev.request("FolderSync", folder_sync())
    assert r.status == 403
    assert kcd.sim.upstream_requests() == reached and kcd.realm.kdc_requests() == kdc
    cert = kcd.certs[name][2]
    tx = await kcd.transaction(lambda t: t.get("device_id") == device_id)
    # Why, the subject and the serial: nothing else of the certificate.
    assert tx["error"] == f"{why}: subject {cert.subject.rfc4514_string()}, serial {cert.serial_number:x}"
    assert tx["status"] == 403


@pytest.mark.parametrize("name", ["foreign", None])
async def test_foreign_or_missing_certificate_never_gets_past_tls(kcd, name):
    """Another CA's certificate, or none with client_cert = "required": the handshake fails."""
    reached = kcd.sim.upstream_requests()
    dev = kcd.device("alice", device_id="KCDNOCERT")
    if name is None:
        dev.ssl_context = ssl.create_default_context(cafile=str(kcd.ca.ca_file))
    else:
        dev.ssl_context = kcd.tls(name)
    with pytest.raises((ssl.SSLError, trio.BrokenResourceError, ConnectionError, OSError)):
        async with dev:
            await dev.request("FolderSync", folder_sync())
    assert kcd.sim.upstream_requests() == reached


async def test_user_claim_must_match_the_certificate(kcd):
    reached = kcd.sim.upstream_requests()
    async with kcd.device("alice", user="mallory@kcd.test", device_id="KCDMALLORY") as dev:
        r = await dev.request("FolderSync", folder_sync())
    assert r.status == 403 and kcd.sim.upstream_requests() == reached
    tx = await kcd.transaction(lambda t: t.get("device_id") == "KCDMALLORY")
    assert "names another user than the client certificate" in tx["error"]


@pytest.mark.parametrize("name, why, kdc_says", [
    # -allow_forwardable ("sensitive, cannot be delegated"): the KDC refuses S4U2Proxy
    ("bob", "may not be delegated", "EVIDENCE_TKT_NOT_FORWARDABLE"),
    ("carol", "unknown to the KDC", "Client not found in Kerberos database"),     # no such principal
])
async def test_kdc_refusal_is_403_and_remembered(kcd, name, why, kdc_says):
    reached = kcd.sim.upstream_requests()
    user = f"{name}@kcd.test"
    kdc_before = kcd.realm.kdc_requests()
    for k in range(5):
        async with kcd.device(name, user=user, device_id=f"KCDREFUSED{name}{k}") as dev:
            r = await dev.request("FolderSync", folder_sync())
        assert r.status == 403
        if k == 0:
            kdc_after_first = kcd.realm.kdc_requests()
            assert kdc_after_first > kdc_before        # the KDC was asked, and said no
    assert kcd.realm.kdc_requests() == kdc_after_first     # then remembered (kcd.refusal_cache)
    assert kcd.sim.upstream_requests() == reached
    tx = await kcd.transaction(lambda t: t.get("device_id") == f"KCDREFUSED{name}0")
    assert tx["error"] == f"kcd: {name}@{REALM} {_reason(why)}"
    assert kcd.realm.kdc_log_text().count(kdc_says) == 1      # the KDC's side of it, once


def _reason(why: str) -> str:
    from seg_fast.kcd.delegation import _USER_REFUSALS

    return next(r for r in _USER_REFUSALS.values() if why in r)


def test_check_config_connect_gets_a_ticket_for_the_test_user(kcd, tmp_path):
    def run(user: str, keytab: Path | None = None) -> tuple[int, str]:
        cfg = gateway_config(tmp_path / f"check-{user}.toml", port=0, sim_port=kcd.sim.sim.port, realm=kcd.realm,
                             ca=kcd.ca, server=(kcd.dir / "gateway.pem", kcd.dir / "gateway.key"),
                             crl=kcd.dir / "device-ca.crl", tx_log=tmp_path / "tx.log", test_user=user,
                             keytab=keytab)
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp_path / "state"))
        done = subprocess.run([sys.executable, "-m", "seg_fast", "check-config", "--connect", "--config", str(cfg)],
                              env=env, capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout + done.stderr

    code, out = run("alice@kcd.test")
    assert f"kcd.service_principal: {GATEWAY}@{REALM}: ticket from the keytab" in out, out
    assert f"kcd.test_user: alice@{REALM}: service ticket for {MAIL}@{REALM} (S4U2Self + S4U2Proxy)" in out, out
    assert "listener.client_crl" in out and "1 revoked serial(s)" in out
    assert code == 0, out
    assert f"kcd.keytab: {kcd.realm.gateway_keytab}: holds keys for {GATEWAY}@{REALM}" in out
    code, out = run("bob@kcd.test")
    assert code == 1 and f"FAIL  kcd.test_user: bob@{REALM} to {MAIL}@{REALM}: may not be delegated" in out, out
    # The mail server's keytab in the gateway's place: found without asking the KDC.
    code, out = run("alice@kcd.test", keytab=kcd.realm.mail_keytab)
    assert code == 1 and f"FAIL  kcd.keytab: {kcd.realm.mail_keytab}: no keys for {GATEWAY}@{REALM}" in out, out


def test_gateway_may_not_delegate_to_another_service(kcd):
    """The allowed-to-delegate list is what the KDC checks: the same gateway, another target, refused."""
    from seg_fast.kcd.delegation import Delegator, KcdRefused
    from seg_fast.kcd.settings import KcdSettings

    d = Delegator(KcdSettings(enabled=True, keytab=str(kcd.realm.gateway_keytab),
                              service_principal=f"{GATEWAY}@{REALM}", target_spn=f"{OTHER}@{REALM}",
                              kerberos_config=str(kcd.realm.krb5_conf)))
    with pytest.raises(KcdRefused, match="may not be delegated"):
        d.check(f"alice@{REALM}")


def _delegator_for_kdc_at(kcd, tmp_path, port: int, timeout: float = 10.0):
    from seg_fast.kcd.delegation import Delegator
    from seg_fast.kcd.settings import KcdSettings

    conf = tmp_path / "krb5.conf"
    conf.write_text(f"[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n"
                    f"[realms]\n {REALM} = {{\n  kdc = 127.0.0.1:{port}\n }}\n")
    return Delegator(KcdSettings(enabled=True, keytab=str(kcd.realm.gateway_keytab),
                                 service_principal=f"{GATEWAY}@{REALM}", target_spn=f"{MAIL}@{REALM}",
                                 kerberos_config=str(conf), timeout=timeout))


@contextlib.contextmanager
def silent_kdc():
    """A port where UDP and TCP are bound and nothing answers (the TCP side accepts)."""
    for _ in range(20):               # another process may hold the TCP twin of a free UDP port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            tcp.listen(8)
            yield port
            return
    raise AssertionError("no port free for both UDP and TCP")


@pytest.fixture
def restore_krb5_config():
    saved = os.environ.get("KRB5_CONFIG")
    yield
    os.environ["KRB5_CONFIG"] = saved


async def test_kdc_down_or_silent_is_unavailable_not_refused(kcd, tmp_path, restore_krb5_config):
    """No KDC (closed port): 503 material, not remembered as a refusal; a KDC that never answers:
    the request stops waiting after kcd.timeout."""
    from seg_fast.kcd.delegation import KcdUnavailable

    d = _delegator_for_kdc_at(kcd, tmp_path, free_port())
    with pytest.raises(KcdUnavailable, match="the gateway's own ticket"):
        await d.token_for(f"alice@{REALM}")
    assert not d.cache                               # nothing remembered: the next request tries again
    with silent_kdc() as port:
        d = _delegator_for_kdc_at(kcd, tmp_path, port, timeout=1.0)
        with pytest.raises(KcdUnavailable, match=r"no answer from the KDC within kcd.timeout \(1 s\)"):
            await d.token_for(f"alice@{REALM}")


async def test_simulator_refuses_a_ticket_for_another_user(kcd):
    """The simulator's own check: the Kerberos client must be the request's User=."""
    from seg_fast.kcd.delegation import Delegator
    from seg_fast.kcd.settings import KcdSettings
    from seg_fast.sim.negotiate import NegotiateAcceptor

    d = Delegator(KcdSettings(enabled=True, keytab=str(kcd.realm.gateway_keytab),
                              service_principal=f"{GATEWAY}@{REALM}", target_spn=f"{MAIL}@{REALM}",
                              kerberos_config=str(kcd.realm.krb5_conf)))
    sim = MailboxSimulator(require_provisioning=False)
    sim.negotiate = NegotiateAcceptor(str(kcd.realm.mail_keytab))
    target = b"/Microsoft-Server-ActiveSync?Cmd=FolderSync&User={}&DeviceId=SIMCHECK&DeviceType=Phone"
    body = b""
    for user, status in (("alice%40kcd.test", 200), ("bob", 403)):
        token = await d.token_for(f"alice@{REALM}")
        answer = sim._answer(b"POST", target.replace(b"{}", user.encode()),
                             [(b"authorization", b"Negotiate " + token)], body)
        assert answer.status == status
    assert sim.negotiate.mismatched == 1 and dict(sim.negotiate.clients) == {f"alice@{REALM}": 2}


def test_serve_refuses_to_start_with_a_keytab_without_the_gateways_keys(kcd, tmp_path):
    cfg = gateway_config(tmp_path / "gw.toml", port=free_port(), sim_port=kcd.sim.sim.port, realm=kcd.realm,
                         ca=kcd.ca, server=(kcd.dir / "gateway.pem", kcd.dir / "gateway.key"),
                         crl=kcd.dir / "device-ca.crl", tx_log=tmp_path / "tx.log", keytab=kcd.realm.mail_keytab)
    proc = start_serve(cfg, tmp_path)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop_process(proc)
    assert proc.returncode == 1
    assert f"{cfg}: key kcd.keytab: {kcd.realm.mail_keytab}: no keys for {GATEWAY}@{REALM}" in err.decode()
