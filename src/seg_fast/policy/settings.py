"""The [policy] section of the gateway config: the store, the policy source, the switches."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class PolicySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    # Fail closed: with no policy snapshot, devices are blocked unless this is on.
    allow_if_no_policies: bool = False
    # A request whose credential names no user (Kerberos/SPNEGO Negotiate, an opaque bearer
    # token, none at all) where the decision depends on the user (user policy on, or the
    # device is enrolled to a user): "refuse" it, or "trust_query" the device's User=.
    user_without_credential: Literal["refuse", "trust_query"] = "refuse"
    # Decide and record, never block (also switchable at run time from the admin API).
    test_mode: bool = False

    # Where the snapshot and device records live.
    store: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: str = "seg-fast-policy.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "segfast:"

    # Pull source: an HTTP(S) JSON policy API. Empty url: no pulling (file/push only).
    api_url: str = ""
    api_token: str = ""                # sent as "Authorization: Bearer <token>"
    delta_interval: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    api_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    api_proxy_url: str = ""            # outbound HTTP proxy (CONNECT) for the policy API
    api_verify_tls: bool = True        # off = "ignore SSL errors between SEG and the API"
    api_ca_file: str = ""              # extra trust for the API's certificate

    # Real-time push: the MDM posts single-device changes to the admin listener's
    # /seg/push endpoint with "Authorization: Bearer <push_token>"; empty: push is off.
    push_token: str = ""
    # Also serve /seg/push alone on this port of push_host (0: only on the admin listener),
    # for an MDM that cannot reach 127.0.0.1. Loopback by default: the push token can
    # replace the whole policy document, so a non-loopback push_host needs TLS (the
    # device listener's certificate) unless push_allow_plain says otherwise.
    push_host: str = "127.0.0.1"
    push_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    push_allow_plain: bool = False

    # Where this gateway node reports itself (device sightings, diagnostics).
    node_name: str = ""

    def __post_init__(self) -> None:
        # ValueError here becomes a config error naming the [policy] key.
        if self.api_url and not self.api_url.startswith(("http://", "https://")):
            raise ValueError("api_url must be an http:// or https:// URL")
        if self.store == "sqlite" and not self.sqlite_path:
            raise ValueError("sqlite_path must not be empty with store = \"sqlite\"")
        if self.store == "redis" and not self.redis_url.startswith("redis://"):
            raise ValueError("redis_url must be a redis:// URL")
