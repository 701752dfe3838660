"""Device certificates for the KCD tests: a trustme CA, client certificates with a UPN
otherName (trustme cannot write one: `cryptography` issues them, signed by the trustme CA's
key), and a CRL from that CA."""
from __future__ import annotations

import datetime
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


def der_utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    assert len(raw) < 128
    return bytes([0x0C, len(raw)]) + raw


class TestCA:
    """A trustme CA whose key also signs client certificates and CRLs written with cryptography."""

    __test__ = False

    def __init__(self, directory: Path):
        self.dir = directory
        self.trustme = trustme.CA()
        self.key = serialization.load_pem_private_key(self.trustme.private_key_pem.bytes(), None)
        self.cert = x509.load_pem_x509_certificate(self.trustme.cert_pem.bytes())
        self.ca_file = directory / "device-ca.pem"
        self.trustme.cert_pem.write_to_path(str(self.ca_file))

    def server_cert(self, name: str) -> tuple[Path, Path]:
        leaf = self.trustme.issue_cert("localhost", "127.0.0.1")
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(cert), append=True)
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def client_cert(self, name: str, *, upn: str | None = None, email: str | None = None, cn: str = "device",
                    valid_days: tuple[float, float] = (-1, 30)) -> tuple[Path, Path, x509.Certificate]:
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "seg-fast tests")]))
                   .issuer_name(self.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now + datetime.timedelta(days=valid_days[0]))
                   .not_valid_after(now + datetime.timedelta(days=valid_days[1]))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        sans: list = []
        if upn:
            sans.append(x509.OtherName(UPN_OID, der_utf8(upn)))
        if email:
            sans.append(x509.RFC822Name(email))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path, cert

    def crl(self, revoked: list[x509.Certificate], path: Path | None = None) -> Path:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - datetime.timedelta(hours=1)).next_update(now + datetime.timedelta(days=7)))
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=5)).build())
        path = path or self.dir / "device-ca.crl"
        path.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path
