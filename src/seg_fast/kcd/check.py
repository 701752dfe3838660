"""What `seg-fast check-config [--connect]` says about client certificates and KCD."""
from __future__ import annotations

import trio

from seg_fast.errors import ConfigError


def startup_findings(config) -> list[tuple[bool, str, str]]:
    """What would stop every worker at start (`serve` refuses before starting any): the CA,
    CRL and keytab files, python-gssapi. No KDC is asked."""
    out: list[tuple[bool, str, str]] = []
    if config.listener.client_cert != "off":
        from seg_fast.kcd.clientcert import CertAuth

        try:
            CertAuth(config)
        except ConfigError as exc:
            key, _, text = str(exc).partition(": ")
            out.append((False, key, text))
    if config.kcd.enabled:
        from seg_fast.kcd.delegation import Delegator

        try:
            problem = Delegator(config.kcd).keytab_problem()
        except ConfigError as exc:
            key, _, text = str(exc).split(": key ", 1)[-1].partition(": ")
            return out + [(False, key, text)]
        if problem:
            out.append((False, "kcd.keytab", f"{config.kcd.keytab}: no keys for {config.kcd.service_principal}: "
                                              f"{problem}"))
    return out


async def findings(config, connect: bool) -> list[tuple[bool, str, str]]:
    """(ok, key, text) for [listener] client certificates, [cert_map] and [kcd]."""
    out: list[tuple[bool, str, str]] = []
    lst = config.listener
    if lst.client_cert != "off":
        from seg_fast.kcd.clientcert import CertAuth

        try:
            auth = CertAuth(config)
            text = f"{lst.client_ca}: loads; client certificates {lst.client_cert}, mapped by {config.cert_map.source}"
            out.append((True, "listener.client_ca", text))
            if auth.crls is not None:
                revoked = sum(len(list(crl)) for crl in auth.crls.by_issuer.values())
                out.append((True, "listener.client_crl", f"{lst.client_crl}: signed by the CA, "
                                                         f"{revoked} revoked serial(s)"))
        except ConfigError as exc:
            key, _, text = str(exc).partition(": ")
            out.append((False, key, text))
    if not config.kcd.enabled:
        return out
    from seg_fast.kcd.delegation import Delegator, KcdRefused, KcdUnavailable

    try:
        delegator = Delegator(config.kcd)
    except ConfigError as exc:
        text = str(exc).split(": key ", 1)[-1]
        key, _, text = text.partition(": ")
        return out + [(False, key, text)]
    problem = await trio.to_thread.run_sync(delegator.keytab_problem)
    if problem:
        return out + [(False, "kcd.keytab", f"{config.kcd.keytab}: no keys for "
                                            f"{config.kcd.service_principal}: {problem}")]
    out.append((True, "kcd.keytab", f"{config.kcd.keytab}: holds keys for {config.kcd.service_principal}"))
    if not connect:
        return out
    kcd = config.kcd
    try:
        own = await trio.to_thread.run_sync(delegator.own_credentials)
        out.append((True, "kcd.service_principal", f"{own.name}: ticket from the keytab, valid "
                                                   f"{own.lifetime} s"))
    except KcdUnavailable as exc:
        return out + [(False, "kcd.service_principal", str(exc))]
    if not kcd.test_user:
        out.append((True, "kcd.test_user", "not set: no delegated ticket asked for"))
        return out
    from seg_fast.kcd.clientcert import CertAuth

    principal = CertAuth.principal_for(kcd.test_user, config.cert_map.realm)
    try:
        got = await trio.to_thread.run_sync(delegator.check, principal)
        out.append((True, "kcd.test_user", f"{principal}: service ticket for {got['target']} "
                                           f"(S4U2Self + S4U2Proxy), valid {got['valid_for_s']} s"))
    except (KcdRefused, KcdUnavailable) as exc:
        out.append((False, "kcd.test_user", f"{principal} to {kcd.target_spn}: {exc}"))
    return out
