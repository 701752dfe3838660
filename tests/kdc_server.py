"""A real MIT Kerberos realm for the KCD tests: Debian's krb5kdc on a loopback port, its
principals kept by the LDAP database module in a throw-away slapd.

Why LDAP: MIT's KDC grants S4U2Proxy (constrained delegation) only when its database module
says the impersonating service may delegate to the target. The DB2 module answers neither the
traditional check (check_allowed_to_delegate: ``krbAllowedToDelegateTo``) nor the
resource-based one (allowed_to_delegate_from); the LDAP module (``kldap``) keeps
``krbAllowedToDelegateTo`` on the service's entry. So the realm is slapd (mdb backend, a
plain slapd.conf) + kldap + krb5kdc, everything under one temp dir, nothing system-wide.

Principals (realm KCD.TEST):
- HTTP/gw.kcd.test: the gateway; ok_to_auth_as_delegate, may delegate to HTTP/mail.kcd.test.
- HTTP/mail.kcd.test: the mail server (the simulator's keytab).
- alice: a user the gateway may act for.
- bob: "account is sensitive and cannot be delegated" (-allow_forwardable): the KDC
  refuses the delegation.
- HTTP/other.kcd.test: a service the gateway may not delegate to.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from processes import stop_process

REALM = "KCD.TEST"
SUFFIX = "dc=kcd,dc=test"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PW = "ldap-admin-pw"          # the throw-away slapd's root password (loopback, temp dir)
GATEWAY = "HTTP/gw.kcd.test"
MAIL = "HTTP/mail.kcd.test"
OTHER = "HTTP/other.kcd.test"
SCHEMA_GZ = Path("/usr/share/doc/krb5-kdc-ldap/kerberos.schema.gz")
TOOLS = ("krb5kdc", "kdb5_ldap_util", "kadmin.local", "slapd", "slapadd", "ldapmodify")
_REQUEST = re.compile(r"\b(AS_REQ|TGS_REQ)\b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Realm:
    dir: Path
    kdc_port: int
    krb5_conf: Path
    gateway_keytab: Path
    mail_keytab: Path
    kdc_log: Path
    env: dict = field(default_factory=dict)     # KRB5_CONFIG for clients of this realm

    def kdc_requests(self) -> int:
        """AS and TGS requests the KDC has logged so far (issued or refused): the KDC's own count."""
        try:
            text = self.kdc_log.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if _REQUEST.search(line))

    def kdc_log_text(self) -> str:
        return self.kdc_log.read_text(errors="replace")


def _missing_tools() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if not SCHEMA_GZ.exists():
        missing.append(str(SCHEMA_GZ))
    return missing


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}")
        time.sleep(0.05)


def _run(args: list[str], env: dict, stdin: str | None = None) -> str:
    done = subprocess.run(args, env=env, input=stdin, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout + done.stderr


@contextmanager
def running_realm(base: Path):
    """Start slapd + krb5kdc for realm KCD.TEST under ``base``; yield a Realm."""
    missing = _missing_tools()
    if missing:
        message = f"MIT KDC with LDAP module not installed (scripts/test.sh installs it): missing {missing}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    base.mkdir(parents=True, exist_ok=True)
    ldap_port, kdc_port = free_port(), free_port()
    (base / "ldapdb").mkdir()
    (base / "kerberos.schema").write_bytes(gzip.decompress(SCHEMA_GZ.read_bytes()))
    (base / "slapd.conf").write_text(
        "include /etc/ldap/schema/core.schema\n"
        "include /etc/ldap/schema/cosine.schema\n"
        f"include {base}/kerberos.schema\n"
        f"pidfile {base}/slapd.pid\n"
        "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
        "database mdb\nmaxsize 33554432\n"
        f'suffix "{SUFFIX}"\nrootdn "{ADMIN_DN}"\nrootpw {ADMIN_PW}\n'
        f"directory {base}/ldapdb\n"
        "index objectClass eq\nindex krbPrincipalName eq,pres,sub\n")
    (base / "base.ldif").write_text(
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: kcd\ndc: kcd\n")
    krb5_conf = base / "krb5.conf"
    ldap_uri = f"ldap://127.0.0.1:{ldap_port}"
    krb5_conf.write_text(
        "[libdefaults]\n"
        f" default_realm = {REALM}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n"
        " rdns = false\n dns_canonicalize_hostname = false\n forwardable = true\n"
        "[realms]\n"
        f" {REALM} = {{\n  kdc = 127.0.0.1:{kdc_port}\n  database_module = ldapconf\n }}\n"
        "[dbmodules]\n ldapconf = {\n  db_library = kldap\n"
        f"  ldap_kerberos_container_dn = cn=krbcontainer,{SUFFIX}\n"
        f"  ldap_kdc_dn = {ADMIN_DN}\n  ldap_kadmind_dn = {ADMIN_DN}\n"
        f"  ldap_service_password_file = {base}/ldap.stash\n"
        f"  ldap_servers = {ldap_uri}\n  ldap_conns_per_server = 2\n }}\n")
    kdc_log = base / "kdc.log"
    (base / "kdc.conf").write_text(
        "[kdcdefaults]\n"
        f" kdc_listen = 127.0.0.1:{kdc_port}\n kdc_tcp_listen = 127.0.0.1:{kdc_port}\n"
        "[realms]\n"
        f" {REALM} = {{\n  key_stash_file = {base}/stash\n  database_module = ldapconf\n"
        f"  acl_file = {base}/kadm5.acl\n }}\n"
        f"[logging]\n kdc = FILE:{kdc_log}\n")
    # kldap's stash of the LDAP bind password (the format kdb5_ldap_util stashsrvpw writes).
    (base / "ldap.stash").write_text(f"{ADMIN_DN}#{{HEX}}{ADMIN_PW.encode().hex()}\n")
    env = dict(os.environ, KRB5_CONFIG=str(krb5_conf), KRB5_KDC_PROFILE=str(base / "kdc.conf"))
    env.pop("KRB5CCNAME", None)
    env.pop("KRB5_KTNAME", None)

    procs: list[subprocess.Popen] = []
    try:
        _run([_tool("slapadd"), "-f", str(base / "slapd.conf"), "-l", str(base / "base.ldif")], env)
        slapd = subprocess.Popen([_tool("slapd"), "-d", "0", "-f", str(base / "slapd.conf"),
                                  "-h", f"{ldap_uri}/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(slapd)
        _wait_port(ldap_port, slapd, "slapd")
        _run([_tool("kdb5_ldap_util"), "-D", ADMIN_DN, "-w", ADMIN_PW, "-H", ldap_uri, "create",
              "-subtrees", SUFFIX, "-r", REALM, "-s", "-P", "kdc-master-pw"], env)
        gw_keytab, mail_keytab = base / "gateway.keytab", base / "mail.keytab"
        _run([_tool("kadmin.local")], env, stdin="\n".join([
            f"addprinc -randkey +ok_to_auth_as_delegate {GATEWAY}",
            f"addprinc -randkey {MAIL}",
            f"addprinc -randkey {OTHER}",
            "addprinc -pw alice-pw alice",
            "addprinc -pw bob-pw -allow_forwardable bob",
            f"ktadd -k {gw_keytab} {GATEWAY}",
            f"ktadd -k {mail_keytab} {MAIL}",
            ""]))
        # The allowed-to-delegate list: an attribute of the gateway's entry (LDAP module only).
        _run([_tool("ldapmodify"), "-x", "-H", ldap_uri, "-D", ADMIN_DN, "-w", ADMIN_PW], env, stdin=(
            f"dn: krbPrincipalName={GATEWAY}@{REALM},cn={REALM},cn=krbcontainer,{SUFFIX}\n"
            "changetype: modify\nadd: krbAllowedToDelegateTo\n"
            f"krbAllowedToDelegateTo: {MAIL}@{REALM}\n"))
        kdc = subprocess.Popen([_tool("krb5kdc"), "-n", "-r", REALM], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(kdc)
        _wait_port(kdc_port, kdc, "krb5kdc")
        yield Realm(dir=base, kdc_port=kdc_port, krb5_conf=krb5_conf, gateway_keytab=gw_keytab,
                    mail_keytab=mail_keytab, kdc_log=kdc_log,
                    env={"KRB5_CONFIG": str(krb5_conf)})
    finally:
        for proc in reversed(procs):
            stop_process(proc, grace=5)
