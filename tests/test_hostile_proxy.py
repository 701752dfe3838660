"""Hostile traffic against a running `seg-fast serve` (2 workers) in front of the simulator.

Each attack of issue 9 ("Worker crashes", "Slow and greedy clients", CL+TE, exact
max_header_bytes) goes over a real socket; after each, the worker PIDs (the control
process's children) are the ones from before and a normal device still gets its
answer. Deadlines are configured small (1.5 s) and everything is polled with a
generous bound; nothing asserts a duration.
"""
from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h11
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processes import REPO, start_serve, stop_process, wait_listening
from redis_server import free_port
from seg_fast.proxy.forked import worker_pids
from seg_fast.sim.client import EasClient
from seg_fast.sim.corpus import Corpus
from seg_fast.sim.tree import E, decode, encode, text

SEED, BIG_MESSAGE = 1, 11             # Corpus(1).message(11) carries a 2 MB attachment
PASSWORD = "secret"
DEADLINE = 1.5                        # timeouts.request_head / request_body / device_write here
PER_ADDRESS = 30                      # limits.max_connections_per_address here
POOL = 2                              # upstream.pool_size here (per worker)
UNSENT = 8_000_000                    # limits.max_unsent_bytes here: under three 2.8 MB answers
EAS = "/Microsoft-Server-ActiveSync"


def _auth(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()


def _eas_head(cmd: str, user: str, extra: str = "", method: str = "POST") -> bytes:
    return (f"{method} {EAS}?Cmd={cmd}&User={user}&DeviceId=HOSTILE1&DeviceType=iPhone HTTP/1.1\r\n"
            f"Host: gw\r\nAuthorization: {_auth(user)}\r\nMS-ASProtocolVersion: 14.1\r\n"
            f"User-Agent: Apple-iPhone/1.0\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n{extra}").encode()


FETCH_BODY = encode(E("ItemOperations:ItemOperations", E(
    "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
    E("AirSyncBase:FileReference", f"1:{BIG_MESSAGE + 1}:0"))))
FETCH = _eas_head("ItemOperations", "reader", f"Content-Length: {len(FETCH_BODY)}\r\n\r\n") + FETCH_BODY


class Gw:
    def __init__(self, proc, port: int, sim, sim_port: int):
        self.proc, self.port, self.sim, self.sim_port = proc, port, sim, sim_port
        self.stderr: list[str] = []
        self.pids: set[int] = set()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        # Read it all: a worker writing to a full pipe would block.
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))

    def workers(self) -> set[int]:
        """The control process's live children (a dead worker not yet reaped is left out)."""
        alive = set()
        for pid in worker_pids(self.proc.pid):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                alive.add(pid)
        return alive

    def crashed(self) -> bool:
        return any("exited with" in line or "Traceback" in line for line in self.stderr)

    def incidents(self, kind: str) -> list[dict]:
        out = []
        for line in list(self.stderr):
            if line.startswith("{") and f'"incident":"{kind}"' in line:
                out.append(json.loads(line))
        return out

    def logged(self, kind: str, bound: float = 20.0) -> list[dict]:
        """The incident lines of a kind, waited for: a worker may log after it has closed the
        socket the test watched, and the reader thread appends lines when it gets them."""
        end = time.monotonic() + bound
        while not (found := self.incidents(kind)) and time.monotonic() < end:
            time.sleep(0.05)
        return found


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    sim = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--seed", str(SEED),
                            "--initial", str(BIG_MESSAGE + 1), "--no-provisioning", "--password", PASSWORD],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        sim_port = json.loads(sim.stdout.readline())["sim_port"]
        port = free_port()
        cfg = tmp / "gw.toml"
        cfg.write_text(
            f'workers = 2\n'
            f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\npool_size = {POOL}\n'
            f'[admin]\nenabled = false\n'
            f'[log]\ntransactions = ""\n'
            f'[policy]\nallow_if_no_policies = false\n'
            f'[timeouts]\nrequest_head = {DEADLINE}\nrequest_body = {DEADLINE}\ndevice_write = {DEADLINE}\n'
            f'[limits]\nmax_connections_per_address = {PER_ADDRESS}\nmax_unsent_bytes = {UNSENT}\n'
            # the buffered path (a fetch streamed instead holds no whole answer: sealstream.py)
            f'[security]\nstream_seal = false\n')
        # The demo's policies: email security on, so the ItemOperations answer takes the
        # buffered (transformed) path; its docx attachment is allowed for an unmanaged device.
        subprocess.run([sys.executable, "-m", "seg_fast", "policy", "--config", str(cfg), "load",
                        str(REPO / "src" / "seg_fast" / "demo_policies.json")], check=True, cwd=tmp,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src"), "SEG_FAST_STATE_DIR": str(tmp / "state")},
                       stdout=subprocess.DEVNULL)
        proc = start_serve(cfg, tmp)
        g = Gw(proc, port, sim, sim_port)
        try:
            wait_listening(port, proc)
            end = time.monotonic() + 60
            while len(g.workers()) < 2 and time.monotonic() < end:
                time.sleep(0.1)
            g.pids = g.workers()
            assert len(g.pids) == 2
            # The reader's mailbox is the first the simulator makes (item i+1 = message i):
            # its fetch answers the 2 MB attachment (about 2.8 MB of base64 in WBXML).
            assert len(Corpus(SEED)[BIG_MESSAGE].attachments[0][2]) > 2_000_000
            raw = _exchange(port, FETCH, bound=60)
            assert raw.startswith(b"HTTP/1.1 200") and len(raw) > 2_700_000
            yield g
        finally:
            stop_process(proc)
    finally:
        stop_process(sim)


def _device_ok(port: int) -> None:
    """A normal device: FolderSync answered with Status 1 (through either worker)."""
    async def one(i):
        c = EasClient("127.0.0.1", port, "normal", PASSWORD, f"NORMAL{i}", device_type="iPhone",
                      user_agent="Apple-iPhone/1.0")
        try:
            r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
            assert r.status == 200, r.status
            assert text(r.doc, "FolderHierarchy:Status") == "1"
        finally:
            await c.aclose()

    async def main():
        with trio.fail_after(60):
            for i in range(6):        # new connections: the kernel spreads them over both workers
                await one(i)

    trio.run(main)


def _unharmed(gw: Gw) -> None:
    assert gw.proc.poll() is None
    assert gw.workers() == gw.pids, "a worker was replaced"
    assert not gw.crashed(), "".join(gw.stderr)[-3000:]
    _device_ok(gw.port)


def _exchange(port: int, data: bytes, bound: float = 30.0, source: str | None = None) -> bytes:
    """Send ``data``, close our side, read until the gateway closes (within ``bound``)."""
    s = socket.socket()
    if source:
        s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    try:
        return _send_and_read(s, data, bound)
    finally:
        s.close()


def _send_and_read(s: socket.socket, data: bytes, bound: float = 30.0) -> bytes:
    """On a connected socket: send ``data``, close our side, read until the gateway closes."""
    s.settimeout(bound)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass                          # the gateway may close before it read everything
    out = b""
    end = time.monotonic() + bound
    try:
        while time.monotonic() < end:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out
    raise AssertionError(f"gateway kept the connection open past {bound} s")


def _statuses(raw: bytes) -> list[int]:
    """The status codes of the answers in ``raw``, parsed by h11 (the independent reader)."""
    conn = h11.Connection(h11.CLIENT)
    out = []
    conn.receive_data(raw)
    conn.receive_data(b"")
    while True:
        # h11 needs a request to read an answer against: a bodyless GET per answer.
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError:
            # The end of the bytes between answers is the gateway closing; inside one, a broken answer.
            return out if not conn.trailing_data[0] else out + [-1]
        if isinstance(ev, h11.Response):
            out.append(ev.status_code)
        elif isinstance(ev, h11.EndOfMessage):
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return out
        elif ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
            return out


# -- worker crashes -------------------------------------------------------------------------

def test_garbage_after_a_request_is_answered_400_and_no_worker_dies(gw):
    # The probe, 20 times: one answer each for the request, then 400 for "X".
    for _ in range(20):
        raw = _exchange(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nX\r\n\r\n")
        assert _statuses(raw) == [404, 400]
    assert gw.logged("malformed_request")
    for line in gw.stderr:
        assert "Basic " not in line
    _unharmed(gw)


def test_connection_listing_content_length_on_a_streamed_body(gw):
    body = b"\x03\x01\x6a\x00" + b"\x00" * (70_000 - 4)
    head = _eas_head("Sync", "jdoe", f"Connection: Content-Length\r\nContent-Length: {len(body)}\r\n\r\n")
    raw = _exchange(gw.port, head + body)
    # The simulator's own answer (its header on it): the body reached it, framed as declared.
    assert _statuses(raw) in ([200], [400]) and b"ms-server-activesync" in raw.lower()
    _unharmed(gw)


CORPUS = [
    b"X\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",                                            # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    bytes.fromhex("16030100a5010000a10303") + b"\x00" * 64,                # a TLS ClientHello, on plain HTTP
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT mail.example.com:443 HTTP/1.1\r\nHost: mail.example.com:443\r\n\r\n",
    b"GET http://evil.example" + EAS.encode() + b"?Cmd=Sync HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST " + EAS.encode() + b"?jAAJBAp2MTQwRGV2aWNl HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"POST " + EAS.encode() + b"?%ff%fe=%00 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    _eas_head("Sync", "jdoe", "Content-Length: 10\r\n\r\n") + b"abc",           # EOF inside the body
    _eas_head("Sync", "jdoe", "Transfer-Encoding: chunked\r\n\r\n") + b"3\r\nabc\r\n0\r\nX: \x01\r\n\r\n",
    _eas_head("Sync", "jdoe", "Expect: 100-continue\r\nContent-Length: 100000\r\n\r\n"),
    _eas_head("Ping", "jdoe", "Content-Length: 3\r\n\r\n") + b"\x03\x01\x6a",     # a truncated WBXML Ping
    _eas_head("Sync", "jdoe", "Authorization: Basic !!!\r\nContent-Length: 0\r\n\r\n"),
    _eas_head("Sync", "jdoe\xff", "Content-Length: 0\r\n\r\n"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 50) + b"GET / HTTP/1.1\r\nHost",       # a pipeline, cut short
    b"GET / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
]


def test_corpus_of_malformed_heads_bodies_and_pipelines(gw):
    for data in CORPUS:
        raw = _exchange(gw.port, data)
        assert raw == b"" or raw.startswith(b"HTTP/1.1 "), (data[:80], raw[:200])
    _unharmed(gw)


_TOKENS = st.sampled_from([
    b"GET", b"POST", b"OPTIONS", b"G\x00T", b"", b" ", b"/", EAS.encode(), b"?Cmd=Sync&User=u&DeviceId=d&DeviceType=t",
    b"?Cmd=Ping", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"\r\n", b"\n", b"\r\n\r\n", b":", b"Host: a",
    b"Content-Length: 4", b"Content-Length: 99999999999999999999", b"Transfer-Encoding: chunked",
    b"Connection: Content-Length", b"Connection: close", b"Expect: 100-continue", b"Authorization: Basic eDp5",
    b"0\r\n\r\n", b"5\r\nabcde\r\n", b"fffffff\r\n", b"\x03\x01\x6a\x00", b"\xff\xfe", b"\t",
])
_REQUEST = st.tuples(
    st.sampled_from([b"GET", b"POST", b"PUT", b"OPTIONS"]),
    st.sampled_from([b"/", EAS.encode() + b"?Cmd=Sync&User=u&DeviceId=d&DeviceType=t", EAS.encode() + b"?x"]),
    st.lists(st.sampled_from([b"Host: a", b"Content-Length: 4", b"Transfer-Encoding: chunked",
                              b"Connection: Content-Length", b"Content-Length: 0", b"Expect: 100-continue",
                              b"Authorization: Basic eDp5", b"Connection: close"]), max_size=4),
    st.sampled_from([b"", b"abcd", b"4\r\nabcd\r\n0\r\n\r\n", b"zz\r\n"]),
).map(lambda r: r[0] + b" " + r[1] + b" HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in r[2]) + b"\r\n" + r[3])


@settings(max_examples=50, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.one_of(_REQUEST, st.lists(_TOKENS, max_size=12).map(b"".join),
                          st.binary(max_size=200)), min_size=1, max_size=4).map(b"".join))
def test_generated_malformed_traffic(gw, data):
    raw = _exchange(gw.port, data)
    assert raw == b"" or raw.startswith(b"HTTP/1.1 "), (data[:80], raw[:200])
    # One gateway for every example: the workers are checked after each, the device at the end.
    assert gw.workers() == gw.pids and not gw.crashed()


def test_generated_traffic_left_the_workers_unharmed(gw):
    _unharmed(gw)


# -- framing --------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_content_length_with_transfer_encoding_closes_after_the_answer(gw, version):
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    data = (b"POST / HTTP/" + version + b"\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n" + smuggled)
    raw = _exchange(gw.port, data)
    assert _statuses(raw) == [404]    # the bytes after the chunked body are not served as a request
    assert b"connection: close" in raw.lower()
    _unharmed(gw)


def _head_of(size: int) -> bytes:
    start, end = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


def test_max_header_bytes_is_exact(gw):
    limit = 65536                      # the default
    assert _statuses(_exchange(gw.port, _head_of(limit))) == [404]
    assert _statuses(_exchange(gw.port, _head_of(limit + 1))) == [431]
    assert _statuses(_exchange(gw.port, _head_of(119 * 1024))) == [431]
    # The same through a pipeline: a small request, then a head one byte too large.
    raw = _exchange(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" + _head_of(limit + 1))
    assert _statuses(raw) == [404, 431]
    _unharmed(gw)


# -- slow and greedy clients ----------------------------------------------------------------

def _trickle_until_closed(socks: list[socket.socket], payload: bytes, bound: float = 20.0) -> dict:
    """Send ``payload`` one byte per socket per 0.2 s until the gateway closes each; what each read."""
    got = {s: b"" for s in socks}
    open_ = set(socks)
    pos = {s: 0 for s in socks}
    end = time.monotonic() + bound
    while open_ and time.monotonic() < end:
        for s in list(open_):
            try:
                if pos[s] < len(payload):
                    s.send(payload[pos[s]:pos[s] + 1])
                    pos[s] += 1
            except OSError:
                pass
        ready, _, _ = select.select(list(open_), [], [], 0.2)
        for s in ready:
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                got[s] += chunk
            else:
                open_.discard(s)
    assert not open_, f"{len(open_)} slow connections still open after {bound} s"
    return got


def test_slowloris_head_has_one_deadline_for_the_whole_head(gw):
    socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(20)]
    # One byte every 0.2 s: each read is quick, the head never ends (it is longer than it can be sent).
    got = _trickle_until_closed(socks, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 500)
    for s in socks:
        s.close()
    assert all(_statuses(raw) == [408] for raw in got.values())
    assert gw.logged("device_timeout")
    _unharmed(gw)


def test_a_slow_head_is_cut_among_devices_whose_waits_end_early(gw):
    """sockio's timer wheel leaves its sleep at a slot whose waits all ended early, rather
    than moving a trio deadline back each time: behind a stream of normal devices (their
    waits filed and ended at once), heads that never end are still cut at their deadline."""
    stop, served = threading.Event(), []

    def devices():
        while not stop.is_set():
            _device_ok(gw.port)
            served.append(1)

    normal = threading.Thread(target=devices)
    normal.start()
    try:
        socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(6)]
        # 5 bytes a second of a 500-byte head: only the head's deadline (DEADLINE) ends it
        # within the trickle's 20 s.
        got = _trickle_until_closed(socks, b"POST /x HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 500)
        for s in socks:
            s.close()
    finally:
        stop.set()
        normal.join()
    assert all(_statuses(raw) == [408] for raw in got.values())
    assert served, "no normal device was served meanwhile"
    _unharmed(gw)


def test_slow_request_bodies_are_cut_and_release_the_mail_server_connections(gw):
    # Bodies over 64 KB stream to the mail server as they come: each slow one holds a
    # pool connection (upstream.pool_size = 4 per worker) until its deadline.
    head = _eas_head("Sync", "jdoe", "Content-Length: 100000\r\n\r\n")
    socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(4 * POOL)]
    for s in socks:
        s.sendall(head + b"\x03\x01\x6a\x00")
    got = _trickle_until_closed(socks, b"\x00" * 1000)
    for s in socks:
        s.close()
    # Past a worker's pool the device is told 503 at once; the others are cut at the deadline.
    statuses = [_statuses(raw) for raw in got.values()]
    assert all(st in ([408], [503]) for st in statuses), statuses
    assert statuses.count([408]) >= POOL
    _unharmed(gw)                     # a pool still held would answer the device 503


def _server_side(port: int, client_ports: set[int]) -> dict[int, tuple[str, int]]:
    """Gateway-side sockets of these client connections: client port -> (TCP state, send queue)."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote = f[1], f[2]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) in client_ports:
            out[int(remote.split(":")[1], 16)] = (f[3], int(f[4].split(":")[0], 16))
    return out


def _slow_reader(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)      # a reader that takes nothing
    s.connect(("127.0.0.1", port))
    s.sendall(FETCH)
    return s


def test_slow_readers_are_cut_bounded_and_release_the_mail_server_connections(gw):
    # Two readers first: the gateway is writing their answers (its send queues fill)...
    readers = [_slow_reader(gw.port) for _ in range(2)]
    end = time.monotonic() + 20
    while time.monotonic() < end:
        queues = _server_side(gw.port, {s.getsockname()[1] for s in readers})
        if len(queues) == 2 and all(q > 0 for _, q in queues.values()):
            break
        time.sleep(0.05)
    # ...then more, one at a time, until holding them would pass max_unsent_bytes (8 MB,
    # under three answers) while the first two read nothing: the slowest are cut.
    end = time.monotonic() + 20
    while not gw.incidents("device_write_evicted") and time.monotonic() < end:
        readers.append(_slow_reader(gw.port))
        time.sleep(0.3)
    assert gw.logged("device_write_evicted")
    while len(readers) < 4 * POOL:
        readers.append(_slow_reader(gw.port))
    ports = {s.getsockname()[1] for s in readers}
    end = time.monotonic() + 30

    def held():
        # Still writing to a reader that takes nothing: established with bytes queued. (A
        # reader answered 503 has the whole answer in its receive buffer and may idle in
        # keep-alive; the mail-server side is checked by _unharmed below.)
        return [p for p, (state, queued) in _server_side(gw.port, ports).items() if state == "01" and queued]

    while held() and time.monotonic() < end:
        time.sleep(0.2)
    assert not held(), "the gateway still holds slow readers"
    # What they get when they finally read is a cut answer, not the whole 2.8 MB, or a 503
    # (past this worker's upstream.pool_size, or when it could not hold one more answer).
    cut = 0
    for s in readers:
        s.settimeout(10)
        raw = b""
        try:
            while chunk := s.recv(1 << 20):
                raw += chunk
        except OSError:
            pass
        s.close()
        if not raw or raw.startswith(b"HTTP/1.1 200"):   # (a reset may come before the bytes)
            assert len(raw) < 2 * 1024 * 1024
            cut += 1
        else:
            assert _statuses(raw) == [503]
    assert cut >= 2
    assert gw.logged("device_write_timeout")        # the last ones, at the write deadline
    _unharmed(gw)                     # a mail-server connection still held would answer 503


def test_connections_per_address_are_capped_at_accept(gw):
    # From 127.0.0.2: the kernel spreads them over both workers; each holds at most PER_ADDRESS.
    socks = []
    for _ in range(3 * PER_ADDRESS):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", gw.port))
        socks.append(s)
    refused = 0
    end = time.monotonic() + 20
    pending = list(socks)
    while time.monotonic() < end and refused < PER_ADDRESS:
        ready, _, _ = select.select(pending, [], [], 0.2)
        for s in ready:
            try:
                closed = s.recv(1) == b""
            except OSError:
                closed = True
            if closed:
                refused += 1
                pending.remove(s)
    # 90 connections, at most 2 x 30 kept: at least 30 refused, without a byte sent.
    assert refused >= PER_ADDRESS
    assert gw.logged("refused_max_connections_per_address")
    _device_ok(gw.port)                # other addresses are served meanwhile
    for s in socks:
        s.close()
    _unharmed(gw)


async def test_worker_connection_cap_refuses_at_accept_and_counts(tmp_path):
    # The per-worker cap, on one in-process worker (its counters are what metrics will read).
    from seg_fast.config import load_config
    from seg_fast.hooks import AllowAll
    from seg_fast.proxy.gateway import Gateway

    config = load_config(None, env={
        "SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0", "SEG_FAST_LOG_TRANSACTIONS": "",
        "SEG_FAST_UPSTREAM_URL": "http://127.0.0.1:9", "SEG_FAST_LIMITS_MAX_CONNECTIONS": "5",
        "SEG_FAST_SECURITY_MASTER_KEY_FILE": str(tmp_path / "master.key"),
        "SEG_FAST_SECURITY_KEY_STATE_FILE": str(tmp_path / "keys.json")})
    gw = Gateway(config, gatekeeper_factory=lambda c: AllowAll())
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve)
        streams = [await trio.open_tcp_stream("127.0.0.1", gw.port) for _ in range(12)]
        with trio.fail_after(20):
            while gw.counters.get("refused_max_connections", 0) < 7:
                await trio.sleep(0.01)
        assert gw.active == 5
        for s in streams:
            await s.aclose()
        with trio.fail_after(20):
            while gw.active:
                await trio.sleep(0.01)
        assert not gw.per_address
        nursery.cancel_scope.cancel()


async def test_a_trusted_load_balancer_is_not_capped_per_address(tmp_path):
    from seg_fast.config import load_config
    from seg_fast.hooks import AllowAll
    from seg_fast.proxy.gateway import Gateway

    env = {"SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0", "SEG_FAST_LOG_TRANSACTIONS": "",
           "SEG_FAST_UPSTREAM_URL": "http://127.0.0.1:9", "SEG_FAST_LIMITS_MAX_CONNECTIONS_PER_ADDRESS": "3",
           "SEG_FAST_SECURITY_MASTER_KEY_FILE": str(tmp_path / "master.key"),
           "SEG_FAST_SECURITY_KEY_STATE_FILE": str(tmp_path / "keys.json")}
    for trusted, kept in (("[]", 3), ('["127.0.0.1"]', 8)):
        gw = Gateway(load_config(None, env={**env, "SEG_FAST_LISTENER_TRUSTED_PROXIES": trusted}),
                     gatekeeper_factory=lambda c: AllowAll())
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.serve)
            streams = [await trio.open_tcp_stream("127.0.0.1", gw.port) for _ in range(8)]
            with trio.fail_after(20):
                while gw.active + gw.counters.get("refused_max_connections_per_address", 0) < 8:
                    await trio.sleep(0.01)
            assert gw.active == kept
            for s in streams:
                await s.aclose()
            nursery.cancel_scope.cancel()



def test_answers_the_gateway_makes_carry_a_reason_phrase(gw):
    """A 404 made by the gateway itself: a status line with its standard phrase."""
    raw = _exchange(gw.port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", bound=20)
    assert raw.startswith(b"HTTP/1.1 404 Not Found\r\n"), raw[:40]


# -- made-up identifying values (proxy/_http1.pyx keeps repeated ones once, in a bounded table) --

FOLDERSYNC_BODY = encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))


def _foldersyncs(port: int, agents: list[bytes]) -> list[str | None]:
    """A FolderSync per User-Agent over one keep-alive connection: each answer's FolderSync
    Status (None for an answer that is not a FolderSync document), read with h11."""
    conn = h11.Connection(h11.CLIENT)
    out: list[str | None] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for agent in agents:
            head = (f"POST {EAS}?Cmd=FolderSync&User=normal&DeviceId=MADEUP1&DeviceType=iPhone HTTP/1.1\r\n"
                    f"Host: gw\r\nAuthorization: {_auth('normal')}\r\nMS-ASProtocolVersion: 14.1\r\n"
                    f"Content-Type: application/vnd.ms-sync.wbxml\r\n"
                    f"Content-Length: {len(FOLDERSYNC_BODY)}\r\nUser-Agent: ").encode()
            s.sendall(head + agent + b"\r\n\r\n" + FOLDERSYNC_BODY)
            conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            status, body = None, b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = s.recv(65536)
                    assert data, "the gateway closed the connection"
                    conn.receive_data(data)
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
            assert status == 200, status
            out.append(text(decode(body), "FolderHierarchy:Status") if body else None)
            conn.start_next_cycle()
    return out


def test_made_up_user_agents_fill_no_table_and_get_past_no_policy(gw):
    # The demo's policies allow only listed mail clients ("Apple-iPhone*", ...). 4,500 made-up
    # User-Agents (more than the table of shared values holds, some longer than it keeps), then
    # the listed one: each answered by the policy, the made-up ones blocked (Status 129), the
    # listed one let through, before and after the flood; no worker ends.
    listed = b"Apple-iPhone/1.0"
    made_up = [b"made-up/%d" % i + (b"x" * 200 if i % 10 == 0 else b"") for i in range(4500)]
    assert _foldersyncs(gw.port, [listed]) == ["1"]
    for k in range(0, len(made_up), 1500):     # over a few connections: the kernel spreads them
        assert set(_foldersyncs(gw.port, made_up[k:k + 1500])) == {"129"}
    assert _foldersyncs(gw.port, [listed, b"made-up/17", listed]) == ["1", "129", "1"]
    _unharmed(gw)


def _one_answer(raw: bytes) -> tuple[int, bytes]:
    """The status and body of the one answer in ``raw`` (h11, whatever its framing)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    status, body = None, b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Response):
            status = ev.status_code
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            return status, body
        else:
            raise AssertionError(f"no whole answer: {ev!r} after {raw[:200]!r}")


# -- connections that say nothing -----------------------------------------------------------

def test_a_connection_is_the_kernels_until_its_first_byte_and_is_served_when_it_speaks(gw):
    # The listener defers accept (TCP_DEFER_ACCEPT, sockio.defer_accept): a connection that
    # has sent nothing is a request socket in the kernel (SYN_RECV on the gateway's side,
    # 03 in /proc/net/tcp), not a descriptor and a wake-up of a worker; the client's side is
    # established all the same. After DEFER_ACCEPT_S the kernel hands it over anyway.
    silent, checked = [], 0
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
        t0 = time.monotonic()
        state = _server_side(gw.port, {s.getsockname()[1]}).get(s.getsockname()[1], ("gone", 0))[0]
        if time.monotonic() - t0 < 0.5:      # looked well within the deferral: the state is the listener's doing
            checked += 1
            assert state == "03", f"accepted before its first byte (state {state})"
        silent.append(s)
    assert checked >= 10
    # Each speaks now (some past the deferral): every one is answered, nothing is lost.
    head = (f"POST {EAS}?Cmd=FolderSync&User=normal&DeviceId=SILENT1&DeviceType=iPhone HTTP/1.1\r\n"
            f"Host: gw\r\nAuthorization: {_auth('normal')}\r\nMS-ASProtocolVersion: 14.1\r\n"
            f"User-Agent: Apple-iPhone/1.0\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
            f"Content-Length: {len(FOLDERSYNC_BODY)}\r\nConnection: close\r\n\r\n").encode()
    for s in silent:                  # one at a time: this gateway has two mail-server connections a worker
        s.sendall(head + FOLDERSYNC_BODY)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        s.close()
        status, body = _one_answer(raw)
        assert status == 200
        assert text(decode(body), "FolderHierarchy:Status") == "1"
    # One that never speaks is handed to a worker once the deferral is over (its idle
    # deadline, or TLS's handshake deadline, takes over from there).
    mute = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    try:
        port = mute.getsockname()[1]
        end = time.monotonic() + 30
        while _server_side(gw.port, {port}).get(port, ("gone", 0))[0] != "01" and time.monotonic() < end:
            time.sleep(0.05)
        assert _server_side(gw.port, {port})[port][0] == "01"
    finally:
        mute.close()
    _unharmed(gw)


# -- the keep-alive lane (proxy/lane.py) ------------------------------------------------------

FOLDER_SYNC = encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))


def _kept_alive(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each had a FolderSync answered (Status 1) and stay open: each
    then waits in its worker's parking lot for its next request, without a task."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(30)
        s.sendall(_eas_head("FolderSync", "normal", f"Content-Length: {len(FOLDER_SYNC)}\r\n\r\n") + FOLDER_SYNC)
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        conn.send(h11.EndOfMessage())
        body = b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(s.recv(65536))
            elif isinstance(ev, h11.Response):
                assert ev.status_code == 200, ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
        assert text(decode(body), "FolderHierarchy:Status") == "1"
        socks.append(s)
    return socks


def test_kept_alive_connections_in_the_lot_are_held_to_every_deadline(gw):
    """Connections the parking lot holds between requests are attacked: a head trickled a
    byte at a time (408 at request_head, one deadline for the whole head), garbage (400), an
    oversized head (431), a hang-up; and one asks again and is answered on the same
    connection. No worker is harmed."""
    slow = _kept_alive(gw.port, 10)
    got = _trickle_until_closed(slow, b"POST " + EAS.encode() + b"?Cmd=Sync HTTP/1.1\r\nX-Slow: " + b"s" * 500)
    assert all(_statuses(raw) == [408] for raw in got.values())
    for s in slow:
        s.close()
    garbage, huge, leaving, again = _kept_alive(gw.port, 4)
    leaving.close()
    for s, data, status in ((garbage, b"\x16\x03\x01\x02\x00 not http\r\n\r\n", 400),
                            (huge, _head_of(65536 + 1), 431),
                            (again, _eas_head("FolderSync", "normal", f"Content-Length: {len(FOLDER_SYNC)}\r\n\r\n")
                             + FOLDER_SYNC, 200)):
        raw = _send_and_read(s, data)
        s.close()
        assert _statuses(raw) == [status], raw[:200]
    _unharmed(gw)
