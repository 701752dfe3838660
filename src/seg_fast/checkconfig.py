"""`seg-fast check-config`: validate a gateway config the way `nginx -t` does.

Parses the file (errors name the file and the key), then checks what the running
gateway will need: certificates and keys load and match (expiry shown), the
directories it writes are writable, its ports are free, the policy store opens.
`--connect` is the guide's Test Connection: it reaches the mail server, the policy
API and Redis as configured (TLS trust, outbound proxy) and prints each latency.
Exit 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import msgspec


class Finding(NamedTuple):
    ok: bool
    what: str          # the key or the thing checked
    text: str
    warn: bool = False  # passes, but needs the admin soon (a certificate close to expiry)


EXPIRY_WARNING_DAYS = 30


def _cert_facts(pem_or_cert) -> tuple[str, int]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem_or_cert) if isinstance(pem_or_cert, bytes) else pem_or_cert
    until = cert.not_valid_after_utc
    days = (until - datetime.datetime.now(datetime.timezone.utc)).days
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName) + san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    sans = f", SANs {', '.join(names[:20])}" + (f" (+{len(names) - 20})" if len(names) > 20 else "") \
        if names else ", no SANs (devices match the name against SANs: add one)"
    return f"{cert.subject.rfc4514_string()}{sans}, valid until {until:%Y-%m-%d} ({days} days)", days


def _expiry_finding(key: str, facts: str, days: int) -> Finding:
    if days < 0:
        return Finding(False, key, f"expired: {facts}")
    if days < EXPIRY_WARNING_DAYS:
        return Finding(True, key, f"expires in {days} days (under {EXPIRY_WARNING_DAYS}): renew it: {facts}",
                       warn=True)
    return Finding(True, key, facts)


def check_pfx(lst) -> list[Finding]:
    """listener.tls_pfx: opens with its password, ssl loads it (in memory), subject/SANs/expiry."""
    from seg_fast.errors import ConfigError
    from seg_fast.pfx import load_into, load_pfx, pem_of

    try:
        pfx = load_pfx(lst)
    except ConfigError as exc:
        key, _, text = str(exc).removeprefix("key ").partition(": ")
        return [Finding(False, key, text)]
    facts, days = _cert_facts(pfx.cert)
    out = [_expiry_finding("listener.tls_pfx", facts, days)]
    try:
        how = load_into(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), pem_of(pfx))
        out.append(Finding(True, "listener.tls_pfx", f"key and {1 + len(pfx.chain)} certificate(s) load "
                                                     f"(converted in memory: {how})"))
    except ssl.SSLError as exc:
        out.append(Finding(False, "listener.tls_pfx", f"ssl cannot use its key and certificate ({exc})"))
    return out


def check_tls(config) -> list[Finding]:
    out: list[Finding] = []
    lst = config.listener
    if lst.tls_pfx:
        out += check_pfx(lst)
    elif not lst.tls_cert:
        out.append(Finding(True, "listener.tls_cert", "plain HTTP on the device leg (TLS ends at a load balancer)"))
    else:
        try:
            pem = Path(lst.tls_cert).read_bytes()
            facts, days = _cert_facts(pem)
        except OSError as exc:
            return [Finding(False, "listener.tls_cert", f"{lst.tls_cert}: {exc.strerror}")]
        except ValueError as exc:
            return [Finding(False, "listener.tls_cert", f"{lst.tls_cert}: not a PEM certificate ({exc})")]
        out.append(_expiry_finding("listener.tls_cert", facts, days))
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(lst.tls_cert, lst.tls_key)
            out.append(Finding(True, "listener.tls_key", "loads and matches the certificate"))
        except (OSError, ssl.SSLError) as exc:
            out.append(Finding(False, "listener.tls_key", f"{lst.tls_key}: does not load or does not match "
                                                          f"listener.tls_cert ({exc})"))
    for key, path in (("upstream.ca_file", config.upstream.ca_file), ("policy.api_ca_file", config.policy.api_ca_file),
                      ("upstream.proxy_ca_file", config.upstream.proxy_ca_file),
                      ("smime.ldap_ca_file", config.smime.ldap_ca_file)):
        if path:
            try:
                ssl.create_default_context(cafile=path)
                out.append(Finding(True, key, f"{path}: loads"))
            except (OSError, ssl.SSLError) as exc:
                out.append(Finding(False, key, f"{path}: cannot be used as CA file ({exc})"))
    return out


def _writable_dir(path: Path) -> str | None:
    """None if files can be created in ``path`` (or in its nearest existing parent)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent directory"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def check_paths(config) -> list[Finding]:
    out: list[Finding] = []
    state = Path(config.state_dir)
    problem = _writable_dir(state)
    out.append(Finding(problem is None, "state_dir", problem or f"{state}: usable"))
    for key, target in (("log.transactions", config.log.transactions), ("log.file", config.log.file)):
        if target not in ("", "-"):
            problem = _writable_dir(Path(target).parent)
            out.append(Finding(problem is None, key, problem or f"{target}: writable"))
    return out


def check_state_mode(config) -> list[Finding]:
    # `serve` only warns about these (it can run); check-config makes the admin fix them.
    from seg_fast.statedir import exposure_warnings

    return [Finding(False, "state_dir", text) for text in exposure_warnings(config.state_dir)]


def startup_problem(config) -> Finding | None:
    """The first thing that would make every worker fail at start, for `serve` to refuse early."""
    # A read-only state_dir that exists is not one: the store opens read-only and serves,
    # refusing only writes (issue 9; `serve` warns, `check-config` still reports it).
    from seg_fast.kcd.check import startup_findings       # client certificates and KCD

    kcd = [Finding(*f) for f in startup_findings(config)]
    return next((f for f in check_tls(config) + check_paths(config) + check_sources(config) + kcd
                 if not f.ok and not (f.what == "state_dir" and Path(config.state_dir).is_dir())), None)


def check_sources(config) -> list[Finding]:
    """Each upstream.source_addresses entry must be an address of this host (bindable)."""
    import socket

    from seg_fast.proxy.upstream import bind_source, family_of

    out = []
    for source in config.upstream.source_addresses:
        try:
            with socket.socket(family_of(source), socket.SOCK_STREAM) as sock:     # (no IPv6 here: also refused)
                bind_source(sock, source)
        except OSError as exc:
            out.append(Finding(False, "upstream.source_addresses",
                               f"{source}: not an address of this host ({exc.strerror or exc})"))
            continue
        out.append(Finding(True, "upstream.source_addresses", f"{source}: an address of this host"))
    return out


def check_ports(config) -> list[Finding]:
    from seg_fast.proxy.instance import bind_error

    wanted = [("listener.port", config.listener.host, config.listener.port)]
    if config.admin.enabled:
        wanted.append(("admin.port", config.admin.host, config.admin.port))
    if config.policy.push_port:
        wanted.append(("policy.push_port", config.policy.push_host, config.policy.push_port))
    out = []
    for key, host, port in wanted:
        if port == 0:
            out.append(Finding(True, key, "0: any free port"))
            continue
        exc = bind_error(host, port)
        out.append(Finding(exc is None, key, f"{host}:{port}: " + (f"cannot listen ({exc.strerror or exc})"
                                                                  if exc else "free")))
    return out


async def check_store(config) -> list[Finding]:
    from seg_fast.policy.store import open_store

    if config.policy.store == "sqlite" and not Path(config.policy.sqlite_path).exists():
        text = (f"{config.policy.sqlite_path}: not created yet; no policies loaded, so every device is blocked "
                "(policy.allow_if_no_policies is off)" if not config.policy.allow_if_no_policies
                else f"{config.policy.sqlite_path}: not created yet")
        return [Finding(config.policy.allow_if_no_policies, "policy.sqlite_path", text)]
    if config.policy.store == "redis":
        return []                    # reached by --connect
    store = open_store(config.policy)
    try:
        await store.open()
        snap = await store.snapshot()
    except Exception as exc:         # any store failure is a finding, not a traceback
        return [Finding(False, "policy.sqlite_path", f"{config.policy.sqlite_path}: {exc}")]
    finally:
        await store.aclose()
    if snap.document is None and not config.policy.allow_if_no_policies:
        return [Finding(False, "policy.sqlite_path", "no policies loaded: every device is blocked "
                                                     "(`seg-fast policy load FILE` loads some)")]
    return [Finding(True, "policy.sqlite_path", f"policy snapshot version {snap.version}, "
                                                f"{len(snap.devices)} device records")]


async def _timed(what: str, probe: Callable) -> Finding:
    import trio

    t0 = time.perf_counter()
    try:
        text = await probe()
    except (trio.TooSlowError, OSError, Exception) as exc:     # a failed probe is reported, not raised
        return Finding(False, what, f"{exc} ({(time.perf_counter() - t0) * 1000:.0f} ms)")
    return Finding(True, what, f"{text} ({(time.perf_counter() - t0) * 1000:.0f} ms)")


async def check_connect(config) -> list[Finding]:
    """The guide's Test Connection: one request to each service the gateway talks to."""
    from seg_fast.policy.source import http_get

    out = []
    up = config.upstream
    # The policy source's one-GET client, set up with the mail server's trust and proxy.
    up_settings = msgspec.structs.replace(config.policy, api_token="", api_verify_tls=up.verify_tls,
                                          api_ca_file=up.ca_file, api_proxy_url=up.proxy_url,
                                          api_timeout=config.timeouts.upstream_connect + config.timeouts.upstream_read)
    url = up.url.rstrip("/") + config.eas.paths[0]

    async def mail_server():
        status, _ = await http_get(url, up_settings, label="mail server", proxy_ca_file=up.proxy_ca_file)
        return f"{url}: HTTP {status}" + (" (asks for credentials, as expected)" if status == 401 else "")

    out.append(await _timed("upstream.url", mail_server))
    # EWS and webmail (proxy/passthrough.py): the first path each forwards, same trust and proxy.
    for key, on, base, paths in (("ews.url", config.ews.enabled, config.ews.url, config.ews.paths),
                                 ("webmail.url", config.webmail.enabled, config.webmail.url, config.webmail.prefixes)):
        if on and paths:
            async def passthrough(target=(base or up.url).rstrip("/") + paths[0], key=key):
                status, _ = await http_get(target, up_settings, label=key)
                return f"{target}: HTTP {status}"

            out.append(await _timed(key, passthrough))
    if config.policy.api_url:
        api = config.policy.api_url.rstrip("/") + "/snapshot"

        async def policy_api():
            status, body = await http_get(api, config.policy)
            if status != 200:
                raise OSError(f"{api}: HTTP {status}")
            return f"{api}: HTTP 200, {len(body)} bytes"

        out.append(await _timed("policy.api_url", policy_api))
    if config.smime.ldap_url:
        from seg_fast.ldapcerts import directory_from, search_many

        async def ldap():
            import trio

            d = directory_from(config.smime)
            with trio.fail_after(config.smime.ldap_timeout):
                await search_many(d, ["check-config@seg-fast.invalid"])
            return (f"{d.host}:{d.port} ({d.tls}), bound as {d.bind_dn or 'anonymous'}, "
                    f"searched {d.base_dn or '(root)'}")

        out.append(await _timed("smime.ldap_url", ldap))
    if config.policy.store == "redis":
        from seg_fast.policy.resp import RedisConnection

        async def redis():
            conn = await RedisConnection.connect(config.policy.redis_url, timeout=config.timeouts.upstream_connect)
            try:
                return f"{config.policy.redis_url}: PING {await conn.execute('PING')!r}"
            finally:
                await conn.aclose()

        out.append(await _timed("policy.redis_url", redis))
    return out


async def run_checks(config, connect: bool) -> list[Finding]:
    findings = (check_tls(config) + check_paths(config) + check_state_mode(config) + check_ports(config)
                + check_sources(config))
    findings += await check_store(config)
    if connect:
        findings += await check_connect(config)
    from seg_fast.kcd.check import findings as kcd_findings    # client certificates and KCD

    findings += [Finding(*f) for f in await kcd_findings(config, connect)]
    return findings


def cli(argv: list[str]) -> int:
    import trio

    from seg_fast.config import load_config, unknown_env_vars
    from seg_fast.errors import ConfigError

    ap = argparse.ArgumentParser(prog="seg-fast check-config",
                                 description="validate a gateway config (like nginx -t); exit 0 when all is well")
    ap.add_argument("--config", help="the TOML file (default: the embedded defaults)")
    ap.add_argument("--connect", action="store_true",
                    help="also reach the mail server, the policy API and Redis (Test Connection)")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"seg-fast check-config: {exc}", file=sys.stderr)
        return 1
    print(f"config: {args.config or '(embedded defaults)'}")
    findings = trio.run(run_checks, config, args.connect)
    findings += [Finding(False, var, "environment variable names no setting (misspelt?)")
                 for var in unknown_env_vars()]
    for f in findings:
        print(f"  {('warn' if f.warn else 'ok  ') if f.ok else 'FAIL'}  {f.what}: {f.text}")
    failed = sum(not f.ok for f in findings)
    print(f"{len(findings) - failed} ok, {failed} failed")
    return 1 if failed else 0
