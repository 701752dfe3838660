"""A fleet connection reads a large answer at most wire.READ_SLICE bytes per loop step:
the waiting reader checkpoints between slices, the poller (HttpConn.poll_answer) and
read_tls stop after a slice and leave the rest to the next readable, and the answer
read that way is the same bytes."""
from __future__ import annotations

import ssl

import trio

from seg_fast.sim import wire
from seg_fast.sim.wire import FALLBACK, HttpConn, RawStream, read_tls

BODY = bytes(range(256)) * (5 * 4096 + 7)         # ~5 MB
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY


class _AllThere:
    """A socket whose whole answer has arrived: recv never waits."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.recvs = 0

    def recv(self, n: int) -> bytes:
        if not self.data:
            raise BlockingIOError
        self.recvs += 1
        out, self.data = self.data[:n], self.data[n:]
        return out

    def recvmsg_into(self, buffers, ancbufsize=0, flags=0):
        """stamps.late's peek: the bytes are there, unstamped."""
        if not self.data:
            raise BlockingIOError
        return len(self.data), [], 0, None


class _Stream:
    """A stream whose receive_some never waits (the bytes are there): no checkpoint."""

    def __init__(self, data: bytes) -> None:
        self.sock = _AllThere(data)

    async def receive_some(self, max_bytes=None) -> bytes:
        return self.sock.recv(max_bytes or wire.RECV)


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


def test_waiting_reader_yields_between_slices():
    got = {}

    async def read(conn) -> None:
        got["answer"] = await conn.answer()

    async def main():
        steps = _Steps()
        trio.lowlevel.add_instrument(steps)
        conn = HttpConn(_Stream(ANSWER))
        async with trio.open_nursery() as n:
            n.start_soon(read, conn, name="reader")
        trio.lowlevel.remove_instrument(steps)
        return steps.steps["reader"]

    steps = trio.run(main)
    status, _headers, body = got["answer"]
    assert status == 200 and body == BODY
    # one step per READ_SLICE read (and the first): not the whole answer in one
    assert steps >= len(BODY) // wire.READ_SLICE, steps


def test_poller_reads_a_slice_per_call():
    sock = _AllThere(ANSWER)
    conn = HttpConn(RawStream(sock))
    calls = 0
    res = None
    while res is None:
        calls += 1
        res = conn.poll_answer()
        assert res is not FALLBACK
        assert calls < 100
    status, _headers, body = res
    assert status == 200 and body == BODY
    # ~5 MB in 1 MB slices: several calls (each a Parker wake-up), not one
    assert calls >= len(BODY) // wire.READ_SLICE, calls


class _Ssl:
    """An SSL object with records decrypted on demand and nothing held back."""

    def __init__(self, records: int) -> None:
        self.left = records

    def read(self, n: int) -> bytes:
        if not self.left:
            raise ssl.SSLWantReadError
        self.left -= 1
        return b"x" * wire.TLS_RECV

    def pending(self) -> int:
        return 0


def test_read_tls_stops_after_its_limit():
    obj = _Ssl(200)                       # ~3.3 MB of records
    parts: list[bytes] = []
    n, state = read_tls(obj, parts, wire.READ_SLICE)
    assert state == wire.TLS_DRAINED
    assert wire.READ_SLICE <= n < wire.READ_SLICE + wire.TLS_RECV
    assert obj.left > 0                   # the rest stays for the next call
    # without a limit (the simulator's requests) it drains everything there
    n2, state2 = read_tls(obj, parts)
    assert state2 == wire.TLS_DRAINED and obj.left == 0
    assert n + n2 == 200 * wire.TLS_RECV
