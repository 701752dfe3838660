"""The policy API source against a small trio + h11 JSON server (plain and TLS)."""
from __future__ import annotations

import json

import pytest
import trio
import trustme

from http_client import JsonServer
from redis_server import free_port
from seg_fast.errors import PolicyError
from seg_fast.policy.settings import PolicySettings
from seg_fast.policy.source import PolicySource, SourceError, META_TOKEN
from seg_fast.policy.store import SqliteStore

SNAPSHOT = {"token": "t1", "policies": {"managed": {"compromised": True}},
            "devices": [{"device_id": "A", "managed": True}, {"device_id": "B", "managed": True}]}
DELTA = {"token": "t2", "devices": [{"device_id": "A", "managed": True, "compromised": True}], "removed": ["B"]}


def api(routes, **kw):
    return JsonServer({k: (v[0], json.dumps(v[1]).encode() if not isinstance(v[1], bytes) else v[1])
                       if isinstance(v, tuple) else v for k, v in routes.items()})


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "p.db")
    await s.open()
    yield s
    await s.aclose()


async def test_full_then_delta(store, nursery):
    srv = api({"/api/snapshot": (200, SNAPSHOT), "/api/changes": (200, DELTA)})
    port = await nursery.start(srv.serve)
    src = PolicySource(PolicySettings(api_url=f"http://127.0.0.1:{port}/api", api_token="sekrit"), store)
    await src.pull_once()
    snap = await store.snapshot()
    assert snap.document.managed.compromised and {d.device_id for d in snap.devices} == {"A", "B"}
    assert await store.get_meta(META_TOKEN) == "t1"
    await src.pull_once()
    snap = await store.snapshot()
    assert [(d.device_id, d.compromised) for d in snap.devices] == [("A", True)]
    assert await store.get_meta(META_TOKEN) == "t2"
    assert [p for p, _ in srv.seen] == ["/api/snapshot", "/api/changes?since=t1"]
    assert all(h["authorization"] == "Bearer sekrit" for _, h in srv.seen)


async def test_api_down_keeps_last_snapshot(store):
    await store.replace_all(None, [])
    src = PolicySource(PolicySettings(api_url=f"http://127.0.0.1:{free_port()}/api", api_timeout=2), store)
    before = await store.version()
    with pytest.raises(SourceError, match="cannot connect"):
        await src.pull_once()
    assert await store.version() == before


@pytest.mark.parametrize("answer,match", [
    ((200, {"token": "x", "policies": {"general": {"user": 5}}}), "policies.general.user"),
    ((200, b"{not json"), "not valid JSON"),
    ((200, {"token": "x", "devices": [{"device_id": "A"}, {"managed": True}]}), "device_id"),
    ((500, {}), "HTTP 500"),
])
async def test_bad_answers_rejected_whole(store, nursery, answer, match):
    await store.replace_all(None, [])
    srv = api({"/snapshot": answer})
    port = await nursery.start(srv.serve)
    src = PolicySource(PolicySettings(api_url=f"http://127.0.0.1:{port}"), store)
    before = await store.version()
    with pytest.raises((PolicyError, SourceError), match=match):
        await src.pull_once()
    assert await store.version() == before


async def test_expired_token_means_full_pull(store, nursery):
    srv = api({"/snapshot": (200, SNAPSHOT), "/changes": (410, {})})
    port = await nursery.start(srv.serve)
    await store.set_meta(META_TOKEN, "old")
    src = PolicySource(PolicySettings(api_url=f"http://127.0.0.1:{port}"), store)
    await src.pull_once()
    assert [p for p, _ in srv.seen] == ["/changes?since=old", "/snapshot"]
    assert len((await store.snapshot()).devices) == 2


async def test_tls_trust(store, nursery, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    srv = api({"/snapshot": (200, SNAPSHOT)})
    port = await nursery.start(lambda task_status: srv.serve(ssl_context=ctx, task_status=task_status))
    url = f"https://127.0.0.1:{port}"
    with pytest.raises(SourceError):       # not trusted by default
        await PolicySource(PolicySettings(api_url=url), store).pull_once()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    await PolicySource(PolicySettings(api_url=url, api_ca_file=str(ca_file)), store).pull_once()
    assert len((await store.snapshot()).devices) == 2


async def test_run_loop_retries_and_keeps_serving(store, nursery):
    calls = []

    def snapshot(path, headers):
        calls.append(path)
        return (503, b"{}") if len(calls) == 1 else (200, json.dumps(SNAPSHOT).encode())
    srv = JsonServer({"/snapshot": snapshot, "/changes": (200, json.dumps(DELTA).encode())})
    port = await nursery.start(srv.serve)
    src = PolicySource(PolicySettings(api_url=f"http://127.0.0.1:{port}", delta_interval=0.6), store)
    src.retry_after_error = 0.2
    await nursery.start(src.run)
    with trio.fail_after(5):
        while not src.last_error:
            await trio.sleep(0.01)
    assert "HTTP 503" in src.last_error and (await store.snapshot()).document is None
    with trio.fail_after(5):             # retried sooner than delta_interval
        while (await store.snapshot()).document is None:
            await trio.sleep(0.02)
    with trio.fail_after(5):
        while not srv.seen or not srv.seen[-1][0].startswith("/changes"):
            await trio.sleep(0.02)
    assert calls == ["/snapshot", "/snapshot"] and srv.seen[-1][0] == "/changes?since=t1"


async def test_through_an_outbound_connect_proxy(store, nursery):
    """The API is reached through an HTTP CONNECT proxy with Basic credentials."""
    import base64

    srv = api({"/snapshot": (200, SNAPSHOT)})
    api_port = await nursery.start(srv.serve)
    tunnels = []

    async def proxy_conn(stream):
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        lines = head.split(b"\r\n")
        auth = [l for l in lines if l.lower().startswith(b"proxy-authorization:")]
        want = b"Basic " + base64.b64encode(b"px:pw")
        if not lines[0].startswith(b"CONNECT ") or not auth or auth[0].split(b":", 1)[1].strip() != want:
            await stream.send_all(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
            await stream.aclose()
            return
        target = lines[0].split()[1].decode()
        tunnels.append(target)
        host, port = target.rsplit(":", 1)
        up = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(a, b):
            try:
                while data := await a.receive_some(65536):
                    await b.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(b)
        async with trio.open_nursery() as n:
            n.start_soon(pipe, stream, up)
            n.start_soon(pipe, up, stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy_port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, proxy_conn, listeners)
    url = f"http://127.0.0.1:{api_port}"
    bad = PolicySettings(api_url=url, api_proxy_url=f"http://px:wrong@127.0.0.1:{proxy_port}")
    with pytest.raises(SourceError, match="407"):
        await PolicySource(bad, store).pull_once()
    good = PolicySettings(api_url=url, api_proxy_url=f"http://px:pw@127.0.0.1:{proxy_port}")
    await PolicySource(good, store).pull_once()
    assert tunnels == [f"127.0.0.1:{api_port}"]
    assert len((await store.snapshot()).devices) == 2
