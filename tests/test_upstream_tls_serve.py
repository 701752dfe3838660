"""A running `seg-fast serve` in front of an https:// mail server (as Exchange, Office 365 or
Traveler are reached): the mail-server connection on tlsio's TLS, carried on by the record
layer after its TLS 1.3 handshake, and the keep-alive lane writing and reading it.

The mail server here is trio's SSLStream (OpenSSL over memory BIOs, its session tickets sent
after the handshake) with a trustme certificate the gateway verifies through upstream.ca_file.
"""
from __future__ import annotations

import ssl

import h11
import pytest
import trio
import trustme
from processes import start_serve, stop_process, wait_listening
from redis_server import free_port
from test_upstream_failures import BOUND, FOLDERSYNC, PING, Device

from seg_fast.proxy import tls13

pytestmark = pytest.mark.skipif(not tls13.available(), reason="TLS 1.3 records need CPython's ssl on OpenSSL 3")

BIG = 300_000                         # an answer past one read (upstream.RECEIVE_SIZE) and many records


class TLSMailServer:
    """``plan(command, n)`` per request: "answer" (200 with b"answer:<command>" and a
    ``BIG``-byte body for Settings), "hold" (a Ping: never answered), "garbage" (bytes
    that are not TLS records, then close)."""

    def __init__(self, plan, context: ssl.SSLContext):
        self.plan, self.context = plan, context
        self.sock = trio.socket.socket()
        self.port = 0
        self.connections = 0
        self.requests: list[str] = []
        self.changed = trio.Event()

    async def until(self, cond) -> None:
        with trio.fail_after(BOUND):
            while not cond():
                await self.changed.wait()

    def _note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await self.sock.accept()
                nursery.start_soon(self._connection, trio.SSLStream(trio.SocketStream(conn), self.context,
                                                                    server_side=True))

    async def _connection(self, stream) -> None:
        self.connections += 1
        self._note()
        conn = h11.Connection(h11.SERVER)
        request = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif type(event) is h11.Request:
                    request = event
                elif type(event) is h11.EndOfMessage:
                    command = dict(x.split(b"=", 1) for x in request.target.split(b"?", 1)[1].split(b"&"))[b"Cmd"].decode()
                    self.requests.append(command)
                    self._note()
                    what = self.plan(command, len(self.requests))
                    if what == "hold":
                        await trio.sleep_forever()
                    if what == "garbage":
                        await stream.transport_stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nnot a TLS record")
                        return
                    body = b"answer:" + command.encode() + (bytes(range(256)) * (BIG // 256) if command == "Settings" else b"")
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                        (b"Content-Type", b"application/vnd.ms-sync.wbxml"),
                        (b"Content-Length", str(len(body)).encode())])) + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
            self._note()


@pytest.fixture(scope="module")
def mail_pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("mailpki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(sctx)
    return d / "ca.pem", sctx


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


@pytest.mark.parametrize("records", [True, False], ids=["records", "openssl"])
async def test_an_https_mail_server_carries_kept_alive_requests_parked_pings_and_big_answers(tmp_path, mail_pki, records):
    ca, sctx = mail_pki
    mail = TLSMailServer(lambda command, n: "hold" if command == "Ping" else "answer", sctx)
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
            assert mail.requests.count("FolderSync") == 30 and mail.connections == 1
            status, _, body = await dev.request("Settings", FOLDERSYNC)
            assert status == 200 and body == b"answer:Settings" + bytes(range(256)) * (BIG // 256)
            pinger = await Device.connect(port)
            await pinger.send("Ping", PING, device="PINGER1")
            await mail.until(lambda: "Ping" in mail.requests)
            # while the Ping is held by the mail server, the other device's exchanges go on
            for _ in range(5):
                status, _, body = await dev.request("FolderSync", FOLDERSYNC)
                assert (status, body) == (200, b"answer:FolderSync")
            assert mail.connections == 2  # the Ping holds one connection, the lane keeps the other
            await pinger.aclose()
            await dev.aclose()
        finally:
            stop_process(proc)
        nursery.cancel_scope.cancel()


async def test_a_mail_server_sending_no_tls_on_a_kept_connection_is_not_answered_from_and_the_worker_serves_on(
        tmp_path, mail_pki):
    ca, sctx = mail_pki
    mail = TLSMailServer(lambda command, n: "garbage" if n == 2 else "answer", sctx)
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
            assert mail.requests == ["FolderSync"] * 3 and mail.connections == 2
            again = await Device.connect(port)
            status, _, body = await again.request("FolderSync", FOLDERSYNC)
            assert (status, body) == (200, b"answer:FolderSync")
            assert proc.poll() is None
            await dev.aclose()
            await again.aclose()
        finally:
            stop_process(proc)
        nursery.cancel_scope.cancel()
