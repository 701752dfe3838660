"""TLS handshakes arriving together are spread over scheduler batches (proxy/tlsio.HandshakeGate).

A handshake's server flight is ~1 ms of CPU in one task step; devices arriving together
(a ramp, a fleet reconnecting) made one batch of hundreds of them back to back, during
which no connected device was served. Counted, not timed: a trio Instrument numbers the
batches and a wrapper around each connection's OpenSSL object records in which batch the
ClientHello was answered (its first do_handshake call).
"""
from __future__ import annotations

import collections
import socket

import pytest
import trio
import trio.lowlevel

from batches import Batches
from seg_fast.proxy import tlsio
from tls_contexts import server_and_client

N = 24


class Counted:
    """The OpenSSL object, recording the batch of its first do_handshake call."""

    def __init__(self, obj, batches, per_batch):
        self._o, self._batches, self._per_batch, self._first = obj, batches, per_batch, True

    def do_handshake(self):
        if self._first:
            self._first = False
            self._per_batch[self._batches.n] += 1
        return self._o.do_handshake()

    def __getattr__(self, name):
        return getattr(self._o, name)


@pytest.fixture(scope="module")
def tls():
    return server_and_client()


async def _handshakes_together(tls, n: int = N) -> collections.Counter:
    """n devices connect and send their ClientHello; once every ClientHello is in, the
    server starts all n handshakes in one step (all ready in the same batch)."""
    server_ctx, client_ctx = tls
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    port = listener.getsockname()[1]
    batches = Batches()
    per_batch: collections.Counter = collections.Counter()
    done: list[str] = []

    def device():
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:   # blocks: the handshake
                s.sendall(b"ping")
                return s.recv(4)

    async def client(results):
        results.append(await trio.to_thread.run_sync(device, limiter=trio.CapacityLimiter(n)))

    async def serve(stream):
        await stream.do_handshake(trio.current_time() + 20)
        got = await stream.receive_some(4)
        await stream.send_all(got)
        done.append(got.decode())
        stream.close()

    trio.lowlevel.add_instrument(batches)
    try:
        results: list = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(client, results)
                accepted = []
                for _ in range(n):
                    sock, _ = await listener.accept()
                    accepted.append(sock)
                for sock in accepted:                   # every ClientHello has arrived
                    await trio.lowlevel.wait_readable(sock)
                streams = []
                for sock in accepted:
                    stream = tlsio.TLSStream(trio.SocketStream(sock), server_ctx)
                    stream._obj = Counted(stream._obj, batches, per_batch)
                    streams.append(stream)
                for stream in streams:                  # all in this one step
                    nursery.start_soon(serve, stream)
    finally:
        trio.lowlevel.remove_instrument(batches)
        listener.close()
    assert done == ["ping"] * n and results == [b"ping"] * n      # every handshake succeeded
    assert sum(per_batch.values()) == n
    return per_batch


async def test_handshakes_arriving_together_are_spread_over_batches(tls, monkeypatch):
    monkeypatch.setattr(tlsio, "HANDSHAKE_BUDGET_MS", 0.0)     # one handshake's share per batch
    per_batch = await _handshakes_together(tls)
    # A batch's share (1) at once, then the waiting ones a share per batch; a batch can hold the
    # share let through for it and one newcomer's: never more than 2.
    assert max(per_batch.values()) <= 2, per_batch
    assert len(per_batch) >= N // 2, per_batch


async def test_without_the_gate_they_would_share_one_batch(tls, monkeypatch):
    """The control: with an unbounded share the same N ClientHellos are answered in one batch,
    so the test above is not passing by the accident of how they arrive."""
    monkeypatch.setattr(tlsio, "HANDSHAKE_BUDGET_MS", 1e9)
    per_batch = await _handshakes_together(tls)
    assert list(per_batch.values()) == [N], per_batch


async def test_a_handshake_cancelled_while_waiting_leaves_the_queue(tls, monkeypatch):
    monkeypatch.setattr(tlsio, "HANDSHAKE_BUDGET_MS", 0.0)
    gate = tlsio._gate()
    gate.admitted = gate.per_batch()           # this batch's share is used
    with trio.CancelScope() as scope:
        scope.cancel()
        await gate.admit()
    assert not gate.waiting and gate.deferred == 1


async def test_a_handshake_waits_at_most_max_wait(monkeypatch):
    """However busy the worker, those that waited HANDSHAKE_MAX_WAIT go at the next batch,
    all of them (a fake clock: the wait is counted, not timed); before that, one a batch."""
    clock = [100.0]
    monkeypatch.setattr(tlsio.time, "monotonic", lambda: clock[0])
    gate = tlsio.HandshakeGate(budget_ms=0.0, max_wait=1.0)     # one per batch
    batches = Batches()
    trio.lowlevel.add_instrument(batches)
    per_batch: collections.Counter = collections.Counter()
    gate.admitted = 1

    async def handshake():
        await gate.admit()
        per_batch[batches.n] += 1

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(handshake)
            while sum(per_batch.values()) < 3:         # one a batch while none is overdue
                await trio.lowlevel.checkpoint()
            assert max(per_batch.values()) <= 2, per_batch
            clock[0] += 1.0                             # every waiting one is now overdue
    finally:
        trio.lowlevel.remove_instrument(batches)
    assert sum(per_batch.values()) == 20
    assert max(per_batch.values()) >= 10, per_batch     # the overdue ones, together
