"""A running `seg-fast serve` in front of an https:// mail server (as Exchange, Office 365 or
Traveler are reached): the mail-server connection on tlsio's TLS, carried on by the record
layer after its TLS 1.3 handshake, and the keep-alive lane writing and reading it.

The mail server here is trio's SSLStream (OpenSSL over memory BIOs, its session tickets sent
after the handshake) with a trustme certificate the gateway verifies through upstream.ca_file.
"""
from __future__ import annotations

import pytest
import trio
from processes import start_serve, stop_process, wait_listening
from redis_server import free_port
from test_tls13_records_client import mail_context, write_pki
from test_upstream_failures import BIG_ANSWER, FOLDERSYNC, PING, Device, FakeMailServer

from seg_fast.proxy import tls13

pytestmark = pytest.mark.skipif(not tls13.available(), reason="TLS 1.3 records need CPython's ssl on OpenSSL 3")


@pytest.fixture(scope="module")
def mail_pki(tmp_path_factory):
    d = write_pki(tmp_path_factory.mktemp("mailpki"))
    return d / "ca.pem", mail_context(d)


def _config(tmp, mail_port: int, port: int, ca, records: bool = True):
    cfg = tmp / "gw.toml"
    cfg.write_text(
        f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "https://localhost:{mail_port}"\nca_file = "{ca}"\n'
        f'tls13_records = {"true" if records else "false"}\n'
        f'[admin]\nenabled = false\n[log]\ntransactions = "{tmp / "tx.jsonl"}"\n'
        f'[policy]\nallow_if_no_policies = true\n'
        f'[timeouts]\nupstream_read = 10\nupstream_connect = 5\nping_margin = 1\n')
    return cfg


def _requests(mail) -> list[str]:
    return [r for c in mail.connections for r in c["requests"]]


@pytest.mark.parametrize("records", [True, False], ids=["records", "openssl"])
async def test_an_https_mail_server_carries_kept_alive_requests_parked_pings_and_big_answers(tmp_path, mail_pki, records):
    ca, sctx = mail_pki
    plan = {"Ping": "hold", "Settings": "big"}
    mail = FakeMailServer(lambda conn, n, command: plan.get(command, "answer"), tls=sctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(mail.serve)
        port = free_port()
        proc = start_serve(_config(tmp_path, mail.port, port, ca, records), tmp_path)
        try:
            await trio.to_thread.run_sync(wait_listening, port, proc)
            dev = await Device.connect(port)
            for _ in range(30):       # kept alive on both legs: the lane's exchanges after the first
                status, _, body = await dev.request("FolderSync", FOLDERSYNC)
                assert (status, body) == (200, b"answer:FolderSync")
            assert _requests(mail) == ["FolderSync"] * 30 and len(mail.connections) == 1
            status, _, body = await dev.request("Settings", FOLDERSYNC)
            assert status == 200 and body == b"answer:Settings" + BIG_ANSWER
            pinger = await Device.connect(port)
            await pinger.send("Ping", PING, device="PINGER1")
            await mail.until(lambda: "Ping" in _requests(mail))
            # while the mail server holds the Ping, the other device's exchanges go on
            for _ in range(5):
                status, _, body = await dev.request("FolderSync", FOLDERSYNC)
                assert (status, body) == (200, b"answer:FolderSync")
            assert len(mail.connections) == 2     # the Ping holds one connection, the other is kept
            await pinger.aclose()
            await dev.aclose()
        finally:
            stop_process(proc)
        nursery.cancel_scope.cancel()


async def test_a_mail_server_sending_no_tls_on_a_kept_connection_is_not_answered_from_and_the_worker_serves_on(
        tmp_path, mail_pki):
    ca, sctx = mail_pki
    mail = FakeMailServer(lambda conn, n, command: "garbage" if (conn, n) == (0, 2) else "answer", tls=sctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(mail.serve)
        port = free_port()
        proc = start_serve(_config(tmp_path, mail.port, port, ca), tmp_path)
        try:
            await trio.to_thread.run_sync(wait_listening, port, proc)
            dev = await Device.connect(port)
            status, _, body = await dev.request("FolderSync", FOLDERSYNC)
            assert (status, body) == (200, b"answer:FolderSync")
            # on the kept connection the mail server answers with bytes that are not TLS records:
            # not an answer; the request goes again on a new connection (the kept-alive rule)
            status, _, body = await dev.request("FolderSync", FOLDERSYNC)
            assert (status, body) == (200, b"answer:FolderSync")
            assert _requests(mail) == ["FolderSync"] * 3 and len(mail.connections) == 2
            again = await Device.connect(port)
            status, _, body = await again.request("FolderSync", FOLDERSYNC)
            assert (status, body) == (200, b"answer:FolderSync")
            assert proc.poll() is None
            await dev.aclose()
            await again.aclose()
        finally:
            stop_process(proc)
        nursery.cancel_scope.cancel()
