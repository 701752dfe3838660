"""The sizing benchmark's device leg over TLS 1.3: the fleet trusts the run's own CA,
the simulator (direct), the gateway and nginx present its certificate, devices
resume their TLS session on later connections. Time compressed: claims nothing."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import trio

from seg_fast.sim import sizing

DEVICES = 40


def _check(paths: list[str], **options) -> list[str]:
    """A tiny run of ``paths``; what it said."""
    opts = sizing.Options(devices=DEVICES, ramp=2.0, settle=1.0, hold=5.0, drain=15.0, paths=paths,
                          shard_size=200, rate_scale=40.0, seed=11, repeat=1, tls=True, **options)
    said = []
    report = trio.run(sizing.bench, opts, False, DEVICES, said.append)
    (run,) = report["points"][0]["runs"]
    assert set(run["paths"]) == set(paths)
    for name, p in run["paths"].items():
        assert p["failures"] == {}, (name, p["failure_samples"])
        assert p["ready"] == DEVICES, name
        assert p["byte_checked"] > 100, name            # answers compared byte for byte
        # one TLS handshake per connection; later ones resume the device's session
        assert p["tls"]["handshakes"] >= DEVICES, (name, p["tls"])
        assert p["tls"]["resumed"] > 0, (name, p["tls"])
    assert not any("plain HTTP" in x for x in report["points"][0]["verdict"]["invalid"])
    return said


def test_fleet_over_tls_every_answer_checked():
    paths = ["direct"]
    if importlib.util.find_spec("seg_fast.proxy.server") is not None:
        paths.append("gateway")
    _check(paths)


def test_the_gateway_reaches_the_simulator_at_https_with_upstream_tls():
    """--upstream-tls: the gateway's mail server is the simulator's TLS listener, its
    certificate (naming the shards' addresses) verified; every answer still byte-checked."""
    from pathlib import Path

    from cryptography import x509

    said = _check(["gateway"], upstream_tls=True, keep=True)
    (kept,) = [Path(m.rsplit(" kept ", 1)[1]) for m in said if " kept " in m]
    try:
        cfg = (kept / "gateway0.toml").read_text()
        assert 'url = "https://127.11.0.1:' in cfg and f'ca_file = "{kept}/ca.pem"' in cfg
        cert = x509.load_pem_x509_certificate((kept / "server.pem").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.11.0.1"}
    finally:
        shutil.rmtree(kept, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SEG_FAST_SLOW"), reason="slow: SEG_FAST_SLOW=1 runs it")
@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed")
def test_nginx_over_tls():
    _check(["nginx"])


def test_nginx_keeps_tls_sessions_and_reads_as_the_gateway(tmp_path):
    """nginx's own defaults flattered the gateway: a 5-minute session lifetime turned devices'
    later connections into full handshakes through nginx only, and unbuffered reads of a page
    cut answers into page-sized TLS records. Both are set to what the gateway does."""
    import ctypes
    import subprocess

    import trustme

    from seg_fast import openssl
    from seg_fast.proxy import upstream
    from seg_fast.proxy.gateway import server_tls_context

    ca = trustme.CA()
    cert = ca.issue_cert("eas.example")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    cert.private_key_pem.write_to_path(tmp_path / "server.key")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")        # (--upstream-tls: the simulator's CA)
    # (the context held while its SSL_CTX is read: a temporary's was freed, and read after)
    ctx = server_tls_context(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    ptr = openssl.ssl_ctx_of(ctx)
    assert ptr, "the gateway context's SSL_CTX could not be read"
    get_timeout = openssl.libssl().SSL_CTX_get_timeout
    get_timeout.restype, get_timeout.argtypes = ctypes.c_long, [ctypes.c_void_p]
    assert get_timeout(ptr) == sizing.TLS_SESSION_LIFETIME_S

    proxy = object.__new__(sizing.Proxy)
    proxy.opts = sizing.Options(devices=13_000, tls=True)
    proxy.dir = tmp_path
    proxy.sims, proxy.listen = [("127.11.0.1", 9001), ("127.11.0.2", 9002)], [("127.12.0.1", 9443), ("127.12.0.2", 9444)]
    conf = proxy.nginx_conf()
    assert f"ssl_session_timeout {sizing.TLS_SESSION_LIFETIME_S}s;" in conf
    assert "proxy_pass http://sim1;" in conf and "proxy_ssl" not in conf
    # --upstream-tls: nginx reaches the simulator at https://, verifying it as the gateway does
    proxy.opts = sizing.Options(devices=13_000, tls=True, upstream_tls=True)
    conf = proxy.nginx_conf()
    assert "proxy_pass https://sim1;" in conf and "proxy_ssl_verify on;" in conf
    assert f"proxy_ssl_trusted_certificate {tmp_path}/ca.pem;" in conf
    assert f"proxy_ssl_name {sizing.SERVER_NAME};" in conf and "proxy_ssl_session_reuse on;" in conf
    # nginx reads the mail server's answer in pieces as large as the gateway's
    assert sizing.NGINX_BUFFER_KIB * 1024 == upstream.RECEIVE_SIZE
    assert f"proxy_buffer_size {sizing.NGINX_BUFFER_KIB}k;" in conf and "proxy_buffering off;" in conf
    assert "worker_processes 3;" in conf and conf.count("proxy_pass") == 2
    assert "worker_rlimit_nofile 19500;" in conf
    # --nofile: nginx's workers get the run's limit and carry as many devices as the gateway's
    proxy.opts = sizing.Options(devices=13_000, tls=True, nofile=60_000, shard_size=13_000)
    raised = proxy.nginx_conf()
    assert "worker_rlimit_nofile 60000;" in raised and "worker_connections 59500;" in raised
    assert f"worker_processes {-(-13_000 // sizing.shard_size(proxy.opts))};" in raised
    if shutil.which("nginx"):            # nginx itself accepts it (syntax, certificate and key, with --upstream-tls)
        (tmp_path / "nginx.conf").write_text(conf)
        got = subprocess.run(["nginx", "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                             capture_output=True, text=True)
        assert got.returncode == 0, got.stderr
