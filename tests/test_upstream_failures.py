"""How a running `seg-fast serve` fails when the mail server (or its own descriptor limit)
fails under it — the mechanisms issue 10's soaks looked at for the unexplained 503s.

- a mail server whose process takes no more connections (a simulator at its descriptor
  limit: the kernel completes the handshake and queues the connection, nobody accepts
  it) ends as a 503 at timeouts.upstream_read whose record says "new connection", and
  leaves nothing poisoned behind — the real `seg-fast sim` under a small RLIMIT_NOFILE
  as well as a listener that never accepts;
- a pooled connection the mail server closed while idle is not used for a Ping (which
  parks, where nothing resends): the Ping goes on a new connection and is answered;
- a Ping written into a kept-alive connection that the mail server drops on arrival
  is answered at once (a 503 naming the close, or the answer after a resend), never held
  to the Ping's heartbeat + margin;
- a worker takes no more device connections than its descriptor limit can carry with
  one mail-server connection each (parked Pings hold both): past that, connections are
  refused at accept, and no Ping fails for want of a descriptor;
- a connect the kernel completed is not "timed out" because the worker's own loop stalled
  past upstream_connect (in process: the soaks' commonest 503; xfail until the pool decides
  by the socket, not the clock).

Deadlines are configured small; everything is awaited with generous bounds, no durations
are asserted.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h11
import trio
from processes import REPO, start_serve, stop_process, wait_listening
from redis_server import free_port

from seg_fast.oslimits import device_connections_within
from seg_fast.sim.tree import E, encode

PASSWORD = "secret"
READ = 1.0                            # timeouts.upstream_read here
BOUND = 30                            # seconds any single wait in these tests may take at most
EAS = b"/Microsoft-Server-ActiveSync"


def _query(cmd: str, device: str = "SOAKTEST1") -> bytes:
    return EAS + f"?Cmd={cmd}&User=jdoe&DeviceId={device}&DeviceType=iPhone".encode()


def _headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"Host", b"gw"), (b"Authorization", b"Basic " + base64.b64encode(f"jdoe:{PASSWORD}".encode())),
            (b"MS-ASProtocolVersion", b"14.1"), (b"User-Agent", b"Apple-iPhone/1.0"),
            (b"Content-Type", b"application/vnd.ms-sync.wbxml"), (b"Content-Length", str(len(body)).encode())]


FOLDERSYNC = encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
PING = encode(E("Ping:Ping", E("Ping:HeartbeatInterval", "60"), E("Ping:Folders", E(
    "Ping:Folder", E("Ping:Id", "5"), E("Ping:Class", "Email")))))


class Device:
    """One device connection to the gateway, speaking h11."""

    def __init__(self, stream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Device:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, cmd: str, body: bytes, device: str = "SOAKTEST1") -> None:
        await self.stream.send_all(self.h11.send(h11.Request(method=b"POST", target=_query(cmd, device),
                                                             headers=_headers(body)))
                                   + self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage()))

    async def answer(self) -> tuple[int, dict, bytes] | None:
        """(status, headers, body); None if the gateway closed without an answer."""
        status, headers, body = 0, {}, b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif type(event) is h11.Response:
                status, headers = event.status_code, {k.lower(): v for k, v in event.headers}
            elif type(event) is h11.Data:
                body += event.data
            elif type(event) is h11.EndOfMessage:
                self.h11.start_next_cycle()
                return status, headers, body
            elif type(event) is h11.ConnectionClosed:
                return None

    async def request(self, cmd: str, body: bytes, device: str = "SOAKTEST1"):
        await self.send(cmd, body, device)
        with trio.fail_after(BOUND):
            return await self.answer()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


BIG_ANSWER = bytes(range(256)) * 1172          # ~300 KB: past one read and many TLS records


class FakeMailServer:
    """A mail server in this process whose behaviour per request is ``plan(conn, n, request)``:
    "answer" (200, keep-alive), "big" (the same, BIG_ANSWER after the words), "answer_close"
    (200, then close as an idle timeout would, no Connection: close), "drop" (read it, close
    without a word), "hold" (never answer), "garbage" (bytes that are not the protocol, then
    close). ``accepting`` False: listen, but take no connection (a process out of
    descriptors). ``tls``: a server context, for an https:// mail server."""

    def __init__(self, plan, accepting: bool = True, tls=None):
        self.plan = plan
        self.tls = tls
        self.sock = trio.socket.socket()
        self.port = 0
        self.accepting = trio.Event()
        if accepting:
            self.accepting.set()
        self.connections: list[dict] = []
        self.changed = trio.Event()

    def _note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, cond) -> None:
        with trio.fail_after(BOUND):
            while not cond():
                await self.changed.wait()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        task_status.started()
        await self.accepting.wait()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await self.sock.accept()
                stream = trio.SocketStream(conn)
                if self.tls is not None:
                    stream = trio.SSLStream(stream, self.tls, server_side=True)
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream) -> None:
        record = {"requests": [], "eof": False, "closed_by_us": False}
        self.connections.append(record)
        self._note()
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        record["eof"] = True
                        return
                    conn.receive_data(data)
                elif type(event) is h11.Request:
                    request, body = event, b""
                elif type(event) is h11.Data:
                    body += event.data
                elif type(event) is h11.EndOfMessage:
                    command = dict(x.split(b"=", 1) for x in request.target.split(b"?", 1)[1].split(b"&"))[b"Cmd"]
                    record["requests"].append(command.decode())
                    self._note()
                    what = self.plan(len(self.connections) - 1, len(record["requests"]), command.decode())
                    if what == "hold":
                        await trio.sleep_forever()
                    if what == "drop":
                        record["closed_by_us"] = True
                        return
                    if what == "garbage":
                        raw = stream.transport_stream if self.tls is not None else stream
                        await raw.send_all(b"\x00\x01not HTTP, nor a TLS record\r\n\r\n")
                        record["closed_by_us"] = True
                        return
                    answer = b"answer:" + command + (BIG_ANSWER if what == "big" else b"")
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                        (b"Content-Type", b"application/vnd.ms-sync.wbxml"),
                        (b"Content-Length", str(len(answer)).encode())]))
                        + conn.send(h11.Data(data=answer)) + conn.send(h11.EndOfMessage()))
                    if what == "answer_close":
                        record["closed_by_us"] = True
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            record["eof"] = True
        finally:
            await trio.aclose_forcefully(stream)
            self._note()


def _config(tmp: Path, upstream_port: int, port: int) -> Path:
    cfg = tmp / "gw.toml"
    cfg.write_text(
        f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{upstream_port}"\n'
        f'[admin]\nenabled = false\n'
        f'[log]\ntransactions = "{tmp / "tx.jsonl"}"\n'
        f'[policy]\nallow_if_no_policies = true\n'
        f'[timeouts]\nupstream_read = {READ}\nupstream_connect = 5\nping_margin = 1\n')
    return cfg


def _nofile(n: int) -> list[str]:
    """A command prefix that runs the command under RLIMIT_NOFILE n (soft and hard: the gateway
    and the simulator lift the soft limit to the hard one)."""
    return ["prlimit", f"--nofile={n}:{n}", "--"]


class Serve:
    def __init__(self, tmp: Path, upstream_port: int, nofile: int | None = None):
        self.tmp, self.port = tmp, free_port()
        cfg = _config(tmp, upstream_port, self.port)
        if nofile is None:
            self.proc = start_serve(cfg, tmp)
        else:                         # start_serve's command, under a lower descriptor limit
            env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp / "state"))
            self.proc = subprocess.Popen([*_nofile(nofile), sys.executable, "-m", "seg_fast", "serve",
                                          "--config", str(cfg)],
                                         env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self):
        wait_listening(self.port, self.proc)
        return self

    def __exit__(self, *exc):
        stop_process(self.proc)

    async def records(self, want: int) -> list[dict]:
        """The first ``want`` transaction records (the log is flushed in the background)."""
        path = self.tmp / "tx.jsonl"
        with trio.fail_after(BOUND):
            while True:
                lines = path.read_text().splitlines() if path.exists() else []
                recs = [json.loads(x) for x in lines if x.startswith("{")]
                if len(recs) >= want:
                    return recs
                await trio.sleep(0.05)


# -- a mail server that takes no more connections ---------------------------------------------

async def test_a_mail_server_that_accepts_nothing_is_a_503_at_upstream_read_and_poisons_nothing(tmp_path):
    """The kernel queues the gateway's connection and takes the request; the process never
    accepts (what a simulator at its descriptor limit looks like from outside). The device
    gets a 503 with Retry-After at upstream_read, the record names a *new* connection, and
    the gateway closed that connection: when the server accepts again it reads the request
    and then EOF, and the next request is served on a connection of its own."""
    up = FakeMailServer(lambda conn, n, cmd: "answer", accepting=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        with Serve(tmp_path, up.port) as gw:
            dev = await Device.connect(gw.port)
            status, headers, _ = await dev.request("FolderSync", FOLDERSYNC)
            assert status == 503 and b"retry-after" in headers
            rec = (await gw.records(1))[0]
            assert rec["status"] == 503 and rec["command"] == "FolderSync"
            assert rec["error"].startswith(f"mail server did not answer within {READ:g} s (new connection, "), rec
            up.accepting.set()
            await up.until(lambda: len(up.connections) == 1 and up.connections[0]["eof"])
            assert up.connections[0]["requests"] == ["FolderSync"]     # it got there, then the gateway let go
            dev2 = await Device.connect(gw.port)
            status, _, body = await dev2.request("FolderSync", FOLDERSYNC)
            assert (status, body) == (200, b"answer:FolderSync")
            assert len(up.connections) == 2 and up.connections[1]["requests"] == ["FolderSync"]
            await dev.aclose()
            await dev2.aclose()
        nursery.cancel_scope.cancel()


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_the_simulator_at_its_descriptor_limit(tmp_path):
    """The real `seg-fast sim` held to 40 descriptors and filled with idle connections
    stops accepting (trio retries accept() every 0.1 s); a device's request through the
    gateway then ends as the 503 above, and once the idle connections go, the same
    simulator serves the device again through the same gateway."""
    limit = 40
    sim = subprocess.Popen([*_nofile(limit), sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--seed", "1",
                            "--no-provisioning", "--password", PASSWORD],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    fillers: list[socket.socket] = []
    try:
        sim_port = json.loads(sim.stdout.readline())["sim_port"]
        # More idle connections than it has descriptors: it accepts until EMFILE, the rest queue.
        for _ in range(limit + 8):
            fillers.append(socket.create_connection(("127.0.0.1", sim_port)))
        with trio.fail_after(BOUND):
            while _fd_count(sim.pid) < limit:
                await trio.sleep(0.05)
        with Serve(tmp_path, sim_port) as gw:
            assert _fd_count(sim.pid) == limit            # still full
            dev = await Device.connect(gw.port)
            status, _, _ = await dev.request("FolderSync", FOLDERSYNC)
            assert status == 503
            rec = (await gw.records(1))[0]
            assert rec["error"].startswith(f"mail server did not answer within {READ:g} s (new connection, "), rec
            for s in fillers:
                s.close()
            fillers.clear()
            status, _, body = await dev.request("FolderSync", FOLDERSYNC)
            assert status == 200 and body.startswith(b"\x03\x01j\x00")      # the simulator's WBXML answer
            await dev.aclose()
    finally:
        for s in fillers:
            s.close()
        stop_process(sim, grace=10)


async def test_the_lean_simulator_sheds_what_it_cannot_accept(tmp_path):
    """The sizing shards' simulator (lean_serve, `seg-fast sim --reactor`) held to 40
    descriptors: out of them, it spends its spare descriptor to accept the waiting
    connection and close it, so the gateway answers a prompt 503 that names the close
    instead of waiting out upstream_read on a connection nobody reads."""
    limit = 40
    sim = subprocess.Popen([*_nofile(limit), sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--seed", "1",
                            "--no-provisioning", "--password", PASSWORD, "--reactor"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    fillers: list[socket.socket] = []
    try:
        sim_port = json.loads(sim.stdout.readline())["sim_port"]
        for _ in range(limit):
            fillers.append(socket.create_connection(("127.0.0.1", sim_port)))
        with trio.fail_after(BOUND):
            while _fd_count(sim.pid) < limit - 1:    # its spare descriptor stays in reserve
                await trio.sleep(0.05)
        with Serve(tmp_path, sim_port) as gw:
            dev = await Device.connect(gw.port)
            status, _, _ = await dev.request("FolderSync", FOLDERSYNC)
            assert status == 503
            rec = (await gw.records(1))[0]
            # Closed at once: an EOF, or a reset when the request had already arrived unread.
            assert rec["error"].startswith(("mail server closed the connection before answering",
                                            "mail server connection broke")), rec
            assert "new connection" in rec["error"], rec
            for s in fillers:
                s.close()
            fillers.clear()
            with trio.fail_after(BOUND):         # the simulator sees the fillers go, then serves again
                while True:
                    status, _, body = await dev.request("FolderSync", FOLDERSYNC)
                    if status == 200:
                        break
                    await trio.sleep(0.05)
            assert body.startswith(b"\x03\x01j\x00")
            await dev.aclose()
    finally:
        for s in fillers:
            s.close()
        stop_process(sim, grace=10)


# -- a kept-alive connection the mail server closed, and a Ping ----------------------------------

async def test_a_ping_never_goes_on_a_pooled_connection_the_server_closed_while_idle(tmp_path):
    """The mail server answers, keeps the connection open a moment, then closes it idle
    (an idle keep-alive timeout; no Connection: close). The device's Ping after that goes on a
    new connection (a Ping parks, where nothing would resend it) and gets its answer."""
    up = FakeMailServer(lambda conn, n, cmd: "answer_close" if conn == 0 else "answer")
    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        with Serve(tmp_path, up.port) as gw:
            dev = await Device.connect(gw.port)
            assert (await dev.request("FolderSync", FOLDERSYNC))[0] == 200
            await up.until(lambda: up.connections[0]["closed_by_us"])
            status, _, body = await dev.request("Ping", PING)
            assert (status, body) == (200, b"answer:Ping")
            assert [c["requests"] for c in up.connections] == [["FolderSync"], ["Ping"]]
            await dev.aclose()
        nursery.cancel_scope.cancel()


async def _ping_dropped_on_a_kept_alive_connection(tmp_path) -> tuple[int, bytes, dict, FakeMailServer]:
    """FolderSync answered keep-alive on connection 0, then the Ping: dropped on arrival."""
    up = FakeMailServer(lambda conn, n, cmd: "drop" if (conn, n) == (0, 2) else "answer")
    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        with Serve(tmp_path, up.port) as gw:
            dev = await Device.connect(gw.port)
            assert (await dev.request("FolderSync", FOLDERSYNC))[0] == 200
            status, _, body = await dev.request("Ping", PING)     # BOUND (30 s) < the Ping's 61 s
            rec = (await gw.records(2))[1]
            await dev.aclose()
        nursery.cancel_scope.cancel()
    assert up.connections[0]["requests"] == ["FolderSync", "Ping"]
    return status, body, rec, up


async def test_a_ping_the_server_drops_on_a_kept_alive_connection_is_answered_at_once(tmp_path):
    """The pooled connection looked alive when taken, and the mail server drops it when the
    Ping arrives (it closed between the gateway's probe and its write). The Ping is parked
    by then; the close wakes it and the device is answered at once — a 503, or the answer
    after a resend on a new connection — not held to the heartbeat (60 s) + margin."""
    status, body, rec, up = await _ping_dropped_on_a_kept_alive_connection(tmp_path)
    if status == 503:
        assert rec["status"] == 503 and "heartbeat" not in rec["error"], rec
        assert len(up.connections) == 1
    else:
        assert (status, body) == (200, b"answer:Ping") and up.connections[1]["requests"] == ["Ping"]


async def test_the_dropped_ping_s_record_names_the_close(tmp_path):
    """What the 503's record says for that Ping: the mail server closed (as the fast path says
    for the same EOF on any other request), not a malformed answer."""
    status, _, rec, _ = await _ping_dropped_on_a_kept_alive_connection(tmp_path)
    if status == 503:
        assert "closed the connection before answering" in rec["error"], rec


# -- the worker's own descriptor limit ------------------------------------------------------------

async def test_device_connections_are_capped_so_every_parked_ping_has_its_descriptors(tmp_path):
    """A worker under RLIMIT_NOFILE 600 gets more devices than it can carry, each parking a
    Ping (which holds a device and a mail-server descriptor). It refuses the surplus at accept
    (closed, no answer) and every device it took has its Ping at the mail server: none
    answered 503 for want of a descriptor (EMFILE on the mail-server connect) and none left
    hanging unaccepted."""
    nofile, devices = 600, 300          # 300 parked Pings would need > 600 descriptors
    up = FakeMailServer(lambda conn, n, cmd: "hold")
    outcome = {"refused": 0, "answered": []}

    async def device(port: int, i: int) -> None:
        dev = await Device.connect(port)
        try:
            await dev.send("Ping", PING, device=f"CAP{i:05d}")
            got = await dev.answer()
        except (trio.BrokenResourceError, h11.RemoteProtocolError, OSError):
            got = None                # refused: closed at accept, maybe with a reset
        finally:
            await dev.aclose()
        if got is None:
            outcome["refused"] += 1
        else:
            outcome["answered"].append(got[:1])

    async with trio.open_nursery() as nursery:
        await nursery.start(up.serve)
        with Serve(tmp_path, up.port, nofile=nofile) as gw:
            async with trio.open_nursery() as devs:
                for i in range(devices):
                    devs.start_soon(device, gw.port, i)
                with trio.fail_after(BOUND * 2):
                    while sum(len(c["requests"]) for c in up.connections) + outcome["refused"] \
                            + len(outcome["answered"]) < devices:
                        await trio.sleep(0.05)
                assert outcome["answered"] == []
                held = len(up.connections)
                assert all(c["requests"] == ["Ping"] for c in up.connections)
                assert 0 < held < devices and outcome["refused"] == devices - held
                assert held <= device_connections_within(nofile, 256)   # what oslimits plans per worker
                devs.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


# -- a connect the kernel made, timed out by the worker's own lag ----------------------------------

async def test_a_connect_the_kernel_made_is_not_timed_out_by_the_workers_own_lag():
    """The soaks' commonest 503 ("connecting to ... timed out" with no listen overflow): the
    kernel completes the handshake at once, then the worker's loop stalls past
    upstream_connect (a long step, or starvation). The connection exists; it must be used,
    not reported as a mail server that did not answer the connect."""
    import select
    import time

    import msgspec

    from seg_fast.config import load_config
    from seg_fast.proxy.upstream import UpstreamError, UpstreamPool, origin_of

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    config = load_config(None, env={})
    pool = UpstreamPool(config.upstream, msgspec.structs.replace(config.timeouts, upstream_connect=0.5))
    got = {}

    async def connect():
        try:
            got["conn"] = await pool.connect(origin_of(f"http://127.0.0.1:{listener.getsockname()[1]}"))
        except UpstreamError as exc:
            got["error"] = str(exc)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            with trio.fail_after(BOUND):
                while not select.select([listener], [], [], 0)[0]:
                    await trio.sleep(0)           # until the kernel has queued the handshake
            time.sleep(1.0)                       # the worker's loop stalls past upstream_connect
        accepted, _ = listener.accept()           # the kernel's connection, there all along
        accepted.close()
        assert "conn" in got, got
        got["conn"].sock.close()
    finally:
        listener.close()
