"""A big answer to a fast-reading TLS device leaves a slice per task step (proxy/tlsio.py).

While the device's socket took them, TLSStream wrote every record of an answer in one task
step: a 10 MB attachment passed through went out 2 MB per step (~5-7 ms of CPU each, the
worker's other connections waiting). Each record the socket takes at once now counts as a
ready operation, so a step writes at most FAIR_EVERY records (512 KiB) before a checkpoint.
Counted, not timed: a wrapper around the connection's OpenSSL object counts the records
written in each step of the sending task (a trio Instrument marks the steps); what the
device reads is checked byte for byte by Python's ssl module (the independent end).
"""
from __future__ import annotations

import hashlib
import socket
import threading

import pytest
import trio
import trio.lowlevel

from seg_fast.proxy import tlsio
from tls_contexts import server_and_client

SIZE = 4 * 1024 * 1024 + 123          # not a whole number of records


class CountedWrites:
    """The OpenSSL object, counting the records written in the current step."""

    def __init__(self, obj):
        self._o = obj
        self.in_step = 0
        self.per_step: list[int] = []

    def write(self, data):
        n = self._o.write(data)
        self.in_step += 1
        return n

    def __getattr__(self, name):
        return getattr(self._o, name)


class Steps(trio.abc.Instrument):
    """Closes a count per step of one task."""

    def __init__(self, counted: CountedWrites):
        self.counted, self.task = counted, None

    def before_task_step(self, task):
        if task is self.task:
            self.counted.in_step = 0

    def after_task_step(self, task):
        if task is self.task and self.counted.in_step:
            self.counted.per_step.append(self.counted.in_step)


@pytest.fixture(scope="module")
def tls():
    return server_and_client()


async def test_a_big_answer_is_written_a_slice_per_step(tls):
    server_ctx, client_ctx = tls
    body = bytes(range(256)) * (SIZE // 256) + b"x" * (SIZE % 256)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    got: dict = {}

    def device():
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"go")
                h, n = hashlib.sha256(), 0
                while n < SIZE:
                    data = s.recv(1 << 20)
                    if not data:
                        break
                    h.update(data)
                    n += len(data)
                got["n"], got["sha"] = n, h.hexdigest()

    thread = threading.Thread(target=device, daemon=True)
    thread.start()
    try:
        with trio.fail_after(30):
            sock, _ = await listener.accept()
            # Room for the whole answer in the kernel: nothing makes the writer wait but itself.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            stream = tlsio.TLSStream(trio.SocketStream(sock), server_ctx)
            await stream.do_handshake(trio.current_time() + 20)
            assert await stream.receive_some(2) == b"go"
            counted = CountedWrites(stream._obj)
            stream._obj = counted
            steps = Steps(counted)
            steps.task = trio.lowlevel.current_task()
            trio.lowlevel.add_instrument(steps)
            try:
                await stream.send_parts([b"HEAD\r\n\r\n", body], None)
            finally:
                trio.lowlevel.remove_instrument(steps)
            if counted.in_step:
                counted.per_step.append(counted.in_step)  # the last step: it goes on here
            await trio.to_thread.run_sync(thread.join, 20)
            stream.close()
    finally:
        listener.close()
    assert got == {"n": SIZE + 8, "sha": hashlib.sha256(b"HEAD\r\n\r\n" + body).hexdigest()}
    records = -(-(SIZE + 8) // tlsio.RECORD)
    assert sum(counted.per_step) == records          # every record went
    assert max(counted.per_step) <= tlsio.FAIR_EVERY  # ... at most FAIR_EVERY of them in one step
    assert len(counted.per_step) >= records // tlsio.FAIR_EVERY
