"""The device leg's TLS (proxy/tlsio.py) through a running `seg-fast serve`, trustme certificates.

The friendly cases (a whole EAS session, session resumption, close_notify both ways) and
the hostile ones (a handshake that stalls, garbage for a ClientHello, TLS 1.0/1.1, a
renegotiation, a record over the limit, a device that never reads its answer, an EOF
without close_notify): each must end that connection alone, and the worker keeps serving.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import h11
import pytest
import trio
import trustme
from proxy_helpers import MiniUpstream

from seg_fast.eas.wbxml import Element, encode
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.state import INBOX
from seg_fast.sim.tree import E, text

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "secret"
BIG = 16 * 1024 * 1024                  # an answer no socket buffer holds
LARGE = os.urandom(3 * 1024 * 1024 + 123)    # an attachment-sized answer, not a repeated byte
EAS = b"/Microsoft-Server-ActiveSync"


# -- set-up: certificates, mail servers on a background trio loop, seg-fast serve ------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tlsio-certs")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    return ca, d


def client_context(ca, **kw) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


class Upstreams:
    """The mailbox simulator, a mail server with a BIG answer and one (``mixed``) that answers
    LARGE to anything but a Ping, which it holds until ``release_pings``; on their own trio loop."""

    def __init__(self):
        self.sim = MailboxSimulator(password=PASSWORD, seed=7, require_provisioning=False, initial_messages=20)
        self.big = MiniUpstream(lambda req, body: (200, [(b"Content-Length", str(BIG).encode())], b"B" * BIG))
        self.mixed = MiniUpstream(self._mixed)
        self._release = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "the mail servers did not start"

    async def _main(self):
        async with trio.open_nursery() as nursery:
            self._scope, self._token = nursery.cancel_scope, trio.lowlevel.current_trio_token()
            await nursery.start(self.sim.serve, "127.0.0.1", 0)
            await nursery.start(self.big.serve)
            await nursery.start(self.mixed.serve)
            self._release = trio.Event()
            self._ready.set()

    async def _mixed(self, req, body):
        if b"Cmd=Ping" in req.target:
            await self._release.wait()
            return 200, [(b"Content-Type", b"application/vnd.ms-sync.wbxml")], PING_ANSWER
        return 200, [(b"Content-Type", b"application/octet-stream")], LARGE

    def release_pings(self):
        def release():
            self._release.set()
            self._release = trio.Event()

        trio.from_thread.run_sync(release, trio_token=self._token)

    @property
    def token(self):
        return self._token

    def close(self):
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)


@pytest.fixture(scope="module")
def upstreams():
    u = Upstreams()
    yield u
    u.close()


class Serve:
    """`seg-fast serve` (one worker) with device-leg TLS; stderr (incidents) collected."""

    def __init__(self, tmp: Path, upstream: str, cert_dir: Path, **timeouts):
        tmp.mkdir(parents=True, exist_ok=True)
        t = {"tls_handshake": 1.0, "shutdown_grace": 5.0, **timeouts}
        lines = ["workers = 1", "[listener]", 'host = "127.0.0.1"', "port = 0",
                 f'tls_cert = "{cert_dir / "cert.pem"}"', f'tls_key = "{cert_dir / "key.pem"}"',
                 "[upstream]", f'url = "{upstream}"', "[admin]", "enabled = false", "[log]", 'transactions = ""',
                 "[policy]", "allow_if_no_policies = true", f'sqlite_path = "{tmp / "policy.db"}"',
                 "[security]", "block_attachments_without_policy = false",
                 f'master_key_file = "{tmp / "master.key"}"', f'key_state_file = "{tmp / "keys.json"}"',
                 "[timeouts]"] + [f"{k} = {v}" for k, v in t.items()]
        cfg = tmp / "gateway.toml"
        cfg.write_text("\n".join(lines) + "\n")
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp / "state"))
        self.proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)],
                                     env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self.port = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        end = time.monotonic() + 30
        while self.port is None:
            assert time.monotonic() < end and self.proc.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.05)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.port is None and "worker listening on" in line:
                self.port = int(line.rsplit(":", 1)[1].split()[0])

    def incidents(self, kind: str) -> list[dict]:
        found = []
        for line in list(self.lines):
            if f'"{kind}"' in line:
                try:
                    found.append(json.loads(line[line.index("{"):]))
                except ValueError:
                    found.append({"line": line})
        return found

    def wait_incident(self, kind: str, match: str = "", again=None, bound: float = 20) -> dict:
        """The first logged incident of ``kind`` whose line holds ``match``. Lines are rate-limited
        (one per kind per second), so ``again`` (if given) repeats the provocation meanwhile."""
        found = until(lambda: [i for i in self.incidents(kind) if match in json.dumps(i)], bound, again,
                      lambda: f"no {kind} incident logged; stderr:\n" + "".join(self.lines)[-3000:])
        return found[0]

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def serving(tmp_path_factory, name: str, upstream_port: int, certs):
    """A module's gateway in front of a mail server: it must stop cleanly, having contained nothing."""
    gw = Serve(tmp_path_factory.mktemp(name), f"http://127.0.0.1:{upstream_port}", certs[1])
    yield gw
    assert gw.stop() == 0
    assert not gw.incidents("contained_exception"), "".join(gw.lines)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstreams, certs):
    yield from serving(tmp_path_factory, "tlsio-gw", upstreams.sim.port, certs)


def until(found, bound: float = 20, again=None, why=lambda: "gave up waiting"):
    """Poll ``found()`` (calling ``again()`` meanwhile, if given) until it is truthy, for at most
    ``bound`` seconds: its value, or AssertionError with ``why()``."""
    end = time.monotonic() + bound
    while not (value := found()):
        assert time.monotonic() < end, why()
        if again is not None:
            again()
        time.sleep(0.05)
    return value


# -- a blocking HTTPS client ---------------------------------------------------------------

AUTH = b"Basic " + base64.b64encode(f"kim:{PASSWORD}".encode())


def options_request(close: bool = False) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    headers = [(b"Host", b"localhost"), (b"Authorization", AUTH)]
    if close:
        headers.append((b"Connection", b"close"))
    return conn.send(h11.Request(method=b"OPTIONS", target=EAS, headers=headers)) + conn.send(h11.EndOfMessage())


PING_BODY = encode(Element("Ping:Ping", children=[
    Element("Ping:HeartbeatInterval", text="900"),
    Element("Ping:Folders", children=[Element("Ping:Folder", children=[
        Element("Ping:Id", text="1"), Element("Ping:Class", text="Email")])])]))
PING_ANSWER = encode(Element("Ping:Ping", children=[Element("Ping:Status", text="2")]))


def eas_request(cmd: str, device: str, body: bytes = b"") -> bytes:
    """A POST of an EAS command (kim's credentials), as a device sends it."""
    conn = h11.Connection(h11.CLIENT)
    target = EAS + f"?Cmd={cmd}&User=kim&DeviceId={device}&DeviceType=iPhone".encode()
    headers = [(b"Host", b"localhost"), (b"Authorization", AUTH), (b"MS-ASProtocolVersion", b"14.1"),
               (b"Content-Type", b"application/vnd.ms-sync.wbxml"), (b"Content-Length", str(len(body)).encode())]
    return conn.send(h11.Request(method=b"POST", target=target, headers=headers)) + conn.send(h11.Data(data=body)) \
        + conn.send(h11.EndOfMessage())


def read_answer(sock) -> tuple[int, list, bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"OPTIONS", target=EAS, headers=[(b"Host", b"x")]))
    conn.send(h11.EndOfMessage())
    status, headers, body = None, None, bytearray()
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(ev, h11.Response):
            status, headers = ev.status_code, ev.headers
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            return status, headers, bytes(body)


def connect(port: int, ctx: ssl.SSLContext, **kw) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    return ctx.wrap_socket(raw, server_hostname="localhost", **kw)


def served(gw: Serve, ca) -> bool:
    """The worker answers a new TLS connection."""
    with connect(gw.port, client_context(ca)) as s:
        s.sendall(options_request())
        return read_answer(s)[0] == 200


def closed_by_peer(sock: socket.socket) -> bytes:
    """Read until the gateway closes (EOF or reset; a generous bound): what came first."""
    got = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return got
            got += data
    except (ConnectionResetError, ssl.SSLError):
        return got


# -- friendly ------------------------------------------------------------------------------

async def test_eas_session_over_tls(gateway, upstreams, certs):
    """FolderSync, Sync, an attachment three ways and a parked Ping, all through the TLS leg."""
    ca, _ = certs
    dev = EasClient("127.0.0.1", gateway.port, "kim", PASSWORD, "DEVTLS1", ssl_context=client_context(ca))
    try:
        r = await dev.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
        assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "1"
        r = await dev.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
                              E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", INBOX)))))
        key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
        r = await dev.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
                              E("AirSync:SyncKey", key), E("AirSync:CollectionId", INBOX),
                              E("AirSync:GetChanges", "1"), E("AirSync:WindowSize", "50"),
                              E("AirSync:Options", E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", "2")))))))
        assert r.status == 200
        refs = [el.text for el in r.doc.iter() if el.tag == "AirSyncBase:FileReference"]
        assert refs, "the corpus lists attachments"
        fetch = E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                  E("AirSyncBase:FileReference", refs[0])))
        r = await dev.request("ItemOperations", fetch)
        inline = base64.b64decode(text(r.doc, "ItemOperations:Response", "ItemOperations:Fetch",
                                       "ItemOperations:Properties", "ItemOperations:Data"))
        r = await dev.request("GetAttachment", params={"AttachmentName": refs[0]})
        assert r.status == 200 and r.body == inline and len(inline) > 0
        ping = E("Ping:Ping", E("Ping:HeartbeatInterval", "300"),
                 E("Ping:Folders", E("Ping:Folder", E("Ping:Id", INBOX), E("Ping:Class", "Email"))))
        result = []
        async with trio.open_nursery() as nursery:
            async def do_ping():
                result.append(await dev.request("Ping", ping))

            nursery.start_soon(do_ping)
            # The Ping waits at the mail server (and in the gateway's parking lot, its TLS
            # stream with it) until mail arrives.
            with trio.fail_after(20):
                while upstreams.sim.parked < 1:
                    await trio.sleep(0.02)
            assert not result
            await trio.to_thread.run_sync(lambda: trio.from_thread.run_sync(
                upstreams.sim.deliver, "kim", trio_token=upstreams.token))
        assert result[0].status == 200 and text(result[0].doc, "Ping:Status") == "2"
        r = await dev.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
        assert r.status == 200                   # the connection carries on after the parked Ping
    finally:
        await dev.aclose()


def test_tls13_session_resumption_and_close_notify(gateway, certs):
    ca, _ = certs
    ctx = client_context(ca)
    with connect(gateway.port, ctx) as s:
        assert s.version() == "TLSv1.3" and not s.session_reused
        s.sendall(options_request())
        assert read_answer(s)[0] == 200
        session = s.session
    # A new connection offers the ticket: resumed, as devices do.
    with connect(gateway.port, ctx, session=session, suppress_ragged_eofs=False) as s:
        assert s.session_reused
        s.sendall(options_request(close=True))
        assert read_answer(s)[0] == 200
        # The gateway closes after a Connection: close answer with a close_notify: a clean
        # EOF (a ragged one raises SSLEOFError here, suppress_ragged_eofs being off).
        assert s.recv(100) == b""


def test_eof_without_close_notify_is_an_ordinary_close(gateway, certs):
    ca, _ = certs
    s = connect(gateway.port, client_context(ca))
    s.sendall(options_request())
    assert read_answer(s)[0] == 200
    s.sendall(options_request()[:20])            # half a request, then the TCP connection ends
    raw = socket.socket(fileno=os.dup(s.fileno()))
    raw.shutdown(socket.SHUT_RDWR)
    raw.close()
    s.close()
    assert served(gateway, ca)
    assert not gateway.incidents("contained_exception")


@pytest.fixture(scope="module")
def mixed_gateway(tmp_path_factory, upstreams, certs):
    """A gateway in front of ``upstreams.mixed`` (LARGE answers, Pings held)."""
    yield from serving(tmp_path_factory, "tlsio-mixed", upstreams.mixed.port, certs)


def test_a_connection_that_carried_a_large_answer_parks_a_ping_and_goes_on(mixed_gateway, upstreams, certs):
    """A device fetches a 3 MB attachment, then its Ping parks on the same connection (the
    connection idle, as parked Pings are for hours); when mail comes the answer reaches it,
    and the connection serves the next large answer intact."""
    ca, _ = certs
    digest = hashlib.sha256(LARGE).hexdigest()
    with connect(mixed_gateway.port, client_context(ca)) as s:
        s.sendall(eas_request("ItemOperations", "PARK1"))
        status, _, body = read_answer(s)
        assert status == 200 and len(body) == len(LARGE) and hashlib.sha256(body).hexdigest() == digest
        pings = sum(1 for req, _ in upstreams.mixed.requests if b"Cmd=Ping" in req.target)
        s.sendall(eas_request("Ping", "PARK1", PING_BODY))
        # The Ping reached the mail server, which holds it.
        until(lambda: sum(1 for req, _ in upstreams.mixed.requests if b"Cmd=Ping" in req.target) > pings,
              why=lambda: "the Ping never reached the mail server")
        upstreams.release_pings()
        status, _, body = read_answer(s)
        assert status == 200 and body == PING_ANSWER
        s.sendall(eas_request("ItemOperations", "PARK1"))
        status, _, body = read_answer(s)
        assert status == 200 and hashlib.sha256(body).hexdigest() == digest


@pytest.mark.skipif(not shutil.which("openssl") and os.environ.get("CI") != "true",
                    reason="needs the openssl command (scripts/test.sh installs it; under CI its absence fails)")
def test_a_key_update_is_answered_and_the_connection_goes_on(gateway, certs):
    """TLS 1.3 KeyUpdate (update_requested) from the device, read while the connection idles:
    the gateway's own KeyUpdate goes out ahead of its next record (OpenSSL sends it with the
    next write), and the answer to the next request comes under the new keys both ways."""
    ca, d = certs
    (d / "ca.pem").write_bytes(ca.cert_pem.bytes())
    proc = subprocess.Popen(["openssl", "s_client", "-msg", "-crlf", "-connect", f"127.0.0.1:{gateway.port}",
                             "-CAfile", str(d / "ca.pem"), "-servername", "localhost"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(x.decode(errors="replace") for x in proc.stdout), daemon=True).start()

    def wait_for(text: str, after: int = 0) -> int:
        at = until(lambda: "".join(out).find(text, after) + 1 or proc.poll() is not None,
                   why=lambda: f"no {text!r} from s_client:\n{''.join(out)[-3000:]}")
        assert at is not True, f"s_client ended before {text!r}:\n{''.join(out)[-3000:]}"
        return at - 1

    try:
        wait_for("Verify return code: 0 (ok)")
        proc.stdin.write(b"K\n")                # s_client: a KeyUpdate asking for the peer's
        proc.stdin.flush()
        sent = wait_for(">>> TLS 1.3, Handshake [length 0005], KeyUpdate")
        proc.stdin.write(b"OPTIONS " + EAS + b" HTTP/1.1\nHost: localhost\nAuthorization: " + AUTH + b"\n\n")
        proc.stdin.flush()
        answered = wait_for("<<< TLS 1.3, Handshake [length 0005], KeyUpdate", sent)
        wait_for("HTTP/1.1 200 OK", answered)
    finally:
        proc.kill()
        proc.wait()
    assert served(gateway, ca)


def test_a_key_update_before_a_big_answer_goes_out_ahead_of_its_batched_records(tmp_path, upstreams, certs):
    """The answer is big (16 MiB): its records are made a batch at a time in memory and
    written as plain bytes (tlsio._write_batched). The device's KeyUpdate (update_requested)
    comes just before its request: the gateway's own KeyUpdate must go out in its place among
    the records, or s_client's decryption fails (bad record mac) before the last byte."""
    ca, d = certs
    (d / "ca.pem").write_bytes(ca.cert_pem.bytes())
    gw = Serve(tmp_path / "gw", f"http://127.0.0.1:{upstreams.big.port}", d)
    msgs = tmp_path / "msgs.txt"
    proc = subprocess.Popen(["openssl", "s_client", "-msg", "-msgfile", str(msgs), "-crlf",
                             "-connect", f"127.0.0.1:{gw.port}", "-CAfile", str(d / "ca.pem"),
                             "-servername", "localhost"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = bytearray()
    threading.Thread(target=lambda: [text.extend(x) for x in iter(lambda: proc.stdout.read1(1 << 16), b"")],
                     daemon=True).start()
    try:
        until(lambda: b"Verify return code: 0 (ok)" in text or proc.poll() is not None)
        proc.stdin.write(b"K\n")                # s_client: a KeyUpdate asking for the peer's
        proc.stdin.flush()
        until(lambda: b"KEYUPDATE" in text and msgs.exists()
              and ">>> TLS 1.3, Handshake [length 0005], KeyUpdate" in msgs.read_text())
        proc.stdin.write(b"OPTIONS " + EAS + b" HTTP/1.1\nHost: localhost\nAuthorization: " + AUTH + b"\n\n")
        proc.stdin.flush()
        until(lambda: text.find(b"HTTP/1.1 200") >= 0 or proc.poll() is not None, why=lambda: bytes(text[-2000:]))
        head = text.find(b"HTTP/1.1 200")
        assert head >= 0, bytes(text[-2000:])
        until(lambda: text.count(b"B", head) >= BIG or proc.poll() is not None, bound=60,
              why=lambda: f"{text.count(b'B', head)} of {BIG} bytes")
        assert text.count(b"B", head) == BIG and proc.poll() is None, bytes(text[-2000:])
        log = msgs.read_text()
        assert ">>> TLS 1.3, Handshake [length 0005], KeyUpdate" in log
        assert "<<< TLS 1.3, Handshake [length 0005], KeyUpdate" in log   # the gateway's, in its place
    finally:
        proc.kill()
        proc.wait()
    assert gw.stop() == 0


# -- hostile -------------------------------------------------------------------------------

def test_a_stalled_handshake_is_cut_while_others_are_served(gateway, certs):
    ca, _ = certs
    hello = bytearray()
    # The first bytes of a real ClientHello, then nothing.
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(ca).wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        hello += out.read()
    stalled = [socket.create_connection(("127.0.0.1", gateway.port), timeout=20) for _ in range(3)]
    stalled[0].sendall(bytes(hello[:40]))
    stalled[1].sendall(bytes(hello))             # the whole hello, but never the client's Finished
    try:
        assert served(gateway, ca)               # the worker is not held up by them
        for s in stalled:
            got = closed_by_peer(s)              # timeouts.tls_handshake (1 s here) ends each
            assert got[:1] in (b"", b"\x16")     # nothing, or the server's handshake flight
        gateway.wait_incident("tls_handshake_timeout")
    finally:
        for s in stalled:
            s.close()
    assert served(gateway, ca)


def test_garbage_for_a_client_hello_is_refused(gateway, certs):
    ca, _ = certs

    def garbage():
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert closed_by_peer(s) == b""      # OpenSSL sends no alert to plain HTTP: just closed

    garbage()
    # Refused by TLS as what it is, not left to the handshake deadline.
    incident = gateway.wait_incident("tls_handshake_failed", "HTTP_REQUEST", again=garbage)
    assert incident["client_ip"] == "127.0.0.1"
    assert served(gateway, ca)


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_1_0_and_1_1_are_refused(gateway, certs, version):
    ca, _ = certs
    old = client_context(ca)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    v = getattr(ssl.TLSVersion, version)
    old.minimum_version = old.maximum_version = v
    with pytest.raises(ssl.SSLError) as err:
        connect(gateway.port, old).close()
    # The server's refusal (a protocol_version alert), not our own side's.
    assert "PROTOCOL_VERSION" in str(err.value).upper() or "UNSUPPORTED_PROTOCOL" in str(err.value).upper()
    assert "ALERT" in str(err.value).upper(), str(err.value)
    assert served(gateway, ca)


@pytest.mark.skipif(not shutil.which("openssl") and os.environ.get("CI") != "true",
                    reason="needs the openssl command (scripts/test.sh installs it; under CI its absence fails)")
def test_client_renegotiation_is_refused(gateway, certs):
    ca, d = certs
    (d / "ca.pem").write_bytes(ca.cert_pem.bytes())
    # TLS 1.2 (TLS 1.3 has no renegotiation); "R" asks s_client to renegotiate.
    out = subprocess.run(["openssl", "s_client", "-tls1_2", "-msg", "-connect", f"127.0.0.1:{gateway.port}",
                          "-CAfile", str(d / "ca.pem"), "-servername", "localhost"],
                         input=b"R\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    said = out.stdout.decode(errors="replace")
    assert "RENEGOTIATING" in said, said[-2000:]
    # The gateway answers the new ClientHello with a no_renegotiation alert (no second handshake).
    tail = said[said.index("RENEGOTIATING"):]
    assert "<<< TLS 1.2, Alert [length 0002], warning no_renegotiation" in tail, tail[-2000:]
    assert "ServerHello" not in tail
    assert served(gateway, ca)


def test_a_record_over_the_limit_ends_the_connection(gateway, certs):
    ca, _ = certs
    s = connect(gateway.port, client_context(ca))
    s.sendall(options_request())
    assert read_answer(s)[0] == 200
    raw = socket.socket(fileno=os.dup(s.fileno()))
    raw.settimeout(20)
    try:
        # An application-data record claiming 65535 bytes (TLS allows 2^14 + 256).
        raw.sendall(b"\x17\x03\x03\xff\xff" + os.urandom(65535))
        closed_by_peer(raw)                      # the gateway ends it (record_overflow)
    finally:
        raw.close()
        s.close()
    assert served(gateway, ca)
    assert not gateway.incidents("contained_exception")


@pytest.mark.parametrize("bad", ["tampered", "handshake message", "unprotected change_cipher_spec",
                                 "a header of no length behind a request"])
def test_a_forged_record_after_the_handshake_ends_that_connection_with_its_alert(gateway, certs, tmp_path, bad):
    """After a TLS 1.3 handshake the worker reads the device's records with its own record
    layer (proxy/tls13.py, OpenSSL's object freed). A record the test seals itself (keys from
    the client's keylog, ``cryptography``'s AEAD) is served like the client's own; then one
    forged record: the gateway sends its fatal alert, sealed so the client's OpenSSL reads it,
    closes that connection, and the worker goes on serving others. The last case: the record
    layer reads a record's body with the next record's header (one read(2) per record), so a
    header no record can have, in the same write as a request's record, is not lost in the read
    that took it: the request is answered, then decode_error."""
    from tls13_device import Device, keylog_secret
    ca, _ = certs
    keylog = tmp_path / "keys.log"
    s = connect(gateway.port, client_context(ca, keylog_filename=str(keylog)))
    assert s.version() == "TLSv1.3"
    s.sendall(options_request())                   # the client's record 0
    assert read_answer(s)[0] == 200
    dev = Device(s.cipher()[0], keylog_secret(keylog, "CLIENT_TRAFFIC_SECRET_0"))
    dev.seq = 1
    raw = socket.socket(fileno=os.dup(s.fileno()))
    raw.settimeout(20)                              # the descriptor is non-blocking (s has a timeout)
    try:
        raw.sendall(dev.record(options_request() + b"\x17"))    # record 1, the test's own
        assert read_answer(s)[0] == 200                         # read by the client's OpenSSL
        raw.sendall({"tampered": lambda: dev.record(options_request() + b"\x17", tamper=True),
                     "handshake message": lambda: dev.record(bytes([4, 0, 0, 4]) + b"tick" + b"\x16"),
                     "unprotected change_cipher_spec": lambda: b"\x14\x03\x03\x00\x01\x01",
                     "a header of no length behind a request":
                         lambda: dev.record(options_request() + b"\x17") + b"\x15\x03\x03\x00\x00"}[bad]())
        if bad == "a header of no length behind a request":
            assert read_answer(s)[0] == 200
        with pytest.raises(ssl.SSLError) as err:
            s.recv(100)
        assert {"tampered": "BAD_RECORD_MAC", "a header of no length behind a request": "DECODE_ERROR"}.get(
            bad, "UNEXPECTED_MESSAGE") in str(err.value)
        assert closed_by_peer(raw) == b""
    finally:
        raw.close()
        s.close()
    assert served(gateway, ca)
    assert not gateway.incidents("contained_exception")


def test_a_big_answer_arrives_whole_and_a_device_that_never_reads_it_is_cut(tmp_path, upstreams, certs):
    ca, d = certs
    gw = Serve(tmp_path / "gw", f"http://127.0.0.1:{upstreams.big.port}", d, device_write=1.0)
    try:
        # A device that reads gets all of it (encrypted a slice at a time, never all at once).
        with connect(gw.port, client_context(ca)) as s:
            s.sendall(options_request())
            status, _, body = read_answer(s)
            assert status == 200 and len(body) == BIG and body.count(b"B") == BIG
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(20)
        raw.connect(("127.0.0.1", gw.port))
        s = client_context(ca).wrap_socket(raw, server_hostname="localhost")
        s.sendall(options_request())             # the answer: BIG bytes, never read
        gw.wait_incident("device_write_timeout")
        taken = 0
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                taken += len(data)
        except (ConnectionResetError, ssl.SSLError):
            pass
        assert taken < BIG                       # cut (reset), not delivered
        s.close()
        assert served(gw, ca)                    # the worker goes on
        assert not gw.incidents("contained_exception")
    finally:
        assert gw.stop() == 0


def test_a_request_in_one_byte_records_is_served(gateway, certs):
    """Each byte of the request head its own TLS record (a record per send, Nagle off): read a
    record at a time, reassembled, answered."""
    ca, _ = certs
    with connect(gateway.port, client_context(ca)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, byte in enumerate(options_request()):
            s.sendall(bytes([byte]))
        assert read_answer(s)[0] == 200
    assert served(gateway, ca)


def test_unread_bytes_do_not_turn_the_close_into_a_reset(gateway, certs):
    """A record the gateway refuses at its header (a 65535-byte handshake record), then 4,000
    bytes it never reads: the connection still ends with a FIN (an EOF here), not the reset
    the kernel sends when a socket is closed over unread bytes."""
    ca, _ = certs
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as s:
        s.sendall(b"\x16\x03\x01\xff\xff" + b"\x00" * 4000)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while data := s.recv(65536):        # ConnectionResetError here is the failure
            got += data
        assert got[:1] in (b"", b"\x15")       # nothing, or OpenSSL's alert record
    assert served(gateway, ca)
