"""Parked devices leaving together: the parking lot is never the last holder of a released Ping.

When thousands of parked devices closed their connections at once, one step of the parking
task took 41-197 ms of CPU: not the hand-backs (they go a slice per step) but the records
they left in the lot's lists (the due list until the lot's next wake-up, the deadline heap
until its entries were popped or compacted). The tasks that finished the Pings had ended,
so dropping those lists freed every record in one step, each with its TLS connection
(SSL_free), sockets and buffers. Now the heap names a Ping without holding it and
``looplag.in_slices`` lets go of each entry as it hands it back: each record is freed in the
step of the task that finished it. The first tests count, with a trio Instrument, in which
task's step each record is freed (no timings); the last one leaves a running
`seg-fast serve` with parked TLS Pings all at once and checks that every upstream connection
is closed and the gateway still answers.
"""
from __future__ import annotations

import collections
import gc
import json
import socket
import ssl
import weakref
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trustme
from processes import start_serve, stop_process, wait_listening
from redis_server import free_port
from test_loop_stalls import _parked

from seg_fast.proxy import looplag, parking
from seg_fast.proxy.parking import ANSWER, PingPark
from seg_fast.sim.tree import E, encode
from seg_fast.testing.rawhttp import stream_requests

N = 1100                  # past the lot's compaction threshold (1,024 dead heap entries)
BOUND = 30


class _Req:
    """Stands for what a parked Ping holds (its TLS connection): freed with its record."""


class _FreedIn(trio.abc.Instrument):
    """Whose task step each record was freed in (None: between steps)."""

    def __init__(self) -> None:
        self.task = None
        self.freed: collections.Counter = collections.Counter()

    def before_task_step(self, task) -> None:
        self.task = task

    def after_task_step(self, task) -> None:
        self.task = None

    def watch(self, p) -> None:
        p.req = _Req()
        weakref.finalize(p.req, self._freed)

    def _freed(self) -> None:
        name = self.task.name if self.task is not None else None
        self.freed["lot" if name and name.endswith("PingPark.run") else "other"] += 1


async def _leave_together(why: str) -> _FreedIn:
    """Park N Pings, make them due together (devices gone, or heartbeats expired), let each
    handed-back Ping's task close its sockets and end (what resume_parked does), then wake
    the lot twice more (a Ping answered, one more leaving): where were the records freed?"""
    seen = _FreedIn()
    socks: list[socket.socket] = []
    finished = [0]

    async def finish(p, reason):
        await trio.lowlevel.checkpoint()
        p.up.sock.close()
        p.dev_stream.socket.close()
        finished[0] += 1

    gc.disable()                      # reference counting alone must free them (no cycles)
    trio.lowlevel.add_instrument(seen)
    try:
        async with trio.open_nursery() as nursery:
            park = PingPark(lambda p, reason: nursery.start_soon(finish, p, reason))
            await nursery.start(park.run)
            deadline = trio.current_time() + (1.0 if why == parking.TIMEOUT else 3600)
            for _ in range(N):
                p, s = _parked(deadline)
                seen.watch(p)
                socks.extend(s)
                park.park(p)
            del p
            if why == parking.DEVICE_GONE:
                for i in range(0, len(socks), 4):
                    socks[i + 3].close()    # every device's end, in this one step
            with trio.fail_after(BOUND):
                while finished[0] < N:
                    await trio.sleep(0.01)
            for _ in range(2):              # the lot wakes again: nothing of the wave left to free
                p, s = _parked(trio.current_time() + 3600)
                seen.watch(p)
                socks.extend(s)
                park.park(p)
                del p
                s[1].send(b"H")             # its mail server answers
                with trio.fail_after(BOUND):
                    while park.count:
                        await trio.sleep(0.01)
            with trio.fail_after(BOUND):
                while finished[0] < N + 2:
                    await trio.sleep(0.01)
            for _ in range(3):
                await trio.lowlevel.checkpoint()     # the last task's end
            assert park.count == 0 and not park._by_fd
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(seen)
        gc.enable()
        for s in socks:
            s.close()
    return seen


@pytest.mark.parametrize("why", [parking.DEVICE_GONE, parking.TIMEOUT])
async def test_records_of_pings_leaving_together_are_freed_by_their_own_tasks(why):
    """Before: the lot's next step freed all N (the due list dropped at its wake-up; or the
    heap entries popped or compacted there). Now none is freed in a step of the lot."""
    seen = await _leave_together(why)
    assert seen.freed == {"other": N + 2}, seen.freed


class _CountingEpoll:
    """The lot's epoll set, recording how many ready descriptors each poll took."""

    def __init__(self, epoll) -> None:
        self.epoll = epoll
        self.taken: list[int] = []

    def __getattr__(self, name):
        return getattr(self.epoll, name)

    def poll(self, timeout, maxevents):
        got = self.epoll.poll(timeout, maxevents)
        self.taken.append(len(got))
        return got


async def test_devices_leaving_together_are_taken_a_bounded_batch_per_wake(monkeypatch):
    """Each ready descriptor costs the step that takes it (~2.5 us: 4,096 at once were 10 ms
    before the first slice). The lot takes at most POLL_AT_ONCE per wake-up and finds the rest
    at the next ones (level-triggered): every Ping still handed back once."""
    monkeypatch.setattr(parking, "POLL_AT_ONCE", 64)
    released = []
    socks = []
    async with trio.open_nursery() as nursery:
        park = PingPark(lambda p, reason: released.append((id(p), reason)))
        park._epoll = counting = _CountingEpoll(park._epoll)
        await nursery.start(park.run)
        for _ in range(300):
            p, s = _parked(trio.current_time() + 3600)
            socks.extend(s)
            park.park(p)
        for i in range(0, len(socks), 4):
            socks[i + 3].close()          # every device leaves, in this one step
        with trio.fail_after(BOUND):
            while park.count:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    for s in socks:
        s.close()
    assert len(released) == len(set(released)) == 300
    assert {r for _, r in released} == {parking.DEVICE_GONE}
    assert max(counting.taken) == 64 and sum(counting.taken) == 300, counting.taken


async def test_heartbeats_expiring_together_are_taken_a_bounded_batch_per_wake(monkeypatch):
    """Popping an expired entry off the deadline heap costs the step too: at most POLL_AT_ONCE
    per wake-up, the rest at the next ones (their deadline is already past): every Ping
    still handed back once, as TIMEOUT."""
    monkeypatch.setattr(parking, "POLL_AT_ONCE", 64)
    wake_of = []
    socks = []
    async with trio.open_nursery() as nursery:
        park = PingPark(lambda p, reason: wake_of.append((id(p), reason, len(counting.taken))))
        park._epoll = counting = _CountingEpoll(park._epoll)
        await nursery.start(park.run)
        deadline = trio.current_time() + 0.5
        for _ in range(300):
            p, s = _parked(deadline)
            socks.extend(s)
            park.park(p)
        with trio.fail_after(BOUND):
            while park.count:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    for s in socks:
        s.close()
    assert len({(i, r) for i, r, _ in wake_of}) == 300 and {r for _, r, _ in wake_of} == {parking.TIMEOUT}
    per_wake = collections.Counter(w for _, _, w in wake_of)
    assert max(per_wake.values()) == 64 and len(per_wake) >= 5, per_wake


async def test_in_slices_lets_go_of_each_item_as_its_action_runs():
    """The list in_slices works through holds no item whose action has run: by the time an
    action runs, its entry and every earlier one are None (and the list is all None at the end)."""
    items = [_Req() for _ in range(600)]
    for k, x in enumerate(items):
        x.k = k
    del x
    refs = [weakref.ref(x) for x in items]
    checked = []

    def action(item):
        k = item.k
        assert all(x is None for x in items[:k + 1])
        checked.append(k)

    await looplag.in_slices(items, action)
    assert checked == list(range(600))
    assert items == [None] * 600
    assert all(r() is None for r in refs)              # nothing else kept them


async def test_drain_hands_back_every_ping_and_keeps_none():
    """drain() goes through the same slices: every parked Ping handed back once, and the lot
    holds none of them afterwards."""
    released = []
    park = PingPark(lambda p, reason: released.append((id(p), reason)))
    socks = []
    seen = _FreedIn()
    for _ in range(300):
        p, s = _parked(trio.current_time() + 3600)
        seen.watch(p)
        socks.extend(s)
        park.park(p)
    del p
    await park.drain()
    park._epoll.close()
    try:
        assert sorted(released) == sorted(set(released)) and len(released) == 300
        assert {r for _, r in released} == {parking.DRAIN}
        assert park.count == 0 and not park._by_fd
        assert seen.freed.total() == 300                  # the spawn kept nothing either
    finally:
        for s in socks:
            s.close()


# -- a running `seg-fast serve` --------------------------------------------------------------

DEVICES = 150
PING = encode(E("Ping:Ping", E("Ping:HeartbeatInterval", "600"), E("Ping:Folders", E(
    "Ping:Folder", E("Ping:Id", "5"), E("Ping:Class", "Email")))))
FOLDERSYNC = encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
AUTH = "Authorization: Basic amRvZTpzZWNyZXQ=\r\n"          # jdoe:secret


def _request(cmd: str, device: int, body: bytes) -> bytes:
    return (f"POST /Microsoft-Server-ActiveSync?Cmd={cmd}&User=jdoe&DeviceId=DEV{device}&DeviceType=iPhone "
            f"HTTP/1.1\r\nHost: gw\r\n{AUTH}MS-ASProtocolVersion: 14.1\r\nUser-Agent: Apple-iPhone/1.0\r\n"
            f"Content-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class _MailServer:
    """Holds every Ping unanswered (reading on, so it sees the gateway close the connection),
    answers anything else; counts connections open and Pings held."""

    def __init__(self) -> None:
        self.open = 0
        self.pings = 0
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._conn, listeners, task_status=task_status)

    async def _conn(self, stream) -> None:
        self.open += 1
        try:
            async for head, _body in stream_requests(stream):
                if b"Cmd=Ping" in head.split(b"\r\n", 1)[0]:
                    self.pings += 1
                    continue          # never answered; the next read sees the gateway's close
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
                                      b"Content-Length: 2\r\nX-Mail: 1\r\n\r\nok")
        except trio.BrokenResourceError:
            pass
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)


def _gauges(state: Path) -> dict | None:
    for f in (state / "stats").glob("worker-*.json"):
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return None               # being replaced
    return None


async def _until(cond, what: str) -> None:
    with trio.move_on_after(BOUND):
        while not cond():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {BOUND} s: {what}")


async def _answer(stream) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf or not buf.endswith(b"ok"):
        more = await stream.receive_some(65536)
        if not more:
            break
        buf += more
    return buf


async def test_serve_parked_tls_devices_leaving_together_release_every_upstream(tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.check_hostname = False
    mail = _MailServer()
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(mail.serve)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                       f'tls_cert = "{tmp_path / "gw.pem"}"\ntls_key = "{tmp_path / "gw.pem"}"\n'
                       f'[upstream]\nurl = "http://127.0.0.1:{mail.port}"\n[admin]\nenabled = false\n'
                       f'[limits]\nmax_connections_per_address = 0\n[policy]\nallow_if_no_policies = true\n')
        proc = start_serve(cfg, tmp_path)
        try:
            await trio.to_thread.run_sync(wait_listening, port, proc)

            async def device(i: int) -> trio.SSLStream:
                s = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ctx,
                                   server_hostname="localhost")
                await s.send_all(_request("Ping", i, PING))
                return s

            devices = [await device(i) for i in range(DEVICES)]
            state = tmp_path / "state"
            await _until(lambda: mail.pings == DEVICES, "every Ping upstream")
            await _until(lambda: (_gauges(state) or {}).get("parked_pings") == DEVICES, "every Ping parked")
            assert mail.open == DEVICES
            for s in devices:                 # every device leaves, in this one step
                s.transport_stream.socket.close()
            await _until(lambda: mail.open == 0, "the mail server sees every upstream closed")
            await _until(lambda: (g := _gauges(state)) is not None and not g.get("parked_pings")
                         and not g.get("upstream_open"), "the worker's gauges back to 0")
            s = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ctx,
                               server_hostname="localhost")
            await s.send_all(_request("FolderSync", 10_000, FOLDERSYNC))
            with trio.fail_after(BOUND):
                got = await _answer(s)
            assert got.startswith(b"HTTP/1.1 200 ") and b"x-mail: 1" in got.lower() and got.endswith(b"ok")
            await trio.aclose_forcefully(s)
        finally:
            await trio.to_thread.run_sync(stop_process, proc)
        nursery.cancel_scope.cancel()
