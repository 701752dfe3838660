"""An attachment listed by one worker and fetched from another, through `seg-fast serve --workers 2`.

A managed device (policy: PDFs encrypted, S/MIME left alone) syncs its Inbox on one worker,
then fetches attachments by FileReference on a connection the kernel gave the *other*
worker (which worker holds a connection is read from /proc: tests/workers_of.py):

- a PDF is sealed under the name the listing gave it (``seg-fast attachment decrypt``
  writes that file), not the name the fetching worker would guess from the bytes
  ("attachment.pdf");
- the PDF of an S/MIME signed message is exempt there too: it arrives as the mail server
  sent it, not sealed;
- the listing worker killed, the one started in its place knows the name too (the control
  process's copy, replayed to it).

Before refshare, the fetching worker had learnt neither (each worker's cache was its own).
"""
from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys

import trio

from conftest import REPO
from eas_helpers import managed_device, store_policies, sync_req
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy
from seg_fast.policy.model import PolicyDocument
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.state import INBOX, Item
from seg_fast.sim.tree import E, find, kids, text
from workers_of import free_port, worker_holding, workers_of

PASSWORD = "secret"
POLICY = EmailSecurityPolicy(managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt"}), skip_smime=True)


async def on_worker(c: EasClient, control_pid: int, port: int, wanted) -> int:
    """Reconnect ``c`` until the kernel gives its connection to a worker ``wanted(pid)`` accepts."""
    for _ in range(200):
        await c._connect()
        client_port = c._stream.socket.getsockname()[1]
        pid = None
        with trio.fail_after(10):
            while pid is None:
                pid = worker_holding(port, client_port, workers_of(control_pid))
                if pid is None:
                    await trio.sleep(0.01)      # not accepted yet
        if wanted(pid):
            return pid
    raise AssertionError("no connection reached the wanted worker in 200 tries")


async def fetch(c: EasClient, ref: str):
    r = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E(
        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", ref))))
    assert r.status == 200, r
    props = find(r.doc, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Properties")
    return text(props, "AirSyncBase:ContentType"), base64.b64decode(text(props, "ItemOperations:Data"))


async def test_a_listing_on_one_worker_names_the_fetch_on_another(tmp_path):
    await store_policies(tmp_path / "policy.db", PolicyDocument(security=POLICY), [managed_device()])
    sim = MailboxSimulator(password=PASSWORD, seed=5)
    pdf_i = next(i for i in range(400) if (m := sim.corpus.message(i)).attachments and not m.signed
                 and m.attachments[0][0].endswith(".pdf") and len(m.attachments[0][2]) < 400_000)
    signed_i = next(i for i in range(2000) if (m := sim.corpus.message(i)).signed and m.attachments
                    and m.attachments[0][0].endswith(".pdf"))
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        mbox = sim.mailbox("jdoe")
        sid = {"pdf": mbox.add(INBOX, Item(pdf_i)), "signed": mbox.add(INBOX, Item(signed_i))}
        cfg = tmp_path / "gw.toml"
        cfg.write_text("\n".join([
            "workers = 2", "[listener]", 'host = "127.0.0.1"', f"port = {port}",
            "[upstream]", f'url = "http://127.0.0.1:{sim.port}"', "[admin]", "enabled = false",
            "[log]", 'transactions = ""', f'file = "{tmp_path / "gateway.log"}"',
            "[policy]", f'sqlite_path = "{tmp_path / "policy.db"}"',
            "[security]", f'master_key_file = "{tmp_path / "master.key"}"',
            f'key_state_file = "{tmp_path / "keys.json"}"', "[timeouts]", "shutdown_grace = 5.0"]) + "\n")
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp_path / "state"))
        stderr = open(tmp_path / "stderr.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env,
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            with trio.fail_after(60):
                while (tmp_path / "stderr.log").read_text().count("worker listening on") < 2:
                    assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
                    await trio.sleep(0.05)
            c = EasClient("127.0.0.1", port, "jdoe", PASSWORD, "MANAGED1", device_type="iPhone", version="14.1",
                          user_agent="Apple-iPhone15C2/2104.100")
            with trio.fail_after(60):
                await c.provision()
                lister = await on_worker(c, proc.pid, port, lambda pid: True)
                r = await c.request("Sync", sync_req("0"))
                key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
                r = await c.request("Sync", sync_req(key, 2))
                assert r.status == 200
                cmds = find(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Commands")
                items = {text(a, "AirSync:ServerId"): find(a, "AirSync:ApplicationData")
                         for a in kids(cmds, "AirSync:Add")}
                refs = {name: text(find(items[s], "AirSyncBase:Attachments", "AirSyncBase:Attachment"),
                                   "AirSyncBase:FileReference") for name, s in sid.items()}
                # The same connection listed both (one worker); fetch from the other.
                fetcher = await on_worker(c, proc.pid, port, lambda pid: pid != lister)
                assert fetcher != lister
                # The listing reaches the other worker through the control process: poll, bounded.
                pdf_name, _, pdf = sim.corpus.message(pdf_i).attachments[0]

                async def opened_as() -> list[str]:
                    """Fetch the PDF (sealed), open it with the CLI: the file name it was sealed under."""
                    deadline = trio.current_time() + 20
                    while True:
                        ctype, blob = await fetch(c, refs["pdf"])
                        assert ctype == ENVELOPE_CONTENT_TYPE and pdf not in blob
                        out = tmp_path / f"out-{trio.current_time():.3f}"
                        out.mkdir()
                        (tmp_path / "att.segenc").write_bytes(blob)
                        done = await trio.to_thread.run_sync(lambda out=out: subprocess.run(
                            [sys.executable, "-m", "seg_fast", "attachment", "decrypt", "--device", "MANAGED1",
                             "--user", "jdoe", str(tmp_path / "att.segenc")], env=dict(
                                env, SEG_FAST_SECURITY_MASTER_KEY_FILE=str(tmp_path / "master.key"),
                                SEG_FAST_SECURITY_KEY_STATE_FILE=str(tmp_path / "keys.json")),
                            cwd=out, capture_output=True, text=True, check=False))
                        assert done.returncode == 0, done.stderr
                        names = os.listdir(out)
                        if names == [pdf_name] or trio.current_time() > deadline:
                            assert hashlib.sha256((out / names[0]).read_bytes()).digest() == \
                                hashlib.sha256(pdf).digest()
                            return names
                        await trio.sleep(0.2)

                names = await opened_as()
                assert names == [pdf_name], f"the other worker named it {names}, the listing {pdf_name!r}"
                # The signed message's PDF: exempt on the fetching worker too, the server's bytes as they were.
                signed_pdf = sim.corpus.message(signed_i).attachments[0][2]
                assert await on_worker(c, proc.pid, port, lambda pid: pid != lister) != lister
                ctype, blob = await fetch(c, refs["signed"])
                assert ctype != ENVELOPE_CONTENT_TYPE and blob == signed_pdf
                # The lister killed: its restart gets the control process's copy and knows the name too.
                os.kill(lister, signal.SIGKILL)
                while lister in workers_of(proc.pid) or len(workers_of(proc.pid)) < 2 or \
                        (tmp_path / "stderr.log").read_text().count("worker listening on") < 3:
                    assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
                    await trio.sleep(0.05)
                restarted = await on_worker(c, proc.pid, port, lambda pid: pid not in (lister, fetcher))
                names = await opened_as()
                assert names == [pdf_name], f"the restarted worker {restarted} named it {names}"
            await c.aclose()
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            stderr.close()
            nursery.cancel_scope.cancel()
