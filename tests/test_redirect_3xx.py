"""Every 3xx (and 451) the mail server answers an ActiveSync request with sends the device
back to the gateway: Domino's 301 from /servlet/traveler to /traveler, a 307/308 to the
mailbox server (or to TLS), an Exchange 302. The device never sees an internal host name;
the gateway remembers the user's server and forwards its later requests there.

Unit tests cover RedirectMap.rewrite's rule; the end-to-end tests run `seg-fast serve` in
front of a front of the test's own (301 / 307 / 308) and `seg-fast sim` as the mailbox server.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

import h11
import pytest
import trio

from redis_server import free_port
from seg_fast.eas.request import EasRequest
from seg_fast.proxy import headers as hdrs
from seg_fast.proxy.redirects import RedirectMap, is_redirect
from seg_fast.proxy.upstream import origin_of
from seg_fast.sim.client import EasClient
from seg_fast.sim.tree import text
from processes import start_serve, stop_process
from test_traveler import PASSWORD, folder_sync, start_sim

EXTERNAL = "https://seg.example.com"
REQ = EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", user="alice")


def _location(status, value: bytes):
    return hdrs.from_pairs([(b"X-MS-Location" if status == 451 else b"Location", value), (b"Content-Length", b"0")])


def test_which_statuses_are_redirects():
    assert [s for s in (200, 204, 300, 301, 302, 303, 304, 307, 308, 399, 400, 401, 451, 503) if is_redirect(s)] == \
        [300, 301, 302, 303, 307, 308, 399, 451]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 451])
def test_every_redirect_to_another_server_points_at_the_gateway(status):
    rm = RedirectMap(origin_of("http://mbx1.corp"), EXTERNAL + "/")
    out, headers, _ = rm.rewrite(REQ, status, _location(status, b"https://mbx2.corp:444/Microsoft-Server-ActiveSync?a=1"), b"")
    got = dict(hdrs.pairs(headers))
    assert out == status
    assert got[b"X-MS-Location" if status == 451 else b"Location"] == \
        f"{EXTERNAL}/Microsoft-Server-ActiveSync?a=1".encode()
    origin = rm.origin_for("ALICE")
    assert (origin.scheme, origin.host, origin.port) == ("https", "mbx2.corp", 444)


def test_a_redirect_to_the_same_server_names_the_gateway_and_maps_nobody():
    rm = RedirectMap(origin_of("http://mbx1.corp"), EXTERNAL)
    rm.by_user["alice"] = origin_of("http://old.corp")          # learned earlier: the server moved back
    _, headers, _ = rm.rewrite(REQ, 301, _location(301, b"http://MBX1.corp/traveler"), b"")
    assert dict(hdrs.pairs(headers))[b"Location"] == f"{EXTERNAL}/traveler".encode()
    assert rm.origin_for("alice") == rm.default and not rm.by_user


def test_a_scheme_relative_location_is_rewritten_too():
    rm = RedirectMap(origin_of("https://mbx1.corp"), EXTERNAL)
    _, headers, _ = rm.rewrite(REQ, 308, _location(308, b"//mbx7.corp/traveler"), b"")
    assert dict(hdrs.pairs(headers))[b"Location"] == f"{EXTERNAL}/traveler".encode()
    assert rm.origin_for("alice") == origin_of("https://mbx7.corp")


@pytest.mark.parametrize("value", [b"/traveler?x=1", b"traveler", b"ftp://mbx2.corp/x", "/caf\u00e9".encode()])
def test_a_relative_or_foreign_scheme_location_passes_as_it_is(value):
    rm = RedirectMap(origin_of("http://mbx1.corp"), EXTERNAL)
    out, headers, _ = rm.rewrite(REQ, 301, _location(301, value), b"")
    assert out == 301 and dict(hdrs.pairs(headers))[b"Location"] == value and not rm.by_user


def test_without_an_external_url_a_path_change_gets_a_relative_location():
    rm = RedirectMap(origin_of("http://mbx1.corp"))
    out, headers, _ = rm.rewrite(EasRequest(method="POST", path="/servlet/traveler", user="alice"), 301,
                                 _location(301, b"http://mbx1.corp/traveler?x=1"), b"")
    assert out == 301 and dict(hdrs.pairs(headers))[b"Location"] == b"/traveler?x=1"
    # The same path: a retry where the device is (503, no Location), the mapping in force.
    out, headers, _ = rm.rewrite(REQ, 307, _location(307, b"http://mbx2.corp/Microsoft-Server-ActiveSync"), b"")
    assert out == 503 and dict(hdrs.pairs(headers)) == {b"Content-Length": b"0", b"Retry-After": b"1"}
    assert rm.origin_for("alice").host == "mbx2.corp"


class Front:
    """A Domino-like front: 401 without credentials; /servlet/traveler moved (301) to
    /traveler on itself, naming its own internal address; /traveler sent on (``status``)
    to the mailbox server."""

    def __init__(self, status: int, backend: str):
        self.status, self.backend = status, backend
        self.seen: list[tuple[str, str]] = []
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._conn, listeners)

    def _answer(self, req: h11.Request):
        target = req.target.decode()
        path, _, query = target.partition("?")
        if not any(k == b"authorization" for k, _ in req.headers):
            return 401, [(b"WWW-Authenticate", b'Basic realm="Traveler"')]
        if path == "/servlet/traveler":
            return 301, [(b"Location", f"http://127.0.0.1:{self.port}/traveler{'?' + query if query else ''}".encode())]
        return self.status, [(b"Location", f"{self.backend}{target}".encode())]

    async def _conn(self, stream):
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = None
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                self.seen.append((req.method.decode(), req.target.decode()))
                status, headers = self._answer(req)
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers + [
                    (b"Content-Length", b"0")])) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def site(tmp_path, status: int, external: str):
    sim, sim_port = start_sim("/traveler")
    front = Front(status, f"http://127.0.0.1:{sim_port}")
    gw_port = free_port()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(front.serve)
            cfg = tmp_path / "gw.toml"
            cfg.write_text(
                f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
                + (f'external_url = "{external}"\n' if external else "")
                + f'[upstream]\nurl = "http://127.0.0.1:{front.port}"\n'
                f'[eas]\npaths = ["/servlet/traveler", "/traveler"]\n'
                f'[admin]\nenabled = false\n[log]\ntransactions = ""\n[policy]\nallow_if_no_policies = true\n')
            gw = start_serve(cfg, tmp_path)
            try:
                with trio.fail_after(20):
                    while True:
                        assert gw.poll() is None, gw.stderr.read().decode()[-2000:]
                        try:
                            await (await trio.open_tcp_stream("127.0.0.1", gw_port)).aclose()
                            break
                        except OSError:
                            await trio.sleep(0.1)
                yield gw_port, sim_port, front
            finally:
                stop_process(gw)
                nursery.cancel_scope.cancel()
    finally:
        sim.terminate()
        sim.wait(10)


@pytest.mark.parametrize("status", [307, 308])
async def test_domino_moves_then_the_mailbox_server_through_serve(tmp_path, status):
    async with site(tmp_path, status, EXTERNAL) as (gw_port, sim_port, front):
        with trio.fail_after(30):
            old = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "PHONE1", path="/servlet/traveler")
            # Domino's 301 names its own internal address: the device is told the gateway's.
            r = await old.request("", method="OPTIONS")
            assert r.status == 301 and r.headers["location"] == f"{EXTERNAL}/traveler"
            assert f":{front.port}" not in str(r.headers)
            await old.aclose()
            dev = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "PHONE1", path="/traveler")
            # The front sends jdoe on to the mailbox server (307/308): again the gateway's URL.
            r = await dev.request("", method="OPTIONS")
            assert r.status == status and r.headers["location"].startswith(f"{EXTERNAL}/traveler")
            assert str(sim_port) not in str(r.headers)
            seen = len(front.seen)
            # Followed: answered by the mailbox server through the gateway, the front not asked again.
            r = await dev.request("", method="OPTIONS")
            assert r.status == 200 and "14.1" in r.headers["ms-asprotocolversions"].split(",")
            await dev.provision()
            r = await dev.request("FolderSync", folder_sync())
            assert text(r.doc, "FolderHierarchy:Status") == "1"
            await dev.aclose()
            assert len(front.seen) == seen


async def test_without_an_external_url_through_serve(tmp_path):
    async with site(tmp_path, 307, "") as (gw_port, sim_port, front):
        with trio.fail_after(30):
            old = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "PHONE1", path="/servlet/traveler")
            r = await old.request("", method="OPTIONS")
            # No external name: the new path alone, no host at all.
            assert r.status == 301 and r.headers["location"] == "/traveler"
            await old.aclose()
            dev = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "PHONE1", path="/traveler")
            r = await dev.request("", method="OPTIONS")
            assert r.status == 503 and r.headers["retry-after"] == "1" and "location" not in r.headers
            r = await dev.request("", method="OPTIONS")
            assert r.status == 200 and "14.1" in r.headers["ms-asprotocolversions"].split(",")
            await dev.aclose()
