"""Large answers are transformed in a worker thread (proxy/exchange.py THREAD_TRANSFORM_BYTES),
not as one step of the worker's event loop.

- Through a running `seg-fast serve`: answers on both sides of the threshold (links in an
  HTML body; a PDF sealed in a MIME body; a fetched PDF) come out as the pipeline called
  directly makes them: byte for byte where nothing is random, and for sealed attachments
  byte for byte outside the envelope, whose nonce is random, while both envelopes open
  (sim/oracle.py's Opener) to the original file.
- In the gateway's own loop (in process, the transform held in its thread by an event):
  another device's small request is answered while a large answer's transform is under
  way; a device that leaves mid-transform leaves nothing held (limits.max_unsent_bytes
  accounting, connections, the thread).
"""
from __future__ import annotations

import base64
import email
import email.policy
import http.client
import random
import socket
import threading
import time
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h11
import pytest
import trio

from processes import start_serve, stop_process, wait_listening
from seg_fast.config import load_config
from seg_fast.content import pipeline
from seg_fast.content.attachments import ENVELOPE_CONTENT_TYPE
from seg_fast.content.keys import Keyring, load_master_key
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.content.settings import ContentSettings
from seg_fast.eas.request import EasRequest
from seg_fast.eas.wbxml import Element as E, encode, scan
from seg_fast.policy.model import DeviceRecord, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.proxy import exchange
from seg_fast.proxy.gateway import Gateway
from seg_fast.sim.corpus import REWRITE_DOMAINS, Corpus, _make_pdf
from seg_fast.sim.oracle import Opener

UA = "Apple-iPhone15C2/2104.100"
WB = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]
LIMIT = exchange.THREAD_TRANSFORM_BYTES
POLICY = EmailSecurityPolicy(
    hyperlinks=HyperlinkPolicy(enabled=True, mode="include", domains=list(REWRITE_DOMAINS)),
    managed_attachments=AttachmentPolicy(file_types={"pdf": "encrypt"}),
)
SYNC_REQUEST = encode(E("AirSync:Sync", [E("AirSync:Collections", [E("AirSync:Collection", [
    E("AirSync:SyncKey", text="1"), E("AirSync:CollectionId", text="1")])])]))
FETCH_REQUEST = encode(E("ItemOperations:ItemOperations", [E("ItemOperations:Fetch", [
    E("ItemOperations:Store", text="Mailbox"), E("AirSyncBase:FileReference", text="ref:1")])]))


# -- the answers the mail server gives --------------------------------------------------

def _html(size: int) -> str:
    html = Corpus(3).message(0).html
    return (html * (size // len(html) + 1))[:size]


def _sync(data: str, btype: str, att_name: str | None = None) -> bytes:
    app = [E("Email:Subject", text="s"), E("Email:MessageClass", text="IPM.Note"),
           E("AirSyncBase:Body", [E("AirSyncBase:Type", text=btype),
                                  E("AirSyncBase:EstimatedDataSize", text=str(len(data))),
                                  E("AirSyncBase:Truncated", text="0"), E("AirSyncBase:Data", text=data)])]
    if att_name:
        app.append(E("AirSyncBase:Attachments", [E("AirSyncBase:Attachment", [
            E("AirSyncBase:DisplayName", text=att_name), E("AirSyncBase:FileReference", text="ref:1"),
            E("AirSyncBase:Method", text="1"), E("AirSyncBase:EstimatedDataSize", text="100")])]))
    return encode(E("AirSync:Sync", [E("AirSync:Collections", [E("AirSync:Collection", [
        E("AirSync:SyncKey", text="2"), E("AirSync:CollectionId", text="1"), E("AirSync:Status", text="1"),
        E("AirSync:Commands", [E("AirSync:Add", [E("AirSync:ServerId", text="1:1"),
                                                 E("AirSync:ApplicationData", app)])])])])]))


def _mime_with_pdf(pdf: bytes) -> str:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@contoso.com", "b@fabrikam.com", "report"
    msg.set_content("see http://contoso.com/a and http://example.org/b\n")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="report.pdf")
    return msg.as_bytes(policy=email.policy.SMTP).decode("ascii")


def _fetch(blob: bytes) -> bytes:
    return encode(E("ItemOperations:ItemOperations", [
        E("ItemOperations:Status", text="1"),
        E("ItemOperations:Response", [E("ItemOperations:Fetch", [
            E("ItemOperations:Status", text="1"), E("AirSyncBase:FileReference", text="ref:1"),
            E("ItemOperations:Properties", [E("AirSyncBase:ContentType", text="application/pdf"),
                                            E("ItemOperations:Data", text=base64.b64encode(blob).decode())])])])]))


PDF_BIG = _make_pdf(random.Random(1), 1024 * 1024)
PDF_SMALL = _make_pdf(random.Random(2), 40 * 1024)
# name -> (command, the mail server's answer); each one's size on its side of the threshold
ANSWERS = {
    "links-big": ("Sync", _sync(_html(3 * LIMIT), "2")),
    "links-small": ("Sync", _sync(_html(LIMIT // 8), "2")),
    "pdf-big": ("Sync", _sync(_mime_with_pdf(PDF_BIG), "4", "report.pdf")),
    "pdf-small": ("Sync", _sync(_mime_with_pdf(PDF_SMALL), "4", "report.pdf")),
    "fetch-big": ("ItemOperations", _fetch(PDF_BIG)),
    "fetch-small": ("ItemOperations", _fetch(PDF_SMALL)),
}
ORIGINAL = {"pdf-big": PDF_BIG, "pdf-small": PDF_SMALL, "fetch-big": PDF_BIG, "fetch-small": PDF_SMALL}


def test_answers_lie_on_both_sides_of_the_threshold():
    for name, (_cmd, body) in ANSWERS.items():
        assert (len(body) >= LIMIT) == name.endswith("-big"), (name, len(body))


class _Upstream(BaseHTTPRequestHandler):
    """The mail server: the answer the request's X-Test-Answer header names."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _cmd, body = ANSWERS[self.headers["X-Test-Answer"]]
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.ms-sync.wbxml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _store(tmp_path, devices=("DEV1", "DEV2", "DEV3")) -> None:
    async def fill():
        store = SqliteStore(tmp_path / "policy.db")
        await store.open()
        await store.replace_all(PolicyDocument(security=POLICY), [
            DeviceRecord(device_id=d, user="jdoe", managed=True, compliant=True, compromised=False, encrypted=True,
                         platform="Apple", model="iPhone 15", os="17.4", last_checkin=time.time() - 60,
                         eas_profile=True) for d in devices])
        await store.aclose()
    trio.run(fill)


def _path(command: str, device: str) -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd={command}&User=jdoe&DeviceId={device}&DeviceType=iPhone"


def _headers(name: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(b"jdoe:secret").decode(), "MS-ASProtocolVersion": "14.1",
            "User-Agent": UA, "Content-Type": "application/vnd.ms-sync.wbxml", "X-Test-Answer": name}


# -- what the pipeline makes of them, called directly (the reference) --------------------

def _reference(name: str, key_file: str) -> bytes:
    command, body = ANSWERS[name]
    pipeline.configure(ContentSettings(), keys=Keyring(load_master_key(key_file)))
    try:
        (t,) = pipeline.transforms_for(POLICY, managed=True, device_id="DEV1", user="jdoe")
        req = EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command=command, user="jdoe",
                         device_id="DEV1", user_agent=UA, params={})
        if command == "ItemOperations":
            pipeline._runtime.remember("jdoe", "ref:1", "report.pdf")   # as the Sync listing it would
        out = t.transform_answer(req, 200, WB, body)
    finally:
        pipeline.configure(ContentSettings())
    return out


def _envelope(answer: bytes) -> tuple[int, int]:
    """Where the envelope's base64 lies in a transformed answer (its nonce is random)."""
    (data,) = scan(answer, ("AirSyncBase:Data", "ItemOperations:Data"))
    lo, hi = data.offset, data.offset + data.length
    head = answer.find(b"Content-Type: " + ENVELOPE_CONTENT_TYPE.encode(), lo, hi)
    if head < 0:
        return lo, hi                 # a fetch: the Data is the envelope's base64
    start = answer.index(b"\r\n\r\n", head) + 4
    return start, answer.index(b"\r\n--", start)


def _same(name: str, got: bytes, want: bytes, opener) -> None:
    if name not in ORIGINAL:
        assert got == want, name
        return
    (a, b), (c, d) = _envelope(got), _envelope(want)
    assert (a, b) == (c, d), name
    assert got[:a] == want[:a] and got[b:] == want[b:], name
    for blob in (got[a:b], want[a:b]):
        assert opener("DEV1", "jdoe", base64.b64decode(blob)) == ORIGINAL[name], name


def _serve_config(tmp_path, port: int, up_port: int):
    cfg = tmp_path / "gateway.toml"
    # One worker: a fetch's file name is known from the Sync listing that worker saw (the
    # FileReference cache is per worker), so the fetched envelope matches the reference's.
    cfg.write_text(
        'workers = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{up_port}"\n'
        "[admin]\nenabled = false\n"
        f'[policy]\nsqlite_path = "{tmp_path}/policy.db"\n'
        f'[security]\nmaster_key_file = "{tmp_path}/master.key"\nkey_state_file = "{tmp_path}/keys.json"\n')
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_transforms_the_same_bytes_on_both_sides_of_the_threshold(tmp_path, upstream):
    _store(tmp_path)
    port = _free_port()
    proc = start_serve(_serve_config(tmp_path, port, upstream), tmp_path)
    try:
        wait_listening(port, proc)
        opener = Opener(str(tmp_path / "master.key"), str(tmp_path / "keys.json"))
        for name, (command, _body) in ANSWERS.items():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", _path(command, "DEV1"),
                         FETCH_REQUEST if command == "ItemOperations" else SYNC_REQUEST, _headers(name))
            r = conn.getresponse()
            got = r.read()
            conn.close()
            assert r.status == 200, (name, r.status, got[:200])
            _same(name, got, _reference(name, str(tmp_path / "master.key")), opener)
    finally:
        stop_process(proc)


# -- in the gateway's loop: the thread held by an event -----------------------------------

class _Held:
    """exchange._apply, with a large answer's transform held until released: if it ran on
    the loop, holding it would hold the loop, and no other device would be answered."""

    def __init__(self, apply):
        self.apply = apply
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timed_out = False
        self.threads: dict[int, bool] = {}    # answer size -> ran in the loop's thread
        self.loop_thread = threading.get_ident()

    def __call__(self, t, req, status, headers, body):
        size = sum(map(len, body)) if type(body) is list else len(body)     # a large one comes as parts
        self.threads[size] = threading.get_ident() == self.loop_thread
        if size >= LIMIT:
            self.entered.set()
            if not self.release.wait(20):     # a bound, not a timing: the test fails below
                self.timed_out = True
        return self.apply(t, req, status, headers, body)


async def _eas(port: int, name: str, device: str) -> tuple[int, bytes]:
    """One request on its own connection; (status, body) read with h11."""
    command = ANSWERS[name][0]
    body = FETCH_REQUEST if command == "ItemOperations" else SYNC_REQUEST
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(conn.send(h11.Request(
            method="POST", target=_path(command, device),
            headers=[("Host", "gw"), ("Content-Length", str(len(body))), *_headers(name).items()])))
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status, parts = 0, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(parts)


async def _until(cond, what: str, bound: float = 20) -> None:
    with trio.fail_after(bound):
        while not cond():
            await trio.sleep(0.02)


def _env(tmp_path, up_port: int) -> dict:
    return {"SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0",
            "SEG_FAST_UPSTREAM_URL": f"http://127.0.0.1:{up_port}",
            "SEG_FAST_POLICY_SQLITE_PATH": str(tmp_path / "policy.db"),
            "SEG_FAST_SECURITY_MASTER_KEY_FILE": str(tmp_path / "master.key"),
            "SEG_FAST_SECURITY_KEY_STATE_FILE": str(tmp_path / "keys.json")}


@pytest.fixture
def held(monkeypatch):
    h = _Held(exchange._apply)
    monkeypatch.setattr(exchange, "_apply", h)
    yield h
    h.release.set()


def test_small_answer_served_while_a_large_one_is_transformed(tmp_path, upstream, held):
    _store(tmp_path)

    async def main():
        held.loop_thread = threading.get_ident()
        gw = Gateway(load_config(None, env=_env(tmp_path, upstream)))
        opener = Opener(str(tmp_path / "master.key"), str(tmp_path / "keys.json"))
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.serve)
            big: list = []

            async def big_request():
                big.append(await _eas(gw.port, "pdf-big", "DEV1"))

            nursery.start_soon(big_request)
            await trio.to_thread.run_sync(held.entered.wait, 20)
            assert held.entered.is_set()
            assert gw.unsent.total >= len(ANSWERS["pdf-big"][1])     # its bytes held meanwhile
            # The large answer's transform is under way (held): another device is answered.
            status, small = await _eas(gw.port, "links-small", "DEV2")
            assert status == 200 and not big
            assert small == _reference("links-small", str(tmp_path / "master.key"))
            held.release.set()
            await _until(lambda: big, "the large answer")
            assert big[0][0] == 200
            _same("pdf-big", big[0][1], _reference("pdf-big", str(tmp_path / "master.key")), opener)
            await _until(lambda: gw.unsent.total == 0, "the hold released")
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not held.timed_out
    sizes = {len(b): name for name, (_c, b) in ANSWERS.items()}
    ran_on_loop = {sizes[n]: on_loop for n, on_loop in held.threads.items()}
    assert ran_on_loop == {"pdf-big": False, "links-small": True}


def test_device_gone_mid_transform_leaves_nothing_held(tmp_path, upstream, held):
    _store(tmp_path)
    # A fetch read whole (the streaming seal, proxy/sealstream.py, would not hold it: its own tests).
    env = dict(_env(tmp_path, upstream), SEG_FAST_SECURITY_STREAM_SEAL="false")

    async def main():
        held.loop_thread = threading.get_ident()
        gw = Gateway(load_config(None, env=env))
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.serve)
            command = "ItemOperations"
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(conn.send(h11.Request(
                method="POST", target=_path(command, "DEV3"),
                headers=[("Host", "gw"), ("Content-Length", str(len(FETCH_REQUEST))),
                         *_headers("fetch-big").items()])) + conn.send(h11.Data(data=FETCH_REQUEST))
                + conn.send(h11.EndOfMessage()))
            await trio.to_thread.run_sync(held.entered.wait, 20)
            assert held.entered.is_set()
            assert gw.active == 1 and gw.unsent.total > 0
            await stream.aclose()             # the device leaves while its answer is transformed
            limiter = exchange._thread_limiter()
            assert limiter.borrowed_tokens == 1
            held.release.set()
            await _until(lambda: gw.active == 0 and gw.unsent.total == 0 and limiter.borrowed_tokens == 0,
                         "the connection closed, its hold and the thread released")
            # ... and the worker serves the next device as before.
            status, _ = await _eas(gw.port, "links-small", "DEV2")
            assert status == 200
            await _until(lambda: gw.active == 0, "the second connection closed")
            assert gw.unsent.total == 0
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not held.timed_out


# -- the GIL-free helpers the thread's transform uses -------------------------------------

def test_utf8_text_agrees_with_pythons_decoder():
    from seg_fast.content._mime import utf8_text

    def python(b: bytes) -> bool:
        try:
            return "\0" not in b.decode("utf-8")
        except UnicodeDecodeError:
            return False

    for cp in range(0, 0x110000, 7):              # every length, surrogates included
        b = chr(cp).encode("utf-8", "surrogatepass")
        assert utf8_text(b) == python(b) and utf8_text(b[:-1]) == python(b[:-1]), hex(cp)
    rng = random.Random(5)
    pieces = [bytes([x]) for x in range(256)] + [b"\xe0\x80\xaf", b"\xc0\xaf", b"\xf4\x90\x80\x80", "\u20ac".encode()]
    for _ in range(20000):
        b = b"".join(rng.choice(pieces) if rng.random() < 0.4 else b"a" for _ in range(rng.randint(0, 6)))
        assert utf8_text(b) == python(b), b


def test_join_is_bytes_join():
    from seg_fast.content._mime import join

    chunks = [b"ab", memoryview(b"xcdx")[1:3], bytearray(b"ef"), b""]
    assert join(chunks) == b"".join(chunks) == b"abcdef"
    assert join(()) == b""
