"""MailboxSimulator: a small real ActiveSync server over trio + h11.

One task per connection, one request at a time on it (keep-alive). The command
handlers are sans-IO (commands.py); the only waiting here is Ping. A parked Ping
is its connection task put to sleep with ``wait_task_rescheduled`` after the
request's objects were dropped, woken by ``deliver()`` (or any folder change) or
by its heartbeat, which one task serves for all Pings from a heap of deadlines:
about 5.3 KiB of memory per parked Ping with its mailbox and device
(benchmarks/sim_ping_memory.py; 4.7 before the lean path's per-device caches).

Well-formed requests are read by the lean path (``_lean``: the gateway's compiled
head parser, no h11); anything else goes to h11 from its first byte. Sync items and
fetched attachments are encoded once and spliced into answers (splice.py).

Besides the EAS endpoint (``/Microsoft-Server-ActiveSync``, ``/servlet/traveler``,
``/EAS``) it answers ``GET /sim/stats`` and ``POST /sim/deliver?user=U&count=N``
for tools that drive it from another process.

    sim = MailboxSimulator(password="secret", seed=1)
    port = await nursery.start(sim.serve, "127.0.0.1", 0)
    sim.deliver("jdoe", count=1)        # from a task in the same trio run

Any user name authenticates with the password (Basic). ``deliver`` must be called
from the trio thread that runs ``serve``.
"""
from __future__ import annotations

import base64
import binascii
import collections
import functools
import heapq
import http
import json
import math
import sys
from typing import NamedTuple

import h11
import trio

from seg_fast.errors import EASRequestError, HTTPProtocolError, WBXMLError
from seg_fast.oslimits import raise_nofile_limit
from seg_fast.proxy import http1
from seg_fast.sim import commands as C
from seg_fast.sim import webapps
from seg_fast.sim.commands import Answer, Ctx
from seg_fast.sim.corpus import Corpus
from seg_fast.sim.query import parse_target
from seg_fast.sim.search import search
from seg_fast.sim.splice import Cache
from seg_fast.sim.state import INBOX, Device, Item, Mailbox, normalize_user
from seg_fast.sim.tree import decode

VERSIONS = ("2.5", "12.0", "12.1", "14.0", "14.1", "16.0", "16.1")
SUPPORTED = ("Sync", "SendMail", "SmartForward", "SmartReply", "GetAttachment", "FolderSync",
             "MoveItems", "GetItemEstimate", "Settings", "Ping", "ItemOperations", "Provision",
             "Search", "ResolveRecipients")
PATHS = ("/microsoft-server-activesync", "/servlet/traveler", "/eas")
SERVER_HEADER = (b"ms-server-activesync", b"16.1")
SERVER_TRIPLE = (b"ms-server-activesync", *SERVER_HEADER)
LEAN_METHODS = frozenset((b"GET", b"POST", b"OPTIONS"))
REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
REASONS[449] = b"Retry after sending a PROVISION command"
MAX_HEAD = 16 * 1024
AUTH_CACHE = 1 << 20
RECV = 65536


class SentMail(NamedTuple):
    user: str
    command: str
    mime: bytes


class _Park:
    """A parked Ping: the sleeping connection task, its device and the folders it
    watches. ``task`` is None once it has been woken or cancelled."""
    __slots__ = ("task", "dev", "folders", "changed")

    def __init__(self, dev: Device, folders: tuple[str, ...]):
        self.task = None
        self.dev = dev
        self.folders = folders
        self.changed: tuple[str, ...] = ()

    def abort(self, _raise_cancel) -> trio.lowlevel.Abort:
        # cancelled (server shutting down): forget it so nobody reschedules it
        if self.dev.parked is self:
            self.dev.parked = None
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class MailboxSimulator:
    def __init__(self, password: str = "secret", seed: int = 1, *, corpus: Corpus | None = None,
                 initial_messages: int = 0, require_provisioning: bool = True,
                 max_body: int = 64 * 1024 * 1024, sent_log: int = 1000, splice_answers: bool = True,
                 lean_http: bool = True, paths: tuple[str, ...] = PATHS):
        self.password = password
        # The EAS paths it serves (any case, a trailing slash allowed): one to play a server
        # that has only its own, e.g. ("/servlet/traveler",) for IBM Traveler, ("/EAS",) for GroupWise.
        self.paths = frozenset(p.rstrip("/").lower() for p in paths)
        # lean_http: well-formed requests read and answered without h11 (_lean);
        # False sends every request through h11 (the reference)
        self.lean_http = lean_http
        self._auth_ok: dict[str, tuple[str, str]] = {}   # Authorization -> (password, user) that passed
        self.lean_answers = 0        # answers the lean path wrote (the rest went through h11)
        self.seed = seed
        self.corpus = corpus if corpus is not None else Corpus(seed)
        self.initial_messages = initial_messages
        self.require_provisioning = require_provisioning
        self.max_body = max_body
        self.mailboxes: dict[str, Mailbox] = {}
        self.port: int | None = None
        self.counts: collections.Counter[str] = collections.Counter()   # answers per command
        self.sent: collections.deque[SentMail] = collections.deque(maxlen=sent_log)
        self.sent_count = 0
        self.parked = 0              # Pings parked right now
        self.connections = 0         # open connections right now
        self._next_msg = 0
        self._serial = 0
        # Heartbeat deadlines of parked Pings: one heap and one sleeping task for
        # all of them instead of a cancel scope per Ping. Entries of Pings woken
        # early stay in the heap, but one at its top is dropped before the task
        # sleeps: it wakes for a Ping still parked, not once more per early answer.
        self._deadlines: list[tuple[float, int, _Park]] = []
        self._timer: trio.CancelScope | None = None
        self.heartbeat_wakeups = 0   # the heartbeat task's passes
        # answer_tap(seq, answer) -> answer: sees every answer to a request carrying
        # an X-Fleet-Seq header (the sizing fleet records what it sent, to compare
        # with what its device got through a proxy).
        self.answer_tap = None
        # Encoded Sync items and fetched attachments reused across answers (splice.py);
        # splice_answers=False builds every answer from its whole tree (the reference).
        self.splice_cache = Cache() if splice_answers else None
        # A NegotiateAcceptor (negotiate.py): only Kerberos tokens for its keytab authenticate.
        self.negotiate = None

    # -- the mailbox side ---------------------------------------------------------------
    def mailbox(self, user: str) -> Mailbox:
        key = normalize_user(user)
        mbox = self.mailboxes.get(key)
        if mbox is None:
            mbox = self.mailboxes[key] = Mailbox(key)
            for _ in range(self.initial_messages):
                mbox.add(INBOX, Item(self._take_msg()))
        return mbox

    def deliver(self, user: str, count: int = 1) -> list[str]:
        """New mail into ``user``'s Inbox; wake the user's Pings watching it.
        Returns the new items' ServerIds."""
        mbox = self.mailbox(user)
        ids = [mbox.add(INBOX, Item(self._take_msg())) for _ in range(count)]
        self._notify(mbox)
        return ids

    def _notify(self, mbox: Mailbox) -> None:
        """Wake the mailbox's parked Pings whose folders now hold changes."""
        for dev in mbox.devices.values():
            park = dev.parked
            if park is not None:
                changed = tuple(f for f in park.folders if mbox.pending(dev, f))
                if changed:
                    self._wake(park, changed)

    def stats(self) -> dict:
        """Counters for benchmarks (also served as JSON at GET /sim/stats)."""
        return {"parked": self.parked, "connections": self.connections, "mailboxes": len(self.mailboxes),
                "delivered": self._next_msg, "sent": self.sent_count, "answers": dict(self.counts)}

    def record_sent(self, user: str, command: str, mime: bytes) -> None:
        self.sent_count += 1
        self.sent.append(SentMail(user, command, mime))

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def _take_msg(self) -> int:
        self._next_msg += 1
        return self._next_msg - 1

    # -- the server ----------------------------------------------------------------------
    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, ssl_context=None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        raise_nofile_limit()
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        if ssl_context is not None:
            listeners = [trio.SSLListener(ln, ssl_context, https_compatible=True) for ln in listeners]
        async with trio.open_nursery() as nursery:
            await nursery.start(self._heartbeats)
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started(self.port)

    async def _connection(self, stream) -> None:
        self.connections += 1
        try:
            rest = await self._lean(stream) if self.lean_http else b""
            if rest is not None:
                await self._h11_connection(stream, rest)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:       # a simulator bug: drop this connection, keep serving
            print(f"seg-fast sim: connection error {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _lean(self, stream) -> bytes | None:
        """Requests the compiled parser (proxy/http1.py) takes whole: a complete head
        with a Content-Length (or no body) for GET/POST/OPTIONS, as the fleet sends.
        Returns None when the connection is done, or the unread bytes (from the start
        of a request) for h11 to carry on with anything else (chunked bodies, Expect,
        HTTP/1.0, malformed heads, oversized bodies); the answers' bytes are the ones
        h11 writes (tests/test_sim_http.py)."""
        buf = bytearray()
        while True:
            try:
                head = http1.parse_request(buf, MAX_HEAD) if buf else http1.NEED_MORE
            except HTTPProtocolError:
                return bytes(buf)
            if head is http1.NEED_MORE:
                data = await stream.receive_some(RECV)
                if not data:
                    return bytes(buf) if buf else None
                buf += data
                continue
            if (type(head) is not http1.RequestHead or head.framing == http1.FRAMING_CHUNKED
                    or head.method not in LEAN_METHODS or head.length > self.max_body):
                return bytes(buf)
            end = head.head_len + head.length
            while len(buf) < end:
                data = await stream.receive_some(max(RECV, end - len(buf)))
                if not data:
                    return bytes(buf)  # closed mid-body: h11 answers that (400)
                buf += data
            body = bytes(buf[head.head_len:end])
            del buf[:end]
            headers = [(h[1], h[2]) for h in head.headers]
            seq = _seq_of(headers) if self.answer_tap is not None else None
            keep_alive = head.keep_alive
            answer = self._answer(head.method, head.target, headers, body)
            head = headers = body = None          # not kept alive while a Ping is parked
            if type(answer) is _Park:
                # parked here rather than in a helper coroutine: one frame less per Ping
                park, answer = answer, None
                park.task = trio.lowlevel.current_task()
                self.parked += 1
                try:
                    await trio.lowlevel.wait_task_rescheduled(park.abort)
                finally:
                    self.parked -= 1
                answer = C.ping_answer(park.changed)
                park = None
            if seq is not None:
                answer = self.answer_tap(seq, answer)
            out = http1.write_response(answer.status, REASONS.get(answer.status, b""),
                                       [SERVER_TRIPLE, *[(n, n, v) for n, v in answer.headers]],
                                       http1.FRAMING_LENGTH, len(answer.body), keep_alive)
            self.lean_answers += 1
            if len(answer.body) < 65536:
                await stream.send_all(out + answer.body)
            else:
                await stream.send_all(out)
                await stream.send_all(answer.body)
            if not keep_alive:
                return None

    async def _parked(self, park: _Park) -> Answer:
        park.task = trio.lowlevel.current_task()
        self.parked += 1
        try:
            await trio.lowlevel.wait_task_rescheduled(park.abort)
        finally:
            self.parked -= 1
        return C.ping_answer(park.changed)

    async def _h11_connection(self, stream, received: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if received:
            conn.receive_data(received)
        try:
            while True:
                req = await _next_event(conn, stream)
                if not isinstance(req, h11.Request):
                    return
                body = bytearray()
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                while True:
                    ev = await _next_event(conn, stream)
                    if isinstance(ev, h11.Data):
                        body += ev.data
                        if len(body) > self.max_body:
                            await _send(conn, stream, Answer(413, [], b""))
                            return
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                seq = _seq_of(req.headers) if self.answer_tap is not None else None
                answer = self._handle(req, bytes(body))
                req = body = None          # not kept alive while a Ping is parked
                if type(answer) is _Park:
                    answer = await self._parked(answer)
                if seq is not None:
                    answer = self.answer_tap(seq, answer)
                await _send(conn, stream, answer)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                try:
                    await _send(conn, stream, Answer(400, [], b""))
                except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                    pass

    def _handle(self, req: h11.Request, body: bytes) -> Answer | _Park:
        return self._answer(req.method, req.target, list(req.headers), body)

    def _answer(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes) -> Answer | _Park:
        """The answer to one request; ``headers`` are (lower-case name, value) pairs."""
        try:
            return self._dispatch(method, target, headers, body)
        except (EASRequestError, WBXMLError, UnicodeDecodeError, ValueError):
            return Answer(400, [], b"")
        except Exception as exc:       # a simulator bug: answer 500, keep serving
            print(f"seg-fast sim: internal error {type(exc).__name__}: {exc}", file=sys.stderr)
            return Answer(500, [], b"")

    def _dispatch(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                  body: bytes) -> Answer | _Park:
        if _web(target):                     # EWS and OWA-like webmail (webapps.py)
            return webapps.answer(self, method, target, headers, body)
        method = method.decode("ascii")
        path, q = _parse_target(target)
        if path.startswith("/sim/"):
            return self._side_door(method, path, q.params)
        if path.rstrip("/").lower() not in self.paths:
            return Answer(404, [], b"")
        auth = version = policy_key = multipart = None
        for name, value in headers:              # the four the EAS path reads (the last one wins)
            if name in _READ:
                if name == b"authorization":
                    auth = value
                elif name == b"ms-asprotocolversion":
                    version = value
                elif name == b"x-ms-policykey":
                    policy_key = value
                else:
                    multipart = value
        user = self._authenticate(auth.decode("latin-1") if auth is not None else None)
        if user is not None and self.negotiate is not None and q.user and \
                normalize_user(q.user) != normalize_user(user):
            self.negotiate.mismatched += 1       # a ticket for someone other than the device's user
            return Answer(403, [], b"")
        if user is None:
            return Answer(401, [(b"www-authenticate", b"Negotiate" if self.negotiate is not None
                                 else b'Basic realm="seg-fast sim"')], b"")
        if method == "OPTIONS":
            return Answer(200, [(b"ms-asprotocolversions", ",".join(VERSIONS).encode()),
                                (b"ms-asprotocolcommands", ",".join(SUPPORTED).encode()),
                                (b"allow", b"OPTIONS,POST"), (b"public", b"OPTIONS,POST")], b"")
        if method != "POST" or not q.command or not q.device_id:
            return Answer(400, [], b"")
        command = q.command
        if command not in SUPPORTED:
            return Answer(501, [], b"")
        version = (version.decode("latin-1") if version else None) or q.version or "14.1"
        if version not in VERSIONS:
            return Answer(400, [], b"")
        vnum = C.version_number(version)
        mbox = self.mailbox(user)
        dev = mbox.device(q.device_id)
        self.counts[command] += 1
        if self.require_provisioning and command != "Provision":
            sent_key = (policy_key.decode("latin-1") if policy_key else None) or q.policy_key
            if dev.policy_key is None or sent_key != dev.policy_key:
                return C.provisioning_required(command, vnum, sent_key)
        if command == "Ping" and body and body == dev.ping_body:
            doc = None          # the Ping this device sent last time: read then (C.ping_request)
        else:
            doc = decode(body) if body[:2] == b"\x03\x01" else None
            if body and doc is None and command not in ("SendMail", "SmartReply", "SmartForward"):
                return Answer(400, [], b"")
        multipart = ((multipart is not None and multipart.decode("latin-1").upper() == "T")
                     or (q.base64 and q.flag("AcceptMultiPart")))
        ctx = Ctx(self, mbox, dev, vnum, q, doc, body, multipart)
        if command == "Ping":
            return self._ping(ctx)
        if command in ("SendMail", "SmartReply", "SmartForward"):
            answer = C.send_mail(ctx, command)
        else:
            answer = HANDLERS[command](ctx)
        if command in CHANGES_FOLDERS:
            self._notify(mbox)
        return answer

    def _side_door(self, method: str, path: str, params: dict[str, str]) -> Answer:
        """Control for tools driving a simulator in another process (no auth: it
        listens on loopback): GET /sim/stats; POST /sim/deliver?user=U[&count=N]
        or ?prefix=P&users=N (users P0..P{N-1})."""
        if path == "/sim/stats" and method == "GET":
            return Answer(200, [(b"content-type", b"application/json")], json.dumps(self.stats()).encode())
        if path == "/sim/deliver" and method == "POST":
            count = int(params.get("count", "1"))
            if "user" in params:
                users = [params["user"]]
            else:
                users = [f"{params.get('prefix', 'u')}{k}" for k in range(int(params.get("users", "0")))]
            for user in users:
                self.deliver(user, count)
            return Answer(200, [(b"content-type", b"application/json")],
                          json.dumps({"delivered": count * len(users)}).encode())
        return Answer(404, [], b"")

    def _authenticate(self, value: str | None) -> str | None:
        if self.negotiate is not None:       # a fresh token per request: nothing remembered
            return self.negotiate.user_of(value)
        # a device sends the same header every time: remembered (bounded) once checked
        hit = self._auth_ok.get(value)
        if hit is not None and hit[0] == self.password:
            return hit[1]
        user = self._check_basic(value)
        if user is not None and len(self._auth_ok) < AUTH_CACHE:
            self._auth_ok[value] = (self.password, user)
        return user

    def _check_basic(self, value: str | None) -> str | None:
        if not value or not value[:6].lower() == "basic ":
            return None
        try:
            raw = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        user, sep, password = raw.partition(":")
        if not sep or not user or password != self.password:
            return None
        return user

    # -- Ping ------------------------------------------------------------------------------
    def _ping(self, ctx: Ctx) -> Answer | _Park:
        """The answer now (bad request, changes pending) or a _Park to wait on."""
        req = C.ping_request(ctx)
        if isinstance(req, Answer):
            return req
        heartbeat, folders = req
        dev, mbox = ctx.dev, ctx.mbox
        changed = tuple(f for f in folders if mbox.pending(dev, f))
        if changed:
            return C.ping_answer(changed)
        if dev.parked is not None:        # a newer Ping from the same device replaces it
            self._wake(dev.parked, ())
        park = dev.parked = _Park(dev, folders)
        self._expire_at(park, trio.current_time() + heartbeat)
        return park

    def _expire_at(self, park: _Park, deadline: float) -> None:
        self._serial += 1
        heapq.heappush(self._deadlines, (deadline, self._serial, park))
        if self._timer is not None and deadline < self._timer.deadline:
            self._timer.deadline = deadline

    def _wake(self, park: _Park, changed: tuple[str, ...]) -> None:
        if park.dev.parked is park:
            park.dev.parked = None
            heap = self._deadlines
            if heap and heap[0][2] is park and self._timer is not None:
                # the deadline the heartbeat task sleeps to is gone: sleep to the next live one
                self._prune()
                self._timer.deadline = heap[0][0] if heap else math.inf
        task, park.task = park.task, None
        park.changed = changed
        if task is not None:
            if type(task) is trio.lowlevel.Task:
                trio.lowlevel.reschedule(task)
            else:                          # a connection of lean_serve's Reactor: no task
                task.ping_woken(park)

    def _prune(self) -> None:
        """Drop the heap's top entries of Pings no longer parked (woken early, replaced
        or cancelled: no longer their device's)."""
        heap = self._deadlines
        while heap and heap[0][2].dev.parked is not heap[0][2]:
            heapq.heappop(heap)

    async def _heartbeats(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Answer parked Pings whose heartbeat ran out (Status 1)."""
        heap = self._deadlines
        task_status.started()
        while True:
            self._prune()
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._timer:
                await trio.sleep_forever()
            self.heartbeat_wakeups += 1
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                park = heapq.heappop(heap)[2]
                if park.task is not None:
                    self._wake(park, ())


# Commands that can change folder contents (and so release other devices' Pings).
CHANGES_FOLDERS = frozenset({"Sync", "MoveItems", "SendMail", "SmartReply", "SmartForward",
                             "ItemOperations"})
HANDLERS = {
    "Provision": C.provision, "FolderSync": C.folder_sync, "Sync": C.sync,
    "GetItemEstimate": C.get_item_estimate, "MoveItems": C.move_items, "Settings": C.settings,
    "ItemOperations": C.item_operations, "GetAttachment": C.get_attachment, "Search": search,
    "ResolveRecipients": C.resolve_recipients,
}


# the request headers _dispatch reads
_READ = frozenset((b"authorization", b"ms-asprotocolversion", b"x-ms-policykey", b"ms-asacceptmultipart"))
# targets repeat per device and command
_web = functools.lru_cache(maxsize=65536)(webapps.handles)


@functools.lru_cache(maxsize=65536)
def _parse_target(target: bytes):
    # targets repeat per device and command; the Query is only read by the handlers
    return parse_target(target.decode("latin-1"))


def _seq_of(headers) -> bytes | None:
    for name, value in headers:
        if name == b"x-fleet-seq":
            return value
    return None


async def _next_event(conn: h11.Connection, stream):
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        conn.receive_data(await stream.receive_some(RECV))


async def _send(conn: h11.Connection, stream, answer: Answer) -> None:
    headers = [SERVER_HEADER, *answer.headers, (b"Content-Length", str(len(answer.body)).encode())]
    head = conn.send(h11.Response(status_code=answer.status, headers=headers,
                                  reason=REASONS.get(answer.status, b"")))
    if len(answer.body) < 65536:
        await stream.send_all(head + conn.send(h11.Data(data=answer.body)) + conn.send(h11.EndOfMessage()))
    else:
        await stream.send_all(head)
        await stream.send_all(conn.send(h11.Data(data=answer.body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
