"""Issue 9, "Mail content that slips past the attachment policy": each attack against
a running `seg-fast serve` (its own worker process) in front of a mail server that
serves the crafted answer, with independent oracles for what the device receives
(Python's ``email`` for MIME, SHA-256 of what `seg-fast attachment decrypt` opens).
"""
from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path

import trio
from conftest import REAL_SERVER

from processes import start_serve, stop_process
from proxy_helpers import MiniUpstream
from redis_server import free_port
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.eas.wbxml import decode, encode
from seg_fast.policy.model import DeviceRecord, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.client import EasClient
from seg_fast.sim.tree import E, text

WBXML = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]


def hostile_sync(spans: int, depth: int = 60) -> bytes:
    """A Sync answer of nested Adds holding ``spans`` AirSyncBase:Type strings at
    ``depth``: what a hostile mail server sends to make the scanner list every one."""
    out = bytearray(b"\x03\x01\x6a\x00\x45" + b"\x47" * (depth - 2) + b"\x00\x11")
    out += b"\x46\x031\x00\x01" * spans
    out += b"\x01" * (depth - 1)
    return bytes(out)


def ok_sync() -> bytes:
    return encode(E("AirSync:Sync", E("AirSync:Status", "1")))


async def write_policy(state: Path, document: PolicyDocument, devices=()) -> None:
    state.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(state / "seg-fast-policy.db")
    await store.open()
    try:
        await store.replace_all(document, list(devices))
    finally:
        await store.aclose()


def worker_pids(parent: int) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.add(int(entry))
    return pids


def serve_config(tmp_path: Path, upstream_port: int, **security) -> tuple[Path, int]:
    port = free_port()
    cfg = tmp_path / "gw.toml"
    extra = "".join(f"{k} = {v}\n" for k, v in security.items())
    cfg.write_text(
        f'workers = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{upstream_port}"\n'
        f'[admin]\nenabled = false\n'
        f'[log]\ntransactions = ""\n'
        f'[security]\n{extra}')
    return cfg, port


async def wait_serving(port: int, proc, client: EasClient):
    """The first answer of a worker that is up (connection refused until then)."""
    with trio.fail_after(20):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                return await client.request("FolderSync", E("FolderHierarchy:FolderSync",
                                                             E("FolderHierarchy:SyncKey", "0")))
            except OSError:
                await client.aclose()
                await trio.sleep(0.1)


def sync_request() -> object:
    return E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", "1"), E("AirSync:CollectionId", "1"))))


class Gateway:
    """A running `seg-fast serve` (one worker) in front of a MiniUpstream, policy preset."""

    def __init__(self, tmp_path: Path, handler, document: PolicyDocument, devices=(), **security):
        self.tmp_path, self.document, self.devices, self.security = tmp_path, document, devices, security
        self.up = MiniUpstream(handler)

    async def __aenter__(self):
        await write_policy(self.tmp_path / "state", self.document, self.devices)
        self._nursery_cm = trio.open_nursery()
        self.nursery = await self._nursery_cm.__aenter__()
        await self.nursery.start(self.up.serve)
        cfg, self.port = serve_config(self.tmp_path, self.up.port, **self.security)
        self.proc = start_serve(cfg, self.tmp_path)
        return self

    def client(self, device_id: str, **kw) -> EasClient:
        return EasClient("127.0.0.1", self.port, "jdoe", "secret", device_id, **kw)

    async def __aexit__(self, *exc):
        stop_process(self.proc)
        self.nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)


def command_of(req) -> bytes:
    query = req.target.split(b"?", 1)[1] if b"?" in req.target else b""
    return dict(p.split(b"=", 1) for p in query.split(b"&") if b"=" in p).get(b"Cmd", b"")


class _Attrs(HTMLParser):
    """Every (tag, attribute, value) of an HTML text: the oracle for link rewriting."""

    def __init__(self, html: str):
        super().__init__()
        self.seen: list[tuple[str, str, str]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.seen += [(tag, k, v) for k, v in attrs]


async def _real_server_links(tmp_path, **security) -> tuple[str, str]:
    """(HTML body, plain body) of the real Z-Push Sync answer as a device gets them
    through the gateway under an "all links" policy."""
    answer = (REAL_SERVER / "sync1.resp.wbxml").read_bytes()
    policy = EmailSecurityPolicy(hyperlinks=HyperlinkPolicy(enabled=True, mode="all"))
    async with Gateway(tmp_path, lambda req, body: (200, WBXML, answer),
                       PolicyDocument(security=policy), **security) as gw:
        c = gw.client("LINKS1")
        try:
            await wait_serving(gw.port, gw.proc, c)
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
        finally:
            await c.aclose()
    assert r.status == 200
    bodies = [a.findtext("AirSyncBase:Data") for a in r.doc.iter("AirSyncBase:Body")]
    return next(b for b in bodies if "<html>" in b), next(b for b in bodies if "plain.example.com" in b)


async def test_remote_images_keep_loading_and_hyperlinks_are_rewritten(tmp_path):
    """Issue 9: Z-Push's HTML mail with a tracking image: the <img src> stays https
    (it loads), href and bare text links open in the secure browser."""
    original = decode((REAL_SERVER / "sync1.resp.wbxml").read_bytes())
    html_in = next(b.findtext("AirSyncBase:Data") for b in original.iter("AirSyncBase:Body")
                   if "<html>" in b.findtext("AirSyncBase:Data"))
    before = _Attrs(html_in).seen
    assert ("img", "src", "https://tracker.example.org/pixel.gif") in before
    assert any(t == "a" and k == "href" and v.startswith("http") for t, k, v in before)

    html, plain = await _real_server_links(tmp_path)
    after = _Attrs(html).seen
    assert len(after) == len(before)
    for (tag, key, value), (_, _, new) in zip(before, after):
        if key == "href" and value.startswith(("http://", "https://")):
            assert new == value.replace("https://", "awbs://", 1).replace("http://", "awb://", 1)
        else:
            assert new == value, (tag, key)
    assert "awb://plain.example.com/page" in plain


async def test_image_links_rewritten_when_configured(tmp_path):
    html, _ = await _real_server_links(tmp_path, link_attributes='["href", "src"]')
    assert ("img", "src", "awbs://tracker.example.org/pixel.gif") in _Attrs(html).seen


async def test_hostile_span_count_gets_a_status_and_the_worker_serves_on(tmp_path):
    """5 MB of 999k strings at depth 60: the worker stops at security.max_spans, the
    device gets Sync Status 5 (server error) instead of unchecked content, and the same
    worker answers the next request."""
    hostile = hostile_sync(999_000)
    assert len(hostile) > 4_900_000
    served = []

    def handler(req, body):
        cmd = dict(p.split(b"=", 1) for p in req.target.split(b"?", 1)[1].split(b"&")).get(b"Cmd")
        served.append(cmd)
        if cmd == b"Sync":
            return 200, WBXML, hostile if served.count(b"Sync") == 1 else ok_sync()
        return 200, WBXML, encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", "1")))

    up = MiniUpstream(handler)
    policy = EmailSecurityPolicy(unmanaged_attachments=AttachmentPolicy(file_types={"pdf": "block"}))
    await write_policy(tmp_path / "state", PolicyDocument(security=policy))
    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        cfg, port = serve_config(tmp_path, up.port)
        proc = start_serve(cfg, tmp_path)
        c = EasClient("127.0.0.1", port, "jdoe", "secret", "HOSTILE1")
        try:
            r = await wait_serving(port, proc, c)
            assert r.status == 200
            workers = worker_pids(proc.pid)
            assert len(workers) == 1
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
            assert r.status == 200 and r.headers["content-type"] == "application/vnd.ms-sync.wbxml"
            assert text(r.doc, "AirSync:Status") == "5" and len(r.body) < 100
            with trio.fail_after(20):
                r = await c.request("Sync", sync_request())
            assert r.status == 200 and r.body == ok_sync()
            assert worker_pids(proc.pid) == workers and proc.poll() is None
            assert served.count(b"Sync") == 2
        finally:
            await c.aclose()
            stop_process(proc)
            nursery.cancel_scope.cancel()
