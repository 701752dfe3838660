"""The proxy shell over real loopback sockets, against a small h11 mail server."""
from __future__ import annotations

import base64
import json
import ssl
import subprocess
from contextlib import asynccontextmanager

import h11
import pytest
import trio
import trio.testing
import trustme

from proxy_helpers import Client, MiniUpstream, fixture_answer
from seg_fast.config import load_config
from seg_fast.eas.request import encode_base64_query
from seg_fast.hooks import AllowAll, Decision
from seg_fast.proxy import ping
from seg_fast.proxy.gateway import Gateway

EAS = b"/Microsoft-Server-ActiveSync"
QUERY = b"?Cmd=FolderSync&User=test&DeviceId=ABC123&DeviceType=SmartPhone"
AUTH = (b"Authorization", b"Basic " + base64.b64encode(b"test:secret"))
WBXML = (b"Content-Type", b"application/vnd.ms-sync.wbxml")
FIXTURES = ["options", "prov1", "prov2", "fsync", "sync0", "sync1", "iofetch", "mp", "getatt"]


def _env(upstream_url: str, log_path, **extra) -> dict:
    env = {"SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0",
           "SEG_FAST_UPSTREAM_URL": upstream_url, "SEG_FAST_LOG_TRANSACTIONS": str(log_path),
           "SEG_FAST_SECURITY_MASTER_KEY_FILE": str(log_path.parent / "master.key"),
           "SEG_FAST_SECURITY_KEY_STATE_FILE": str(log_path.parent / "keys.json")}
    env.update({f"SEG_FAST_{k.upper()}": v for k, v in extra.items()})
    return env


@asynccontextmanager
async def gateway(upstream_url: str, tmp_path, *, gatekeeper=None, tls=None, **extra):
    config = load_config(None, env=_env(upstream_url, tmp_path / "tx.jsonl", **extra))
    gw = Gateway(config, tls_context=tls, gatekeeper_factory=lambda c: gatekeeper or AllowAll())
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve)
        yield gw
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def upstream(handler, **kw):
    up = MiniUpstream(handler, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        yield up
        nursery.cancel_scope.cancel()


def _by_fixture(req, body):
    target = req.target.decode()
    name = target.split("Fixture=", 1)[1].split("&", 1)[0] if "Fixture=" in target else "fsync"
    return fixture_answer(name)


def _end_to_end(headers) -> list:
    return [(k.lower(), v) for k, v in headers if k.lower() not in (b"connection", b"transfer-encoding")]


@pytest.mark.parametrize("name", FIXTURES)
async def test_real_server_answers_pass_byte_identical(tmp_path, name):
    status, headers, body = fixture_answer(name)
    async with upstream(_by_fixture) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        direct = await Client.connect(up.port)
        via = await Client.connect(gw.port)
        method = b"OPTIONS" if name == "options" else b"POST"
        target = EAS + QUERY + b"&Fixture=" + name.encode()
        request_body = b"" if method == b"OPTIONS" else b"\x03\x01\x6a\x00\x00\x07\x56\x52\x03\x30\x00\x01\x01"
        d_resp, d_body = await direct.request(method, target, [AUTH, WBXML], request_body)
        g_resp, g_body = await via.request(method, target, [AUTH, WBXML], request_body)
        assert g_resp.status_code == d_resp.status_code == status
        assert g_body == d_body == body
        assert _end_to_end(g_resp.headers.raw_items()) == _end_to_end(d_resp.headers.raw_items())
        # What the mail server got from the gateway: the same request plus forwarding headers.
        seen, seen_body = up.requests[-1]
        assert seen.method == method and seen.target == target and seen_body == request_body
        h = dict(seen.headers)
        assert h[b"authorization"] == AUTH[1] and h[b"x-forwarded-for"] == b"127.0.0.1"
        assert h[b"x-forwarded-proto"] == b"http" and h[b"host"] == f"127.0.0.1:{up.port}".encode()


async def test_keep_alive_reuses_one_mail_server_connection(tmp_path):
    async with upstream(_by_fixture) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        dev = await Client.connect(gw.port)
        for _ in range(5):
            resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 200 and body == fixture_answer("fsync")[2]
        assert up.connections == 1 and len(up.requests) == 5


async def test_paths_queries_and_options(tmp_path):
    async with upstream(_by_fixture) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                     eas_paths='["/Microsoft-Server-ActiveSync","/servlet/traveler"]') as gw:
        dev = await Client.connect(gw.port)
        resp, _ = await dev.request(b"GET", b"/owa/")
        assert resp.status_code == 404
        resp, _ = await dev.request(b"POST", b"/microsoft-server-activesync" + QUERY, [AUTH], b"x")
        assert resp.status_code == 200
        resp, _ = await dev.request(b"POST", b"/servlet/traveler" + QUERY, [AUTH], b"x")
        assert resp.status_code == 200
        resp, _ = await dev.request(b"OPTIONS", EAS, [AUTH])
        assert resp.status_code == 200 and up.requests[-1][0].method == b"OPTIONS"
        n = len(up.requests)
        dev2 = await Client.connect(gw.port)
        resp, _ = await dev2.request(b"POST", EAS + b"?Cmd=Sync&Cmd=Ping&DeviceId=A", [AUTH], b"x")
        assert resp.status_code == 400 and len(up.requests) == n     # never reached the mail server
    lines = [json.loads(x) for x in (tmp_path / "tx.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == [404, 200, 200, 200, 400]
    assert lines[1]["command"] == "FolderSync" and lines[1]["device_id"] == "ABC123" and lines[1]["user"] == "test"
    raw = (tmp_path / "tx.jsonl").read_text()
    assert "dGVzdDpzZWNyZXQ" not in raw and "secret" not in raw       # no Authorization value


async def test_base64_query_identified_and_forwarded_untouched(tmp_path):
    seen = []

    class Recorder(AllowAll):
        def decide(self, req):
            seen.append(req)
            return super().decide(req)

    q = encode_base64_query(version="14.1", command="FolderSync", device_id=bytes.fromhex("a1b2c3"),
                            device_type="SmartPhone", policy_key=42, params=[(7, b"test")]).encode()
    async with upstream(lambda r, b: fixture_answer("fsb64")) as up, \
            gateway(f"http://127.0.0.1:{up.port}", tmp_path, gatekeeper=Recorder()) as gw:
        dev = await Client.connect(gw.port)
        resp, body = await dev.request(b"POST", EAS + b"?" + q, [AUTH, WBXML], b"\x03\x01\x6a\x00")
        assert resp.status_code == 200 and body == (fixture_answer("fsb64")[2])
        assert up.requests[-1][0].target == EAS + b"?" + q
    req = seen[0]
    assert (req.command, req.device_id, req.device_type, req.policy_key, req.user, req.protocol_version) == \
        ("FolderSync", "a1b2c3", "SmartPhone", "42", "test", "14.1")


async def test_mail_server_down_gives_503_then_recovers(tmp_path):
    # Reserve a port, keep it closed: connection refused.
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with gateway(f"http://127.0.0.1:{port}", tmp_path, upstream_retry_after="7") as gw:
        dev = await Client.connect(gw.port)
        with trio.fail_after(3):
            resp, _ = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
        assert resp.status_code == 503 and dict(resp.headers)[b"retry-after"] == b"7"
        # The mail server comes back on the same port: no restart needed.
        up = MiniUpstream(_by_fixture)
        listener = trio.SocketListener(await _bound(port))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, up._conn, [listener])
            resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 200 and body == fixture_answer("fsync")[2]
            nursery.cancel_scope.cancel()


async def _bound(port):
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await sock.bind(("127.0.0.1", port))
    sock.listen(10)
    return sock


async def test_slow_mail_server_gives_503_in_time(tmp_path):
    async def never(req, body):
        await trio.sleep_forever()

    async with upstream(never) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                               timeouts_upstream_read="0.3") as gw:
        dev = await Client.connect(gw.port)
        with trio.fail_after(5):
            resp, _ = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
        assert resp.status_code == 503 and b"retry-after" in dict(resp.headers)


async def test_451_redirect_points_device_back_and_remembers_user(tmp_path):
    async with upstream(_by_fixture) as other:
        other_url = f"https://127.0.0.1:{other.port}/Microsoft-Server-ActiveSync"

        def first(req, body):
            return 451, [(b"X-MS-Location", other_url.encode()), (b"Content-Length", b"0")], b""

        async with upstream(first) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                  listener_external_url="https://eas.example.org:8443") as gw:
            gw.redirects.by_user.clear()
            dev = await Client.connect(gw.port)
            resp, _ = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 451
            # The configured external name, never the device's own Host header (gw.example).
            assert dict(resp.headers)[b"x-ms-location"] == b"https://eas.example.org:8443/Microsoft-Server-ActiveSync"
            origin = gw.redirects.origin_for("TEST")
            assert (origin.scheme, origin.port) == ("https", other.port)
            # Another user still goes to the first server.
            assert gw.redirects.origin_for("someone").port == up.port


async def test_302_redirect_then_forwarded_to_the_named_server(tmp_path):
    async with upstream(_by_fixture) as other:
        def first(req, body):
            return 302, [(b"Location", f"http://127.0.0.1:{other.port}/Microsoft-Server-ActiveSync".encode()),
                         (b"Content-Length", b"0")], b""

        async with upstream(first) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
            dev = await Client.connect(gw.port)
            resp, _ = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            # No listener.external_url: the device retries where it is (no Host header trusted)...
            assert resp.status_code == 503 and dict(resp.headers)[b"retry-after"] == b"1"
            assert b"location" not in dict(resp.headers)
            # ...and the retry reaches the named server through the remembered mapping.
            resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 200 and len(other.requests) == 1 and len(up.requests) == 1


class Upper:
    """A real Transform: uppercases Sync answers."""
    commands = frozenset({"Sync"})

    def transform_answer(self, req, status, headers, body):
        return body.upper() + b"!"


class RefuseSend:
    commands = frozenset({"SendMail"})

    def transform_request(self, req, body):
        return None if b"forbidden" in body else body.replace(b"a", b"b")


class WithTransforms(AllowAll):
    def __init__(self, decision):
        self.decision = decision

    def decide(self, req):
        return self.decision

    def blocked_answer(self, req, decision):
        return 403, [(b"X-Blocked", b"yes")], b"blocked"


async def test_transforms_apply_only_to_their_commands(tmp_path):
    gk = WithTransforms(Decision(allowed=True, reason="allowed.t", transforms=(Upper(), RefuseSend())))
    async with upstream(lambda r, b: (200, [(b"Content-Length", str(len(b)).encode())], b or b"abc")) as up, \
            gateway(f"http://127.0.0.1:{up.port}", tmp_path, gatekeeper=gk) as gw:
        dev = await Client.connect(gw.port)
        resp, body = await dev.request(b"POST", EAS + b"?Cmd=Sync&DeviceId=A&DeviceType=B", [AUTH], b"hello")
        assert body == b"HELLO!" and dict(resp.headers)[b"content-length"] == b"6"
        resp, body = await dev.request(b"POST", EAS + b"?Cmd=FolderSync&DeviceId=A&DeviceType=B", [AUTH], b"hello")
        assert body == b"hello"
        resp, body = await dev.request(b"POST", EAS + b"?Cmd=SendMail&DeviceId=A&DeviceType=B", [AUTH], b"banana")
        assert body == b"bbnbnb" and up.requests[-1][1] == b"bbnbnb"
        n = len(up.requests)
        resp, body = await dev.request(b"POST", EAS + b"?Cmd=SendMail&DeviceId=A&DeviceType=B", [AUTH], b"forbidden")
        assert resp.status_code == 403 and body == b"blocked" and len(up.requests) == n


async def test_transform_bound_never_passes_untransformed_content(tmp_path):
    gk = WithTransforms(Decision(allowed=True, reason="allowed.t", transforms=(Upper(),)))
    big = b"x" * 300_000
    async with upstream(lambda r, b: (200, [(b"Content-Length", str(len(big)).encode())], big)) as up, \
            gateway(f"http://127.0.0.1:{up.port}", tmp_path, gatekeeper=gk, security_max_transform_bytes="100000") as gw:
        dev = await Client.connect(gw.port)
        resp, body = await dev.request(b"POST", EAS + b"?Cmd=Sync&DeviceId=A&DeviceType=B", [AUTH], b"x")
        assert resp.status_code == 500 and b"x" * 1000 not in body and b"too large" in body


async def test_blocked_and_test_mode(tmp_path):
    async with upstream(_by_fixture) as up:
        gk = WithTransforms(Decision(allowed=False, reason="blocked.x"))
        async with gateway(f"http://127.0.0.1:{up.port}", tmp_path, gatekeeper=gk) as gw:
            dev = await Client.connect(gw.port)
            resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 403 and body == b"blocked" and not up.requests
        gk = WithTransforms(Decision(allowed=False, reason="blocked.x", test_mode=True))
        async with gateway(f"http://127.0.0.1:{up.port}", tmp_path, gatekeeper=gk) as gw:
            dev = await Client.connect(gw.port)
            resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 200 and len(up.requests) == 1


async def test_malformed_http_gets_400(tmp_path):
    async with upstream(_by_fixture) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await stream.send_all(b"POST /Microsoft-Server-ActiveSync HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
        data = await stream.receive_some(1000)
        assert data.startswith(b"HTTP/1.1 400")


async def test_chunked_upload_is_streamed_with_its_framing(tmp_path):
    async with upstream(lambda r, b: (200, [(b"Content-Length", b"2")], b"ok"), keep_bodies=False) as up, \
            gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        conn = h11.Connection(h11.CLIENT)
        out = conn.send(h11.Request(method=b"POST", target=EAS + b"?Cmd=SendMail&DeviceId=A&DeviceType=B",
                                    headers=[(b"Host", b"x"), (b"Transfer-Encoding", b"chunked"), AUTH]))
        for _ in range(20):
            out += conn.send(h11.Data(data=b"z" * 10_000))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        client = Client(stream)
        client.conn = conn
        resp, body = await client.read_answer()
        import hashlib
        assert resp.status_code == 200 and body == b"ok"
        assert up.requests[-1][1] == f"200000:{hashlib.sha256(b'z' * 200_000).hexdigest()}".encode()


async def test_drain_answers_a_parked_ping_and_stops(tmp_path):
    async def park(req, body):
        await trio.sleep_forever()

    async with upstream(park) as up:
        config = load_config(None, env=_env(f"http://127.0.0.1:{up.port}", tmp_path / "tx.jsonl"))
        gw = Gateway(config, gatekeeper_factory=lambda c: AllowAll())
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.serve)
            dev = await Client.connect(gw.port)
            idle = await Client.connect(gw.port)
            await dev.stream.send_all(dev.conn.send(h11.Request(
                method=b"POST", target=EAS + b"?Cmd=Ping&User=test&DeviceId=A&DeviceType=B",
                headers=[(b"Host", b"gw"), AUTH, (b"Content-Length", b"0")])) + dev.conn.send(h11.EndOfMessage()))
            with trio.fail_after(5):
                while not gw.parking.count:       # the Ping's task ended; the parking lot holds it
                    await trio.sleep(0.01)
            gw.drain()
            with trio.fail_after(5):
                resp, body = await dev.read_answer()
            assert resp.status_code == 200 and body == ping.HEARTBEAT_EXPIRED
            assert dict(resp.headers)[b"connection"] == b"close"
            with pytest.raises((EOFError, trio.BrokenResourceError, h11.RemoteProtocolError)):
                await idle.request(b"POST", EAS + QUERY, [AUTH], b"x")
        # serve() returned on its own: the nursery closed without being cancelled.
        assert gw.active == 0


def test_heartbeat_expired_answer_is_a_ping_status_1():
    # Independent oracle: libwbxml reads the canned answer as Ping/Status 1.
    import shutil
    if not shutil.which("wbxml2xml"):
        pytest.skip("libwbxml2-utils not installed")
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "p.wbxml")
        with open(src, "wb") as f:
            f.write(ping.HEARTBEAT_EXPIRED)
        out = subprocess.run(["wbxml2xml", "-l", "ACTIVESYNC", "-o", "-", src], capture_output=True, text=True)
        xml = out.stdout or open(os.path.join(d, "p.xml")).read() if os.path.exists(os.path.join(d, "p.xml")) else out.stdout
    assert "<Ping" in xml and "<Status>1</Status>" in xml.replace(" ", "").replace("\n", "")


async def test_tls_on_both_legs_with_trustme(tmp_path):
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    device_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(device_tls)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    # An https mail server with a cert from the same CA.
    up_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(up_ctx)
    up = MiniUpstream(_by_fixture)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_ssl_over_tcp_listeners(0, up_ctx, host="127.0.0.1")
        port = listeners[0].transport_listener.socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, up._conn, listeners)
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        async with gateway(f"https://localhost:{port}", tmp_path, tls=device_tls,
                           upstream_ca_file=str(ca_file)) as gw:
            dev = await Client.connect(gw.port, ssl_context=client_ctx)
            resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 200 and body == fixture_answer("fsync")[2]
            assert dict(up.requests[-1][0].headers)[b"x-forwarded-proto"] == b"https"
            # TLS 1.1 is refused on the device leg.
            old = ssl.create_default_context(cafile=str(ca_file))
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.minimum_version = ssl.TLSVersion.TLSv1
            with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
                bad = await Client.connect(gw.port, ssl_context=old)
                await bad.request(b"POST", EAS + QUERY, [AUTH], b"x")
        # Without the CA the mail server's certificate is refused: 503 ...
        async with gateway(f"https://localhost:{port}", tmp_path, tls=device_tls) as gw:
            dev = await Client.connect(gw.port, ssl_context=client_ctx)
            resp, _ = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 503
        # ... unless "ignore SSL errors" is on.
        async with gateway(f"https://localhost:{port}", tmp_path, tls=device_tls,
                           upstream_verify_tls="false") as gw:
            dev = await Client.connect(gw.port, ssl_context=client_ctx)
            resp, _ = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 200
        nursery.cancel_scope.cancel()


async def test_outbound_connect_proxy_with_basic_credentials(tmp_path):
    tunnels = []

    async def proxy_conn(stream):
        conn = h11.Connection(h11.SERVER)
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
                continue
            break
        auth = dict(ev.headers).get(b"proxy-authorization")
        tunnels.append((ev.method, ev.target, auth))
        if auth != b"Basic " + base64.b64encode(b"pxuser:px pw"):
            await stream.send_all(conn.send(h11.Response(status_code=407, headers=[(b"Content-Length", b"0")])))
            return
        host, port = ev.target.decode().rsplit(":", 1)
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))
        target = await trio.open_tcp_stream(host, int(port))

        async def pipe(a, b):
            try:
                while data := await a.receive_some(65536):
                    await b.send_all(data)
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as n:
            n.start_soon(pipe, stream, target)
            n.start_soon(pipe, target, stream)

    async with upstream(_by_fixture) as up, trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        pport = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, proxy_conn, listeners)
        async with gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                           upstream_proxy_url=f"http://pxuser:px%20pw@127.0.0.1:{pport}") as gw:
            dev = await Client.connect(gw.port)
            resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 200 and body == fixture_answer("fsync")[2]
        assert tunnels[0][:2] == (b"CONNECT", f"127.0.0.1:{up.port}".encode())
        async with gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                           upstream_proxy_url=f"http://pxuser:wrong@127.0.0.1:{pport}") as gw:
            dev = await Client.connect(gw.port)
            resp, _ = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")
            assert resp.status_code == 503
        nursery.cancel_scope.cancel()


async def test_forwarded_headers_behind_a_load_balancer(tmp_path):
    async with upstream(_by_fixture) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                    listener_trusted_proxies='["127.0.0.1/32"]') as gw:
        dev = await Client.connect(gw.port)
        await dev.request(b"POST", EAS + QUERY, [AUTH, (b"X-Forwarded-For", b"203.0.113.7"),
                                                 (b"X-Forwarded-Proto", b"https"), (b"Connection", b"keep-alive, X-Drop"),
                                                 (b"X-Drop", b"1"), (b"Keep-Alive", b"timeout=5")], b"x")
        h = dict(up.requests[-1][0].headers)
        assert h[b"x-forwarded-for"] == b"203.0.113.7, 127.0.0.1" and h[b"x-forwarded-proto"] == b"https"
        assert b"x-drop" not in h and b"keep-alive" not in h


async def test_reload_swaps_upstream_without_dropping_the_connection(tmp_path):
    async with upstream(lambda r, b: (200, [(b"Content-Length", b"1")], b"A")) as a, \
            upstream(lambda r, b: (200, [(b"Content-Length", b"1")], b"B")) as b_, \
            gateway(f"http://127.0.0.1:{a.port}", tmp_path) as gw:
        dev = await Client.connect(gw.port)
        assert (await dev.request(b"POST", EAS + QUERY, [AUTH], b"x"))[1] == b"A"
        await gw.reload(load_config(None, env=_env(f"http://127.0.0.1:{b_.port}", tmp_path / "tx.jsonl")))
        assert (await dev.request(b"POST", EAS + QUERY, [AUTH], b"x"))[1] == b"B"


def test_ping_deadline_uses_cached_heartbeat():
    class GW:
        heartbeats = {}
        config = load_config(None, env={})

    class R:
        user, device_id = "u", "d"

    # No codec answer (empty body): the configured default, then a cached value wins.
    assert ping.upstream_deadline(GW, R, b"") == 3540 + 60
    GW.heartbeats[("u", "d")] = 900
    assert ping.upstream_deadline(GW, R, b"") == 960


def test_heartbeat_read_from_a_ping_built_by_libwbxml(tmp_path):
    import shutil
    if not shutil.which("xml2wbxml"):
        pytest.skip("libwbxml2-utils not installed")
    xml = tmp_path / "ping.xml"
    xml.write_text('<?xml version="1.0"?>\n<!DOCTYPE ActiveSync PUBLIC "-//MICROSOFT//DTD ActiveSync//EN" '
                   '"http://www.microsoft.com/">\n<Ping xmlns="Ping:"><HeartbeatInterval>900</HeartbeatInterval>'
                   '<Folders><Folder><Id>1</Id><Class>Email</Class></Folder></Folders></Ping>\n')
    out = tmp_path / "ping.wbxml"
    subprocess.run(["xml2wbxml", "-a", "-n", "-v", "1.3", "-o", str(out), str(xml)], check=True,
                   capture_output=True)
    body = out.read_bytes()
    assert ping.heartbeat_of(body) == 900
    assert ping.heartbeat_of(body[:-3]) is None            # truncated: no crash, no value

    class GW:
        heartbeats = {}
        config = load_config(None, env={})

    class R:
        user, device_id = "u", "dev1"

    assert ping.upstream_deadline(GW, R, body) == 960
    assert ping.upstream_deadline(GW, R, b"") == 960          # an empty Ping reuses the cached beat


async def _send_ping(dev: Client, device="A"):
    await dev.stream.send_all(dev.conn.send(h11.Request(
        method=b"POST", target=EAS + b"?Cmd=Ping&User=test&DeviceId=" + device.encode() + b"&DeviceType=B",
        headers=[(b"Host", b"gw"), AUTH, (b"Content-Length", b"0")])) + dev.conn.send(h11.EndOfMessage()))


async def test_parked_ping_past_its_deadline_gets_503_and_the_connection_goes_on(tmp_path):
    async def handler(req, body):
        if b"Cmd=Ping" in req.target:
            await trio.sleep_forever()
        return fixture_answer("fsync")

    async with upstream(handler) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                 timeouts_ping_margin="0.3",
                                                 timeouts_ping_default_heartbeat="0.2") as gw:
        dev = await Client.connect(gw.port)
        await _send_ping(dev)
        with trio.fail_after(5):
            resp, _ = await dev.read_answer()
        assert resp.status_code == 503 and gw.parking.count == 0
        resp, body = await dev.request(b"POST", EAS + QUERY, [AUTH], b"x")      # same connection
        assert resp.status_code == 200 and body == fixture_answer("fsync")[2]


async def test_device_leaving_a_parked_ping_frees_both_connections(tmp_path):
    async def park(req, body):
        await trio.sleep_forever()

    async with upstream(park) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path) as gw:
        devs = [await Client.connect(gw.port) for _ in range(20)]
        for i, d in enumerate(devs):
            await _send_ping(d, f"D{i}")
        with trio.fail_after(5):
            while gw.parking.count < 20:
                await trio.sleep(0.01)
        assert gw.active == 20
        for d in devs[:15]:
            await d.aclose()
        with trio.fail_after(5):
            while gw.parking.count > 5 or gw.active > 5:
                await trio.sleep(0.01)
        gw.log.flush()
    lines = [json.loads(x) for x in (tmp_path / "tx.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x["status"] == 499 and x["command"] == "Ping") == 15


async def test_pool_size_caps_mail_server_connections(tmp_path):
    release = trio.Event()

    async def slow(req, body):
        await release.wait()
        return 200, [(b"Content-Length", b"2")], b"ok"

    async with upstream(slow) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path, upstream_pool_size="2") as gw:
        results = []

        async def one():
            dev = await Client.connect(gw.port)
            results.append((await dev.request(b"POST", EAS + QUERY, [AUTH], b"x"))[0].status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(one)
            with trio.fail_after(5):
                while gw.pool.open < 2:
                    await trio.sleep(0.01)
            await one()                                  # a third at once: no connection left
            assert results == [503]
            release.set()
        assert sorted(results) == [200, 200, 503] and gw.pool.open == 2   # both kept alive for reuse


async def _closed_within(stream, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        try:
            while await stream.receive_some(1000):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_request_head_and_idle_timeouts_close_stalled_devices(tmp_path):
    async with upstream(_by_fixture) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path,
                                                     timeouts_request_head="0.3",
                                                     timeouts_idle_keepalive="0.5") as gw:
        stalled = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await stalled.send_all(b"POST /Microsoft-Server-ActiveSync?Cmd=Sync HTTP/1.1\r\nHost: x\r\n")
        idle = await trio.open_tcp_stream("127.0.0.1", gw.port)
        assert await _closed_within(stalled, 10)
        assert await _closed_within(idle, 10)
        with trio.fail_after(10):
            while gw.active:
                await trio.sleep(0.01)


async def test_tls_handshake_timeout(tmp_path):
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    async with upstream(_by_fixture) as up, gateway(f"http://127.0.0.1:{up.port}", tmp_path, tls=ctx,
                                                     timeouts_tls_handshake="0.3") as gw:
        silent = await trio.open_tcp_stream("127.0.0.1", gw.port)    # never says ClientHello
        assert await _closed_within(silent, 10)
        with trio.fail_after(10):
            while gw.active:
                await trio.sleep(0.01)


async def test_parked_ping_woken_early_waits_for_its_real_answer(tmp_path):
    # The mail-server socket turns readable before the answer (here a 1xx; with TLS 1.3 a
    # session ticket does the same): the Ping must still get its answer, not an upstream_read 503.
    async def server(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 102 Processing\r\n\r\n")
        await trio.sleep(1.0)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, server, listeners)
        async with gateway(f"http://127.0.0.1:{port}", tmp_path, timeouts_upstream_read="0.2",
                           timeouts_ping_default_heartbeat="5") as gw:
            dev = await Client.connect(gw.port)
            await _send_ping(dev)
            with trio.fail_after(5):
                resp, body = await dev.read_answer()
            assert resp.status_code == 200 and body == b"ok"
        nursery.cancel_scope.cancel()


# -- sockio: ready reads and writes skip the scheduler; deadlines without a scope each -----

from seg_fast.proxy import sockio  # noqa: E402


async def _socket_pair():
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_sockio_send_all_delivers_more_than_the_socket_buffer_holds():
    left, right = await _socket_pair()
    payload = bytes(range(256)) * 20_000                  # 5 MB: the kernel takes it in parts
    got = bytearray()

    async def reader():
        while len(got) < len(payload):
            data = await sockio.receive(right, sockio.plain_socket(right), 65536)
            assert data
            got.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await sockio.send_all(left, sockio.plain_socket(left), payload)
    assert bytes(got) == payload
    await left.aclose()
    assert await sockio.receive(right, sockio.plain_socket(right), 10) == b""        # EOF


async def test_sockio_deadline_is_never_early_and_ends_the_wait():
    left, right = await _socket_pair()
    sock = sockio.plain_socket(right)
    t0 = trio.current_time()
    assert await sockio.receive(right, sock, 100, t0 + 0.2) is None
    waited = trio.current_time() - t0
    assert 0.2 <= waited < 10    # never early; late only by the wheel's tick (and the machine's load)
    # A wait that gets its data before the deadline returns it and leaves nothing behind.
    left2, right2 = await _socket_pair()
    async with trio.open_nursery() as nursery:
        async def later():
            await trio.sleep(0.05)
            await left2.send_all(b"hello")
        nursery.start_soon(later)
        assert await sockio.receive(right2, sockio.plain_socket(right2), 100,
                                    trio.current_time() + 5) == b"hello"
    wheel = sockio._the_wheel()
    assert not wheel.expired and not any(wheel.slots.values())
    for s in (left, right, left2, right2):
        await s.aclose()


async def test_sockio_many_deadlines_expire_in_order(autojump_clock):
    # trio's autojump clock: time moves only when every task waits, so a loaded
    # machine cannot merge two deadlines into one late tick and the order is exact.
    pairs = [await _socket_pair() for _ in range(6)]
    ended = {}
    order = []

    async def wait(i, stream):
        assert await sockio.receive(stream, sockio.plain_socket(stream), 10,
                                    trio.current_time() + 0.1 * (i + 1)) is None
        ended[i] = trio.current_time()
        order.append(i)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        # started latest deadline first, so the order cannot come from start order
        for i, (_, right) in reversed(list(enumerate(pairs))):
            nursery.start_soon(wait, i, right)
    # Every wait ended, in deadline order, none early and none more than a tick late.
    assert order == list(range(6))
    assert all(0.1 * (i + 1) <= ended[i] - t0 <= 0.1 * (i + 1) + sockio._Wheel.TICK for i in ended)


async def test_sockio_waits_that_end_early_do_not_wake_the_wheel(autojump_clock):
    """Waits answered before their deadlines leave no wait behind, never move the wheel's
    sleep, and wake it at most once for the lot (it once woke at every slot a wait had ever
    used, a Cancelled through trio each); the one wait whose deadline passes still ends, once."""
    wheel = sockio._the_wheel()
    pairs = [await _socket_pair() for _ in range(8)]
    t0 = trio.current_time()
    before, rearms = wheel.wakeups, wheel.rearms

    async def answered(i, left, right):
        async def later():
            await trio.sleep(0.01 * (i + 1))
            await left.send_all(b"x")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            # deadlines in eight different slots, each answered long before it
            assert await sockio.receive(right, sockio.plain_socket(right), 10, t0 + 1 + 0.2 * i) == b"x"

    async with trio.open_nursery() as nursery:
        for i, (left, right) in enumerate(pairs[:-1]):
            nursery.start_soon(answered, i, left, right)
            await trio.testing.wait_all_tasks_blocked()      # filed in deadline order
    assert not any(wheel.slots.values())
    assert wheel.rearms == rearms        # each was filed after the first: the sleep never moved
    await trio.sleep(3)                  # past every deadline those waits had
    assert wheel.wakeups <= before + 1 and not wheel.heap and not wheel.slots
    _, right = pairs[-1]
    woken = wheel.wakeups
    assert await sockio.receive(right, sockio.plain_socket(right), 10, trio.current_time() + 0.5) is None
    assert wheel.wakeups == woken + 1
    for pair in pairs:
        for s in pair:
            await s.aclose()


async def test_sockio_a_wait_behind_an_emptied_slot_expires_on_time(autojump_clock):
    """The wheel sleeps until the first wait's slot; that wait is answered and the sleep
    stays. It wakes there, finds nothing due, and still ends the later wait on time."""
    wheel = sockio._the_wheel()
    (a_left, a_right), (_, b_right) = await _socket_pair(), await _socket_pair()
    t0 = trio.current_time()
    ended = {}

    async def answered():
        assert await sockio.receive(a_right, sockio.plain_socket(a_right), 10, t0 + 1) == b"x"

    async def unanswered():
        assert await sockio.receive(b_right, sockio.plain_socket(b_right), 10, t0 + 2) is None
        ended["b"] = trio.current_time()

    before = wheel.wakeups
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answered)
        nursery.start_soon(unanswered)
        await trio.sleep(0.1)
        await a_left.send_all(b"x")
    assert 2 <= ended["b"] - t0 <= 2 + sockio._Wheel.TICK
    assert wheel.wakeups - before <= 2        # the emptied slot's time, then the wait's own
    for s in (a_left, a_right, b_right):
        await s.aclose()


async def test_sockio_idle_wait_is_ended_by_cancel():
    left, right = await _socket_pair()
    sock = sockio.plain_socket(right)
    wait = sockio.IdleWait(sock)
    async with trio.open_nursery() as nursery:
        async def drain():
            await trio.sleep(0.05)
            wait.cancel()
        nursery.start_soon(drain)
        with pytest.raises(trio.ClosedResourceError):
            await sockio.wait_plain(sock, 10, trio.current_time() + 30)


async def test_sockio_ready_operations_still_let_other_tasks_run():
    left, right = await _socket_pair()
    ticks = 0

    async def other():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.sleep(0)
        before = ticks
        sock = sockio.plain_socket(left)
        for _ in range(4 * sockio.FAIR_EVERY):          # every one of these is ready at once
            await sockio.send_all(left, sock, b"x")
        assert ticks - before >= 3
        nursery.cancel_scope.cancel()


async def test_sockio_send_parts_keeps_order_past_a_partial_write():
    left, right = await _socket_pair()
    parts = [b"head\r\n", bytearray(b"a" * 3_000_000), b"", bytes(range(256)) * 4000, b"end"]
    expected = b"".join(parts)
    got = bytearray()

    async def reader():
        while len(got) < len(expected):
            got.extend(await right.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await sockio.send_parts(left, sockio.plain_socket(left), parts)
    assert bytes(got) == expected


def test_header_rewriting_on_h11_triples():
    from seg_fast.proxy import headers as hdrs
    device = h11.Connection(h11.SERVER)
    device.receive_data(b"POST /x HTTP/1.1\r\nHost: gw\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\n"
                        b"X-Forwarded-For: 10.0.0.9\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n"
                        b"User-Agent: Apple-iPhone\r\n\r\n")
    full = hdrs.items(device.next_event().headers)
    streamed = hdrs.pairs(hdrs.upstream_request_headers(full, host=b"mail:8080", client_ip="10.0.0.1",
                                                          proto=b"https", behind_proxy=True))
    assert streamed == [(b"Host", b"mail:8080"), (b"User-Agent", b"Apple-iPhone"),
                        (b"X-Forwarded-For", b"10.0.0.9, 10.0.0.1"), (b"X-Forwarded-Proto", b"https"),
                        (b"Transfer-Encoding", b"chunked")]
    whole = hdrs.upstream_request_headers(full, host=b"mail", client_ip="10.0.0.1", proto=b"http",
                                          behind_proxy=False, framing=hdrs.content_length(12))
    assert hdrs.pairs(whole)[-3:] == [(b"X-Forwarded-For", b"10.0.0.1"), (b"X-Forwarded-Proto", b"http"),
                                      (b"Content-Length", b"12")]
    # What h11 writes from the triples is what its own constructor would write.
    event = hdrs.request_event(b"POST", b"/x", whole)
    assert h11.Connection(h11.CLIENT).send(event) == h11.Connection(h11.CLIENT).send(
        h11.Request(method=b"POST", target=b"/x", headers=hdrs.pairs(whole)))
    answer = hdrs.from_pairs([(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
                              (b"Content-Length", b"2"), (b"X-Ms-Thing", b"1")])
    assert hdrs.pairs(hdrs.answer_headers(answer)) == [(b"Content-Length", b"2"), (b"X-Ms-Thing", b"1")]
