"""The gateway's configuration: msgspec Structs loaded from one TOML file.

Every setting has a default suited to the demo. Errors name the file and the key.
Each package owns its own section (policy.settings, content.settings).
"""
from __future__ import annotations

import os
from pathlib import Path

import msgspec

from seg_fast.content.settings import ContentSettings
from seg_fast.errors import ConfigError
from seg_fast.policy.settings import PolicySettings


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class ListenerSettings(_Section):
    host: str = "0.0.0.0"
    port: int = 8443
    # PEM files; both empty means plain HTTP (behind a TLS-terminating load balancer).
    tls_cert: str = ""
    tls_key: str = ""


class UpstreamSettings(_Section):
    url: str = "http://127.0.0.1:8080"
    verify_tls: bool = True          # off = the guide's "ignore SSL errors"
    ca_file: str = ""
    proxy_url: str = ""              # outbound HTTP proxy (CONNECT), e.g. http://user:pw@proxy:3128
    pool_size: int = 100_000


class EasSettings(_Section):
    paths: list[str] = msgspec.field(default_factory=lambda: ["/Microsoft-Server-ActiveSync"])


class TimeoutSettings(_Section):
    tls_handshake: float = 10.0
    request_head: float = 30.0
    idle_keepalive: float = 120.0
    upstream_connect: float = 5.0
    upstream_read: float = 60.0
    ping_margin: float = 60.0        # added to a Ping's heartbeat for the upstream read deadline
    shutdown_grace: float = 30.0


class LimitSettings(_Section):
    max_header_bytes: int = 64 * 1024
    max_connections: int = 100_000


class AdminSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 44444
    enabled: bool = True
    token: str = ""                  # empty: a token is generated and written beside the store


class LogSettings(_Section):
    transactions: str = "-"          # file path for transaction summaries; "-" is stdout
    level: str = "info"


class Config(_Section):
    workers: int = 0                 # 0: one per core
    listener: ListenerSettings = ListenerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    eas: EasSettings = EasSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    limits: LimitSettings = LimitSettings()
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()
    policy: PolicySettings = PolicySettings()
    security: ContentSettings = ContentSettings()


def _key_of(message: str) -> str:
    # msgspec says "... - at `$.listener.port`" and "unknown field `x`"
    where = message.rsplit("`$.", 1)[1].rstrip("`") if "`$." in message else ""
    if "unknown field `" in message:
        field = message.split("unknown field `", 1)[1].split("`", 1)[0]
        where = f"{where}.{field}" if where else field
    return where or "(top level)"


def load_config(path: str | os.PathLike | None) -> Config:
    """Load and validate a TOML config file (None: the embedded defaults)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        return msgspec.toml.decode(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: key {_key_of(str(exc))}: {str(exc).split(' - at ')[0]}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
