"""The project fuzzes itself with its kit (seg_fast.testing), bounded and derandomized.

- valid generated requests are accepted by the simulator with the Status the spec
  gives success (1; MoveItems 3; SendMail & co. an empty 200), every protocol
  version, both query forms, on a fresh mailbox after Provision/FolderSync/Sync;
- the runner fuzzes the simulator directly: every answer classified, no failure;
- a planted bug (a 500 on long strings) is found, shrunk to a small request shown
  as XML, written as a failure file, and `seg-fast fuzz --replay` reproduces it
  (and passes once the bug is gone);
- `seg-fast fuzz` against a running `seg-fast serve` in front of the simulator:
  no failure, and the gateway still serves a device afterwards.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from processes import start_serve, stop_process
from redis_server import free_port
from seg_fast import fuzzcli
from seg_fast.sim import mailbox as sim_mailbox
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, find, kids, text
from seg_fast.testing import Device, Known, build, request
from seg_fast.testing.runner import Fuzzer, Target, load_failure
from seg_fast.testing.spec import VERSIONS
from seg_fast.testing.wire import query_params

# Commands whose valid requests the simulator must accept (Ping parks; ResolveRecipients,
# MeetingResponse and Find are not implemented by it: 501).
ACCEPTED = ("Sync", "FolderSync", "ItemOperations", "SendMail", "SmartReply", "SmartForward", "MoveItems",
            "GetItemEstimate", "Search", "Settings", "Provision")


async def fresh_mailbox(sim: MailboxSimulator, user: str, version: str) -> tuple[EasClient, Known]:
    """A new user's device: provisioned, folders synced, Inbox primed and read."""
    c = EasClient("127.0.0.1", sim.port, user, "secret", f"DEV{user}", version=version)
    await c.provision()
    r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
    fkey = text(r.doc, "FolderHierarchy:SyncKey")
    key, sids, refs = "0", [], []
    for _ in range(3):
        r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E(
            "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", "1"),
            E("AirSync:WindowSize", 100) if key != "0" else None))))
        coll = find(r.doc, "AirSync:Collections", "AirSync:Collection")
        key = text(coll, "AirSync:SyncKey")
        for add in kids(find(coll, "AirSync:Commands"), "AirSync:Add"):
            sids.append(text(add, "AirSync:ServerId"))
            refs += [text(a, "AirSyncBase:FileReference") for a in
                     kids(find(add, "AirSync:ApplicationData", "AirSyncBase:Attachments"))]
        if key != "1" and not refs:
            sim.deliver(user, 8)             # no attachment yet: more mail
        elif refs:
            break
    assert sids and refs and fkey
    return c, Known(server_ids=tuple(sids), file_references=tuple(refs), sync_keys={"1": key},
                    folder_sync_key=fkey, user=user)


def statuses(doc, tag: str) -> list[str]:
    return [el.text for el in doc.iter() if el.tag == tag]


def check_success(command: str, version: str, body, r) -> None:
    assert r.status == 200, (command, version, r.status)
    if command in ("SendMail", "SmartReply", "SmartForward"):
        assert r.body == b"", r.doc and r.doc.tag
        return
    doc = r.doc
    assert doc is not None
    if command == "Sync":
        colls = list(kids(find(doc, "AirSync:Collections"), "AirSync:Collection"))
        assert colls and [text(c, "AirSync:Status") for c in colls] == ["1"] * len(colls)
        adds = [a for c in colls for a in kids(find(c, "AirSync:Responses"), "AirSync:Add")]
        assert all(text(a, "AirSync:Status") == "1" for a in adds)
    elif command == "FolderSync":
        assert text(doc, "FolderHierarchy:Status") == "1"
    elif command == "GetItemEstimate":
        got = statuses(doc, "GetItemEstimate:Status")
        assert got and set(got) == {"1"}
    elif command == "MoveItems":
        got = statuses(doc, "Move:Status")
        assert got and set(got) == {"3"}                    # 3: moved (MS-ASCMD 2.2.3.177.9)
    elif command in ("Settings", "Search", "Provision"):
        ns = command
        got = statuses(doc, f"{ns}:Status")
        assert got and set(got) == {"1"}, got
    elif command == "ItemOperations":
        assert text(doc, "ItemOperations:Status") == "1"
        # a Fetch after an EmptyFolderContents or Move in the same request may find the item gone
        destructive = False
        for op, res in zip(body.children, find(doc, "ItemOperations:Response").children):
            if op.tag == "ItemOperations:Fetch" and not destructive:
                assert text(res, "ItemOperations:Status") == "1", (res.tag, text(res, "ItemOperations:Status"))
            elif op.tag == "ItemOperations:EmptyFolderContents":
                assert text(res, "ItemOperations:Status") == "1"
            destructive |= op.tag != "ItemOperations:Fetch"


async def serve_alone(sim: MailboxSimulator, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``sim`` until the cancel scope handed back is cancelled."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(sim.serve, "127.0.0.1", 0)
            task_status.started(scope)
            await trio.sleep_forever()


async def test_valid_requests_are_accepted_with_success_status(nursery):
    token = trio.lowlevel.current_trio_token()
    seen: set[tuple[str, str]] = set()

    async def prepare(version: str):
        # A simulator of its own per example: the same mailbox every time, so the ids the
        # strategies draw from (and so hypothesis's choices) replay exactly when it shrinks.
        sim = MailboxSimulator(password="secret", seed=7, initial_messages=6)
        scope = await nursery.start(serve_alone, sim)
        c, known = await fresh_mailbox(sim, "valid", version)
        return scope, c, known

    async def send(c: EasClient, req) -> object:
        return await c.send(req.method, req.target, req.headers, req.body)

    @settings(max_examples=4, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(VERSIONS), st.data())
    def one(command, version, data):
        # hypothesis draws here, in its own thread; the network work runs in trio
        scope, c, known = trio.from_thread.run(prepare, version, trio_token=token)
        try:
            if command == "GetItemEstimate":       # only the primed Inbox has an estimate to give
                known = dataclasses.replace(known, email_folders=("1",))
            body = data.draw(request(command, version, known))
            req = build(command, body, version=version, base64_query=data.draw(st.booleans()),
                        device=Device(user=known.user, device_id=c.device_id, policy_key=c.policy_key),
                        params=query_params(command, body, int(version.replace(".", "")), known))
            r = trio.from_thread.run(send, c, req, trio_token=token)
            check_success(command, version, body, r)
            seen.add((command, version))
        finally:
            trio.from_thread.run(c.aclose, trio_token=token)
            trio.from_thread.run_sync(scope.cancel, trio_token=token)

    for command in ACCEPTED:
        await trio.to_thread.run_sync(one, command)
    assert {c for c, _ in seen} == set(ACCEPTED) and {v for _, v in seen} == set(VERSIONS)


async def test_the_kit_fuzzes_the_simulator_without_failures(nursery, tmp_path, capsys):
    sim = MailboxSimulator(password="secret", seed=3, initial_messages=6)
    await nursery.start(sim.serve, "127.0.0.1", 0)
    fz = Fuzzer(Target.parse(f"http://127.0.0.1:{sim.port}"), Device(), versions=VERSIONS,
                out=tmp_path / "failures", park_wait=0.2)
    known = await fz.setup()
    assert fz.client.policy_key and known.sync_keys and len(known.server_ids) == 6
    assert await fz.run(100, derandomize=True) == []
    assert fz.executions >= 100 and not fz.failures
    assert set(fz.verdicts) <= {"ok", "parked"} and fz.verdicts["ok"] >= 70
    assert sum(sim.counts.values()) >= 70          # they reached the handlers
    assert "internal error" not in capsys.readouterr().err


def seg_fast(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seg_fast", *args], capture_output=True, text=True, timeout=timeout)


async def test_a_planted_bug_is_found_shrunk_recorded_and_replayed(nursery, tmp_path, monkeypatch, capsys):
    original = sim_mailbox.HANDLERS["MoveItems"]

    def buggy(ctx):
        if any(len(el.text or "") > 1000 for el in ctx.doc.iter()):
            raise RuntimeError("planted bug")       # the simulator answers 500
        return original(ctx)

    monkeypatch.setitem(sim_mailbox.HANDLERS, "MoveItems", buggy)
    # no provisioning: a verbatim replay (the recorded policy key) is then still accepted
    sim = MailboxSimulator(password="secret", seed=3, initial_messages=4, require_provisioning=False)
    await nursery.start(sim.serve, "127.0.0.1", 0)
    out = tmp_path / "failures"
    fz = Fuzzer(Target.parse(f"http://127.0.0.1:{sim.port}"), Device(), versions=("14.1",),
                commands=("MoveItems", "FolderSync"), out=out, mutate=0.8)
    await fz.setup()
    files = await fz.run(60, derandomize=True)
    assert [p.name.rsplit("-", 1)[0] for p in files] == ["http-5xx-MoveItems"]
    f = load_failure(files[0])
    assert f.kind == "http-5xx" and f.answer.status == 500 and f.case.command == "MoveItems"
    assert any(op.startswith("oversize:") for op in f.case.ops)
    # shrunk: one oversized string at the smallest size the mutator makes, little else
    assert f.request_xml.count("\n") <= 12 and 4096 <= len(f.request.body) < 4096 + 200, f.request_xml
    assert "<MoveItems" in f.request_xml and "A" * 4096 in f.request_xml

    # the CLI in process (its own trio.run in a worker thread): the replays' output is the user's view
    async def replay(*extra: str) -> int:
        return await trio.to_thread.run_sync(fuzzcli.cli, ["--replay", str(files[0]), *extra])

    code = await replay()
    out_text = capsys.readouterr().out
    assert code == 1 and "http-5xx" in out_text and "HTTP 500" in out_text, out_text
    assert "<MoveItems" in out_text                # the request, as XML
    code = await replay("--verbatim")
    assert code == 1 and "HTTP 500" in capsys.readouterr().out
    monkeypatch.setitem(sim_mailbox.HANDLERS, "MoveItems", original)      # fixed
    code = await replay()
    out_text = capsys.readouterr().out
    assert code == 0 and ": ok" in out_text, out_text


async def test_fuzzing_seg_fast_serve_in_front_of_the_simulator(nursery, tmp_path):
    sim = MailboxSimulator(password="secret", seed=5, initial_messages=6)
    await nursery.start(sim.serve, "127.0.0.1", 0)
    gw_port = free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
                   f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n[admin]\nenabled = false\n'
                   f'[log]\ntransactions = ""\n[policy]\nallow_if_no_policies = true\n')
    proc = start_serve(cfg, tmp_path)
    try:
        with trio.fail_after(20):
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    await trio.open_tcp_stream("127.0.0.1", gw_port)
                    break
                except OSError:
                    await trio.sleep(0.1)
        out = tmp_path / "failures"
        r = await trio.to_thread.run_sync(lambda: seg_fast(
            "fuzz", "--target", f"http://127.0.0.1:{gw_port}/Microsoft-Server-ActiveSync", "--version", "all",
            "--max-examples", "80", "--seed", "17", "--out", str(out), "--park-wait", "0.2"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "80 requests" in r.stdout or "requests to" in r.stdout
        assert not out.exists() or not list(out.iterdir())
        sent = int(r.stdout.split("seg-fast fuzz: ")[1].split(" requests")[0])
        assert sent >= 80 and sum(sim.counts.values()) >= 60      # through the gateway to the simulator
        assert proc.poll() is None
        c = EasClient("127.0.0.1", gw_port, "after", "secret", "AFTER", version="14.1")
        await c.provision()
        r2 = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
        await c.aclose()
        assert r2.status == 200 and text(r2.doc, "FolderHierarchy:Status") == "1"
    finally:
        await trio.to_thread.run_sync(stop_process, proc)


async def test_docs_property_every_sync_answer_advances_the_synckey(nursery):
    """The property docs/fuzzing.md shows, run as written there (with fresh_mailbox)."""
    sim = MailboxSimulator(password="secret", seed=7, initial_messages=6)
    await nursery.start(sim.serve, "127.0.0.1", 0)
    token = trio.lowlevel.current_trio_token()
    c, known = await fresh_mailbox(sim, "prop", "16.1")
    checked = []

    @settings(max_examples=15, derandomize=True, database=None, deadline=None)
    @given(request("Sync", "16.1", known))
    def sync_key_advances(tree):
        r = trio.from_thread.run(c.request, "Sync", tree, trio_token=token)
        sent = {text(col, "AirSync:CollectionId"): text(col, "AirSync:SyncKey")
                for col in kids(find(tree, "AirSync:Collections"), "AirSync:Collection")}
        for col in kids(find(r.doc, "AirSync:Collections"), "AirSync:Collection"):
            if text(col, "AirSync:Status") == "1":
                assert text(col, "AirSync:SyncKey") != sent[text(col, "AirSync:CollectionId")]
                checked.append(col)

    await trio.to_thread.run_sync(sync_key_advances)
    await c.aclose()
    assert len(checked) >= 15


async def test_each_failure_kind_is_classified_and_written(nursery, tmp_path):
    """A server misbehaving on purpose, one way per command, and a parked Ping that is not a failure."""
    from proxy_helpers import MiniUpstream
    from seg_fast.eas.wbxml import encode
    from seg_fast.testing.runner import Case

    async def handler(req, body):
        cmd = req.target.decode().split("Cmd=")[1].split("&")[0]
        if cmd in ("Sync", "Ping"):
            await trio.sleep_forever()                 # a hang; for Ping, a parked long poll
        if cmd == "GetItemEstimate":
            return 500, [], b""
        wb = [("content-type", "application/vnd.ms-sync.wbxml")]
        if cmd == "FolderSync":
            return 200, wb, b"\x03\x01\x6a\x00\x45"    # cut short
        if cmd == "Settings":
            return 200, wb, encode(E("Settings:Settings", E("Settings:Status", 99)))
        return 200, wb, encode(E("Ping:Ping", E("Ping:Status", 1)))     # MoveItems: another command's root

    up = MiniUpstream(handler)
    await nursery.start(up.serve)

    async def closer(stream):              # reads the request, then drops the connection
        await stream.receive_some(65536)
        await stream.aclose()
    listeners = await nursery.start(trio.serve_tcp, closer, 0)
    closer_port = listeners[0].socket.getsockname()[1]

    out = tmp_path / "failures"
    fz = Fuzzer(Target.parse(f"http://127.0.0.1:{up.port}"), Device(), deadline=0.5, park_wait=0.3, out=out)
    for command in ("Sync", "Ping", "GetItemEstimate", "FolderSync", "Settings", "MoveItems"):
        doc = {"Sync": E("AirSync:Sync", E("AirSync:Collections")), "Ping": E("Ping:Ping"),
               "GetItemEstimate": E("GetItemEstimate:GetItemEstimate"),
               "FolderSync": E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")),
               "Settings": E("Settings:Settings"), "MoveItems": E("Move:MoveItems")}[command]
        await fz.run_case(Case(command=command, version="14.1", body=encode(doc)))
    fz2 = Fuzzer(Target.parse(f"http://127.0.0.1:{closer_port}"), Device(), deadline=5, out=out)
    await fz2.run_case(Case(command="Search", version="14.1", body=encode(E("Search:Search"))))
    await fz.client.aclose()
    await fz2.client.aclose()
    kinds = {cmd: f.kind for (_, cmd), f in (fz.failures | fz2.failures).items()}
    assert kinds == {"Sync": "hang", "GetItemEstimate": "http-5xx", "FolderSync": "malformed-wbxml",
                     "Settings": "status-out-of-range", "MoveItems": "wrong-root", "Search": "reset"}
    assert fz.verdicts["parked"] == 1                  # the Ping
    written = fz.write_failures() + fz2.write_failures()
    assert sorted(p.name.rsplit("-", 1)[0] for p in written) == [
        "hang-Sync", "http-5xx-GetItemEstimate", "malformed-wbxml-FolderSync", "reset-Search",
        "status-out-of-range-Settings", "wrong-root-MoveItems"]
    f = load_failure(out / next(p.name for p in written if p.name.startswith("status-out")))
    assert "Settings:Status = '99'" in f.detail and "<Status>99</Status>" in f.answer_xml
    assert f.request_xml.splitlines()[-1] == "<Settings xmlns=\"Settings:\"/>"


async def test_fuzzing_over_tls(nursery):
    import ssl

    import trustme
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    sim = MailboxSimulator(password="secret", seed=3, initial_messages=3)
    await nursery.start(lambda task_status: sim.serve("127.0.0.1", 0, ssl_context=server_ctx,
                                                      task_status=task_status))
    fz = Fuzzer(Target.parse(f"https://127.0.0.1:{sim.port}"), Device(), versions=("14.1",),
                commands=("FolderSync", "Sync", "Settings"), ssl_context=client_ctx)
    await fz.setup()
    assert len(fz.known.server_ids) == 3
    assert await fz.run(20, derandomize=True) == [] and fz.executions >= 20 and fz.http.get(200, 0) >= 10


async def test_a_keepalive_connection_closed_while_idle_is_not_a_reset(nursery):
    from seg_fast.eas.wbxml import encode
    from seg_fast.testing.runner import Case

    async def one_answer_then_close(stream):    # keep-alive by HTTP, closed right after by the server
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()
    listeners = await nursery.start(trio.serve_tcp, one_answer_then_close, 0)
    port = listeners[0].socket.getsockname()[1]
    fz = Fuzzer(Target.parse(f"http://127.0.0.1:{port}"), Device(), deadline=5)
    for _ in range(3):
        await fz.run_case(Case(command="Settings", version="14.1", body=encode(E("Settings:Settings"))))
    await fz.client.aclose()
    assert fz.verdicts == {"ok": 3} and not fz.failures
