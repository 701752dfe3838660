"""The mailbox simulator served over bare non-blocking sockets, for the fleet shards.

``MailboxSimulator.serve`` accepts with trio's listeners and hands each connection
a trio.SocketStream; in a sizing shard half the load core went to the simulator, and
a third of that to those wrappers (a conflict detector, an error-translating context
manager and a checkpoint per call, and serve_listeners' handler per connection).
Here the shard accepts on a plain listening socket and hands the simulator's own
per-connection handler (``_connection``: the same lean HTTP path, the same answers,
byte for byte) a ``wire.RawStream`` — or an SSLStream over one for the direct path's
TLS port. Nothing else about the simulator changes; tests/test_fleet_serve.py holds
the two servers to identical answers.
"""
from __future__ import annotations

import errno
import socket

import trio

from seg_fast.oslimits import raise_nofile_limit
from seg_fast.sim.wire import RawStream

BACKLOG = 4096
# accept() failures that mean "out of a resource for now": wait, then go on
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def serve(sim, host: str = "127.0.0.1", port: int = 0, *, ssl_context=None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Like ``sim.serve``: listen on (host, port), report the port, serve until
    cancelled. Parked-Ping heartbeats run once per simulator however many ports."""
    raise_nofile_limit()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(BACKLOG)
        ls.setblocking(False)
        bound = ls.getsockname()[1]
        async with trio.open_nursery() as nursery:
            if not getattr(sim, "_lean_heartbeats", False):
                sim._lean_heartbeats = True
                sim.port = bound
                await nursery.start(sim._heartbeats)
            task_status.started(bound)
            while True:
                try:
                    conn, _addr = ls.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(ls)
                    continue
                except OSError as exc:
                    if exc.errno not in _TRANSIENT:
                        raise
                    await trio.sleep(0.1)
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream = RawStream(conn)
                if ssl_context is not None:
                    stream = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
                nursery.start_soon(sim._connection, stream)
    finally:
        trio.lowlevel.notify_closing(ls)
        ls.close()
