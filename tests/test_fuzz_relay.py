"""Every valid answer the kit generates (answer strategies, every command and version),
served by an upstream behind `seg-fast serve`, reaches the device as a valid answer
(the classifier finds nothing), and byte-identical in meaning (same tree) for the
commands that carry no mail content."""
from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from processes import start_serve, stop_process
from proxy_helpers import MiniUpstream
from redis_server import free_port
from seg_fast.eas.wbxml import decode, encode
from seg_fast.sim.client import EasClient
from seg_fast.testing import Answer, answer, classify, commands_for
from seg_fast.testing.spec import COMMANDS, VERSIONS

# Answers carrying mail content (bodies, attachments, fetched data): the gateway's email
# security may rewrite them (it fails closed: without content policies an attachment is
# replaced by a note), so only their validity is checked.
CONTENT = {"Sync", "ItemOperations", "Search", "Find"}


async def test_gateway_relays_every_valid_answer(nursery, tmp_path):
    current = {}

    def handler(req, body):
        doc = current["doc"]
        if doc is None:
            return 200, [], b""
        return 200, [("content-type", "application/vnd.ms-sync.wbxml")], encode(doc)

    up = MiniUpstream(handler)
    await nursery.start(up.serve)
    gw_port = free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
                   f'[upstream]\nurl = "http://127.0.0.1:{up.port}"\n[admin]\nenabled = false\n'
                   f'[log]\ntransactions = ""\n[policy]\nallow_if_no_policies = true\n')
    proc = start_serve(cfg, tmp_path)
    token = trio.lowlevel.current_trio_token()
    try:
        with trio.fail_after(20):
            while True:
                assert proc.poll() is None
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", gw_port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.1)
        c = EasClient("127.0.0.1", gw_port, "relay", "secret", "RELAY1")
        seen = []

        @settings(max_examples=4, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def relay(command, data):
            version = data.draw(st.sampled_from([v for v in VERSIONS if command in commands_for(v)]))
            doc = data.draw(answer(command, version))
            current["doc"] = doc
            c.version = version
            r = trio.from_thread.run(c.request, command, b"", trio_token=token)
            assert r.status == 200, (command, r.status)
            if doc is None:
                assert r.body == b""
            elif command in CONTENT:          # mail content: email security may rewrite it
                assert decode(r.body).tag == doc.tag
            else:
                assert decode(r.body) == doc, command
            assert classify(command, version, Answer(status=r.status, headers=list(r.headers.items()),
                                                     body=r.body)).kind == "ok"
            seen.append(command)

        for command in COMMANDS:
            await trio.to_thread.run_sync(relay, command)
        await c.aclose()
        assert set(seen) == set(COMMANDS)
    finally:
        await trio.to_thread.run_sync(stop_process, proc)
