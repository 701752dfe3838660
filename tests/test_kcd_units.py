"""Client certificates and KCD without sockets: the mapping, the dates, the CRL, the answers
CertAuth.admit gives, the SPNEGO wrapping (pyspnego as the oracle) and the config checks."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kcd_certs import UPN_OID, TestCA
from seg_fast.config import load_config
from seg_fast.eas import credentials
from seg_fast.eas.request import EasRequest
from seg_fast.errors import ConfigError
from seg_fast.kcd import clientcert
from seg_fast.kcd.clientcert import CertAuth
from seg_fast.kcd.settings import CertMapSettings
from seg_fast.observe import Transaction


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


def auth_for(ca: TestCA, tmp_path: Path, *, crl: Path | None = None, kcd: bool = False, **cert_map) -> CertAuth:
    server = ca.server_cert("srv")
    cfg = tmp_path / "gw.toml"
    extra = "".join(f'{k} = "{v}"\n' for k, v in cert_map.items())
    cfg.write_text(
        f'[listener]\ntls_cert = "{server[0]}"\ntls_key = "{server[1]}"\nclient_cert = "optional"\n'
        f'client_ca = "{ca.ca_file}"\n' + (f'client_crl = "{crl}"\n' if crl else "") +
        f"[cert_map]\n{extra}")
    config = load_config(cfg, env={})
    if kcd:     # admit() only needs to know KCD is on
        import msgspec
        config = msgspec.structs.replace(config, kcd=msgspec.structs.replace(config.kcd, enabled=True))
    return CertAuth(config)


class Stream:
    def __init__(self, der_bytes: bytes | None):
        self.der = der_bytes

    def getpeercert(self, binary_form=False):
        return self.der


@pytest.mark.parametrize("cert_map, kw, user, principal", [
    ({}, {"upn": "alice@kcd.test"}, "alice@kcd.test", "alice@KCD.TEST"),
    ({"realm": "CORP.EXAMPLE"}, {"upn": "alice@kcd.test"}, "alice@kcd.test", "alice@CORP.EXAMPLE"),
    ({"source": "email"}, {"email": "a.smith@example.com", "upn": "other@x"}, "a.smith@example.com",
     "a.smith@EXAMPLE.COM"),
    ({"source": "subject"}, {"cn": "jdoe"}, "jdoe", "jdoe"),
    ({"source": "subject", "realm": "EXAMPLE.COM"}, {"cn": "jdoe"}, "jdoe", "jdoe@EXAMPLE.COM"),
])
def test_mapping(ca, tmp_path, cert_map, kw, user, principal):
    auth = auth_for(ca, tmp_path, **cert_map)
    cert_path = ca.client_cert("c", **kw)[0]
    ident = auth.check(der(cert_path))
    assert (ident.user, ident.principal, ident.problem) == (user, principal, "")


def test_unmappable_and_odd_names(ca, tmp_path):
    auth = auth_for(ca, tmp_path)
    assert auth.check(der(ca.client_cert("n", email="x@y")[0])).problem == "no user in it (cert_map.source = upn)"
    # A UPN that is not a UTF8String, and one with a control character.
    for value, problem in ((b"\x16\x05alice", "no user in it (cert_map.source = upn)"),
                           (b"\x0c\x06ali\nce", "its user name is not one")):
        cert = _with_other_name(ca, value)
        assert auth.check(cert.public_bytes(serialization.Encoding.DER)).problem == problem
    # A long UPN: DER long-form length.
    long_upn = "a" * 150 + "@kcd.test"
    cert = _with_other_name(ca, b"\x0c\x81" + bytes([len(long_upn)]) + long_upn.encode())
    assert auth.check(cert.public_bytes(serialization.Encoding.DER)).user == long_upn
    # Another otherName type is not a UPN.
    cert = _with_other_name(ca, b"\x0c\x05alice", oid=x509.ObjectIdentifier("1.3.6.1.5.2.2"))
    assert auth.check(cert.public_bytes(serialization.Encoding.DER)).user is None


def _with_other_name(ca: TestCA, value: bytes, oid=UPN_OID) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.OtherName(oid, value)]), critical=False)
            .sign(ca.key, hashes.SHA256()))


def test_dates(ca, tmp_path):
    auth = auth_for(ca, tmp_path)
    raw = der(ca.client_cert("d", upn="alice@kcd.test", valid_days=(1, 30))[0])
    assert auth.check(raw).problem == "not yet valid"
    now = datetime.datetime.now(datetime.timezone.utc)
    assert auth.check(raw, now=now + datetime.timedelta(days=2)).problem == ""
    assert auth.check(raw, now=now + datetime.timedelta(days=31)).problem == "expired"


def test_crl_revokes_checks_its_signature_and_is_reread(ca, tmp_path):
    one = ca.client_cert("one", upn="one@kcd.test")[2]
    two = ca.client_cert("two", upn="two@kcd.test")[2]
    crl = ca.crl([one], tmp_path / "ca.crl")
    auth = auth_for(ca, tmp_path, crl=crl)
    raw = {c: c.public_bytes(serialization.Encoding.DER) for c in (one, two)}
    assert auth.check(raw[one]).problem == "revoked"
    assert auth.check(raw[two]).problem == ""
    # Two revoked now, written as DER; seen at the next look (CRL_RECHECK) at the file.
    new = x509.load_pem_x509_crl(ca.crl([one, two], tmp_path / "new.crl").read_bytes())
    crl.write_bytes(new.public_bytes(serialization.Encoding.DER))
    os.utime(crl, ns=(1, 10**18))
    assert auth.check(raw[two]).problem == ""                 # not looked at yet
    auth.crls.checked = 0.0
    assert auth.check(raw[two]).problem == "revoked"
    # A CRL another CA signed is refused at start (it would let revoked certificates in).
    other = TestCA(tmp_path)
    with pytest.raises(ConfigError, match="listener.client_crl: .*not signed by a CA of listener.client_ca"):
        auth_for(ca, tmp_path, crl=other.crl([two], tmp_path / "other.crl"))


def test_admit(ca, tmp_path):
    auth = auth_for(ca, tmp_path)
    raw = der(ca.client_cert("a", upn="alice@kcd.test")[0])

    def admit(auth, der_bytes, user=None):
        req = EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", user=user)
        rec = Transaction(ts=0.0, method="POST", user=user)
        return auth.admit(Stream(der_bytes), req, rec), req, rec

    answer, req, rec = admit(auth, raw, user="alice")
    assert answer is None and req.user == rec.user == "alice@kcd.test" and req.identity == credentials.CERTIFICATE
    answer, req, rec = admit(auth, raw, user="mallory")
    assert answer[0] == 403 and req.user == "mallory" and "another user" in rec.error
    # "optional" without KCD: no certificate, other credentials decide.
    answer, req, rec = admit(auth, None, user="bob")
    assert answer is None and req.user == "bob" and req.identity == credentials.NONE
    # With KCD every request needs one.
    answer, req, rec = admit(auth_for(ca, tmp_path, kcd=True), None, user="bob")
    assert answer[0] == 403 and rec.error == "no client certificate (kcd.enabled needs one)"


def test_identity_is_checked_once_per_connection(ca, tmp_path):
    auth = auth_for(ca, tmp_path)
    stream = Stream(der(ca.client_cert("a", upn="alice@kcd.test")[0]))
    first = auth.identity_of(stream)
    stream.der = b"garbage that would not parse"
    assert auth.identity_of(stream) is first


def test_spnego_wrapping_matches_pyspnego():
    from spnego._spnego import NegTokenInit, unpack_token

    from seg_fast.kcd.delegation import spnego_init

    for size in (10, 120, 300, 70000):
        krb5_token = b"\x60" + bytes(range(256)) * (size // 256) + b"k" * (size % 256)
        ours = spnego_init(krb5_token)
        parsed = unpack_token(ours)
        assert parsed.mech_types == ["1.2.840.113554.1.2.2"] and parsed.mech_token == krb5_token
        assert ours == NegTokenInit(mech_types=["1.2.840.113554.1.2.2"], mech_token=krb5_token).pack()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(text)
    return p


def test_config_errors_name_key_and_file(tmp_path, monkeypatch):
    cfg = write(tmp_path, '[kcd]\nenabled = true\n')
    with pytest.raises(ConfigError, match=rf"{cfg}: key kcd.keytab: needed with kcd.enabled"):
        load_config(cfg, env={})
    cfg = write(tmp_path, '[listener]\nclient_cert = "sometimes"\n')
    with pytest.raises(ConfigError, match=rf"{cfg}: key listener.client_cert: must be"):
        load_config(cfg, env={})
    cfg = write(tmp_path, '[listener]\nclient_cert = "required"\nclient_ca = "ca.pem"\n')
    with pytest.raises(ConfigError, match=r"key listener.client_cert: client certificates need TLS"):
        load_config(cfg, env={})
    full = ('[listener]\ntls_cert = "c.pem"\ntls_key = "k.pem"\nclient_cert = "required"\nclient_ca = "ca.pem"\n'
            '[kcd]\nenabled = true\nkeytab = "gw.keytab"\nservice_principal = "HTTP/gw"\ntarget_spn = "HTTP/mail"\n')
    cfg = write(tmp_path, full)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gssapi" else real(name, *a))
    with pytest.raises(ConfigError, match=rf"{cfg}: key kcd.enabled: needs python-gssapi, which is not installed"):
        load_config(cfg, env={})


def test_delegator_without_gssapi_is_a_config_error(monkeypatch, tmp_path):
    import sys

    from seg_fast.kcd.delegation import Delegator
    from seg_fast.kcd.settings import KcdSettings

    keytab = tmp_path / "gw.keytab"
    keytab.write_bytes(b"\x05\x02")
    monkeypatch.setitem(sys.modules, "gssapi", None)        # import gssapi -> ImportError
    with pytest.raises(ConfigError, match="gw.toml: key kcd.enabled: needs python-gssapi"):
        Delegator(KcdSettings(enabled=True, keytab=str(keytab), service_principal="HTTP/gw",
                              target_spn="HTTP/mail"), "gw.toml")
    with pytest.raises(ConfigError, match="gw.toml: key kcd.keytab: cannot read /nonexistent"):
        Delegator(KcdSettings(enabled=True, keytab="/nonexistent", service_principal="HTTP/gw",
                              target_spn="HTTP/mail"), "gw.toml")


def test_cert_map_defaults():
    assert CertMapSettings().source == "upn"
    assert clientcert.CertAuth.principal_for("CORP\\jdoe", "") == "CORP\\jdoe"
    assert clientcert.CertAuth.principal_for("jdoe@sub.example.com", "") == "jdoe@SUB.EXAMPLE.COM"


def _ocsp_response(ca: TestCA, cert, *, signer_key=None, signer_cert=None, serial_of=None, next_update_days=1,
                   revoked=False, extra_certs=None):
    from cryptography.x509 import ocsp

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=serial_of or cert, issuer=ca.cert, algorithm=hashes.SHA1(),
        cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
        this_update=now - datetime.timedelta(hours=1), next_update=now + datetime.timedelta(days=next_update_days),
        revocation_time=now - datetime.timedelta(hours=2) if revoked else None, revocation_reason=None)
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert or ca.cert)
    if extra_certs:
        builder = builder.certificates(extra_certs)
    return builder.sign(signer_key or ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _responder_cert(ca: TestCA, eku: bool):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocsp")]))
         .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=9)))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
    return key, b.sign(ca.key, hashes.SHA256())


def test_ocsp_response_checks(ca, tmp_path):
    from seg_fast.kcd.ocsp import GOOD, MAX_CACHE, REVOKED, OcspError, _read

    cert = ca.client_cert("o", upn="o@kcd.test")[2]
    other = ca.client_cert("p", upn="p@kcd.test")[2]
    status, valid_for = _read(_ocsp_response(ca, cert), cert, ca.cert)
    assert status == GOOD and valid_for == MAX_CACHE                 # nextUpdate a day away: an hour
    assert _read(_ocsp_response(ca, cert, revoked=True), cert, ca.cert)[0] == REVOKED
    with pytest.raises(OcspError, match="another certificate"):
        _read(_ocsp_response(ca, cert, serial_of=other), cert, ca.cert)
    stranger = TestCA(tmp_path)
    with pytest.raises(OcspError, match="signature does not verify"):
        _read(_ocsp_response(ca, cert, signer_key=stranger.key, signer_cert=stranger.cert), cert, ca.cert)
    with pytest.raises(OcspError, match="not current"):
        _read(_ocsp_response(ca, cert, next_update_days=-1), cert, ca.cert)
    # A responder the CA delegated to (id-kp-OCSPSigning) may sign; without the EKU it may not.
    key, delegate = _responder_cert(ca, eku=True)
    raw = _ocsp_response(ca, cert, signer_key=key, signer_cert=delegate, extra_certs=[delegate])
    assert _read(raw, cert, ca.cert)[0] == GOOD
    key, plain = _responder_cert(ca, eku=False)
    with pytest.raises(OcspError, match="signature does not verify"):
        _read(_ocsp_response(ca, cert, signer_key=key, signer_cert=plain, extra_certs=[plain]), cert, ca.cert)
    with pytest.raises(OcspError, match="not an OCSP response"):
        _read(b"<html>proxy error</html>", cert, ca.cert)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=100)
@given(st.text(max_size=400))
def test_upn_der_reader_against_pyspnego_encoder(name):
    """Any UTF8String pyspnego's DER encoder writes reads back; a truncated or padded one does not."""
    from spnego._asn1 import TagClass, TypeTagNumber, pack_asn1

    from seg_fast.kcd.clientcert import _der_utf8

    der = pack_asn1(TagClass.universal, False, TypeTagNumber.utf8_string, name.encode("utf-8"))
    assert _der_utf8(der) == name
    if name:
        assert _der_utf8(der[:-1]) is None
    assert _der_utf8(der + b"\x00") is None


@settings(max_examples=50)
@given(st.binary(max_size=3000))          # long-form lengths up to 3 bytes: the sizes in the test above
def test_spnego_wrapping_is_pyspnegos_for_any_token(token):
    from spnego._spnego import NegTokenInit

    from seg_fast.kcd.delegation import spnego_init

    assert spnego_init(token) == NegTokenInit(mech_types=["1.2.840.113554.1.2.2"], mech_token=token).pack()


def test_a_reload_is_refused_on_what_would_stop_a_start(ca, tmp_path):
    """SIGHUP's pre-check in the control process runs the start-up checks (a bad CRL here),
    so the workers never half-apply a config they would refuse."""
    from seg_fast.proxy.server import _reload_problem

    server = ca.server_cert("srv")
    other = TestCA(tmp_path)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[listener]\ntls_cert = "{server[0]}"\ntls_key = "{server[1]}"\nclient_cert = "optional"\n'
        f'client_ca = "{ca.ca_file}"\nclient_crl = "{other.crl([], tmp_path / "other.crl")}"\n')
    problem = _reload_problem(load_config(cfg, env={}))
    assert problem is not None and problem.startswith("key listener.client_crl:")
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "other.crl"), str(ca.crl([], tmp_path / "ca.crl"))))
    assert _reload_problem(load_config(cfg, env={})) is None
