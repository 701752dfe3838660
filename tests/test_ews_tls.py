"""EWS and webmail use the ActiveSync upstream's TLS settings: a mail server over HTTPS
verified against upstream.ca_file (trustme CA), and a name its certificate does not
hold refused (503), through a running `seg-fast serve`."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
import trustme

from processes import REPO, start_serve, stop_process
from redis_server import free_port
from test_ews_passthrough import request, subscribe_body, _wait_listening

PASSWORD = "pw-tls"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ews-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")            # not "localhost": that name must fail verification
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "sim.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    sim = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--no-provisioning",
                            "--password", PASSWORD, "--tls-cert", str(tmp / "sim.pem"),
                            "--tls-key", str(tmp / "sim.pem")],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp, env=env)
    try:
        sim_port = json.loads(sim.stdout.readline())["sim_port"]
        port = free_port()
        cfg = tmp / "gw.toml"
        cfg.write_text(
            f'workers = 1\n'
            f'[listener]\nhost = "127.0.0.1"\nport = {port}\nexternal_url = "https://mail.example.com"\n'
            f'[upstream]\nurl = "https://127.0.0.1:{sim_port}"\nca_file = "{tmp / "ca.pem"}"\n'
            f'[admin]\nenabled = false\n[log]\ntransactions = ""\n'
            f'[policy]\nallow_if_no_policies = true\n'
            f'[ews]\nenabled = true\nallowed_sources = ["127.0.0.1"]\n'
            f'[webmail]\nenabled = true\nurl = "https://localhost:{sim_port}"\n')
        proc = start_serve(cfg, tmp)
        try:
            _wait_listening(port, proc)
            yield port
        finally:
            stop_process(proc)
    finally:
        stop_process(sim)


def test_ews_reaches_an_https_mail_server_verified_with_the_configured_ca(gw):
    auth = "Basic " + base64.b64encode(f"jdoe:{PASSWORD}".encode()).decode()
    status, _, body = request(gw, "POST", "/EWS/Exchange.asmx", {"Authorization": auth}, subscribe_body())
    assert status == 200 and b"NoError" in body


def test_a_certificate_that_does_not_name_the_server_is_refused(gw):
    # webmail.url names "localhost"; the certificate holds 127.0.0.1 only.
    status, hdrs, _ = request(gw, "GET", "/owa/")
    assert status == 503 and "retry-after" in hdrs
