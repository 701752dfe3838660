"""EWS and webmail take the ActiveSync upstream's way to the mail server, never one of their
own, end to end through `seg-fast serve`: its outbound proxy (an https:// CONNECT proxy of
the tests' own, tests/test_outbound_proxy.py) and its TLS trust (an HTTPS mail server
verified with upstream.ca_file; a name its certificate does not hold refused, 503)."""
from __future__ import annotations

import ssl

import trio
import trustme

from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast.sim.mailbox import MailboxSimulator
from test_ews_passthrough import request, subscribe_body
from test_outbound_proxy import ConnectProxy, until_serving

PASSWORD = "secret"


async def test_ews_and_webmail_reach_the_mail_server_through_the_proxy_and_its_tls_trust(tmp_path):
    proxy_ca, mail_ca = trustme.CA(), trustme.CA()
    proxy_ca.cert_pem.write_to_path(str(tmp_path / "proxy-ca.pem"))
    mail_ca.cert_pem.write_to_path(str(tmp_path / "mail-ca.pem"))
    proxy = ConnectProxy(proxy_ca, credentials=b"px:pw")
    sim_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    mail_ca.issue_cert("127.0.0.1").configure_cert(sim_ctx)     # not "localhost": that name must fail
    sim = MailboxSimulator(password=PASSWORD, require_provisioning=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        await nursery.start(lambda task_status: sim.serve("127.0.0.1", 0, ssl_context=sim_ctx,
                                                          task_status=task_status))
        port = free_port()
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\nexternal_url = "https://mail.example.com"\n'
            f'[upstream]\nurl = "https://127.0.0.1:{sim.port}"\nca_file = "{tmp_path}/mail-ca.pem"\n'
            f'proxy_url = "https://px:pw@localhost:{proxy.port}"\nproxy_ca_file = "{tmp_path}/proxy-ca.pem"\n'
            f'[admin]\nenabled = false\n[log]\ntransactions = ""\n[policy]\nallow_if_no_policies = true\n'
            f'[ews]\nenabled = true\nallowed_sources = ["127.0.0.1"]\n'
            f'[webmail]\nenabled = true\nurl = "https://localhost:{sim.port}"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            await until_serving(proc, port)
            auth = "Basic amRvZTpzZWNyZXQ="          # jdoe:secret
            with trio.fail_after(30):
                status, _, body = await trio.to_thread.run_sync(
                    lambda: request(port, "POST", "/EWS/Exchange.asmx", {"Authorization": auth}, subscribe_body()))
                assert status == 200 and b"NoError" in body
                # webmail.url names "localhost", which the mail server's certificate does not hold.
                status, hdrs, _ = await trio.to_thread.run_sync(lambda: request(port, "GET", "/owa/"))
                assert status == 503 and "retry-after" in hdrs
            # Both went through the proxy's tunnel (TLS to the proxy, CONNECT, the mail server's TLS inside).
            assert set(proxy.targets) == {f"127.0.0.1:{sim.port}", f"localhost:{sim.port}"}
            assert proxy.handshakes >= 2 and proxy.refused == 0
            assert proxy.first_bytes and all(b[:1] == b"\x16" for b in proxy.first_bytes)   # a ClientHello
            assert [e["target"] for e in sim.web.log] == ["/EWS/Exchange.asmx"]
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()
