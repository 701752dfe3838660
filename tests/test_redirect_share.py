"""451/302 mappings live in the policy store: a redirect learned by one worker (or node)
sends the user to the new mail server from every other within a second, survives a
restart, and is listed by the admin CSV download. Two gateways over real loopback
sockets on one SQLite file, and on one real redis-server."""
from __future__ import annotations

import base64
import uuid
from contextlib import asynccontextmanager

import pytest
import trio

from proxy_helpers import Client, MiniUpstream, fixture_answer
from redis_server import running_redis
from seg_fast.admin.api import AdminApi
from seg_fast.config import Config, load_config
from seg_fast.policy.gate import PolicyGatekeeper
from seg_fast.policy.settings import PolicySettings
from seg_fast.proxy.gateway import Gateway

EAS = b"/Microsoft-Server-ActiveSync"


async def sync(dev, user: str):
    auth = (b"Authorization", b"Basic " + base64.b64encode(f"{user}:secret".encode()))
    target = EAS + f"?Cmd=FolderSync&User={user}&DeviceId=ABC123&DeviceType=SmartPhone".encode()
    resp, _ = await dev.request(b"POST", target, [auth], b"x")
    return resp


@pytest.fixture(params=["sqlite", "redis"])
def policy(request, tmp_path):
    if request.param == "sqlite":
        yield PolicySettings(sqlite_path=str(tmp_path / "p.db"), allow_if_no_policies=True)
    else:
        with running_redis(tmp_path) as url:
            yield PolicySettings(store="redis", redis_url=url, redis_prefix=f"t{uuid.uuid4().hex[:8]}:",
                                 allow_if_no_policies=True)


@asynccontextmanager
async def gateway(nursery, upstream_url: str, tmp_path, policy: PolicySettings):
    config = load_config(None, env={"SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0",
                                    "SEG_FAST_UPSTREAM_URL": upstream_url, "SEG_FAST_LOG_TRANSACTIONS": "",
                                    "SEG_FAST_LISTENER_EXTERNAL_URL": "https://gw.example"})
    gw = Gateway(config, gatekeeper_factory=lambda c: PolicyGatekeeper(policy))
    async with trio.open_nursery() as n:
        await n.start(gw.serve)
        yield gw
        n.cancel_scope.cancel()


async def until(check) -> None:
    """Poll ``check`` (generously bounded): the mappings travel through the store."""
    with trio.fail_after(20):
        while not await check():
            await trio.sleep(0.02)


async def test_redirect_reaches_every_worker_and_the_admin_csv(policy, tmp_path):
    state = {"b_sends_back": False}
    async with trio.open_nursery() as nursery:
        a_url = "http://127.0.0.1:{}/Microsoft-Server-ActiveSync"
        a = MiniUpstream(lambda req, body: (451, [(b"X-MS-Location", b_url.encode()), (b"Content-Length", b"0")], b""))
        await nursery.start(a.serve)

        def b_handler(req, body):
            if state["b_sends_back"]:
                return 451, [(b"X-MS-Location", a_url.format(a.port).encode()), (b"Content-Length", b"0")], b""
            return fixture_answer("fsync")
        b = MiniUpstream(b_handler)
        await nursery.start(b.serve)
        b_url = f"http://127.0.0.1:{b.port}/Microsoft-Server-ActiveSync"

        async with gateway(nursery, f"http://127.0.0.1:{a.port}", tmp_path, policy) as gw1, \
                gateway(nursery, f"http://127.0.0.1:{a.port}", tmp_path, policy) as gw2:
            dev1, dev2 = await Client.connect(gw1.port), await Client.connect(gw2.port)
            resp = await sync(dev1, "test")
            assert resp.status_code == 451 and len(a.requests) == 1
            # The worker that saw it forwards the user at once.
            resp = await sync(dev1, "test")
            assert resp.status_code == 200 and len(b.requests) == 1

            async def gw2_knows():
                return gw2.gatekeeper.redirects.get("test") == b_url
            await until(gw2_knows)
            # The other worker (or node) forwards the user to the new server too...
            resp = await sync(dev2, "TEST")
            assert resp.status_code == 200 and len(b.requests) == 2 and len(a.requests) == 1
            # ...and another user still goes to the first server.
            resp = await sync(dev2, "someone")
            assert resp.status_code == 451 and len(a.requests) == 2

            # The admin CSV lists the mappings the workers wrote (once gw2 has flushed its own).
            api = AdminApi(Config(policy=policy), gw2.gatekeeper)
            want = ["user,location", f"someone,{b_url}", f"test,{b_url}"]

            async def csv_lists_both():
                status, ctype, csv = await api.handle("GET", "/seg/download/redirect/", b"")
                assert status == 200 and ctype.startswith("text/csv")
                return csv.decode().splitlines() == want
            await until(csv_lists_both)

            # A gateway started now (a restart) knows the mapping from the store.
            async with gateway(nursery, f"http://127.0.0.1:{a.port}", tmp_path, policy) as gw3:
                dev3 = await Client.connect(gw3.port)
                resp = await sync(dev3, "test")
                assert resp.status_code == 200 and len(b.requests) == 3

            # The new server sends the user back to the default one: undone everywhere.
            state["b_sends_back"] = True
            resp = await sync(dev2, "test")
            assert resp.status_code == 451 and len(b.requests) == 4

            async def gw1_forgot():
                return "test" not in gw1.gatekeeper.redirects
            await until(gw1_forgot)
            before = len(a.requests)
            resp = await sync(dev1, "test")
            assert len(a.requests) == before + 1 and len(b.requests) == 4
            status, _, csv = await api.handle("GET", "/seg/download/redirect/", b"")
            assert csv.decode().splitlines() == ["user,location", f"someone,{b_url}"]
        nursery.cancel_scope.cancel()
