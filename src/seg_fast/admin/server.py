"""The admin API on 127.0.0.1:44444 (the control process): the trio + h11 shell.

Every request needs ``Authorization: Bearer <token>``: ``[admin] token``, or one
generated on first start and written (mode 0600) to the token file beside the
policy store. ``/seg/push`` takes ``[policy] push_token`` instead (and is off when
that is empty); ``/seg/openapi.json`` is open. The control process also runs the
policy API pull (``[policy] api_url``) and, with ``[policy] push_port``, a second
listener that serves ``/seg/push`` alone for an MDM that cannot reach localhost.
"""
from __future__ import annotations

import functools
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

import h11
import msgspec
import trio

from seg_fast.admin.api import CALLER, JSON, QUERY, AdminApi, HttpError
from seg_fast.admin.console import query_params
from seg_fast.errors import SegFastError, StartupError
from seg_fast.policy.gate import RECORDS_DIR, PolicyGatekeeper
from seg_fast.policy.source import PolicySource
from seg_fast.proxy.headers import reason_phrase
from seg_fast.statedir import ensure_parent, resolve

log = logging.getLogger("seg_fast.admin")

MAX_BODY = 16 * 1024 * 1024
MAX_HEADERS = 64 * 1024
IDLE_TIMEOUT = 30.0


def token_path(config) -> Path:
    """Beside the SQLite store, else in the state directory."""
    if config.policy.store == "sqlite":
        db = resolve(config.policy.sqlite_path, config.state_dir)
        return db.with_name(db.name + ".admin-token")
    return resolve("seg-fast-admin.token", config.state_dir)


def admin_token(config) -> str:
    """The configured token, or the generated one (created once, kept in the token file)."""
    if config.admin.token:
        return config.admin.token
    path = token_path(config)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    try:
        ensure_parent(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except OSError as exc:
        # A read-only or full state_dir: no token anyone could read, so no admin API.
        raise StartupError(f"{path}: cannot create the admin token file ({exc.strerror}); "
                           "set key admin.token or make state_dir writable") from None
    return token


def _ephemeral_hint(port: int) -> str:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
    except (OSError, ValueError):
        return ""
    if lo <= port <= hi:
        return (f"; {port} lies in the kernel's ephemeral port range ({lo}-{hi}), where outgoing connections "
                "may take it: choose a port outside it or reserve it (net.ipv4.ip_local_reserved_ports)")
    return ""


# The console: scripts and styles from this listener only, no inline code, never framed.
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SESSION_COOKIE = "seg_session"
SESSION_TTL = 8 * 3600.0
MAX_SESSIONS = 1000
# Wrong tokens at the login form: this many per address within the window, then 429.
LOGIN_ATTEMPTS = 10
LOGIN_WINDOW = 60.0


class Login(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    name: str = ""                 # who this is, for the audit log


class Session(msgspec.Struct):
    name: str
    csrf: str
    expires: float


class Sessions:
    """Console sessions of this control process (a restart logs everyone out)."""

    def __init__(self, ttl: float = SESSION_TTL):
        self.ttl = ttl
        self.by_id: dict[str, Session] = {}

    def create(self, name: str) -> tuple[str, Session]:
        now = time.time()
        self.by_id = {k: v for k, v in self.by_id.items() if v.expires > now}
        while len(self.by_id) >= MAX_SESSIONS:
            self.by_id.pop(next(iter(self.by_id)))
        sid = secrets.token_urlsafe(32)
        sess = Session(name=name, csrf=secrets.token_urlsafe(32), expires=now + self.ttl)
        self.by_id[sid] = sess
        return sid, sess

    def get(self, sid: str) -> Session | None:
        sess = self.by_id.get(sid) if sid else None
        if sess is None:
            return None
        if sess.expires <= time.time():
            self.by_id.pop(sid, None)
            return None
        return sess

    def drop(self, sid: str) -> None:
        self.by_id.pop(sid, None)


def _header(headers, name: bytes) -> bytes:
    for k, v in headers:
        if k.lower() == name:
            return v.strip()
    return b""


def _cookie(headers, name: str) -> str:
    for k, v in headers:
        if k.lower() != b"cookie":
            continue
        for part in v.decode("latin-1").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
    return ""


def _bearer(headers) -> bytes:
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
    return b""


def _peer(stream) -> str:
    """The client's address ("" when the stream has no socket, e.g. in memory)."""
    while hasattr(stream, "transport_stream"):
        stream = stream.transport_stream
    try:
        return stream.socket.getpeername()[0]
    except (AttributeError, OSError):
        return ""


def _loopback(addr: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(addr.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False


class AdminServer:
    def __init__(self, config, *, gate: PolicyGatekeeper | None = None, push_only: bool = False):
        self.config = config
        self.gate = gate or PolicyGatekeeper(config.policy, node=f"admin/{os.getpid()}",
                                             records_dir=resolve(RECORDS_DIR, config.state_dir))
        self.source = PolicySource(config.policy, self.gate.store) if config.policy.api_url else None
        self.api = AdminApi(config, self.gate, source=self.source, started=time.time())
        self.token = admin_token(config).encode()
        self.push_token = config.policy.push_token.encode()
        self.push_only = push_only
        self.sessions = Sessions()
        self.login_failures: dict[str, list[float]] = {}    # peer -> recent wrong-token times
        self.tls = False              # set when the listener speaks TLS (cookies get Secure)

    def _caller(self, route, method: str, headers, peer: str = "") -> str | None:
        """Who is calling (for the audit log), or None when not allowed.

        A bearer token, or the console's session cookie; with the cookie, every
        state-changing call must also carry the session's CSRF token (X-CSRF-Token).
        """
        if route.auth == "none":
            return "anonymous"
        if route.auth == "metrics" and _loopback(peer):
            return "loopback"     # a scraper on this host needs no token (issue 12)
        given = _bearer(headers)
        if given:
            want = self.push_token if route.auth == "push" else self.token
            ok = bool(want) and hmac.compare_digest(given, want)
            return f"{'push' if route.auth == 'push' else 'token'}@{peer or '?'}" if ok else None
        if route.auth == "push":
            return None
        session = self.sessions.get(_cookie(headers, SESSION_COOKIE))
        if session is None:
            return None
        if method not in ("GET", "HEAD") and not hmac.compare_digest(_header(headers, b"x-csrf-token"),
                                                                     session.csrf.encode()):
            raise HttpError(403, "missing or wrong X-CSRF-Token for this session")
        return f"{session.name}@{peer or '?'}"

    def _session_call(self, method: str, headers, body: bytes, peer: str):
        """POST /seg/session {token, name}: the console's login; GET: the CSRF token; DELETE: log out."""
        if method == "POST":
            try:
                login = msgspec.json.decode(body, type=Login)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise HttpError(400, f"request body: {exc}") from None
            now = time.monotonic()
            recent = [t for t in self.login_failures.get(peer, []) if now - t < LOGIN_WINDOW]
            if len(recent) >= LOGIN_ATTEMPTS:
                raise HttpError(429, f"too many wrong tokens from this address; wait {LOGIN_WINDOW:.0f} s")
            if not hmac.compare_digest(login.token.encode(), self.token):
                log.warning("admin: console login refused from %s", peer or "?")
                if len(self.login_failures) > 10_000:
                    self.login_failures.clear()
                self.login_failures[peer] = recent + [now]
                raise HttpError(401, "wrong admin token")
            self.login_failures.pop(peer, None)
            sid, sess = self.sessions.create(login.name.strip()[:64] or "admin")
            self.api.audit.write(f"{sess.name}@{peer or '?'}", "login")
            cookie = (f"{SESSION_COOKIE}={sid}; Path=/seg; Max-Age={int(SESSION_TTL)}; HttpOnly; "
                      "SameSite=Strict").encode()
            if self.tls:
                cookie += b"; Secure"
            return 200, JSON, msgspec.json.encode({"csrf": sess.csrf, "name": sess.name,
                                                   "expires": sess.expires}), [(b"set-cookie", cookie)]
        sid = _cookie(headers, SESSION_COOKIE)
        sess = self.sessions.get(sid)
        if sess is None:
            raise HttpError(401, "no session")
        if method == "GET":
            return 200, JSON, msgspec.json.encode({"csrf": sess.csrf, "name": sess.name, "expires": sess.expires})
        if method == "DELETE":
            if not hmac.compare_digest(_header(headers, b"x-csrf-token"), sess.csrf.encode()):
                raise HttpError(403, "missing or wrong X-CSRF-Token for this session")
            self.sessions.drop(sid)
            self.api.audit.write(f"{sess.name}@{peer or '?'}", "logout")
            gone = f"{SESSION_COOKIE}=; Path=/seg; Max-Age=0; HttpOnly; SameSite=Strict".encode()
            return 200, JSON, b'{"logged_out":true}', [(b"set-cookie", gone)]
        raise HttpError(405, f"{method} not allowed on /seg/session")

    async def answer(self, method: str, target: bytes, headers, body: bytes, peer: str = ""):
        """(status, content type, body) or, with headers to add, (status, content type, body, headers)."""
        path = target.split(b"?", 1)[0].decode("ascii", "replace")
        try:
            if path == "/seg/session" and not self.push_only:
                return self._session_call(method, headers, body, peer)
            m = self.api.match(method, path)
            if m is None or (self.push_only and m[0].auth != "push"):
                raise HttpError(404, f"no such endpoint: {path}")
            route, params = m
            who = self._caller(route, method, headers, peer)
            if who is None:
                raise HttpError(401, "missing or wrong bearer token (or console session)")
            CALLER.set(who)
            QUERY.set(query_params(target))
            return await self.api.call(route, params, body)
        except HttpError as exc:
            return exc.status, JSON, msgspec.json.encode({"error": str(exc)})
        except SegFastError as exc:
            log.error("admin %s %s: %s", method, path, exc)
            return 503, JSON, msgspec.json.encode({"error": str(exc)})
        except Exception:
            # A bug in one handler must not take the admin API (or the control process) down.
            log.exception("admin %s %s failed", method, path)
            return 500, JSON, msgspec.json.encode({"error": "internal error (see the control process log)"})

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT) as idle:
                    req, body = await self._read_request(conn, stream)
                if idle.cancelled_caught or req is None:
                    return
                extra = []
                if isinstance(req, int):        # an error status for a malformed request
                    status, ctype, out = req, JSON, msgspec.json.encode({"error": body.decode()})
                else:
                    status, ctype, out, *more = await self.answer(req.method.decode(), req.target, req.headers,
                                                                  body, _peer(stream))
                    extra = more[0] if more else []
                headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(out)).encode()),
                           (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
                           (b"content-security-policy", CSP), (b"x-frame-options", b"DENY"),
                           (b"referrer-policy", b"no-referrer"), *extra]
                if status == 401:
                    headers.append((b"www-authenticate", b'Bearer realm="seg"'))
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))))
                await stream.send_all(conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE or isinstance(req, int):
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _read_request(self, conn, stream):
        req, chunks, size = None, [], 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return 400, str(exc).encode()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    if req is None:
                        return None, b""
            elif isinstance(event, h11.Request):
                req = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    return 413, b"request body too large"
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return req, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def listen(self, host: str, port: int, *, key: str = "admin.port", ssl_context=None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            # Never silently off: the start fails naming the key and the cause.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise StartupError(f"key {key}: cannot listen on {host}:{port}: {why}{_ephemeral_hint(port)}") from None
        bound = listeners[0].socket.getsockname()[1]
        if ssl_context is not None:
            listeners = [trio.SSLListener(l, ssl_context, https_compatible=True) for l in listeners]
        task_status.started(bound)
        await trio.serve_listeners(self.serve_connection, listeners)


async def run(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin API until cancelled (runs in the control process).

    ``task_status.started(port)`` reports the admin port actually bound.
    """
    server = AdminServer(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.gate.run)
        if server.source is not None:
            await nursery.start(server.source.run)
        port = await nursery.start(server.listen, config.admin.host, config.admin.port)
        from seg_fast.admin import series
        await nursery.start(series.run, server.api)          # the dashboard's last 24 h
        if config.policy.push_port and config.policy.push_token:
            # Reachable from the MDM: TLS with the device listener's certificate when it has one.
            tls = None
            if config.listener.tls_cert or config.listener.tls_pfx:
                from seg_fast.proxy.gateway import listener_tls_context
                tls = listener_tls_context(config.listener)
            push = AdminServer(config, gate=server.gate, push_only=True)
            await nursery.start(functools.partial(push.listen, config.policy.push_host, config.policy.push_port,
                                                  key="policy.push_port", ssl_context=tls))
        task_status.started(port)
