"""The device's TLS client certificate: asked for, checked, mapped to a user.

OpenSSL checks the chain during the handshake (listener.client_ca): a certificate from
another CA never gets past it. Its validity dates and revocation are checked here instead,
after the handshake, so the device gets an HTTP answer (403) and the transaction log a
reason, rather than a bare TLS alert nobody can read: the handshake is told not to check
times (X509_V_FLAG_NO_CHECK_TIME) and no CRL is given to OpenSSL.

What is logged of a certificate: its subject and serial number, nothing more.
"""
from __future__ import annotations

import datetime
import os
import time
from typing import NamedTuple

from cryptography import x509
from cryptography.x509.oid import NameOID

from seg_fast.eas import credentials
from seg_fast.errors import ConfigError, EASRequestError
from seg_fast.kcd.ocsp import GOOD, REVOKED, OcspChecker, OcspError

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the handshake checks the chain, not the dates
# (checked below, so an expired certificate gets a 403 and a log line, not a TLS alert).
X509_V_FLAG_NO_CHECK_TIME = 0x200000
UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")     # Microsoft's UPN otherName
SUBJECT_OIDS = {"CN": NameOID.COMMON_NAME, "UID": NameOID.USER_ID, "emailAddress": NameOID.EMAIL_ADDRESS,
                "serialNumber": NameOID.SERIAL_NUMBER, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
                "O": NameOID.ORGANIZATION_NAME}
CRL_RECHECK = 30.0            # seconds between looks at the CRL file's modification time
ATTR = "seg_client_cert"      # the per-connection result, kept on the TLS stream
_REFUSED = [(b"Content-Type", b"text/plain")]
_REFUSED_BODY = b"client certificate not accepted\n"


class CertIdentity(NamedTuple):
    """What one connection's certificate says: the user, or why it is refused."""
    user: str | None           # the mapped user (policy identity), None when refused
    principal: str | None      # the Kerberos principal for KCD (user@REALM)
    problem: str               # "" when accepted; else why (expired, revoked, no UPN, ...)
    subject: str
    serial: int


def require_certificates(ctx, listener) -> None:
    """Make the listener's TLS context ask devices for a certificate from listener.client_ca."""
    import ssl

    if listener.client_cert == "off":
        return
    try:
        ctx.load_verify_locations(cafile=listener.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"listener.client_ca: cannot load {listener.client_ca}: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if listener.client_cert == "required" else ssl.CERT_OPTIONAL
    ctx.verify_flags = ctx.verify_flags | X509_V_FLAG_NO_CHECK_TIME


class _Crls:
    """The CRLs of listener.client_crl by issuer, each checked against its CA; re-read on change."""

    def __init__(self, path: str, cas: dict):
        self.path = path
        self.cas = cas
        self.by_issuer: dict = {}
        self.mtime = None
        self.checked = 0.0
        self.load(first=True)

    def load(self, first: bool = False) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self.mtime:
                return
            data = open(self.path, "rb").read()
            crls = _read_crls(data)
        except (OSError, ValueError) as exc:
            if first:
                raise ConfigError(f"listener.client_crl: cannot read {self.path}: {exc}") from None
            return                 # keep the last good one (an operator mid-copy)
        by_issuer = {}
        for crl in crls:
            ca = self.cas.get(crl.issuer)
            if ca is None or not crl.is_signature_valid(ca.public_key()):
                if first:
                    raise ConfigError(f"listener.client_crl: {self.path}: a CRL not signed by a CA of "
                                      "listener.client_ca")
                return
            by_issuer[crl.issuer] = crl
        self.by_issuer, self.mtime = by_issuer, mtime

    def revoked(self, cert: x509.Certificate) -> bool:
        now = time.monotonic()
        if now - self.checked > CRL_RECHECK:
            self.checked = now
            self.load()
        crl = self.by_issuer.get(cert.issuer)
        return crl is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def _read_crls(data: bytes) -> list:
    if b"-----BEGIN X509 CRL-----" in data:
        out = []
        for block in data.split(b"-----END X509 CRL-----")[:-1]:
            out.append(x509.load_pem_x509_crl(block[block.index(b"-----BEGIN"):] + b"-----END X509 CRL-----\n"))
        return out
    return [x509.load_der_x509_crl(data)]


def _upn(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in san.get_values_for_type(x509.OtherName):
        if name.type_id == UPN_OID:
            return _der_utf8(name.value)
    return None


def _der_utf8(der: bytes) -> str | None:
    # The otherName's value: a DER UTF8String (tag 12), short or long form length.
    if len(der) < 2 or der[0] != 0x0C:
        return None
    length, at = der[1], 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 2 or len(der) < 2 + n:
            return None
        length, at = int.from_bytes(der[2:2 + n], "big"), 2 + n
    if at + length != len(der):
        return None
    try:
        return der[at:].decode("utf-8")
    except UnicodeDecodeError:
        return None


class CertAuth:
    """Per worker: the listener's certificate checks and mapping ([listener], [cert_map])."""

    def __init__(self, config):
        lst, self.map = config.listener, config.cert_map
        self.kcd = config.kcd.enabled         # every EAS request then needs a mapped certificate
        try:
            cas = x509.load_pem_x509_certificates(open(lst.client_ca, "rb").read())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"listener.client_ca: cannot load {lst.client_ca}: {exc}") from None
        self.crls = _Crls(lst.client_crl, {ca.subject: ca for ca in cas}) if lst.client_crl else None
        self.ocsp = OcspChecker(lst.client_ocsp, {ca.subject: ca for ca in cas}, config.timeouts.upstream_connect) \
            if lst.client_ocsp else None
        self.settings = self.key_of(config)

    @staticmethod
    def key_of(config) -> tuple:
        lst = config.listener
        return (lst.client_cert, lst.client_ca, lst.client_crl, lst.client_ocsp, config.cert_map,
                config.kcd.enabled, config.timeouts.upstream_connect)

    @classmethod
    def build(cls, config, old: CertAuth | None = None) -> CertAuth | None:
        lst = config.listener
        if lst.client_cert == "off":
            return None
        if old is not None and old.settings == cls.key_of(config):
            return old
        return cls(config)

    def identity_of(self, stream) -> CertIdentity | None:
        """The connection's certificate, checked and mapped once; None when it has none."""
        found = getattr(stream, ATTR, False)
        if found is not False:
            return found
        try:
            der = stream.getpeercert(binary_form=True)
        except (AttributeError, ValueError):
            der = None                        # plain HTTP, or no handshake
        found = self.check(der) if der else None
        try:
            setattr(stream, ATTR, found)
        except AttributeError:
            pass
        return found

    async def check_online(self, stream, incidents=None) -> None:
        """OCSP (listener.client_ocsp) for the connection's certificate, once, right after the
        handshake: a revoked or unknown one is refused like any other (admit answers 403)."""
        ident = self.identity_of(stream)
        if self.ocsp is None or ident is None or ident.problem:
            return
        cert = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True))
        try:
            status = await self.ocsp.status(cert)
        except (OcspError, ValueError, TypeError) as exc:      # no usable answer, whatever the cause
            if incidents is not None:        # soft fail: the other checks decide (ocsp.py)
                incidents.note("client_cert_ocsp_unavailable", serial=f"{ident.serial:x}", reason=str(exc)[:200])
            return
        if status != GOOD:
            problem = "revoked (OCSP)" if status == REVOKED else "revocation status unknown (OCSP)"
            setattr(stream, ATTR, ident._replace(user=None, principal=None, problem=problem))

    def check(self, der: bytes, now: datetime.datetime | None = None) -> CertIdentity:
        cert = x509.load_der_x509_certificate(der)
        subject, serial = cert.subject.rfc4514_string()[:300], cert.serial_number
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if now > cert.not_valid_after_utc:
            return CertIdentity(None, None, "expired", subject, serial)
        if now < cert.not_valid_before_utc:
            return CertIdentity(None, None, "not yet valid", subject, serial)
        if self.crls is not None and self.crls.revoked(cert):
            return CertIdentity(None, None, "revoked", subject, serial)
        name = self._mapped_name(cert)
        if not name:
            return CertIdentity(None, None, f"no user in it (cert_map.source = {self.map.source})", subject, serial)
        try:
            name = credentials._checked_user(name, "certificate user")
        except EASRequestError:               # a control character or an absurd length
            return CertIdentity(None, None, "its user name is not one", subject, serial)
        return CertIdentity(name, self.principal_of(name), "", subject, serial)

    def _mapped_name(self, cert: x509.Certificate) -> str | None:
        source = self.map.source
        if source == "upn":
            return _upn(cert)
        if source == "email":
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                return None
            emails = san.get_values_for_type(x509.RFC822Name)
            return emails[0] if emails else None
        attrs = cert.subject.get_attributes_for_oid(SUBJECT_OIDS[self.map.subject_attribute])
        return attrs[0].value if attrs and isinstance(attrs[0].value, str) else None

    def principal_of(self, name: str) -> str:
        return self.principal_for(name, self.map.realm)

    @staticmethod
    def principal_for(name: str, realm: str) -> str:
        """The Kerberos principal KCD acts for: local@REALM (``realm``, else the UPN's domain)."""
        local, _, domain = name.rpartition("@") if "@" in name else (name, "", "")
        realm = realm or domain.upper()
        return f"{local}@{realm}" if realm else local

    def admit(self, stream, req, rec) -> tuple | None:
        """Set the request's user from the certificate; an answer (status, headers, body) to refuse it."""
        ident = self.identity_of(stream)
        if ident is None:
            if not self.kcd:
                return None                   # "optional" without KCD: other credentials decide
            rec.error = "no client certificate (kcd.enabled needs one)"
            return 403, _REFUSED, _REFUSED_BODY
        if ident.problem:
            rec.error = f"client certificate {ident.problem}: subject {ident.subject}, serial {ident.serial:x}"
            return 403, _REFUSED, _REFUSED_BODY
        if req.user and not credentials.same_user(req.user, ident.user):
            rec.error = f"User= or the credential names another user than the client certificate " \
                        f"(serial {ident.serial:x})"
            return 403, _REFUSED, _REFUSED_BODY
        req.user = rec.user = ident.user
        req.identity = credentials.CERTIFICATE
        return None
