"""OCSP for device certificates (RFC 6960): is this certificate revoked, asked of the CA's responder.

Asked once per certificate (serial and issuer) and remembered until the response's
nextUpdate (at most MAX_CACHE seconds), so a device's reconnects do not reach the
responder. The response must be signed by the issuing CA, or by a responder certificate
that CA issued for OCSP signing (id-kp-OCSPSigning), name the serial asked about, and be
current. A responder that cannot be reached or answers nonsense leaves the status unknown:
the connection is then let through on the other checks (soft fail, as browsers do; a
responder outage must not lock every device out) and the worker notes an incident.
"""
from __future__ import annotations

import datetime
import time
from urllib.parse import urlsplit

import h11
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

MAX_CACHE = 3600.0            # seconds a status is kept at most (less if nextUpdate says so)
MAX_RESPONSE = 64 * 1024
GOOD, REVOKED, UNKNOWN = "good", "revoked", "unknown"


class OcspError(Exception):
    """No usable answer from the responder (soft fail)."""


def aia_url(cert: x509.Certificate) -> str | None:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for desc in aia:
        if desc.access_method == AuthorityInformationAccessOID.OCSP and \
                isinstance(desc.access_location, x509.UniformResourceIdentifier):
            return desc.access_location.value
    return None


class OcspChecker:
    """listener.client_ocsp: "aia" (the certificate's own responder) or a responder URL."""

    def __init__(self, setting: str, cas: dict, timeout: float):
        self.setting = setting
        self.cas = cas                     # issuer Name -> CA certificate (listener.client_ca)
        self.timeout = timeout
        self.cache: dict[tuple, tuple[str, float]] = {}
        self.queries = 0                   # requests sent to a responder

    async def status(self, cert: x509.Certificate) -> str:
        """GOOD, REVOKED or UNKNOWN (the responder does not know it); OcspError when there is no answer."""
        key = (cert.serial_number, cert.issuer.public_bytes())
        hit = self.cache.get(key)
        now = time.monotonic()
        if hit is not None and now < hit[1]:
            return hit[0]
        issuer = self.cas.get(cert.issuer)
        if issuer is None:
            raise OcspError("issuer not in listener.client_ca")
        url = aia_url(cert) if self.setting == "aia" else self.setting
        if not url:
            raise OcspError("no OCSP responder named in the certificate")
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
        self.queries += 1
        raw = None
        with trio.move_on_after(self.timeout):
            raw = await _post(url, request.public_bytes(serialization.Encoding.DER))
        if raw is None:
            raise OcspError(f"no answer from {url} within {self.timeout:g} s")
        status, valid_for = _read(raw, cert, issuer)
        if len(self.cache) > 100_000:
            self.cache.clear()
        self.cache[key] = (status, now + valid_for)
        return status


def _read(raw: bytes, cert: x509.Certificate, issuer: x509.Certificate) -> tuple[str, float]:
    try:
        resp = ocsp.load_der_ocsp_response(raw)
    except ValueError:
        raise OcspError("answer is not an OCSP response") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"responder says {resp.response_status.name}")
    if resp.serial_number != cert.serial_number:
        raise OcspError("response is for another certificate")
    signer = issuer
    for candidate in resp.certificates:           # a delegated responder: issued by the CA for OCSP
        try:
            candidate.verify_directly_issued_by(issuer)
            eku = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            continue
        if ExtendedKeyUsageOID.OCSP_SIGNING in eku:
            signer = candidate
            break
    if not _signed_by(signer, resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm):
        raise OcspError("response signature does not verify")
    now = datetime.datetime.now(datetime.timezone.utc)
    skew = datetime.timedelta(minutes=5)
    if resp.this_update_utc > now + skew or (resp.next_update_utc is not None and resp.next_update_utc < now - skew):
        raise OcspError("response is not current")
    valid_for = MAX_CACHE
    if resp.next_update_utc is not None:
        valid_for = max(0.0, min(MAX_CACHE, (resp.next_update_utc - now).total_seconds()))
    status = {ocsp.OCSPCertStatus.GOOD: GOOD, ocsp.OCSPCertStatus.REVOKED: REVOKED}.get(
        resp.certificate_status, UNKNOWN)
    return status, valid_for


def _signed_by(cert: x509.Certificate, signature: bytes, data: bytes, algorithm) -> bool:
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(algorithm))
        else:
            key.verify(signature, data)          # Ed25519 / Ed448
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


async def _post(url: str, body: bytes) -> bytes:
    """One HTTP/1.1 POST of an OCSP request (RFC 6960 A.1); the answer's body."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise OcspError(f"{url}: only http:// responders")
    try:
        stream = await trio.open_tcp_stream(parts.hostname, parts.port or 80)
    except OSError as exc:
        raise OcspError(f"{url}: {exc.strerror or exc}") from None
    conn = h11.Connection(h11.CLIENT)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        async with stream:
            await stream.send_all(conn.send(h11.Request(method="POST", target=target, headers=[
                ("Host", parts.netloc), ("Content-Type", "application/ocsp-request"),
                ("Content-Length", str(len(body))), ("Connection", "close")]))
                + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            chunks, size, status = [], 0, 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(16384)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_RESPONSE:
                        raise OcspError(f"{url}: answer larger than {MAX_RESPONSE} bytes")
                    chunks.append(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        raise OcspError(f"{url}: {exc}") from None
    if status != 200:
        raise OcspError(f"{url}: HTTP {status}")
    return b"".join(chunks)
