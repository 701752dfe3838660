"""The [cert_map] and [kcd] sections, and the checks that tie them to [listener]."""
from __future__ import annotations

import importlib.util
from typing import Literal

import msgspec


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class CertMapSettings(_Section):
    # Where a device certificate names its user: "upn" (subjectAltName otherName UPN, as
    # Active Directory's certificate services issue), "email" (subjectAltName rfc822Name)
    # or "subject" (the attribute below of the subject DN).
    source: Literal["upn", "email", "subject"] = "upn"
    subject_attribute: str = "CN"      # with source = "subject": CN, UID, emailAddress, ...
    # The Kerberos realm of mapped users (KCD): user@REALM. Empty: a UPN's own domain,
    # upper-cased; a bare name (no @) then goes to the default realm of krb5.conf.
    realm: str = ""


class KcdSettings(_Section):
    enabled: bool = False
    keytab: str = ""                   # the gateway's own keys (ktpass on AD, kadmin ktadd on MIT)
    service_principal: str = ""        # the gateway's principal, e.g. "HTTP/seg.example.com@EXAMPLE.COM"
    target_spn: str = ""               # the mail server's SPN, e.g. "HTTP/mail.example.com"
    kerberos_config: str = ""          # krb5.conf; empty: $KRB5_CONFIG or /etc/krb5.conf
    threads: int = 4                   # blocking Kerberos calls at once per worker (worker threads)
    refusal_cache: float = 60.0        # seconds a KDC refusal for a user is remembered
    timeout: float = 10.0              # seconds a request waits for the KDC; past it 503
    test_user: str = ""                # `seg-fast check-config --connect` gets a ticket for this user


SUBJECT_ATTRIBUTES = ("CN", "UID", "emailAddress", "serialNumber", "OU", "O")


def problems(config) -> list[tuple[str, str]]:
    """(key, text) for every client-certificate and KCD setting that cannot work."""
    found: list[tuple[str, str]] = []
    lst, kcd, cmap = config.listener, config.kcd, config.cert_map
    if lst.client_cert not in ("off", "optional", "required"):
        found.append(("listener.client_cert", 'must be "off", "optional" or "required"'))
    elif lst.client_cert != "off":
        if not (lst.tls_cert or getattr(lst, "tls_pfx", "")):
            found.append(("listener.client_cert", "client certificates need TLS on the listener "
                          "(listener.tls_cert and tls_key)"))
        if not lst.client_ca:
            found.append(("listener.client_ca", "client certificates need the CA file that issues them"))
    if lst.client_ocsp and (lst.client_cert == "off" or not (lst.client_ocsp == "aia" or (
            lst.client_ocsp.startswith("http://") and len(lst.client_ocsp) > 7))):
        found.append(("listener.client_ocsp", '"aia" or an http:// responder URL, with listener.client_cert on'))
    if lst.client_crl and lst.client_cert == "off":
        found.append(("listener.client_crl", 'a CRL needs listener.client_cert = "optional" or "required"'))
    if cmap.source == "subject" and cmap.subject_attribute not in SUBJECT_ATTRIBUTES:
        found.append(("cert_map.subject_attribute", f"must be one of {', '.join(SUBJECT_ATTRIBUTES)}"))
    if kcd.enabled:
        for key in ("keytab", "service_principal", "target_spn"):
            if not getattr(kcd, key):
                found.append((f"kcd.{key}", "needed with kcd.enabled"))
        if lst.client_cert == "off":
            found.append(("kcd.enabled", 'KCD acts for the user of a client certificate: set '
                          'listener.client_cert = "required" (or "optional")'))
        if kcd.threads < 1:
            found.append(("kcd.threads", "must be 1 or more"))
        if kcd.timeout <= 0:
            found.append(("kcd.timeout", "must be positive"))
        if kcd.refusal_cache < 0:
            found.append(("kcd.refusal_cache", "must be 0 (off) or more"))
        if importlib.util.find_spec("gssapi") is None:
            found.append(("kcd.enabled", "needs python-gssapi, which is not installed: "
                          "pip install 'seg-fast[kcd]' (it builds against libkrb5-dev)"))
    return found
