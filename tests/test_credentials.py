"""The user a credential names (eas/credentials.py): Basic, bearer JWT, NTLM type 3.

NTLM messages are built here by an encoder written from the MS-NLMP 2.2.1.3 layout
(and, when pyspnego is installed, by its own message classes) and read back by the
gateway's decoder; arbitrary bytes never raise anything but EASRequestError.
"""
from __future__ import annotations

import base64
import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from seg_fast.eas import credentials as C
from seg_fast.eas.credentials import bare_user, read_authorization, same_user
from seg_fast.errors import EASRequestError

# -- an independent NTLM encoder (MS-NLMP 2.2.1.1 / 2.2.1.3) ----------------------------------
UNICODE, OEM = 0x00000001, 0x00000002


def ntlm_negotiate(flags: int = 0xE2088297) -> bytes:
    # Signature, MessageType 1, NegotiateFlags, empty DomainNameFields and WorkstationFields.
    return b"NTLMSSP\x00" + struct.pack("<II", 1, flags) + b"\x00" * 16


def ntlm_authenticate(user: str, domain: str, *, unicode: bool = True, workstation: str = "WS01",
                      pad: bytes = b"", reverse: bool = False, with_version: bool = True) -> bytes:
    enc = (lambda s: s.encode("utf-16-le")) if unicode else (lambda s: s.encode("cp437"))
    payloads = [b"\x11" * 24, b"\x22" * 24, enc(domain), enc(user), enc(workstation), b""]
    flags = (UNICODE if unicode else OEM) | 0x00080000 | 0x00000200
    head = 64 + (8 if with_version else 0) + len(pad)
    order = list(range(6))[::-1] if reverse else list(range(6))      # payload order is free
    offsets, blob, at = [0] * 6, b"", head
    for i in order:
        offsets[i] = at
        blob += payloads[i]
        at += len(payloads[i])
    fields = b"".join(struct.pack("<HHI", len(p), len(p), o) for p, o in zip(payloads, offsets))
    version = b"\x0a\x00\x61\x4a\x00\x00\x00\x0f" if with_version else b""
    return b"NTLMSSP\x00" + struct.pack("<I", 3) + fields + struct.pack("<I", flags) + version + pad + blob


def header(scheme: str, blob: bytes) -> str:
    return f"{scheme} {base64.b64encode(blob).decode()}"


# Names as devices send them: ASCII, accented, CJK, a UPN; never control characters.
names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(user=names, domain=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
       reverse=st.booleans(), with_version=st.booleans(), pad=st.binary(max_size=8),
       scheme=st.sampled_from(["NTLM", "Negotiate", "ntlm"]))
def test_ntlm_type3_user_and_domain_unicode(user, domain, reverse, with_version, pad, scheme):
    blob = ntlm_authenticate(user, domain, reverse=reverse, with_version=with_version, pad=pad)
    got = read_authorization(header(scheme, blob))
    assert got == (scheme.lower(), f"{domain}\\{user}" if domain else user, C.CREDENTIAL)


@settings(max_examples=60, deadline=None)
@given(user=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1, max_size=20),
       domain=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=10))
def test_ntlm_type3_oem_strings(user, domain):
    got = read_authorization(header("NTLM", ntlm_authenticate(user, domain, unicode=False)))
    assert got[1] == (f"{domain}\\{user}" if domain else user)


def test_ntlm_type1_is_a_handshake_and_anonymous_names_no_one():
    assert read_authorization(header("NTLM", ntlm_negotiate())) == ("ntlm", None, C.HANDSHAKE)
    assert read_authorization(header("Negotiate", ntlm_negotiate())) == ("negotiate", None, C.HANDSHAKE)
    assert read_authorization(header("NTLM", ntlm_authenticate("", ""))) == ("ntlm", None, C.NONE)


def test_kerberos_negotiate_names_no_user():
    spnego = bytes.fromhex("6082") + b"\x01\x00" + b"\x06\x06\x2b\x06\x01\x05\x05\x02" + b"\x00" * 40
    assert read_authorization(header("Negotiate", spnego)) == ("negotiate", None, C.NONE)


@pytest.mark.parametrize("blob", [
    b"", b"NTLMSSP\x00", b"NTLMSSP\x00\x02\x00\x00\x00" + b"\x00" * 40,      # a type 2 from a device
    b"NTLMSSP\x00\x03\x00\x00\x00" + b"\x00" * 20,                              # shorter than 64
    b"XTLMSSP\x00\x03\x00\x00\x00" + b"\x00" * 60,
])
def test_malformed_ntlm_messages(blob):
    with pytest.raises(EASRequestError):
        read_authorization(header("NTLM", blob))


def test_ntlm_buffer_past_the_end_and_odd_utf16():
    blob = bytearray(ntlm_authenticate("mallory", "CORP"))
    struct.pack_into("<I", blob, 36 + 4, len(blob) - 2)            # UserName offset near the end
    with pytest.raises(EASRequestError, match="past the end"):
        read_authorization(header("NTLM", bytes(blob)))
    blob = bytearray(ntlm_authenticate("mallory", "CORP"))
    struct.pack_into("<H", blob, 36, 13)                            # odd UTF-16 length
    with pytest.raises(EASRequestError, match="UTF-16"):
        read_authorization(header("NTLM", bytes(blob)))


def test_ntlm_against_pyspnego_messages():
    """A second, independent encoder and decoder: pyspnego's own NTLM message classes."""
    messages = pytest.importorskip("spnego._ntlm_raw.messages")
    for user, domain, unicode in [("mallory", "CORP", True), ("jdoe@corp.example", "", True),
                                  ("Zoë Ünal", "ÉQUIPE", True), ("alice", "CORP", False)]:
        flags = messages.NegotiateFlags.unicode if unicode else messages.NegotiateFlags.oem
        msg = messages.Authenticate(flags=flags, lm_challenge_response=b"\x00" * 24,
                                    nt_challenge_response=b"\x01" * 24, domain_name=domain, username=user,
                                    workstation="WS", encoding="cp437").pack()
        assert read_authorization(header("NTLM", msg))[1] == (f"{domain}\\{user}" if domain else user)
        # ...and pyspnego reads this file's encoder as the gateway does.
        ours = messages.Authenticate.unpack(ntlm_authenticate(user, domain, unicode=unicode), encoding="cp437")
        assert (ours.user_name, ours.domain_name or "") == (user, domain)


# -- bearer JWTs ---------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims, header_obj=None) -> str:
    head = b64url(json.dumps(header_obj or {"alg": "RS256", "typ": "JWT"}).encode())
    body = claims if isinstance(claims, str) else b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{b64url(b'not-verified-here')}"


@pytest.mark.parametrize("claims,user", [
    ({"upn": "mallory@corp.example", "unique_name": "x", "preferred_username": "y"}, "mallory@corp.example"),
    ({"unique_name": "CORP\\mallory", "preferred_username": "y"}, "CORP\\mallory"),
    ({"preferred_username": "mallory@corp.example", "sub": "123"}, "mallory@corp.example"),
    ({"sub": "app-only", "roles": ["x"]}, None),                   # an app token names no user
])
def test_bearer_jwt_claims(claims, user):
    got = read_authorization("Bearer " + jwt(claims))
    assert got == ("bearer", user, C.CREDENTIAL if user else C.NONE)


@pytest.mark.parametrize("token", ["opaque-token", "ya29.a0AfH6SM", "a.b.c.d.e", "abc.def.ghi"])
def test_bearer_tokens_that_name_no_one(token):
    assert read_authorization("Bearer " + token) == ("bearer", None, C.NONE)


@pytest.mark.parametrize("token", [
    jwt("bm90IGpzb24"),                          # claims are not JSON
    jwt(b64url(b"[1, 2]")),                      # claims are not an object
    jwt({"upn": 5}), jwt({"upn": ""}), jwt({"upn": "a\nb"}), jwt({"upn": "x" * 600}),
    "abc def", "a,b", "",
])
def test_malformed_bearer_tokens_are_refused(token):
    with pytest.raises(EASRequestError):
        read_authorization("Bearer " + token)


# -- the agreement rule --------------------------------------------------------------------
@pytest.mark.parametrize("query,cred,same", [
    ("jdoe", "CORP\\jdoe", True), ("JDoe", "jdoe@corp.example", True), ("corp\\JDOE", "jdoe@corp.example", True),
    ("jdoe@other.example", "CORP\\jdoe", True), ("alice", "CORP\\mallory", False),
    ("mallory@corp.example", "alice@corp.example", False), ("jdoe2", "jdoe", False),
])
def test_user_agreement(query, cred, same):
    assert same_user(query, cred) is same
    assert bare_user(cred) == bare_user(cred.upper())


# -- nothing but EASRequestError, whatever the bytes -----------------------------------------
_blobs = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda b, cut: b[:cut], st.builds(ntlm_authenticate, names, names), st.integers(0, 200)),
    st.builds(lambda b, i, x: b[:i] + x + b[i + len(x):], st.builds(ntlm_authenticate, names, names),
              st.integers(0, 120), st.binary(min_size=1, max_size=8)),
)
_tokens = st.one_of(
    st.builds(lambda b: base64.b64encode(b).decode(), _blobs),
    st.text(max_size=80),
    st.builds(lambda a, b, c: f"{b64url(a)}.{b64url(b)}.{c}", st.binary(max_size=40), st.binary(max_size=80),
              st.text(max_size=10)),
    st.builds(lambda obj: jwt(obj), st.dictionaries(st.sampled_from(list(C.JWT_CLAIMS) + ["sub"]),
                                                    st.one_of(st.text(max_size=30), st.integers(), st.none()))),
)


@settings(max_examples=400, deadline=None)
@given(scheme=st.sampled_from(["Basic", "Bearer", "NTLM", "Negotiate", "Digest", ""]) | st.text(max_size=8),
       token=_tokens)
def test_any_credential_reads_or_raises_the_request_error(scheme, token):
    try:
        got_scheme, user, identity = read_authorization(f"{scheme} {token}")
    except EASRequestError:
        return
    assert identity in (C.CREDENTIAL, C.HANDSHAKE, C.NONE)
    assert (user is not None) == (identity == C.CREDENTIAL)
    if user is not None:
        assert user == user.strip("\x00") and not any(ord(c) < 32 or c == "\x7f" for c in user)


def test_any_blank_separates_scheme_and_token():
    assert read_authorization("Basic\t" + base64.b64encode(b"mallory:x").decode()) == \
        ("basic", "mallory", C.CREDENTIAL)
    assert read_authorization("  bearer   " + jwt({"upn": "m@x"}) + " ")[1] == "m@x"


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=120), query_user=st.sampled_from([b"", b"&User=alice", b"&User=mallory"]))
def test_any_authorization_bytes_through_parse_request(value, query_user):
    """Whatever the header holds, the request parser answers or raises EASRequestError."""
    from seg_fast.eas.request import parse_request
    for prefix in (b"", b"Basic ", b"Bearer ", b"NTLM ", b"Negotiate "):
        try:
            req = parse_request("POST", b"/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=A&DeviceType=B" + query_user,
                                [(b"authorization", prefix + value)])
        except EASRequestError:
            continue
        assert req.identity in (C.CREDENTIAL, C.HANDSHAKE, C.NONE)
        if req.identity == C.CREDENTIAL and query_user:
            assert same_user(query_user.split(b"=")[1].decode(), req.user)
