"""The gateway's configuration: msgspec Structs loaded from one TOML file.

Every setting has a default suited to the demo. Errors name the file and the key.
Each package owns its own section (policy.settings, content.settings).
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

import msgspec

from seg_fast.content.settings import ContentSettings
from seg_fast.errors import ConfigError
from seg_fast.kcd.settings import CertMapSettings, KcdSettings
from seg_fast.ldapcerts import SmimeSettings
from seg_fast.policy.settings import PolicySettings
from seg_fast.statedir import DEFAULT_STATE_DIR, resolve


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class ListenerSettings(_Section):
    host: str = "0.0.0.0"
    port: int = 8443
    # PEM files; both empty means plain HTTP (behind a TLS-terminating load balancer).
    tls_cert: str = ""
    tls_key: str = ""
    # Or one PKCS#12 (.pfx/.p12) file holding key and chain (the guide's format). Its password:
    # the first line of tls_pfx_password_file, or the environment variable tls_pfx_password_env names.
    tls_pfx: str = ""
    tls_pfx_password_file: str = ""
    tls_pfx_password_env: str = ""
    backlog: int = 4096
    # Addresses (CIDR) of load balancers whose X-Forwarded-For/-Proto, Forwarded and
    # X-Real-IP are believed; from anyone else they are dropped. Empty: nobody's.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # The gateway's URL as devices reach it ("https://mail.example.com"): where a 451 or 3xx
    # from the mail server sends the device. Empty: the device is told to retry (503).
    external_url: str = ""
    # Device TLS client certificates (docs/kcd.md): "off", "optional" or "required". A
    # certificate's mapped user ([cert_map]) is the user policies decide on; one that is
    # expired, revoked or does not map gets 403 (the transaction log says why).
    client_cert: str = "off"
    client_ca: str = ""              # PEM CA certificate(s) device certificates must chain to
    client_crl: str = ""             # CRL file(s) of that CA (PEM or DER), re-read when it changes
    # OCSP for device certificates: "" off, "aia" (the responder the certificate names) or the
    # responder's http:// URL; answers kept until their nextUpdate; an unreachable one: soft fail.
    client_ocsp: str = ""
    # Seconds between new TLS session ticket keys. The control process makes them and every
    # worker uses them (proxy/tickets.py), so a device resumes on whichever worker it reaches;
    # a ticket stays good for one to two periods.
    tls_ticket_key_rotation: float = 3600.0
    # A TLS 1.3 connection is carried on by the gateway's own record layer once OpenSSL has
    # made its keys, and OpenSSL's ~14 KiB per connection is freed (proxy/tls13.py): a
    # parked Ping then costs ~0.3 KiB of TLS state. Off: OpenSSL keeps every connection.
    tls13_records: bool = True


class UpstreamSettings(_Section):
    url: str = "http://127.0.0.1:8080"
    verify_tls: bool = True          # off = the guide's "ignore SSL errors"
    ca_file: str = ""
    # Outbound proxy (CONNECT), e.g. http://user:pw@proxy:3128; https:// speaks TLS to the proxy first.
    proxy_url: str = ""
    proxy_ca_file: str = ""          # extra trust for an https:// proxy's certificate
    # A TLS 1.3 connection to an https:// mail server (not inside an https:// proxy) is carried on
    # by the gateway's own record layer once OpenSSL has made its keys, as listener.tls13_records
    # does for devices: a parked Ping's mail-server connection keeps ~0.3 KiB of TLS state, not
    # OpenSSL's ~14 KiB. Off: OpenSSL keeps every mail-server connection.
    tls13_records: bool = True
    pool_size: int = 100_000
    idle_pool_size: int = 256        # idle keep-alive connections kept per mail server
    retry_after: int = 30            # seconds, in the 503 answer when the mail server is unreachable
    # Local addresses connections to the mail server (or the outbound proxy) are made from, in
    # turn. A parked Ping holds one, and from one address the kernel has only its ephemeral
    # port range (~28,000 by default) toward one mail server address: more devices need more.
    # Empty: the kernel picks the address.
    source_addresses: list[str] = msgspec.field(default_factory=list)


class EasSettings(_Section):
    # Case-insensitive; add "/servlet/traveler" (IBM Traveler) or "/EAS" (GroupWise) as needed.
    paths: list[str] = msgspec.field(default_factory=lambda: ["/Microsoft-Server-ActiveSync"])


class EwsSettings(_Section):
    # The guide's enable.boxer.ens.ews.proxy: the notification service (ENS) reaches the
    # mail server's EWS through the gateway (proxy/passthrough.py). No EAS policy applies;
    # a user the user policy blocks is refused (403).
    enabled: bool = False
    # Forwarded paths, matched whole and case-insensitively (a query may follow).
    paths: list[str] = msgspec.field(default_factory=lambda: ["/EWS/Exchange.asmx"])
    # Addresses (CIDR) EWS requests may come from (the ENS servers); needed when enabled.
    allowed_sources: list[str] = msgspec.field(default_factory=list)
    url: str = ""                    # the EWS server; empty: upstream.url (same TLS, proxy, pool)


class WebmailSettings(_Section):
    # The guide's "proxy web mail traffic through gateway": these path prefixes are
    # forwarded untouched (streaming); Set-Cookie domains and Location redirects naming
    # the mail server are rewritten to listener.external_url.
    enabled: bool = False
    prefixes: list[str] = msgspec.field(default_factory=lambda: ["/owa/", "/ecp/"])
    url: str = ""                    # the webmail server; empty: upstream.url


class TimeoutSettings(_Section):
    tls_handshake: float = 10.0
    request_head: float = 30.0       # the whole head, from its first byte (not per read: slowloris)
    # The whole request body: this, plus a second per limits.min_body_rate bytes received.
    request_body: float = 60.0
    # Each answer (or part of a streamed one) to a device: this, plus a second per
    # limits.min_send_rate bytes the device takes (a device that reads nothing is cut here).
    device_write: float = 60.0
    idle_keepalive: float = 120.0
    upstream_connect: float = 5.0
    upstream_read: float = 60.0
    ping_margin: float = 60.0        # added to a Ping's heartbeat for the upstream read deadline
    # A Ping with no heartbeat, sent or cached in this worker (its earlier Ping may have
    # reached another worker): the protocol's maximum, so no parked Ping is ever cut short.
    ping_default_heartbeat: float = 3540.0
    shutdown_grace: float = 30.0


class LimitSettings(_Section):
    max_header_bytes: int = 64 * 1024   # the whole request head, exactly (431 past it)
    max_connections: int = 100_000      # per worker; also kept within the descriptor limit (oslimits)
    # Per client address and worker (0: off); addresses in listener.trusted_proxies
    # (load balancers, carrying many devices) are not capped.
    max_connections_per_address: int = 2_000
    min_body_rate: float = 500.0        # bytes/s a large request body must keep up (0: none)
    min_send_rate: float = 1024.0       # bytes/s a device must read a large answer at (0: none)
    # Answer bytes a worker holds for devices that have not taken them yet; past it the
    # slowest readers are cut first (0: no limit).
    max_unsent_bytes: int = 256 * 1024 * 1024
    max_ping_body: int = 64 * 1024   # a Ping body is read whole to find its HeartbeatInterval
    # Descriptors each process may hold (RLIMIT_NOFILE), as nginx's worker_rlimit_nofile: 0
    # keeps the limit serve is started with (systemd's LimitNOFILE); more raises it, which
    # needs root (CAP_SYS_RESOURCE). A parked Ping holds two, so this decides how many
    # devices one worker carries and so how many workers a core needs (devices_per_core):
    # each worker costs ~20 MiB and its own wake-ups.
    max_descriptors: int = 0
    # pymalloc's arenas (every small object: a worker's per-device state) on transparent huge
    # pages where the kernel allows them (transparent_hugepage "always" or "madvise"), for
    # fewer TLB misses when a wake-up walks a big heap. Off: three side-by-side runs gave
    # -8.5%, +0.9% and -1.4% of the gateway's CPU, no gain shown yet. At start only.
    huge_pages: bool = False
    # 1-99: every worker runs under the real-time round-robin policy at this priority (needs
    # root or CAP_SYS_NICE): a worker with a ready request runs until it waits again, not
    # preempted by a kernel thread or other software on the node, and takes turns with
    # another worker only after the kernel's RR slice (kernel.sched_rr_timeslice_ms, 100 ms),
    # which cuts the tail when a dozen workers share a core. The kernel still leaves others
    # 5% of every core (kernel.sched_rt_runtime_us). 0: time-sharing. At start only.
    realtime_priority: int = 0


class AdminSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 44444
    enabled: bool = True
    token: str = ""                  # empty: a token is generated and written beside the store


class HealthSettings(_Section):
    # GET /healthz and /readyz for load balancers (unauthenticated, yes/no only); 0: off.
    host: str = "0.0.0.0"
    port: int = 0
    check_interval: float = 10.0     # seconds between readiness checks (store, mail server)


class LogSettings(_Section):
    transactions: str = "-"          # file path for transaction summaries; "-" is stdout, "" off
    # The gateway's own log (JSON lines, every area): "-" is stderr. SIGUSR1 reopens both files.
    file: str = "-"
    level: Literal["all", "trace", "debug", "info", "warn", "error", "off"] = "info"


class Config(_Section):
    workers: int = 0                 # 0: one per core (or more: devices_per_core)
    # With workers = 0: devices each core should carry. A parked Ping holds two descriptors;
    # when one process's limit cannot hold a core's share, more workers per core start.
    devices_per_core: int = 0
    # Relative state paths (policy store, admin token, attachment keys) live here;
    # created 0700 on first use.
    state_dir: str = DEFAULT_STATE_DIR
    listener: ListenerSettings = ListenerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    eas: EasSettings = EasSettings()
    ews: EwsSettings = EwsSettings()
    webmail: WebmailSettings = WebmailSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    limits: LimitSettings = LimitSettings()
    admin: AdminSettings = AdminSettings()
    health: HealthSettings = HealthSettings()
    log: LogSettings = LogSettings()
    policy: PolicySettings = PolicySettings()
    security: ContentSettings = ContentSettings()
    cert_map: CertMapSettings = CertMapSettings()
    kcd: KcdSettings = KcdSettings()
    smime: SmimeSettings = SmimeSettings()


def _key_of(message: str) -> str:
    # msgspec says "... - at `$.listener.port`" and "unknown field `x`"
    where = message.rsplit("`$.", 1)[1].rstrip("`") if "`$." in message else ""
    if "unknown field `" in message:
        field = message.split("unknown field `", 1)[1].split("`", 1)[0]
        where = f"{where}.{field}" if where else field
    return where or "(top level)"


ENV_PREFIX = "SEG_FAST_"


def env_overrides(env) -> dict[str, tuple[str, str, str]]:
    """SEG_FAST_<SECTION>_<KEY>=value (or SEG_FAST_<KEY> for top-level keys).

    Returns {dotted key: (section, key, env var name)} for every variable that names a setting.
    """
    found: dict[str, tuple[str, str, str]] = {}
    info = msgspec.inspect.type_info(Config)
    sections = {f.name: f.type for f in info.fields}
    for var in env:
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        if rest in sections and not isinstance(sections[rest], msgspec.inspect.StructType):
            found[rest] = ("", rest, var)
            continue
        for name, typ in sections.items():
            if isinstance(typ, msgspec.inspect.StructType) and rest.startswith(name + "_"):
                key = rest[len(name) + 1:]
                if any(f.name == key for f in typ.fields):
                    found[f"{name}.{key}"] = (name, key, var)
    return found


# SEG_FAST_* variables that are not settings (tests, benchmarks, scripts, the worker's start).
OTHER_ENV_VARS = {"SEG_FAST_HYPOTHESIS", "SEG_FAST_SLOW", "SEG_FAST_VENV", "SEG_FAST_CONTROL_PID",
                  "SEG_FAST_BENCH_GATEKEEPER", "SEG_FAST_TICKET_FD", "SEG_FAST_CORPUS_CACHE"}


def unknown_env_vars(env=None) -> list[str]:
    """SEG_FAST_* variables that name no setting (a misspelt one would be ignored silently)."""
    env = os.environ if env is None else env
    known = {var for _, _, var in env_overrides(env).values()} | OTHER_ENV_VARS
    return sorted(v for v in env if v.startswith(ENV_PREFIX) and v not in known)


def _env_value(text: str, typ) -> object:
    # Strings are taken as they are; numbers, booleans and lists are read as JSON.
    if isinstance(typ, msgspec.inspect.StrType):
        return text
    try:
        return msgspec.json.decode(text.encode())
    except msgspec.DecodeError:
        return text                  # let validation name the key and the expected type


def load_config(path: str | os.PathLike | None, env=None) -> Config:
    """Load and validate a TOML config file (None: the embedded defaults).

    SEG_FAST_* environment variables (``env``, default os.environ) override the file.
    """
    env = os.environ if env is None else env
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        try:
            raw = msgspec.toml.decode(data)
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    overrides = env_overrides(env)
    if overrides:
        info = {f.name: f.type for f in msgspec.inspect.type_info(Config).fields}
        for dotted, (section, key, var) in overrides.items():
            if section:
                typ = next(f.type for f in info[section].fields if f.name == key)
                target = raw.setdefault(section, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"{path}: key {section}: expected a table")
                target[key] = _env_value(env[var], typ)
            else:
                raw[key] = _env_value(env[var], info[key])
    try:
        config = msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as exc:
        key = _key_of(str(exc))
        where = f"environment {overrides[key][2]}" if key in overrides else str(path or "(defaults)")
        raise ConfigError(f"{where}: key {key}: {str(exc).split(' - at ')[0]}") from None
    _check(config, str(path or "(defaults)"), overrides)
    return with_state_paths(config)


def with_state_paths(config: Config) -> Config:
    """The config with every relative state path made absolute inside ``state_dir``."""
    d = config.state_dir
    policy = msgspec.structs.replace(config.policy, sqlite_path=str(resolve(config.policy.sqlite_path, d)))
    security = msgspec.structs.replace(
        config.security, master_key_file=str(resolve(config.security.master_key_file, d)),
        key_state_file=str(resolve(config.security.key_state_file, d)))
    return msgspec.structs.replace(config, policy=policy, security=security)


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _check(config: Config, where: str, overrides) -> None:
    """Value checks msgspec's types cannot express; each names its key."""
    problems: list[tuple[str, str]] = []
    if config.workers < 0:
        problems.append(("workers", "must be 0 (one per core) or more"))
    if config.devices_per_core < 0:
        problems.append(("devices_per_core", "must be 0 (one worker per core) or more"))
    if not config.state_dir:
        problems.append(("state_dir", "must name a directory"))
    if config.health.check_interval <= 0:
        problems.append(("health.check_interval", "must be positive"))
    for key, port in (("listener.port", config.listener.port), ("admin.port", config.admin.port),
                      ("health.port", config.health.port)):
        if not 0 <= port <= 65535:
            problems.append((key, f"port {port} is out of range"))
    # The admin API changes who may read mail: it listens on loopback only (the MDM's
    # push has its own listener, policy.push_host/push_port).
    if config.admin.host not in ("127.0.0.1", "::1", "localhost"):
        problems.append(("admin.host", "the admin API listens on loopback only (127.0.0.1, ::1 or localhost)"))
    # The push token can replace the whole policy document: off loopback it travels
    # only over TLS (the device listener's certificate) unless explicitly allowed.
    pol = config.policy
    if (pol.push_port and pol.push_token and not _loopback(pol.push_host)
            and not (config.listener.tls_cert or config.listener.tls_pfx)
            and not pol.push_allow_plain):
        problems.append(("policy.push_host",
                         f"push listener on {pol.push_host} would take the push token over plain HTTP: give the "
                         "device listener TLS (listener.tls_cert/tls_key), keep push_host on loopback, or set "
                         "policy.push_allow_plain = true"))
    if not config.listener.tls_ticket_key_rotation >= 60:
        problems.append(("listener.tls_ticket_key_rotation", "must be at least 60 (seconds)"))
    if config.listener.tls_pfx and (config.listener.tls_cert or config.listener.tls_key):
        problems.append(("listener.tls_pfx", "give either tls_pfx or tls_cert/tls_key, not both"))
    if config.listener.tls_pfx and not (config.listener.tls_pfx_password_file or config.listener.tls_pfx_password_env):
        problems.append(("listener.tls_pfx_password_file", "a PFX file needs its password: a file "
                                                           "(tls_pfx_password_file) or tls_pfx_password_env"))
    if bool(config.listener.tls_cert) != bool(config.listener.tls_key):
        problems.append(("listener.tls_key" if config.listener.tls_cert else "listener.tls_cert",
                         "TLS needs both tls_cert and tls_key (or neither, for plain HTTP)"))
    from urllib.parse import urlsplit

    from seg_fast.proxy.headers import TrustedProxies

    try:
        TrustedProxies(config.listener.trusted_proxies)
    except ValueError as exc:
        problems.append(("listener.trusted_proxies", f"not an address or CIDR network: {exc}"))
    if config.listener.external_url:
        ext = urlsplit(config.listener.external_url)
        if not config.listener.external_url.isascii() or ext.scheme not in ("http", "https") \
                or not ext.hostname or ext.path.strip("/") or ext.query or ext.fragment:
            problems.append(("listener.external_url", "must be an http:// or https:// URL with a host and no path"))
    up = urlsplit(config.upstream.url)
    if up.scheme not in ("http", "https") or not up.hostname:
        problems.append(("upstream.url", "must be an http:// or https:// URL with a host"))
    for source in config.upstream.source_addresses:
        try:
            ipaddress.ip_address(source)
        except ValueError:
            problems.append(("upstream.source_addresses", f"{source!r} is not an IP address"))
    if config.upstream.proxy_url:
        px = urlsplit(config.upstream.proxy_url)
        if px.scheme not in ("http", "https") or not px.hostname:
            problems.append(("upstream.proxy_url", "must be an http(s)://[user:password@]host:port URL"))
    for path in config.eas.paths:
        if not path.startswith("/") or "?" in path:
            problems.append(("eas.paths", f"{path!r} must be an absolute path without a query"))
    if not config.eas.paths:
        problems.append(("eas.paths", "needs at least one path"))
    from seg_fast.proxy.passthrough import config_problems

    problems += config_problems(config)
    from seg_fast.ldapcerts import config_problems as smime_problems

    problems += smime_problems(config)
    from seg_fast.kcd.settings import problems as kcd_problems

    problems += kcd_problems(config)
    for name in msgspec.structs.fields(TimeoutSettings):
        if getattr(config.timeouts, name.name) <= 0:
            problems.append((f"timeouts.{name.name}", "must be positive"))
    for key in ("max_header_bytes", "max_connections"):
        if getattr(config.limits, key) <= 0:
            problems.append((f"limits.{key}", "must be positive"))
    for key in ("max_connections_per_address", "min_body_rate", "min_send_rate", "max_unsent_bytes"):
        if getattr(config.limits, key) < 0:
            problems.append((f"limits.{key}", "must be 0 (off) or more"))
    if config.limits.max_descriptors and not 1024 <= config.limits.max_descriptors <= 1 << 30:
        problems.append(("limits.max_descriptors", "must be 0 (the limit serve starts with) or 1024 to 2**30"))
    if not 0 <= config.limits.realtime_priority <= 99:
        problems.append(("limits.realtime_priority", "must be 0 (time-sharing) or 1 to 99 (SCHED_RR)"))
    if problems:
        key, text = problems[0]
        if key in overrides:
            where = f"environment {overrides[key][2]}"
        raise ConfigError(f"{where}: key {key}: {text}")
