"""One gateway worker: listener, device connections, shared state, drain and reload."""
from __future__ import annotations

import errno
import functools
import socket
import ssl

import trio

from seg_fast import ticker
from seg_fast.content import pipeline as content_pipeline
from seg_fast.kcd import clientcert, delegation
from seg_fast.ldapcerts import CertLookup
from seg_fast.observe import TransactionLog
from seg_fast.oslimits import device_connections_within, raise_nofile_limit
from seg_fast.policy import gate
from seg_fast.proxy import lane, sockio, tls13
from seg_fast.proxy.downstream import resume_parked, serve_device
from seg_fast.proxy.headers import TrustedProxies
from seg_fast.proxy.incidents import Incidents
from seg_fast.malloc import huge_arenas, return_big_buffers
from seg_fast.proxy.looplag import LoopLag, in_slices
from seg_fast.proxy.parking import PingPark
from seg_fast.proxy.passthrough import Passthrough
from seg_fast.proxy.redirects import RedirectMap
from seg_fast.proxy.tlsio import TLSStream
from seg_fast.proxy.upstream import UpstreamPool, origin_of
from seg_fast.stats import Stats

# Connections taken from the listen queue per scheduler batch (a checkpoint between batches).
ACCEPT_BATCH = 32


def server_tls_context(cert: str, key: str, pfx=None, records: bool = True) -> ssl.SSLContext:
    """TLS for the device leg: TLS 1.2 and later only. ``pfx``: listener settings whose
    tls_pfx (PKCS#12) holds key and chain instead of the PEM files. ``records``: a TLS 1.3
    connection goes on without OpenSSL's object after its handshake (proxy/tls13.py)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A renegotiation the device starts costs a handshake each time and gains nothing (TLS 1.3
    # has none): refused, as nginx does. OpenSSL 3 refuses client-initiated ones by default;
    # this also holds where Python is linked against OpenSSL 1.1.1, which allowed them.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if pfx is not None:
        from seg_fast import pfx as pkcs12

        pkcs12.load_into(ctx, pkcs12.pem_of(pkcs12.load_pfx(pfx)))
    else:
        ctx.load_cert_chain(cert, key)
    if records:
        tls13.prepare(ctx)
    return ctx


def listener_tls_context(listener) -> ssl.SSLContext | None:
    """The device listener's context from its settings (PEM or PFX); None for plain HTTP."""
    if listener.tls_pfx:
        return server_tls_context("", "", pfx=listener, records=listener.tls13_records)
    if listener.tls_cert:
        return server_tls_context(listener.tls_cert, listener.tls_key, records=listener.tls13_records)
    return None


def listening_socket(host: str, port: int, backlog: int) -> trio.socket.SocketType:
    """A listening socket other workers can share (SO_REUSEPORT: the kernel spreads connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sockio.defer_accept(sock)
    return sock


class Gateway:
    """The state one worker shares between its device connections."""

    def __init__(self, config, *, config_path=None, tls_context: ssl.SSLContext | None = None,
                 gatekeeper_factory=None):
        self.config_path = config_path
        # The policy engine's gatekeeper by default; tests and benchmarks may pass another.
        self.gatekeeper_for = gatekeeper_factory or gate.build
        self.log = TransactionLog(config.log.transactions)
        self.heartbeats: dict = {}
        self.draining = False
        self.idle_scopes: set = set()         # idle waits: CancelScopes or sockio.IdleWait (cancel())
        self.parked_scopes: set[trio.CancelScope] = set()
        self.active = 0                       # device connections, parked Pings included
        self.yield_skips = 0                  # exchange.YIELD_BACKOFF: fast-lane requests left to not yield
        self.per_address: dict[str, int] = {}   # the same, by client address
        self.max_connections = 0              # limits.max_connections within the descriptor limit
        # Contained exceptions, deadlines, refused connections: counts for metrics, a rate-limited log.
        self.incidents = Incidents()
        # Requests, decisions, bytes: counted per transaction, written for the control process (stats.py).
        self.stats = Stats()
        self.port: int | None = None
        self._tls_override = tls_context
        self._nursery = None
        self._accept_scope = trio.CancelScope()
        self._conns_scope = trio.CancelScope()
        self._gatekeeper_scope = None
        self._conns = None
        self.parking: PingPark | None = None
        self.pool = None
        self._apply(config)

    def _apply(self, config) -> None:
        old_pool = self.pool
        self.config = config
        t, lim = config.timeouts, config.limits
        if getattr(self, "unsent", None) is None:
            self.unsent = sockio.Unsent(0)    # answer bytes this worker holds for devices
        # Under pressure a write is cut once it had a quarter of its deadline to show its pace.
        self.unsent.limit, self.unsent.min_rate, self.unsent.min_age = \
            lim.max_unsent_bytes, lim.min_send_rate, t.device_write / 4
        self.device_pace = sockio.Pace(t.device_write, lim.min_send_rate, self.unsent)
        self.upstream_pace = sockio.Pace(t.upstream_read)
        # The content pipeline reads its [security] settings per process.
        content_pipeline.configure(config.security)
        self.eas_paths = frozenset(p.lower().encode() for p in config.eas.paths)
        # EWS and webmail beside ActiveSync (proxy/passthrough.py); None when both are off.
        self.passthrough = Passthrough.build(config)
        # Forwarding headers are believed from these peers only (listener.trusted_proxies).
        self.trusted_proxies = TrustedProxies(config.listener.trusted_proxies)
        if old_pool is None or old_pool.settings != config.upstream or \
                old_pool.connect_timeout != config.timeouts.upstream_connect:
            self.pool = UpstreamPool(config.upstream, config.timeouts)
            if old_pool is not None:
                old_pool.close()      # in-flight connections finish, then close on release
        default = origin_of(config.upstream.url)
        if getattr(self, "redirects", None) is None or self.redirects.default != default:
            self.redirects = RedirectMap(default)
            if getattr(self, "gatekeeper", None) is not None:
                self.redirects.attach(self.gatekeeper)
        self.redirects.external = config.listener.external_url.rstrip("/").encode("ascii")
        if self._tls_override is not None:
            self.tls_context = self._tls_override
        else:
            self.tls_context = listener_tls_context(config.listener)
            if self.tls_context is not None:      # device certificates (kcd/clientcert.py)
                clientcert.require_certificates(self.tls_context, config.listener)
        # Device certificates' users and Kerberos constrained delegation (kcd/); kept across
        # a reload that leaves their settings as they were (the ticket cache with them).
        self.certauth = clientcert.CertAuth.build(config, getattr(self, "certauth", None))
        self.kcd = delegation.Delegator.build(config, str(self.config_path or "(config)"), getattr(self, "kcd", None))
        # S/MIME certificates from LDAP for ResolveRecipients ([smime]); the cache survives
        # a reload that leaves the section as it was.
        old_certs = getattr(self, "certs", None)
        if not config.smime.ldap_url:
            self.certs = None
        elif old_certs is None or old_certs.settings != config.smime:
            self.certs = CertLookup(config.smime, self.incidents)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind, accept and serve until drained (then finish in-flight work and return)."""
        self._nofile = raise_nofile_limit()
        return_big_buffers()
        if self.config.limits.huge_pages:
            huge_arenas()         # (a worker started as a new interpreter; forked ones have it)
        cfg = self.config.listener
        sock = listening_socket(cfg.host, cfg.port, cfg.backlog)
        await sock.bind((cfg.host, cfg.port))
        sock.listen(cfg.backlog)
        self.port = sock.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._start_gatekeeper(self.gatekeeper_for(self.config))
                nursery.start_soon(self._flush_log)
                self.looplag = LoopLag(self.incidents)     # read by metrics and the sizing run
                await nursery.start(self.looplag.run)
                with self._conns_scope:
                    async with trio.open_nursery() as conns:
                        self._conns = conns
                        self.parking = PingPark(self._resume, self.incidents, functools.partial(lane.fire, self))
                        await nursery.start(self.parking.run)
                        task_status.started(self.port)
                        with self._accept_scope:
                            await self._accept(sock, conns)
                        sock.close()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            self.pool.close()
            self.log.close()

    async def _start_gatekeeper(self, gatekeeper) -> None:
        old = self._gatekeeper_scope
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await gatekeeper.run(task_status=task_status)

        await self._nursery.start(run)
        self.gatekeeper = gatekeeper
        self.redirects.attach(gatekeeper)      # 451/3xx mappings shared through its store
        self._gatekeeper_scope = scope
        if old is not None:
            old.cancel()

    @property
    def counters(self) -> dict[str, int]:
        """Refused connections, contained exceptions and deadlines, by kind (for metrics)."""
        return self.incidents.counts

    def _connection_cap(self) -> int:
        # Two descriptors per device connection (its mail-server connection: a parked Ping
        # holds both) plus the idle pool and the worker's own: past this accept() refuses,
        # rather than a Ping failing for want of a descriptor (EMFILE on the mail-server
        # connect) or devices left unaccepted in the listen queue (EMFILE on accept).
        nofile = getattr(self, "_nofile", 1 << 21)
        return min(self.config.limits.max_connections,
                   device_connections_within(nofile, self.config.upstream.idle_pool_size))

    async def _accept(self, sock, conns) -> None:
        raw = getattr(sock, "_sock", None)      # the stdlib socket under trio's
        if raw is None:
            await self._accept_awaited(sock, conns)
            return
        # accept(2) first, the wait only when the queue is empty: trio's sock.accept() adds
        # its own checkpoint and wrapper frames to every connection; and what is queued is
        # taken together, a bounded number per scheduler batch (with the checkpoint between),
        # so a ramp of devices does not wait in the listen queue while a busy worker's
        # batches grow long.
        taken = 0
        while True:
            try:
                more, addr = raw.accept()
            except (BlockingIOError, InterruptedError):
                taken = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.incidents.note("accept_out_of_descriptors", errno=errno.errorcode[exc.errno])
                    taken = 0
                    await trio.sleep(0.1)         # out of descriptors: let connections finish
                    continue
                raise
            self._admit(trio.socket.from_stdlib_socket(more), addr[0], conns)   # (non-blocking there)
            taken += 1
            if taken >= ACCEPT_BATCH:
                taken = 0
                await trio.lowlevel.checkpoint()

    async def _accept_awaited(self, sock, conns) -> None:
        """trio's accept, for a listener that is not a trio socket over a stdlib one."""
        while True:
            try:
                client, addr = await sock.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.incidents.note("accept_out_of_descriptors", errno=errno.errorcode[exc.errno])
                    await trio.sleep(0.1)
                    continue
                raise
            self._admit(client, addr[0], conns)

    def _admit(self, client, ip: str, conns) -> None:
        # Refused before any TLS or HTTP work: the close is the whole cost.
        limits = self.config.limits
        if self.active >= self._connection_cap():
            client.close()
            self.incidents.note("refused_max_connections", client_ip=ip, limit=self._connection_cap())
            return
        per_ip = self.per_address.get(ip, 0)
        # A trusted load balancer carries many devices on its one address: not capped per address.
        if limits.max_connections_per_address and per_ip >= limits.max_connections_per_address \
                and ip not in self.trusted_proxies:
            client.close()
            self.incidents.note("refused_max_connections_per_address", client_ip=ip,
                                limit=limits.max_connections_per_address)
            return
        self.active += 1
        self.per_address[ip] = per_ip + 1
        conns.start_soon(self._connection, client, ip)

    def connection_closed(self, ip: str) -> None:
        self.active -= 1
        left = self.per_address.get(ip, 1) - 1
        if left > 0:
            self.per_address[ip] = left
        else:
            self.per_address.pop(ip, None)

    def _resume(self, parked, why: str) -> None:
        self._conns.start_soon(resume_parked, self, parked, why)

    async def _connection(self, client, ip: str) -> None:
        parked = False
        try:
            stream = sockio.tcp_stream(client)       # (TCP_NODELAY; NOTSENT_LOWAT 1 MiB)
            if self.tls_context is not None:
                stream = TLSStream(stream, self.tls_context)     # proxy/tlsio.py: lean, ragged EOF tolerated
                try:
                    await stream.do_handshake(trio.current_time() + self.config.timeouts.tls_handshake)
                except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                    # Counted (nginx logs these too); a connection that closes before its first
                    # byte (a load balancer's TCP check) is not.
                    if isinstance(exc, trio.TooSlowError):
                        self.incidents.note("tls_handshake_timeout", client_ip=ip)
                    elif stream.handshake_started:
                        self.incidents.note("tls_handshake_failed", client_ip=ip, reason=str(exc)[:160])
                    stream.close()
                    return
                if self.certauth is not None and self.certauth.ocsp is not None:    # kcd/ocsp.py
                    await self.certauth.check_online(stream, self.incidents)
                parked = await serve_device(self, stream, ip, b"https")
            else:
                parked = await serve_device(self, stream, ip, b"http")
        except Exception as exc:      # noqa: BLE001 - serve_device contains its own; this is the last fence
            self.incidents.exception("contained_exception", exc, ip)
            client.close()
        finally:
            if not parked:            # a parked Ping's connection stays counted until it closes
                self.connection_closed(ip)

    async def _flush_log(self) -> None:
        while True:
            await ticker.every(1.0)
            self.log.flush()

    def drain(self) -> None:
        """Stop accepting, close idle connections, answer parked Pings, finish the rest."""
        if self.draining:
            return
        self.draining = True
        self._accept_scope.cancel()
        self._conns_scope.deadline = trio.current_time() + self.config.timeouts.shutdown_grace
        if self._conns is not None:
            try:
                # Among the connections' tasks, so serve() waits until every parked Ping is handed back.
                self._conns.start_soon(self._drain_in_slices)
            except RuntimeError:      # serve() has already finished
                pass

    async def _drain_in_slices(self) -> None:
        # A slice per loop step: with 100,000 connections one pass would stall the worker for seconds.
        for scopes in (self.idle_scopes, self.parked_scopes):
            await in_slices(list(scopes), lambda scope: scope.cancel())
        if self.parking is not None:
            await self.parking.drain()

    async def reload(self, config) -> None:
        """New settings for new requests; open connections carry on."""
        self._apply(config)
        if self._nursery is not None:
            await self._start_gatekeeper(self.gatekeeper_for(config))
