"""EWS for the notification service with certificate authentication and Kerberos constrained
delegation (the guide: "CBA using KCD is supported" for ENS): the same kcd/ settings as
ActiveSync, through a running `seg-fast serve`, to the simulator's EWS endpoint taking only
Negotiate tokens it verifies with the mail server's keytab, a real MIT KDC behind (the
set-up of tests/test_kcd.py)."""
from __future__ import annotations

import base64
import os
import socket
import time

import pytest

from kcd_certs import TestCA
from kdc_server import REALM, running_realm
from processes import start_serve, stop_process
from redis_server import free_port
from test_ews_passthrough import answers, subscribe_body
from test_kcd import SimThread, gateway_config  # skips this module too without python-gssapi
from seg_fast.sim.mailbox import MailboxSimulator


@pytest.fixture(scope="module")
def ews(tmp_path_factory):
    base = tmp_path_factory.mktemp("ews-kcd")
    with running_realm(base / "realm") as realm:
        saved = {k: os.environ.get(k) for k in ("KRB5_CONFIG", "KRB5RCACHEDIR")}
        os.environ.update(KRB5_CONFIG=str(realm.krb5_conf), KRB5RCACHEDIR=str(base))
        from seg_fast.sim.negotiate import NegotiateAcceptor

        ca = TestCA(base)
        certs = {"alice": ca.client_cert("alice", upn="alice@kcd.test", cn="Alice"),
                 "expired": ca.client_cert("expired", upn="alice@kcd.test", cn="Alice old", valid_days=(-60, -1))}
        sim = MailboxSimulator(password="never-used", seed=3)
        sim.negotiate = NegotiateAcceptor(str(realm.mail_keytab))
        thread = SimThread(sim)
        sim_port = thread.start()
        port = free_port()
        cfg = gateway_config(base / "gw.toml", port=port, sim_port=sim_port, realm=realm, ca=ca,
                             server=ca.server_cert("gateway"), crl=ca.crl([]), tx_log=base / "tx.log")
        cfg.write_text(cfg.read_text() + '[ews]\nenabled = true\nallowed_sources = ["127.0.0.1"]\n')
        proc = start_serve(cfg, base)
        try:
            end = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                    assert time.monotonic() < end, "seg-fast serve did not listen"
                    time.sleep(0.1)
            yield port, ca, certs, thread, realm
        finally:
            stop_process(proc)
            thread.stop()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _post(port: int, ca: TestCA, cert, user: str = "alice@kcd.test") -> tuple[int, bytes]:
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    body = subscribe_body()
    raw = (f"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
           f"Authorization: Basic {base64.b64encode(f'{user}:not-sent-upstream'.encode()).decode()}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s, \
            ctx.wrap_socket(s, server_hostname="localhost") as t:
        t.sendall(raw)
        out = b""
        while chunk := t.recv(65536):
            out += chunk
    (resp, data), = answers(out)
    return resp.status_code, data


def test_ews_reaches_the_mail_server_as_the_certificates_user(ews):
    port, ca, certs, thread, realm = ews
    neg = thread.sim.negotiate
    status, body = _post(port, ca, certs["alice"])
    assert status == 200 and b"NoError" in body
    # The simulator accepted a Kerberos ticket for alice (the device's Basic header never got there).
    assert neg.clients[f"alice@{REALM}"] == 1 and neg.refused == 0
    assert f"PROTOCOL-TRANSITION s4u-client=alice@{REALM}" in realm.kdc_log_text()


def test_a_refused_certificate_gets_403_without_a_mail_server_request(ews):
    port, ca, certs, thread, realm = ews
    before = thread.upstream_requests()
    status, _ = _post(port, ca, certs["expired"])
    assert status == 403
    assert thread.upstream_requests() == before


def test_a_credential_naming_another_user_than_the_certificate_gets_403(ews):
    port, ca, certs, thread, realm = ews
    before = thread.upstream_requests()
    status, _ = _post(port, ca, certs["alice"], user="mallory@kcd.test")
    assert status == 403
    assert thread.upstream_requests() == before
