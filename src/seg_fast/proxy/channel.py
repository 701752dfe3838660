"""The control process's line to each worker: one Unix socketpair per worker.

``seg-fast serve``'s workers are separate processes; what they must share goes through
here, never through a file: the TLS session ticket keys (control -> every worker,
proxy/tickets.py) and what a worker learnt of an attachment that another worker may be
asked to fetch (worker -> control -> the other workers, seg_fast/refshare.py). A pair is
SOCK_SEQPACKET (each send one whole message, kept apart), made before the worker starts:
what the control process sends at once (the first ticket keys) waits in it, so the worker
has it before its first connection. The worker finds its end by the descriptor number in
``SEG_FAST_TICKET_FD`` (a number, nothing secret). A message starts with a 5-byte kind;
``handlers`` (the worker's) and ``Hub.relayed`` (the control process's) say what each
side takes. Nothing blocks: a message a full socket does not take is dropped (tickets:
the next rotation resends the ring; attachment names: a cache).
"""
from __future__ import annotations

import os
import socket

import trio

ENV_FD = "SEG_FAST_TICKET_FD"
KIND_BYTES = 5
MAX_MESSAGE = 64 * 1024

MAX_PENDING = 4096

handlers: dict[bytes, object] = {}      # worker: message kind -> function(message)
_pending: list[bytes] = []              # messages that came before their kind's handler
_worker_sock: socket.socket | None = None


# -- the control process --------------------------------------------------------------------

class Hub:
    """One socketpair per worker (control process): ``pair`` before a worker starts, ``started``
    with its pid, ``gone`` when it exits; ``send_all`` to every worker; messages of the kinds in
    ``relayed`` that a worker sends are passed to every other worker (``run``). ``kept`` (if
    given) sees each relayed message (``note``) and gives what a worker started later should
    be sent first (``replay()``: messages), so a restarted worker knows what the others do."""

    def __init__(self, relayed: frozenset[bytes] = frozenset(), kept=None):
        self.relayed = relayed
        self.kept = kept
        self.channels: dict[int, socket.socket] = {}     # worker pid -> control's end
        self._nursery = None

    def pair(self, first: bytes = b"") -> tuple[socket.socket, socket.socket]:
        """(control's end, worker's end), ``first`` already waiting in it; the worker's end goes
        to the child (pass_fds, ENV_FD) and is then closed here."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        if first:
            ours.send(first)
        return ours, theirs

    def started(self, pid: int, ours: socket.socket) -> None:
        self.channels[pid] = ours
        if self._nursery is not None and self.relayed:
            self._nursery.start_soon(self._relay, pid, ours)
            backlog = self.kept.replay() if self.kept is not None else []
            if backlog:
                self._nursery.start_soon(self._replay, pid, ours, backlog)

    def gone(self, pid: int) -> None:
        sock = self.channels.pop(pid, None)
        if sock is not None:
            sock.close()

    def send_all(self, message: bytes, but: int | None = None) -> None:
        for pid, sock in list(self.channels.items()):
            if pid == but:
                continue
            try:
                sock.send(message)
            except BlockingIOError:
                pass              # that worker is behind: this message is lost to it, never us blocked
            except OSError:
                self.gone(pid)    # exited (its restart gets a new pair)

    async def run(self) -> None:
        """Relay the workers' messages (the workers started before and after)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.relayed:
                for pid, sock in list(self.channels.items()):
                    nursery.start_soon(self._relay, pid, sock)
            await trio.sleep_forever()

    async def _relay(self, pid: int, sock: socket.socket) -> None:
        while self.channels.get(pid) is sock:
            try:
                await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, OSError):
                return
            while True:
                try:
                    message = sock.recv(MAX_MESSAGE)
                except BlockingIOError:
                    break
                except OSError:
                    return
                if not message:
                    return        # the worker exited; gone() closes our end
                if message[:KIND_BYTES] in self.relayed:
                    self.send_all(message, but=pid)
                    if self.kept is not None:
                        self.kept.note(message)

    async def _replay(self, pid: int, sock: socket.socket, messages: list[bytes]) -> None:
        """Send a new worker the backlog, waiting (a while) for room as it reads."""
        for message in messages:
            while self.channels.get(pid) is sock:
                try:
                    sock.send(message)
                    break
                except BlockingIOError:
                    with trio.move_on_after(10) as waited:
                        await trio.lowlevel.wait_writable(sock)
                    if waited.cancelled_caught:
                        return    # a worker that does not read: it learns from new listings
                except OSError:
                    return
            else:
                return

    def close(self) -> None:
        for pid in list(self.channels):
            self.gone(pid)


# -- a worker -----------------------------------------------------------------------------------

def open_from_env() -> socket.socket | None:
    """The worker's end (ENV_FD), every message already waiting in it handled; None outside a serve."""
    global _worker_sock
    fd = os.environ.pop(ENV_FD, "")     # not inherited by anything this worker starts
    if not fd.isdigit():
        return None
    try:
        sock = socket.socket(fileno=int(fd))
    except OSError:
        return None
    sock.setblocking(False)
    _worker_sock = sock
    _take(sock)
    return sock


def handle(kind: bytes, handler) -> None:
    """Set the worker's handler for a kind of message; the ones that came before it (read with
    the ticket keys, before the gateway was built) are handled now."""
    handlers[kind] = handler
    early = [m for m in _pending if m[:KIND_BYTES] == kind]
    _pending[:] = [m for m in _pending if m[:KIND_BYTES] != kind]
    for message in early:
        handler(message)


def send(message: bytes) -> bool:
    """Send to the control process from any thread (a SOCK_SEQPACKET send is one whole message);
    False if not sent (outside a serve, the socket full, the control process gone)."""
    sock = _worker_sock
    if sock is None:
        return False
    try:
        sock.send(message)
        return True
    except OSError:
        return False


def _take(sock: socket.socket) -> bool:
    """Handle every message waiting; False at EOF (the control process is gone)."""
    while True:
        try:
            message = sock.recv(MAX_MESSAGE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not message:
            return False
        handler = handlers.get(message[:KIND_BYTES])
        if handler is not None:
            handler(message)
        elif len(_pending) < MAX_PENDING:
            _pending.append(message)


async def follow(sock: socket.socket) -> None:
    """The worker's task: handle each message as it comes."""
    global _worker_sock
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            if not _take(sock):
                return
    finally:
        _worker_sock = None
        sock.close()
