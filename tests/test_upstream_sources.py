"""upstream.source_addresses: a running `seg-fast serve` makes its mail-server connections from
the listed local addresses in turn (the mail server sees them as the peers), refuses an address
that is not this host's before any worker starts, and one source whose ports are used up
(EADDRNOTAVAIL) passes the connection to the next. Linux answers for all of 127.0.0.0/8 on lo."""
from __future__ import annotations

import errno
import socket
import threading
from http.server import BaseHTTPRequestHandler

import pytest
import trio

from processes import finish, http_server, options_answer, start_serve, stop_process, wait_listening
from redis_server import free_port
from seg_fast.proxy import upstream


class _MailServer(BaseHTTPRequestHandler):
    """Answers OPTIONS and closes, so each request needs a new connection; keeps the peers."""
    protocol_version = "HTTP/1.1"
    peers: list[str] = []

    def do_OPTIONS(self):
        self.peers.append(self.client_address[0])
        self.send_response(200)
        self.send_header("MS-ASProtocolVersions", "14.1")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def mail_server():
    _MailServer.peers = []
    with http_server(_MailServer) as port:
        yield port


def _config(tmp_path, port: int, mail_port: int, sources: str):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[upstream]\nurl = "http://127.0.0.1:{mail_port}"\nsource_addresses = {sources}\n'
                   '[admin]\nenabled = false\n[policy]\nallow_if_no_policies = true\n')
    return cfg


def test_mail_server_connections_come_from_the_source_addresses_in_turn(tmp_path, mail_server):
    port = free_port()
    proc = start_serve(_config(tmp_path, port, mail_server, '["127.0.0.2", "127.0.0.3"]'), tmp_path)
    try:
        wait_listening(port, proc)
        answers = [options_answer(port) for _ in range(6)]
    finally:
        stop_process(proc)
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
    assert sorted(_MailServer.peers) == ["127.0.0.2"] * 3 + ["127.0.0.3"] * 3
    assert all(a != b for a, b in zip(_MailServer.peers, _MailServer.peers[1:]))     # in turn


def test_a_source_address_not_of_this_host_is_refused_before_any_worker(tmp_path, mail_server):
    cfg = _config(tmp_path, free_port(), mail_server, '["127.0.0.2", "192.0.2.1"]')
    proc = start_serve(cfg, tmp_path)
    err = finish(proc)
    assert proc.returncode == 1
    assert "gw.toml" in err and "key upstream.source_addresses: 192.0.2.1: not an address of this host" in err
    assert "Traceback" not in err and "worker" not in err


def test_a_source_out_of_ports_passes_the_connection_to_the_next(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    tried = []
    real = upstream.open_tcp

    async def open_tcp(host, port, deadline, source=None):
        tried.append(source)
        if source == "127.0.0.2":          # its ports toward this server all in use
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        return await real(host, port, deadline, source)

    monkeypatch.setattr(upstream, "open_tcp", open_tcp)

    class Settings:
        source_addresses = ["127.0.0.2", "127.0.0.3"]
        idle_pool_size, pool_size, proxy_url = 4, 10, ""

    class Timeouts:
        upstream_connect = 5.0

    async def main():
        pool = upstream.UpstreamPool(Settings, Timeouts)
        origin = upstream.origin_of(f"http://127.0.0.1:{listener.getsockname()[1]}")
        conn = await pool.connect(origin)
        peer, _ = listener.accept()
        assert peer.getpeername()[0] == "127.0.0.3"
        peer.close()
        await conn.aclose()
        # every source out of ports: the error names why
        Settings.source_addresses = ["127.0.0.2"]
        with pytest.raises(upstream.UpstreamError, match="EADDRNOTAVAIL"):
            await upstream.UpstreamPool(Settings, Timeouts).connect(origin)

    try:
        trio.run(main)
    finally:
        listener.close()
    assert tried == ["127.0.0.2", "127.0.0.3", "127.0.0.2"]


@pytest.mark.parametrize("sources", ["[]", '["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]'])
def test_serve_warns_when_the_devices_need_more_ports_than_the_sources_have(tmp_path, mail_server, sources):
    import os

    from seg_fast.oslimits import ephemeral_ports

    cfg = _config(tmp_path, free_port(), mail_server, sources)
    cfg.write_text("devices_per_core = 30000\n" + cfg.read_text())
    parked = 30_000 * (os.cpu_count() or 1)
    short = parked > ephemeral_ports() * max(1, sources.count("127."))
    proc = start_serve(cfg, tmp_path)
    try:
        seen = b""
        while b"worker(s)" not in seen:
            line = proc.stderr.readline()
            assert line, seen.decode()
            seen += line
    finally:
        stop_process(proc)
    warned = f"WARNING: devices_per_core 30000 on {os.cpu_count() or 1} core(s): {parked} parked Pings".encode()
    assert (warned in seen) == short, seen.decode()
    if sources == "[]" and ephemeral_ports() < 30_000:
        assert short           # one address and the default range: ~28,000 ports for 30,000+ Pings


def test_a_reload_changes_the_sources_and_refuses_one_not_of_this_host(tmp_path, mail_server):
    import signal
    import time

    port = free_port()
    cfg = _config(tmp_path, port, mail_server, '["127.0.0.2"]')
    proc = start_serve(cfg, tmp_path)
    lines: list[bytes] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, b"")), daemon=True).start()

    def until(check, what: str) -> None:
        end = time.monotonic() + 60
        while not check():
            assert time.monotonic() < end, f"{what}: {b''.join(lines).decode()[-2000:]}"
            time.sleep(0.1)

    try:
        wait_listening(port, proc)
        assert options_answer(port).startswith(b"HTTP/1.1 200") and _MailServer.peers[-1] == "127.0.0.2"
        cfg.write_text(cfg.read_text().replace('["127.0.0.2"]', '["127.0.0.3"]'))
        proc.send_signal(signal.SIGHUP)
        until(lambda: options_answer(port).startswith(b"HTTP/1.1 200") and _MailServer.peers[-1] == "127.0.0.3",
              "the reloaded source")
        # the control process checks a reloaded config as it checks one at start, and keeps the
        # running one: the workers go on from 127.0.0.3
        cfg.write_text(cfg.read_text().replace('["127.0.0.3"]', '["192.0.2.1"]'))
        proc.send_signal(signal.SIGHUP)
        until(lambda: any(b"reload refused" in x and b"192.0.2.1" in x for x in lines), "the refusal")
        assert options_answer(port).startswith(b"HTTP/1.1 200") and _MailServer.peers[-1] == "127.0.0.3"
    finally:
        stop_process(proc)
