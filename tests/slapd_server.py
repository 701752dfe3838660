"""A real OpenLDAP slapd (Debian's) in a temp dir on loopback ports, for the S/MIME lookup tests.

It serves ldap:// (StartTLS offered) and ldaps:// with a trustme certificate, holds
a few people with S/MIME certificates made here with ``cryptography``, and lets
only bound users read ``userCertificate`` (an anonymous search finds people but
no certificates). Data goes in with slapadd before slapd starts.
"""
from __future__ import annotations

import base64
import datetime
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from processes import stop_process
from redis_server import free_port

SUFFIX = "dc=seg-fast,dc=test"
ADMIN_DN = f"cn=admin,{SUFFIX}"
SERVICE_DN = f"cn=gateway,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "ldap-service-pw-7f3e"
SCHEMAS = ("core", "cosine", "inetorgperson")


def user_certificate(email: str, *, days: int = 365, born: int = 1, names: tuple[str, ...] | None = None) -> bytes:
    """A self-signed S/MIME certificate (DER) for ``email`` (SAN rfc822Name ``names``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, email.split("@")[0])])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=born))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(n) for n in (names or (email,))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


class Person(NamedTuple):
    uid: str
    mail: str
    certs: tuple[bytes, ...]


class Slapd(NamedTuple):
    ldap_url: str                 # ldap://127.0.0.1:P (StartTLS offered)
    ldaps_url: str
    ca_file: str                  # trust for its certificate
    people: dict[str, Person]     # by mail
    password_file: str            # SERVICE_PASSWORD, one line


def _people() -> dict[str, Person]:
    out = {}
    for uid, mail, certs in (
        ("alice", "alice@seg-fast.test", (user_certificate("alice@seg-fast.test"),)),
        ("bob", "bob@seg-fast.test", (user_certificate("bob@seg-fast.test"), user_certificate("bob@seg-fast.test"))),
        # expired: a directory holding it must not make the device encrypt to it
        ("carol", "carol@seg-fast.test", (user_certificate("carol@seg-fast.test", days=-1, born=30),)),
        # a certificate naming somebody else: must not be handed out as dave's
        ("dave", "dave@seg-fast.test", (user_certificate("dave@seg-fast.test", names=("mallory@evil.test",)),)),
        # the mail server has its own certificate for the signer: the directory's is not added
        ("signer", "signer@seg-fast.test", (user_certificate("signer@seg-fast.test"),)),
        ("erin", "erin@seg-fast.test", ()),      # in the directory, no certificate
    ):
        out[mail] = Person(uid, mail, certs)
    return out


def _ldif(people: dict[str, Person]) -> str:
    lines = [f"dn: {SUFFIX}", "objectClass: dcObject", "objectClass: organization", "o: seg-fast", "dc: seg-fast", "",
             f"dn: ou=people,{SUFFIX}", "objectClass: organizationalUnit", "ou: people", "",
             f"dn: ou=services,{SUFFIX}", "objectClass: organizationalUnit", "ou: services", "",
             f"dn: {SERVICE_DN}", "objectClass: person", "cn: gateway", "sn: gateway",
             f"userPassword: {SERVICE_PASSWORD}", ""]
    for p in people.values():
        lines += [f"dn: uid={p.uid},ou=people,{SUFFIX}", "objectClass: inetOrgPerson", f"uid: {p.uid}",
                  f"cn: {p.uid}", f"sn: {p.uid}", f"mail: {p.mail}"]
        lines += [f"userCertificate;binary:: {base64.b64encode(c).decode()}" for c in p.certs]
        lines.append("")
    return "\n".join(lines) + "\n"


def _conf(d: Path, cert: Path, key: Path) -> str:
    schema_dir = Path("/etc/ldap/schema")
    return "\n".join(
        [f"include {schema_dir / (s + '.schema')}" for s in SCHEMAS]
        + [f"pidfile {d / 'slapd.pid'}", "modulepath /usr/lib/ldap", "moduleload back_mdb",
           f"TLSCertificateFile {cert}", f"TLSCertificateKeyFile {key}",
           # bound users read certificates; anonymous ones find entries but not them
           "access to attrs=userPassword by anonymous auth by * none",
           "access to attrs=userCertificate by users read by * none",
           "access to * by * read",
           "database mdb", f"suffix \"{SUFFIX}\"", f"rootdn \"{ADMIN_DN}\"", "rootpw admin-pw-not-used",
           f"directory {d / 'db'}", "maxsize 10485760", "index mail eq", ""])


@contextmanager
def running_slapd(tmp_path: Path):
    exe, slapadd = shutil.which("slapd") or "/usr/sbin/slapd", shutil.which("slapadd") or "/usr/sbin/slapadd"
    if not (os.path.exists(exe) and os.path.exists(slapadd)):
        if os.environ.get("CI") == "true":
            raise RuntimeError("slapd is not installed (scripts/test.sh installs it)")
        pytest.skip("slapd not installed (scripts/test.sh installs it)")
    import trustme

    d = tmp_path / "slapd"
    (d / "db").mkdir(parents=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(d / "cert.pem")
    leaf.private_key_pem.write_to_path(d / "key.pem")
    ca.cert_pem.write_to_path(d / "ca.pem")
    (d / "slapd.conf").write_text(_conf(d, d / "cert.pem", d / "key.pem"))
    people = _people()
    (d / "data.ldif").write_text(_ldif(people))
    subprocess.run([slapadd, "-f", str(d / "slapd.conf"), "-l", str(d / "data.ldif")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    (d / "pw").write_text(SERVICE_PASSWORD + "\n")
    port, sport = free_port(), free_port()
    proc = subprocess.Popen([exe, "-f", str(d / "slapd.conf"), "-d", "0",
                             "-h", f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{sport}/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        for p in (port, sport):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", p), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("slapd did not start") from None
                    time.sleep(0.05)
        yield Slapd(f"ldap://127.0.0.1:{port}", f"ldaps://127.0.0.1:{sport}", str(d / "ca.pem"), people,
                    str(d / "pw"))
    finally:
        stop_process(proc, grace=5)
