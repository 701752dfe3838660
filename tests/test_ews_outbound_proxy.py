"""EWS and webmail through the ActiveSync outbound proxy (an https:// CONNECT proxy of the
tests' own, tests/test_outbound_proxy.py), end to end through `seg-fast serve`: the
passthrough routes take the upstream pool's way to the mail server, never a way of their own."""
from __future__ import annotations

import trio
import trustme

from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.sim.mailbox import MailboxSimulator
from test_ews_passthrough import request, subscribe_body
from test_outbound_proxy import TlsConnectProxy, until_serving

PASSWORD = "secret"


async def test_ews_and_webmail_reach_the_mail_server_through_the_https_proxy(tmp_path):
    proxy_ca = trustme.CA()
    proxy_ca.cert_pem.write_to_path(str(tmp_path / "proxy-ca.pem"))
    proxy = TlsConnectProxy(proxy_ca, credentials=b"px:pw")
    sim = MailboxSimulator(password=PASSWORD, require_provisioning=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        port = free_port()
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\nexternal_url = "https://mail.example.com"\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'proxy_url = "https://px:pw@localhost:{proxy.port}"\nproxy_ca_file = "{tmp_path}/proxy-ca.pem"\n'
            f'[admin]\nenabled = false\n[log]\ntransactions = ""\n[policy]\nallow_if_no_policies = true\n'
            f'[ews]\nenabled = true\nallowed_sources = ["127.0.0.1"]\n[webmail]\nenabled = true\n')
        proc = start_serve(cfg, tmp_path)
        try:
            await until_serving(proc, port)
            auth = "Basic amRvZTpzZWNyZXQ="          # jdoe:secret
            with trio.fail_after(30):
                status, _, body = await trio.to_thread.run_sync(
                    lambda: request(port, "POST", "/EWS/Exchange.asmx", {"Authorization": auth}, subscribe_body()))
                assert status == 200 and b"NoError" in body
                status, hdrs, _ = await trio.to_thread.run_sync(lambda: request(port, "GET", "/owa/"))
                assert status == 302 and hdrs["location"][0].startswith("https://mail.example.com/owa/auth/")
            # Both went through the proxy's tunnel (TLS to the proxy, then CONNECT to the mail server).
            assert proxy.targets and set(proxy.targets) == {f"127.0.0.1:{sim.port}"}
            assert proxy.handshakes >= 1 and proxy.refused == 0
            assert [e["target"] for e in sim.web.log] == ["/EWS/Exchange.asmx", "/owa/"]
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()
