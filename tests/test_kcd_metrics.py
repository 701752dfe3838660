"""KCD's rounds with the KDC in /metrics: a running `seg-fast serve` (client certificates,
kcd on, admin on) in front of the simulator, a real MIT KDC (tests/kdc_server.py), and
/metrics read with prometheus_client's parser. The KDC's own log is the oracle: a
delegation it granted logs PROTOCOL-TRANSITION, a user it does not know logs "Client not
found"; the gateway's counters must say the same.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import trio

from http_client import request
from kcd_certs import TestCA
from kdc_server import REALM, running_realm
from redis_server import free_port
from processes import start_serve, stop_process
from test_kcd import Kcd, SimThread, _delegator_for_kdc_at, folder_sync, gateway_config, silent_kdc
from test_kcd import restore_krb5_config  # noqa: F401 (a fixture)

parser = pytest.importorskip("prometheus_client.parser")
TOKEN = "adm-kcd"


@pytest.fixture(scope="module")
def kcd_admin(tmp_path_factory):
    base = tmp_path_factory.mktemp("kcdm")
    with running_realm(base / "realm") as realm:
        saved = {k: os.environ.get(k) for k in ("KRB5_CONFIG", "KRB5RCACHEDIR")}
        os.environ.update(KRB5_CONFIG=str(realm.krb5_conf), KRB5RCACHEDIR=str(base))
        from seg_fast.sim.mailbox import MailboxSimulator
        from seg_fast.sim.negotiate import NegotiateAcceptor

        ca = TestCA(base)
        certs = {"alice": ca.client_cert("alice", upn="alice@kcd.test", cn="Alice"),
                 "carol": ca.client_cert("carol", upn="carol@kcd.test", cn="Carol")}
        sim = MailboxSimulator(password="never-used", seed=3, initial_messages=2)
        sim.negotiate = NegotiateAcceptor(str(realm.mail_keytab))
        thread = SimThread(sim)
        sim_port = thread.start()
        port, admin_port = free_port(), free_port()
        cfg = gateway_config(base / "gw.toml", port=port, sim_port=sim_port, realm=realm, ca=ca,
                             server=ca.server_cert("gateway"), crl=ca.crl([]), tx_log=base / "tx.log")
        cfg.write_text(cfg.read_text().replace("[admin]\nenabled = false\n",
                                               f'[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n'))
        proc = start_serve(cfg, base)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                    assert time.monotonic() < deadline, "seg-fast serve did not listen"
                    time.sleep(0.1)
            env = Kcd(realm, ca, thread, port, base / "tx.log", base, certs)
            env.admin_port = admin_port
            yield env
        finally:
            stop_process(proc)
            thread.stop()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _kcd_figures(text_: str) -> dict:
    fams = {f.name: f for f in parser.text_string_to_metric_families(text_)}
    out = {s.labels["result"]: s.value for s in fams["seg_fast_kcd_kdc_requests"].samples
           if s.name == "seg_fast_kcd_kdc_requests_total"}
    for name in ("timeouts", "cached_refusals", "tokens"):
        out[name] = fams[f"seg_fast_kcd_{name}"].samples[0].value
    return out


async def test_kdc_rounds_are_counted_in_metrics_as_the_kdc_logged_them(kcd_admin):
    env = kcd_admin
    async with env.device("alice") as dev:
        await dev.provision()
        assert (await dev.request("FolderSync", folder_sync())).status == 200
    for k in range(3):                  # unknown to the KDC: asked once, then the remembered refusal
        async with env.device("carol", user="carol@kcd.test", device_id=f"KCDMCAROL{k}") as dev:
            assert (await dev.request("FolderSync", folder_sync())).status == 403
    kdc_log = env.realm.kdc_log_text()
    granted = kdc_log.count(f"PROTOCOL-TRANSITION s4u-client=alice@{REALM}")
    unknown = kdc_log.count("Client not found in Kerberos database")
    assert granted >= 1 and unknown >= 1
    want = {"fetched": granted, "refused": unknown, "unavailable": 0, "timeouts": 0, "cached_refusals": 2}
    end = trio.current_time() + 20       # the worker writes its counters once a second
    while True:
        status, _, body = await request(env.admin_port, "GET", "/metrics", token=TOKEN)
        assert status == 200
        got = _kcd_figures(body.decode())
        if {k: got[k] for k in want} == want or trio.current_time() > end:
            break
        await trio.sleep(0.2)
    assert {k: got[k] for k in want} == want
    # One token per request the mail server accepted (the simulator counts them by client).
    assert got["tokens"] == env.sim.sim.negotiate.clients[f"alice@{REALM}"] >= 2


async def test_no_kdc_and_a_silent_kdc_are_counted_unavailable_and_timeout(kcd_admin, tmp_path,
                                                                          restore_krb5_config):  # noqa: F811
    from seg_fast.admin.metrics import render
    from seg_fast.kcd.delegation import KcdUnavailable
    from seg_fast.stats import WorkerSnapshot

    down = _delegator_for_kdc_at(kcd_admin, tmp_path, free_port())       # nothing listens there
    for _ in range(2):
        with pytest.raises(KcdUnavailable):
            await down.token_for(f"alice@{REALM}")
    with silent_kdc() as port:
        silent = _delegator_for_kdc_at(kcd_admin, tmp_path, port, timeout=1.0)
        with pytest.raises(KcdUnavailable):
            await silent.token_for(f"alice@{REALM}")
    snaps = [WorkerSnapshot(pid=1, ts=time.time(), kcd=dict(down.outcomes)),
             WorkerSnapshot(pid=2, ts=time.time(), kcd=dict(silent.outcomes))]
    got = _kcd_figures(render(snaps))
    # (the silent KDC's thread gives up on its own later, tens of seconds on: unavailable then)
    late = snaps[1].kcd["unavailable"]
    assert (got["fetched"], got["refused"], got["unavailable"], got["timeouts"]) == (0, 0, 2 + late, 1)
