"""`seg-fast demo` as a user runs it: the printed URL and account work, the policies apply."""
from __future__ import annotations

import os
import re
import urllib.request
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from seg_fast.sim.client import EasClient
from seg_fast.sim.tree import E, find, kids, text

REPO = Path(__file__).resolve().parent.parent


async def test_demo_prints_a_working_device_url_and_applies_demo_policies():
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "demo", "--port", "0", "--seconds", "30"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        url = None
        while url is None:
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert line, "demo exited early:\n" + "".join(lines) + proc.stderr.read()
            lines.append(line)
            m = re.search(r"device URL\s+(https://[\d.]+:(\d+)/\S+)", line)
            if m:
                url, port = m.group(1), int(m.group(2))
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE                 # the demo's certificate is self-signed
        body = E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))
        phone = EasClient("127.0.0.1", port, "demo", "secret", "DEMO1", ssl_context=ctx,
                          user_agent="Apple-iPhone9C1/1602.92")
        r = await phone.request("FolderSync", body)
        assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "1"
        # The embedded email security policy: links to its listed domains are rewritten
        # to the secure browser's schemes in the HTML bodies the phone syncs.
        bodies = await _inbox_html_bodies(phone)
        assert bodies, "the demo mailbox has mail"
        rewritten = [b for b in bodies if "awbs://" in b or "awb://" in b]
        assert rewritten, "no link was rewritten"
        for b in bodies:
            assert not re.search(r"https?://([\w-]+\.)*contoso\.com", b)    # a listed domain
        other = EasClient("127.0.0.1", port, "demo", "secret", "DEMO2", ssl_context=ctx, user_agent="curl/8.0")
        r = await other.request("FolderSync", body)
        assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "129"   # blocked mail client
        await phone.aclose()
        await other.aclose()
        while not lines[-1].startswith("  printf"):      # the rest of the banner
            lines.append(await trio.to_thread.run_sync(proc.stdout.readline))
            assert lines[-1], "banner cut short"
        out = "".join(lines)
        assert "demo / secret" in out and "curl -k -i -X OPTIONS" in out   # the account and the curl lines
        # The admin API's /metrics counts the demo's traffic (the worker's counters are written
        # as serve's workers write them).
        admin = re.search(r"admin API\s+(http://127\.0\.0\.1:\d+)/", out).group(1)
        metrics = {}
        with trio.fail_after(20):
            while metrics.get("seg_fast_answer_bytes_total", 0) <= 0:
                await trio.sleep(0.2)
                page = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(admin + "/metrics").read())
                metrics = {k: float(v) for k, v in (ln.split(" ", 1) for ln in page.decode().splitlines()
                                                    if ln.startswith("seg_fast_") and " " in ln and "{" not in ln)}
    finally:
        if proc.poll() is None:
            proc.kill()


async def _inbox_html_bodies(c: EasClient) -> list[str]:
    """HTML (Type 2) bodies of every Inbox message, as the phone receives them."""
    def sync(key, more):
        return E("AirSync:Sync", E("AirSync:Collections", E(
            "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", "1"),
            *((E("AirSync:GetChanges"), E("AirSync:WindowSize", 100),
               E("AirSync:Options", E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", 2))))
              if more else ()))))
    r = await c.request("Sync", sync("0", False))
    key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
    r = await c.request("Sync", sync(key, True))
    assert r.status == 200
    cmds = find(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Commands")
    return [text(a, "AirSync:ApplicationData", "AirSyncBase:Body", "AirSyncBase:Data")
            for a in kids(cmds, "AirSync:Add")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_demo_stops_cleanly_on_a_signal(sig):
    """Ctrl-C or SIGTERM: exit 0 with one line and no traceback; the temporary state
    (demo key, policy DB, transaction log) is removed."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "demo", "--port", "0", "--no-tls"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        state = None
        while state is None:
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert line, "demo exited early: " + proc.stderr.read()
            m = re.search(r"transactions\s+(\S+)/transactions\.jsonl", line)
            if m:
                state = Path(m.group(1))
        assert state.is_dir()
        proc.send_signal(sig)
        rc = await trio.to_thread.run_sync(proc.wait, 30)
        err = proc.stderr.read()
        assert rc == 0, err
        assert "Traceback" not in err and "ExceptionGroup" not in err, err
        assert err.strip().splitlines()[-1] == "seg-fast demo stopped"
        assert not state.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
