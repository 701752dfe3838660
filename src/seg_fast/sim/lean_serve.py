"""The mailbox simulator served over bare non-blocking sockets, for the fleet shards.

``MailboxSimulator.serve`` accepts with trio's listeners and gives each connection a
task and a trio.SocketStream; in a sizing shard the simulator is half the load core.
Here a plain port is served by one epoll set and one task for all its connections
(``Reactor``): a readable socket's requests are read, parsed by the gateway's compiled
parser and answered there and then, as the simulator's lean path does (``_lean``: the
same checks, the same answers byte for byte); a parked Ping is its connection marked
parked in that set — no task, no coroutine — and ``deliver()`` (or the heartbeat)
hands it its answer. Whatever the lean path would leave to h11 (chunked bodies,
Expect, HTTP/1.0, malformed or oversized heads, a connection closed mid-request) goes
to a task running the simulator's h11 path on a ``wire.RawStream`` from the first
unread byte, as ``_lean`` hands it over. A TLS port (the direct path's: the shard
terminates both ends of the devices' TLS) is served the same way, each connection's
TLS over OpenSSL's socket BIO on its bare socket (the SSL object ssl.SSLSocket uses
inside, as wire.TlsStream): requests decrypted where the socket is readable, answers
written with one TLS write each (retried with the same bytes when the socket was
full, OpenSSL's rule), the handshake done by the first read; what goes to h11 goes
with its SSL object in a wire.TlsStream. tests/test_fleet_serve.py holds both to the
simulator's own server, byte for byte.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import sys

import trio

from seg_fast.errors import HTTPProtocolError
from seg_fast.oslimits import raise_nofile_limit
from seg_fast.proxy import http1, sockio
from seg_fast.proxy.tlsio import socket_bio
from seg_fast.sim import commands as C, stamps, steps
from seg_fast.sim.mailbox import LEAN_METHODS, MAX_HEAD, REASONS, SERVER_TRIPLE, _Park, _seq_of
from seg_fast.sim.wire import TLS_EOF, TLS_STUCK, RawStream, TlsStream, read_tls

BACKLOG = 4096
RECV = 65536
# accept() failures that mean "out of a resource for now": wait, then go on
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE}
_IN = select.EPOLLIN | select.EPOLLRDHUP


class Reserve:
    """One spare descriptor (nginx's and libuv's trick): out of descriptors, the simulator
    spends it to accept the waiting connection and close it at once, so the proxy sees a
    prompt close rather than a queued connection nobody reads (its request then waits
    out upstream_read, a gateway 503 the load side caused). Counted in ``sim.accept_shed``:
    the sizing verdict calls such a run the load side's, not the gateway's."""

    def __init__(self) -> None:
        self.fd = os.open(os.devnull, os.O_RDONLY)

    def shed(self, sim, ls: socket.socket) -> bool:
        if self.fd < 0:
            return False
        os.close(self.fd)
        self.fd = -1
        try:
            conn, _addr = ls.accept()
            conn.close()
            sim.accept_shed = getattr(sim, "accept_shed", 0) + 1
            return True
        except OSError:
            return False
        finally:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self.fd = -1              # the next shed tries again

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR


async def serve(sim, host: str = "127.0.0.1", port: int = 0, *, ssl_context=None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Like ``sim.serve``: listen on (host, port), report the port, serve until
    cancelled. Parked-Ping heartbeats run once per simulator however many ports."""
    raise_nofile_limit()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reserve = Reserve()
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        sockio.defer_accept(ls)       # a connection's accept and its first read: one wake-up
        stamps.enable(ls)             # (inherited by what it accepts)
        ls.listen(BACKLOG)
        ls.setblocking(False)
        bound = ls.getsockname()[1]
        async with trio.open_nursery() as nursery:
            if not getattr(sim, "_lean_heartbeats", False):
                sim._lean_heartbeats = True
                sim.port = bound
                await nursery.start(sim._heartbeats)
            task_status.started(bound)
            await Reactor(sim, ls, nursery, reserve, ssl_context).run()
    finally:
        trio.lowlevel.notify_closing(ls)
        ls.close()
        reserve.close()


class _Conn:
    """One connection in the Reactor: the bytes read (decrypted) and not yet answered,
    the answer bytes not yet sent, and the parked Ping (``park``) or its answer due;
    under TLS its SSL object (``tls``) and whether a read wanted the socket writable
    (``blocked``)."""
    __slots__ = ("sock", "fd", "buf", "out", "park", "due", "seq", "keep", "eof", "reactor", "tls",
                 "blocked", "late")

    def __init__(self, sock: socket.socket, reactor: "Reactor", tls=None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.out: list[memoryview] = []
        self.park: _Park | None = None
        self.due: _Park | None = None       # woken, its answer not written yet
        self.seq = None
        self.keep = True
        self.eof = False
        self.reactor = reactor
        self.tls = tls
        self.blocked = False
        self.late = 0.0                     # s the request's bytes sat unread (stamps.py)

    def ping_woken(self, park: _Park) -> None:
        """MailboxSimulator._wake: the Ping parked here is answered (from whichever
        task delivered the mail): written by the reactor's task when it next runs,
        which the writable socket makes at once."""
        self.reactor.woken(self, park)


class Reactor:
    def __init__(self, sim, ls: socket.socket, nursery: trio.Nursery, reserve: Reserve | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.sim = sim
        self.ctx = ssl_context
        self.ls = ls
        self.reserve = reserve
        self.nursery = nursery
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        # set while a shard's poller steps this reactor from its own set (hook): a trio.Event
        # set when it lets go
        self.hooked: trio.Event | None = None

    async def run(self) -> None:
        ep = self.ep
        ep.register(self.ls.fileno(), select.EPOLLIN)
        reactors = self.sim.__dict__.setdefault("lean_reactors", [])
        reactors.append(self)
        try:
            while True:
                if self.hooked is not None:
                    await self.hooked.wait()
                    continue
                await trio.lowlevel.wait_readable(ep.fileno())
                if self.hooked is None:
                    self.step()
        finally:
            reactors.remove(self)
            for c in list(self.conns.values()):
                self._close(c)
            ep.close()

    def hook(self, poller) -> None:
        """Served from now on in ``poller``'s step (fleet.Parker.attach), which sleeps in its
        own epoll set for both: one wake-up per request, not one through trio for each set."""
        if self.hooked is None:
            self.hooked = trio.Event()
            poller.attach(self.ep.fileno(), self.step, self._let_go)

    def _let_go(self) -> None:
        hooked, self.hooked = self.hooked, None
        hooked.set()

    def step(self) -> None:
        """Accept, read and answer whatever is ready."""
        conns = self.conns
        lfd = self.ls.fileno()
        ready = self.ep.poll(0)
        steps.note(("{} ready", len(ready)))     # kept if this step is slow
        for fd, ev in ready:
            if fd == lfd:
                self._accept()
                continue
            c = conns.get(fd)
            if c is None:
                continue
            try:
                self._event(c, ev)
            except OSError:
                self._close(c)
            except Exception as exc:     # a simulator bug: drop this connection, keep serving
                print(f"seg-fast sim: connection error {type(exc).__name__}: {exc}", file=sys.stderr)
                self._close(c)

    def _accept(self) -> None:
        sim = self.sim
        while True:
            try:
                sock, _addr = self.ls.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise
                if exc.errno in _OUT_OF_FDS and self.reserve is not None and self.reserve.shed(sim, self.ls):
                    continue
                # out of descriptors for now: stop listening a moment (level-triggered
                # epoll would otherwise report the waiting connection at once, again)
                self.ep.unregister(self.ls.fileno())
                self.nursery.start_soon(self._listen_again)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = None
            if self.ctx is not None:
                try:
                    tls = socket_bio(self.ctx, sock, True)   # handshake: first read
                except (OSError, ValueError):
                    sock.close()
                    continue
            sim.connections += 1
            c = _Conn(sock, self, tls)
            if not sim.lean_http:
                self._handoff(c, False)
                continue
            self.conns[c.fd] = c
            self.ep.register(c.fd, _IN)

    async def _listen_again(self) -> None:
        await trio.sleep(0.1)
        self.ep.register(self.ls.fileno(), select.EPOLLIN)

    def _event(self, c: _Conn, ev: int) -> None:
        if c.park is not None:
            # parked: nothing is read until its answer (as the waiting task reads
            # nothing); only a connection torn down both ways is noticed
            if ev & _GONE:
                self._close(c)
            return
        if c.blocked:                     # a TLS read that wanted to write: go on reading
            c.blocked = False
            self.ep.modify(c.fd, _IN)
            self._read(c)
        elif c.due is not None or c.out:
            if c.due is not None:
                park, c.due = c.due, None
                self._respond(c, C.ping_answer(park.changed))
            else:
                self._flush(c)
            if c.out:                     # still more to write: EPOLLOUT says when
                return
            if not c.keep:
                self._close(c)
                return
            self.ep.modify(c.fd, _IN)     # written: back to reading (pipelined requests first)
        else:
            self._read(c)
        self._serve(c)

    def _read(self, c: _Conn) -> None:
        if not c.buf and (c.tls is None or not c.tls.pending()):
            # a request's first bytes: how long they waited for us is the load side's delay
            c.late = stamps.late(c.sock) or 0.0
        if c.tls is not None:
            return self._read_tls(c)
        sock = c.sock
        while True:
            try:
                data = sock.recv(RECV)
            except BlockingIOError:
                return
            if not data:
                c.eof = True
                return
            c.buf += data
            if len(data) < RECV:
                return

    def _read_tls(self, c: _Conn) -> None:
        parts: list[bytes] = []
        _n, state = read_tls(c.tls, parts)
        for data in parts:
            c.buf += data
        if state == TLS_EOF:
            c.eof = True
        elif state == TLS_STUCK:
            c.blocked = True              # (handshake or ticket bytes the socket did not take)
            self.ep.modify(c.fd, _OUT)

    def _serve(self, c: _Conn) -> None:
        """Answer the complete requests in ``c.buf`` (as MailboxSimulator._lean does),
        until one parks, one's answer cannot all be written now, or more must come."""
        if c.blocked:                     # a TLS read to finish first (when writable)
            return
        sim = self.sim
        buf = c.buf
        while True:
            if not buf:
                if c.eof:
                    self._close(c)
                return
            try:
                head = http1.parse_request(buf, MAX_HEAD)
            except HTTPProtocolError:
                return self._handoff(c)
            if head is http1.NEED_MORE:
                if c.eof:
                    self._handoff(c)
                return
            if (type(head) is not http1.RequestHead or head.framing == http1.FRAMING_CHUNKED
                    or head.method not in LEAN_METHODS or head.length > sim.max_body):
                return self._handoff(c)
            end = head.head_len + head.length
            if len(buf) < end:
                if c.eof:
                    self._handoff(c)        # closed mid-body: h11 answers that (400)
                return
            body = bytes(buf[head.head_len:end])
            del buf[:end]
            headers = [(h[1], h[2]) for h in head.headers]
            c.seq = _seq_of(headers) if sim.answer_tap is not None else None
            c.keep = head.keep_alive
            answer = sim._answer(head.method, head.target, headers, body)
            head = headers = body = None
            if type(answer) is _Park:
                answer.task = c           # MailboxSimulator._wake calls c.ping_woken
                c.park = answer
                sim.parked += 1
                self.ep.modify(c.fd, 0)
                return
            self._respond(c, answer)
            if c.out:
                return
            if not c.keep:
                self._close(c)
                return

    def woken(self, c: _Conn, park: _Park) -> None:
        self.sim.parked -= 1
        if c.park is not park or c.fd not in self.conns:
            return
        c.park = None
        if c.buf or c.blocked or c.eof:
            # requests pipelined behind the Ping (served in the reactor's task, not
            # from inside whichever request or delivery woke it), or a TLS read to finish
            c.due = park
            self.ep.modify(c.fd, _OUT)    # writable at once: the reactor's task writes it
            return
        # Written here and now (a delivery's or the heartbeat's pass): waiting for the
        # reactor's task cost a loop pass of its own per woken Ping at real rates.
        try:
            self._respond(c, C.ping_answer(park.changed))
        except OSError:
            self._close(c)
            return
        if c.out:                         # the rest when writable (_respond registered it)
            return
        if not c.keep:
            self._close(c)
            return
        self.ep.modify(c.fd, _IN)         # back to reading: the device's next request

    def _respond(self, c: _Conn, answer) -> None:
        sim = self.sim
        if c.seq is not None:
            answer = sim.answer_tap(c.seq, answer, c.late)
        body = answer.body
        out = http1.write_response(answer.status, REASONS.get(answer.status, b""),
                                   [SERVER_TRIPLE, *[(n, n, v) for n, v in answer.headers]],
                                   http1.FRAMING_LENGTH, len(body), c.keep)
        sim.lean_answers += 1
        if c.tls is not None:             # one TLS write (one or a few records) per answer
            c.out = [out + body] if len(body) < 65536 else [out, body]
        else:
            c.out = [memoryview(out), memoryview(body)] if body else [memoryview(out)]
        if self._flush(c) is False:
            self.ep.modify(c.fd, _OUT)

    def _flush(self, c: _Conn) -> bool:
        """Write what is pending without waiting (one writev); False: some is left.
        Under TLS a write the socket did not take is retried later with the same bytes
        (OpenSSL keeps what it already put into records)."""
        out = c.out
        if c.tls is not None:
            obj = c.tls
            while out:
                try:
                    obj.write(out[0])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    return False
                out.pop(0)
            return True
        try:
            sent = c.sock.sendmsg(out)
        except BlockingIOError:
            sent = 0
        while out and sent >= len(out[0]):
            sent -= len(out[0])
            out.pop(0)
        if out:
            out[0] = out[0][sent:]
            return False
        return True

    def _handoff(self, c: _Conn, registered: bool = True) -> None:
        """The rest of this connection to the simulator's h11 path, from the first
        unread byte (as ``_lean`` returns it)."""
        if registered:
            self.ep.unregister(c.fd)
            del self.conns[c.fd]
        self.nursery.start_soon(self._h11, c.sock, bytes(c.buf), c.tls)

    async def _h11(self, sock: socket.socket, rest: bytes, tls=None) -> None:
        sim = self.sim
        stream = RawStream(sock) if tls is None else TlsStream.over(sock, tls)
        try:
            await sim._h11_connection(stream, rest)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:       # a simulator bug: drop this connection, keep serving
            print(f"seg-fast sim: connection error {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sim.connections -= 1
            await trio.aclose_forcefully(stream)

    def _close(self, c: _Conn) -> None:
        if self.conns.pop(c.fd, None) is None:
            return
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        park, c.park = c.park, None
        if park is not None:              # as a parked task cancelled: forgotten
            self.sim.parked -= 1
            park.task = None
            if park.dev.parked is park:
                park.dev.parked = None
        c.out = []
        c.sock.close()
        self.sim.connections -= 1
