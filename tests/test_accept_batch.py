"""Connections waiting in the listen queue are taken several per scheduler batch.

trio's accept() ends with a checkpoint, so a worker took one connection per batch: when a
busy worker's batches grew long (a ramp of TLS handshakes, a wave of answers), devices
waited in the listen queue until their connect timed out. Counted, not timed: a trio
Instrument numbers the batches and the gateway's connection handler records in which
batch each connection was admitted.
"""
from __future__ import annotations

import collections
import socket

import trio

from batches import Batches
from seg_fast.config import load_config
from seg_fast.hooks import AllowAll
from seg_fast.proxy import gateway as gateway_mod
from seg_fast.proxy.gateway import Gateway
from test_proxy import _env

N = 20


async def _queued_then_accepted(tmp_path, **limits) -> tuple[collections.Counter, Gateway]:
    """N connections complete their TCP handshake into the listen queue before the
    gateway's accept loop starts; returns the batches they were admitted in."""
    config = load_config(None, env=_env("http://127.0.0.1:9", tmp_path / "tx.jsonl", **limits))
    gw = Gateway(config, gatekeeper_factory=lambda c: AllowAll())
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(N)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(N)]
    batches = Batches()
    admitted: collections.Counter = collections.Counter()

    held = []

    async def connection(client, ip):
        admitted[batches.n] += 1
        held.append(client)          # open until the end: the per-address count stays up

    gw._connection = connection
    trio.lowlevel.add_instrument(batches)
    try:
        with trio.move_on_after(10):
            async with trio.open_nursery() as conns:
                conns.start_soon(gw._accept, listener, conns)
                while sum(admitted.values()) + gw.incidents.counts.get(
                        "refused_max_connections_per_address", 0) < N:
                    await trio.sleep(0.01)
                conns.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(batches)
        listener.close()
        for c in held + clients:
            c.close()
    return admitted, gw


async def test_queued_connections_are_taken_together(tmp_path):
    admitted, _ = await _queued_then_accepted(tmp_path)
    assert sum(admitted.values()) == N
    # One awaited accept, then the rest of the queue in the same batch (at most
    # ACCEPT_BATCH more): one batch, where trio's accept alone took N.
    assert N <= gateway_mod.ACCEPT_BATCH + 1
    assert len(admitted) == 1, admitted


async def test_limits_hold_for_connections_taken_together(tmp_path):
    admitted, gw = await _queued_then_accepted(tmp_path, limits_max_connections_per_address="5")
    assert sum(admitted.values()) == 5
    assert gw.incidents.counts["refused_max_connections_per_address"] == N - 5
