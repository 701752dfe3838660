"""Outbound proxies, end to end through `seg-fast serve`: TLS to an https:// proxy, then
CONNECT inside it, for the mail-server leg and for the policy API; CONNECT in the clear to
an http:// one.

The proxy is the test's own (trio + h11, a trustme certificate when it speaks TLS): it
records every CONNECT target, how many TLS handshakes it made, and the first bytes the
gateway sent through each tunnel (a TLS ClientHello when the mail server is https://: TLS
inside TLS through an https:// proxy). Refusals (wrong credentials, an untrusted proxy certificate, a proxy that
stalls or talks before the tunnel is used) must reach the device as 503, with the
worker alive.
"""
from __future__ import annotations

import base64
import json

import ssl

import h11
import pytest
import trio
import trustme

from http_client import JsonServer
from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, text

PASSWORD = "secret"


class ConnectProxy:
    """A CONNECT proxy, over TLS when given a CA to issue its certificate; ``mode``: "ok", "stall" (never answers CONNECT), "eager" (sends
    data right after its 200, before the client spoke: a confused or hostile proxy), "bloat"
    (an answer head without end), "garbage" (not HTTP)."""

    def __init__(self, ca: trustme.CA | None, credentials: bytes | None = None):
        self.ctx = None
        if ca is not None:
            self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("localhost", "127.0.0.1").configure_cert(self.ctx)
        self.credentials = credentials
        self.mode = "ok"
        self.targets: list[str] = []
        self.first_bytes: list[bytes] = []
        self.handshakes = 0
        self.refused = 0
        self.tunnels: set[trio.CancelScope] = set()

    def drop_tunnels(self) -> None:
        """Close every open tunnel (as a proxy restart would): the gateway's pooled
        mail-server connections through it die, the next request connects anew."""
        for scope in list(self.tunnels):
            scope.cancel()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._conn, listeners, task_status=task_status)

    async def _conn(self, raw):
        stream = raw if self.ctx is None else trio.SSLStream(raw, self.ctx, server_side=True)
        try:
            if self.ctx is not None:
                await stream.do_handshake()
                self.handshakes += 1
            conn = h11.Connection(h11.SERVER)
            req = None
            while req is None:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(ev, h11.Request):
                    req = ev
                else:
                    return
            auth = dict((k.lower(), v) for k, v in req.headers).get(b"proxy-authorization")
            if req.method != b"CONNECT" or (self.credentials is not None
                                            and auth != b"Basic " + base64.b64encode(self.credentials)):
                self.refused += 1
                await stream.send_all(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
                return
            if self.mode == "stall":
                await trio.sleep_forever()
            if self.mode == "bloat":              # an answer head that never ends
                await stream.send_all(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                for _ in range(2000):
                    await stream.send_all(b"a" * 1024)
                return
            if self.mode == "garbage":
                await stream.send_all(b"\x00\xffNOT HTTP\r\n\r\n")
                return
            target = req.target.decode()
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            up = await trio.open_tcp_stream(host, int(port))
            reply = b"HTTP/1.1 200 Connection established\r\n\r\n"
            await stream.send_all(reply + (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" if self.mode == "eager" else b""))
            first = conn.trailing_data[0]

            async def pipe(a, b, note):
                try:
                    if note and first:
                        self.first_bytes.append(bytes(first[:8]))
                        note = False
                        await b.send_all(bytes(first))
                    while data := await a.receive_some(65536):
                        if note:
                            self.first_bytes.append(data[:8])
                            note = False
                        await b.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    await trio.aclose_forcefully(b)

            with trio.CancelScope() as scope:
                self.tunnels.add(scope)
                try:
                    async with trio.open_nursery() as n:
                        n.start_soon(pipe, stream, up, True)
                        n.start_soon(pipe, up, stream, False)
                finally:
                    self.tunnels.discard(scope)
                    await trio.aclose_forcefully(up)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def folder_sync(port: int, device: str = "PXDEV1") -> tuple[int, str | None]:
    c = EasClient("127.0.0.1", port, "jdoe", PASSWORD, device, device_type="iPhone", user_agent="Apple-iPhone/1.0")
    try:
        with trio.fail_after(30):
            r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
        return r.status, text(r.doc, "FolderHierarchy:Status") if r.status == 200 else None
    finally:
        await c.aclose()


async def until_serving(proc, port: int) -> None:
    with trio.fail_after(30):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return
            except OSError:
                await trio.sleep(0.1)


def write_config(tmp_path, port: int, upstream: str, policy: str = "allow_if_no_policies = true\n") -> object:
    cfg = tmp_path / f"gw{port}.toml"
    cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[upstream]\n{upstream}'
                   f'[timeouts]\nupstream_connect = 1.5\n'
                   f'[admin]\nenabled = false\n[log]\ntransactions = ""\n'
                   f'[policy]\n{policy}')
    return cfg


@pytest.fixture
def ca(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return ca


@pytest.mark.parametrize("proxy_tls", [True, False], ids=["https-proxy", "http-proxy"])
@pytest.mark.parametrize("mail_tls", [False, True], ids=["http-mail-server", "https-mail-server"])
async def test_mail_server_through_a_proxy(tmp_path, ca, mail_tls, proxy_tls):
    # The proxy's certificate from another CA than the mail server's: each trust is its own setting.
    proxy_ca = trustme.CA()
    proxy_ca.cert_pem.write_to_path(str(tmp_path / "proxy-ca.pem"))
    proxy = ConnectProxy(proxy_ca if proxy_tls else None, credentials=b"px:p@ss w")
    sim = MailboxSimulator(password=PASSWORD, initial_messages=1, require_provisioning=False)
    sim_ctx = None
    if mail_tls:
        sim_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(sim_ctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        await nursery.start(lambda task_status: sim.serve("127.0.0.1", 0, ssl_context=sim_ctx, task_status=task_status))
        port = free_port()
        scheme, host = ("https", "localhost") if mail_tls else ("http", "127.0.0.1")
        # Credentials with characters that must be percent-encoded in the URL.
        cfg = write_config(tmp_path, port, f'url = "{scheme}://{host}:{sim.port}"\nca_file = "{tmp_path}/ca.pem"\n'
                                           f'proxy_url = "{"https" if proxy_tls else "http"}://px:p%40ss%20w@localhost:{proxy.port}"\n'
                                           f'proxy_ca_file = "{tmp_path}/proxy-ca.pem"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            await until_serving(proc, port)
            assert await folder_sync(port) == (200, "1")
            assert proxy.targets and set(proxy.targets) == {f"{host}:{sim.port}"}
            assert (proxy.handshakes >= 1) is proxy_tls and proxy.refused == 0
            # What crossed the tunnel: a TLS record (ClientHello), or the plain request.
            assert proxy.first_bytes[0][:1] == (b"\x16" if mail_tls else b"P"), proxy.first_bytes
            # check-config --connect takes the same way (the guide's Test Connection).
            from seg_fast.checkconfig import check_connect
            from seg_fast.config import load_config

            tunnels = len(proxy.targets)
            found = {f.what: f for f in await check_connect(load_config(cfg, env={}))}
            assert found["upstream.url"].ok, found["upstream.url"]
            assert len(proxy.targets) == tunnels + 1
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()


async def test_proxy_refusals_reach_the_device_as_503(tmp_path, ca):
    """One gateway, the proxy misbehaving a different way for each request."""
    proxy = ConnectProxy(ca, credentials=b"px:pw")
    sim = MailboxSimulator(password=PASSWORD, initial_messages=1, require_provisioning=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        port = free_port()
        cfg = write_config(tmp_path, port, f'url = "http://127.0.0.1:{sim.port}"\n'
                                           f'proxy_url = "https://px:pw@localhost:{proxy.port}"\n'
                                           f'proxy_ca_file = "{tmp_path}/ca.pem"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            await until_serving(proc, port)
            assert await folder_sync(port, "PXOK1") == (200, "1")     # the baseline works
            good_ctx = proxy.ctx
            for i, case in enumerate(["wrong-password", "untrusted-proxy", "stall", "eager", "bloat", "garbage"]):
                proxy.targets.clear()
                handshakes, refused = proxy.handshakes, proxy.refused
                proxy.mode, proxy.credentials, proxy.ctx = "ok", b"px:pw", good_ctx
                proxy.drop_tunnels()
                await trio.sleep(0)
                if case == "wrong-password":
                    proxy.credentials = b"px:other"
                elif case == "untrusted-proxy":            # a certificate from a CA the gateway does not trust
                    proxy.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    trustme.CA().issue_cert("localhost", "127.0.0.1").configure_cert(proxy.ctx)
                else:
                    proxy.mode = case
                status, _ = await folder_sync(port, f"PXBAD{i}")
                assert status == 503, case
                if case == "untrusted-proxy":
                    assert proxy.handshakes == handshakes and not proxy.targets   # nothing sent to it
                if case == "wrong-password":
                    assert proxy.refused > refused and not proxy.targets
                assert proc.poll() is None
            proxy.mode, proxy.credentials, proxy.ctx = "ok", b"px:pw", good_ctx
            assert await folder_sync(port, "PXOK2") == (200, "1")     # and it recovers, nothing restarted
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()


SNAPSHOT = {"token": "t1", "policies": {"managed": {"compromised": True}},
            "devices": [{"device_id": "PXDEV1", "managed": True, "compromised": True}]}


async def test_policy_api_through_an_https_proxy(tmp_path, ca):
    proxy = ConnectProxy(ca, credentials=b"api:pw")
    api = JsonServer({"/api/snapshot": (200, json.dumps(SNAPSHOT).encode()),
                      "/api/changes": (200, b'{"token": "t1"}')})
    sim = MailboxSimulator(password=PASSWORD, initial_messages=1, require_provisioning=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        api_port = await nursery.start(api.serve)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        port = free_port()
        cfg = write_config(tmp_path, port, f'url = "http://127.0.0.1:{sim.port}"\n',
                           policy=f'allow_if_no_policies = true\napi_url = "http://127.0.0.1:{api_port}/api"\n'
                                  f'api_proxy_url = "https://api:pw@localhost:{proxy.port}"\n'
                                  f'api_ca_file = "{tmp_path}/ca.pem"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            with trio.fail_after(30):
                while not any(p == "/api/snapshot" for p, _ in api.seen):
                    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                    await trio.sleep(0.1)
            assert f"127.0.0.1:{api_port}" in proxy.targets
            # The pulled policy (compromised devices blocked) reaches the workers: 129 for this device.
            await until_serving(proc, port)
            with trio.fail_after(30):
                while (await folder_sync(port))[1] != "129":
                    await trio.sleep(0.2)
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()
