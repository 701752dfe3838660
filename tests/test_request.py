"""EasRequest identification: both query forms, the credential's user, header refusals, malformed input."""
from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings, strategies as st

from seg_fast.eas.request import (COMMAND_CODES, OPTION_ACCEPT_MULTIPART, PARAM_TAGS, EasRequest,
                                  basic_auth_user, encode_base64_query, parse_request)
from seg_fast.errors import EASRequestError

PATH = b"/Microsoft-Server-ActiveSync"
AUTH = (b"Authorization", b"Basic " + base64.b64encode(b"CORP\\jdoe:pa:ss"))


def test_plain_query_fields_and_headers():
    req = parse_request("POST", PATH + b"?Cmd=Sync&User=jdoe&DeviceId=ABC123&DeviceType=iPhone&CollectionId=7",
                        [(b"MS-ASProtocolVersion", b"14.1"), (b"X-MS-PolicyKey", b"3942919513"),
                         (b"User-Agent", b"Apple-iPhone9C1/1602.92"), (b"MS-ASAcceptMultiPart", b"T")],
                        "10.0.0.9")
    assert (req.command, req.user, req.device_id, req.device_type) == ("Sync", "jdoe", "ABC123", "iPhone")
    assert req.protocol_version == "14.1" and req.policy_key == "3942919513"
    assert req.user_agent == "Apple-iPhone9C1/1602.92" and req.accept_multipart
    assert req.params == {"CollectionId": "7"} and req.client_ip == "10.0.0.9"
    assert req.path == "/Microsoft-Server-ActiveSync" and not req.base64_query


def test_basic_auth_user_wins_over_query_user_and_keeps_domain():
    req = parse_request("POST", PATH + b"?Cmd=Ping&User=JDoe@corp.example&DeviceId=A&DeviceType=B", [AUTH])
    assert req.user == "CORP\\jdoe" and req.identity == "credential" and req.auth_scheme == "basic"


@pytest.mark.parametrize("query_user", [b"someoneelse", b"CORP%5Cmallory", b"jdoe2", b"mallory@corp.example"])
def test_query_user_that_disagrees_with_the_credential_is_refused(query_user):
    with pytest.raises(EASRequestError, match="another user"):
        parse_request("POST", PATH + b"?Cmd=Ping&User=" + query_user + b"&DeviceId=A&DeviceType=B", [AUTH])


def test_base64_form_user_must_agree_with_the_credential():
    q = encode_base64_query(version="14.1", command="Sync", device_id=b"\x01", device_type="iPhone",
                            params=[(8, b"alice")])
    mallory = (b"Authorization", b"Basic " + base64.b64encode(b"CORP\\mallory:x"))
    with pytest.raises(EASRequestError, match="another user"):
        parse_request("POST", PATH + b"?" + q.encode(), [mallory])
    q = encode_base64_query(version="14.1", command="Sync", device_id=b"\x01", device_type="iPhone",
                            params=[(8, b"mallory@corp.example")])
    assert parse_request("POST", PATH + b"?" + q.encode(), [mallory]).user == "CORP\\mallory"


def test_two_authorization_headers_are_refused():
    other = (b"authorization", b"Basic " + base64.b64encode(b"mallory:x"))
    for headers in ([AUTH, other], [AUTH, AUTH], [(b"Authorization", b"Bearer abc"), other]):
        with pytest.raises(EASRequestError, match="more than one Authorization"):
            parse_request("POST", PATH + b"?Cmd=Sync&DeviceId=A&DeviceType=B", headers)


@pytest.mark.parametrize("char", [0x01, 0x08, 0x0e, 0x1b, 0x1f, 0x7f])
def test_control_characters_in_header_values_are_refused(char):
    for value in (b"Apple" + bytes([char]) + b"x", ("Apple" + chr(char) + "x")):
        with pytest.raises(EASRequestError, match="control character"):
            parse_request("POST", PATH + b"?Cmd=Sync&DeviceId=A&DeviceType=B", [(b"X-Anything", value)])


def test_tab_and_obs_text_in_header_values_pass():
    req = parse_request("POST", PATH + b"?Cmd=Sync&DeviceId=A&DeviceType=B",
                        [(b"user-agent", b"Apple\tiPhone \xc3\xa9")])
    assert req.user_agent == "Apple\tiPhone \xc3\xa9"


def test_client_address_from_trusted_proxies_only():
    from seg_fast.proxy.headers import TrustedProxies
    proxies = TrustedProxies(["10.0.0.0/8"])
    q = PATH + b"?Cmd=Sync&DeviceId=A&DeviceType=B"
    xff = [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.7, 10.0.0.3")]
    assert parse_request("POST", q, xff, "10.0.0.1", proxies).client_ip == "203.0.113.7"
    assert parse_request("POST", q, xff, "192.0.2.5", proxies).client_ip == "192.0.2.5"   # not a proxy
    assert parse_request("POST", q, xff, "10.0.0.1").client_ip == "10.0.0.1"             # none configured
    assert parse_request("POST", q, [], "10.0.0.1", proxies).client_ip == "10.0.0.1"


def test_percent_encoded_values():
    req = parse_request("POST", PATH + b"?Cmd=GetAttachment&AttachmentName=5%3A1%3A0&DeviceId=A&DeviceType=B", [])
    assert req.params["AttachmentName"] == "5:1:0"


def test_base64_form_matches_the_fixture_description():
    # The real-server fsb64 capture: 14.1, FolderSync, locale 0x0409, DeviceId, PolicyKey,
    # DeviceType SmartPhone, and parameter tag 7 holding the 4 bytes "test".
    q = encode_base64_query(version="14.1", command="FolderSync", device_id=bytes.fromhex("0123abcd"),
                            device_type="SmartPhone", policy_key=1234567890, params=[(7, b"test")])
    raw = base64.b64decode(q)
    assert raw[:4] == bytes([141, 9, 0x09, 0x04])          # independent check of the layout
    req = parse_request("POST", PATH + b"?" + q.encode(), [AUTH, (b"User-Agent", b"X")])
    assert req.base64_query
    assert (req.command, req.protocol_version, req.device_id, req.device_type) == \
        ("FolderSync", "14.1", "0123abcd", "SmartPhone")
    assert req.policy_key == "1234567890" and req.user == "CORP\\jdoe"
    assert req.params == {"Options": b"test".hex()} and not req.accept_multipart


def test_base64_form_user_param_and_multipart_option():
    q = encode_base64_query(version="16.1", command="ItemOperations", device_id=b"\x01\x02",
                            device_type="Android", params=[(8, b"jdoe@example.com"), (7, b"\x02"),
                                                           (1, b"5"), (3, b"5:12")])
    req = parse_request("POST", PATH + b"?" + q.replace("=", "%3D").encode(), [])
    assert req.user == "jdoe@example.com" and req.accept_multipart and req.policy_key is None
    assert req.params == {"Options": "2", "CollectionId": "5", "ItemId": "5:12"}
    assert req.protocol_version == "16.1"


@pytest.mark.parametrize("query", [
    b"Cmd=Sync&Cmd=Ping", b"Cmd=Sy%20nc", b"Cmd=Sync&DeviceId=a%00b", b"Cmd=Sync&=x", b"Cmd=Sync&DeviceId",
    b"Cmd=Sync&DeviceId=%ff%fe", b"Cmd=Sync&DeviceType=a/b",
    b"!!!!", b"AAAA", base64.b64encode(bytes([141, 99, 9, 4, 0, 0, 0])),           # unknown command
    base64.b64encode(bytes([141, 9, 9, 4, 10, 1])),                               # DeviceId past the end
    base64.b64encode(bytes([141, 9, 9, 4, 1, 0xAA, 3, 1, 2, 3, 0])),              # 3-byte policy key
    base64.b64encode(bytes([141, 9, 9, 4, 1, 0xAA, 0, 1, 0x41, 5, 1, 0x41])),     # parameter tag 5
    base64.b64encode(bytes([141, 9, 9, 4, 1, 0xAA, 0, 1, 0x41, 1, 9, 0x41])),     # value past the end
    base64.b64encode(bytes([3, 9, 9, 4, 1, 0xAA, 0, 1, 0x41])),                   # version byte 3
])
def test_malformed_queries_raise_the_request_error(query):
    with pytest.raises(EASRequestError):
        parse_request("POST", PATH + b"?" + query, [])


@pytest.mark.parametrize("value", [b"Basic !!", b"Basic " + base64.b64encode(b"nocolon"),
                                   b"Basic " + base64.b64encode(b"\xff\xfe:x")])
def test_bad_basic_credentials(value):
    with pytest.raises(EASRequestError):
        parse_request("POST", PATH + b"?Cmd=Sync&DeviceId=A&DeviceType=B", [(b"Authorization", value)])


def test_opaque_bearer_names_no_user_and_no_password_leaks():
    assert basic_auth_user("Bearer abc") is None
    req = parse_request("POST", PATH + b"?Cmd=Sync&User=jdoe&DeviceId=A&DeviceType=B",
                        [(b"Authorization", b"Bearer abc")])
    assert (req.user, req.identity, req.auth_scheme) == ("jdoe", "none", "bearer")
    req = parse_request("POST", PATH + b"?Cmd=Sync&DeviceId=A&DeviceType=B", [AUTH])
    assert "pa:ss" not in repr(req)


def test_bad_protocol_version_header():
    with pytest.raises(EASRequestError):
        parse_request("POST", PATH + b"?Cmd=Sync", [(b"MS-ASProtocolVersion", b"14.1; drop")])


def test_bare_post_and_options_have_no_command():
    assert parse_request("OPTIONS", PATH, []).command is None
    assert parse_request("POST", PATH, []).device_id is None


@given(st.binary(max_size=300))
def test_any_query_bytes_parse_or_raise_the_request_error(blob):
    for query in (blob, base64.b64encode(blob)):
        try:
            req = parse_request("POST", PATH + b"?" + query, [AUTH])
        except EASRequestError:
            continue
        assert req.path == PATH.decode()


@given(st.binary(min_size=0, max_size=40))
def test_base64_round_trip_of_device_ids(dev_id):
    q = encode_base64_query(version="14.0", command="Ping", device_id=dev_id, device_type="T")
    req = parse_request("POST", PATH + b"?" + q.encode(), [])
    assert req.device_id == dev_id.hex() and req.command == "Ping"


# ---- The original (regex/urllib) parser, kept verbatim as the oracle of the faster one. ----

_MAX_QUERY = 4096
_MAX_VALUE = 1024
_B64_QUERY = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
_TOKEN = re.compile(r"[A-Za-z0-9_.\-:@\\]*")
_VERSION = re.compile(r"\d{1,2}\.\d{1,2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _reference_parse_request(method: str, target: bytes | str, headers, client_ip: str = "") -> EasRequest:
    """Identify one request. ``headers`` is a list of (name, value) pairs (bytes or str)."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    path_b, _, query = target.partition(b"?")
    try:
        path = path_b.decode("ascii")
    except UnicodeDecodeError:
        raise EASRequestError("request path is not ASCII") from None
    if len(query) > _MAX_QUERY:
        raise EASRequestError(f"query longer than {_MAX_QUERY} bytes")

    hdr: dict[str, str] = {}
    for name, value in headers:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        hdr.setdefault(name.lower(), value)

    req = EasRequest(method=method, path=path, client_ip=client_ip)
    req.user_agent = hdr.get("user-agent")
    version = hdr.get("ms-asprotocolversion")
    if version is not None:
        version = version.strip()
        if not _VERSION.fullmatch(version):
            raise EASRequestError("MS-ASProtocolVersion header is not a version number")
        req.protocol_version = version
    req.policy_key = hdr.get("x-ms-policykey")
    req.accept_multipart = hdr.get("ms-asacceptmultipart", "").strip().upper() == "T"

    if query:
        if _reference_looks_base64(query):
            _reference_parse_base64_query(query, req)
        else:
            _reference_parse_plain_query(query, req)

    auth_user = _reference_basic_auth_user(hdr.get("authorization"))
    if auth_user is not None:
        # The authenticated name is what the mail server checks; the query's User is a hint.
        req.user = auth_user
    return req


def _reference_looks_base64(query: bytes) -> bool:
    # The plain form always has name=value pairs; a base64 blob is one token with '=' only as padding.
    unquoted = unquote_to_bytes(query)
    return b"&" not in query and _B64_QUERY.fullmatch(unquoted) is not None and b"=" not in unquoted.rstrip(b"=")


def _reference_parse_plain_query(query: bytes, req: EasRequest) -> None:
    params: dict[str, str] = {}
    for pair in query.split(b"&"):
        if not pair:
            continue
        name_b, eq, value_b = pair.partition(b"=")
        try:
            name = unquote_to_bytes(name_b.replace(b"+", b" ")).decode("utf-8")
            value = unquote_to_bytes(value_b.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise EASRequestError("query parameter is not UTF-8") from None
        if not name or not eq:
            raise EASRequestError("query parameter without a name or '='")
        if len(value) > _MAX_VALUE or _CONTROL.search(name) or _CONTROL.search(value):
            raise EASRequestError(f"query parameter {name[:40]!r} is too long or holds control characters")
        if name in params:
            raise EASRequestError(f"query parameter {name[:40]!r} given twice")
        params[name] = value
    cmd = params.pop("Cmd", None)
    if cmd is not None:
        if not cmd.isalnum():
            raise EASRequestError("Cmd is not a command name")
        req.command = cmd
    req.user = params.pop("User", None)
    req.device_id = params.pop("DeviceId", None)
    req.device_type = params.pop("DeviceType", None)
    for field in ("device_id", "device_type"):
        value = getattr(req, field)
        if value is not None and not _TOKEN.fullmatch(value):
            raise EASRequestError(f"{field} holds characters a device identifier may not")
    req.params = params


def _reference_parse_base64_query(query: bytes, req: EasRequest) -> None:
    try:
        raw = base64.b64decode(unquote_to_bytes(query), validate=True)
    except (binascii.Error, ValueError):
        raise EASRequestError("base64 query is not valid base64") from None
    req.base64_query = True
    end = len(raw)
    if end < 7:
        raise EASRequestError("base64 query shorter than its fixed fields")
    version = raw[0]
    if not 20 <= version <= 199:
        raise EASRequestError(f"base64 query protocol version byte {version} is not a version")
    req.protocol_version = f"{version // 10}.{version % 10}"
    code = raw[1]
    command = COMMAND_CODES.get(code)
    if command is None:
        raise EASRequestError(f"base64 query command code {code} is unknown")
    req.command = command
    pos = 4                                           # skip the 2-byte locale
    dev_len = raw[pos]
    pos += 1
    if pos + dev_len > end:
        raise EASRequestError("base64 query DeviceId runs past the end")
    # The DeviceId travels as raw bytes; hex keeps it a printable, stable identifier.
    req.device_id = raw[pos:pos + dev_len].hex()
    pos += dev_len
    if pos >= end:
        raise EASRequestError("base64 query ends before the policy key length")
    key_len = raw[pos]
    pos += 1
    if key_len not in (0, 4) or pos + key_len > end:
        raise EASRequestError("base64 query policy key must be 0 or 4 bytes")
    if key_len == 4:
        req.policy_key = str(int.from_bytes(raw[pos:pos + 4], "little"))
    pos += key_len
    if pos >= end:
        raise EASRequestError("base64 query ends before the DeviceType length")
    type_len = raw[pos]
    pos += 1
    if pos + type_len > end:
        raise EASRequestError("base64 query DeviceType runs past the end")
    try:
        req.device_type = raw[pos:pos + type_len].decode("ascii")
    except UnicodeDecodeError:
        raise EASRequestError("base64 query DeviceType is not ASCII") from None
    if not _TOKEN.fullmatch(req.device_type):
        raise EASRequestError("base64 query DeviceType holds characters a device type may not")
    pos += type_len
    params: dict[str, str] = {}
    while pos < end:
        if pos + 2 > end:
            raise EASRequestError("base64 query parameter header runs past the end")
        tag, length = raw[pos], raw[pos + 1]
        pos += 2
        if pos + length > end:
            raise EASRequestError("base64 query parameter value runs past the end")
        value = raw[pos:pos + length]
        pos += length
        name = PARAM_TAGS.get(tag)
        if name is None:
            raise EASRequestError(f"base64 query parameter tag {tag} is unknown")
        if name == "Options":
            # A one-byte bitmask per the spec; other lengths are carried as hex, not trusted.
            if length == 1:
                req.accept_multipart = req.accept_multipart or bool(value[0] & OPTION_ACCEPT_MULTIPART)
                params[name] = str(value[0])
            else:
                params[name] = value.hex()
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise EASRequestError(f"base64 query parameter {name} is not UTF-8") from None
        if _CONTROL.search(text):
            raise EASRequestError(f"base64 query parameter {name} holds control characters")
        if name == "User":
            req.user = text
        else:
            params[name] = text
    req.params = params


def _reference_basic_auth_user(value: str | None) -> str | None:
    """The user name of a Basic Authorization header (never the password), or None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise EASRequestError("Authorization header is not valid Basic credentials") from None
    user, colon, _ = decoded.partition(":")
    if not colon or _CONTROL.search(user):
        raise EASRequestError("Authorization header is not valid Basic credentials")
    return user


def _outcome(parse, *args):
    try:
        return parse(*args)
    except Exception as exc:      # the oracle's own errors (any type) must be matched too
        return (type(exc), str(exc))


_TEXT = st.sampled_from(["Sync", "jdoe", "CORP\\jdoe", "ABC123", "iPhone", "5:1:0", "", "a b", "a+b",
                         "%3A", "%ff", "%", "%0", "%00", "a\x01", "\x7f", "é", "ü%20x", "=", "==", "a=b",
                         "Sy nc", "a/b", "x" * 1025, "\u0661\u0664", "%E2%82%AC"]) | st.text(max_size=12)
_NAMES = st.sampled_from(["Cmd", "User", "DeviceId", "DeviceType", "CollectionId", "AttachmentName",
                          "ItemId", "SaveInSent", "", "a%00", "N+m", "%ff"]) | st.text(max_size=6)


def _enc(text, raw_bytes):
    return text.encode("latin-1") if raw_bytes else text.encode("utf-8", "surrogatepass")


@st.composite
def _plain_queries(draw):
    pairs = []
    for name, value, eq, raw in draw(st.lists(st.tuples(_NAMES, _TEXT, st.booleans(),
                                                        st.sampled_from([False] * 4 + [True])), max_size=7)):
        try:
            pairs.append(_enc(name, raw) + (b"=" if eq or draw(st.integers(0, 5)) else b"") + _enc(value, raw))
        except UnicodeEncodeError:
            pairs.append(_enc(name, False) + b"=" + _enc(value, False))
    return b"&".join(pairs)


@st.composite
def _base64_queries(draw):
    if draw(st.integers(0, 3)):              # mostly well-formed packed fields, some broken
        raw = bytearray([draw(st.sampled_from([141, 140, 160, 161] * 3 + [3, 200, 19])),
                         draw(st.sampled_from([0, 9, 18, 23] * 3 + [19, 24, 99])), 9, 4])
        dev = draw(st.binary(max_size=20))
        raw += bytes([len(dev) + draw(st.sampled_from([0] * 8 + [1, 200]))]) + dev
        raw += draw(st.sampled_from([b"\x00", b"\x04\x01\x02\x03\x04"] * 3 + [b"\x03\x01\x02\x03", b""]))
        dtype = draw(st.sampled_from([b"iPhone", b"SmartPhone", b"Android"] * 4 + [b"Smart Phone", b"\xff",
                                                                                  b"a/b", b""]))
        raw += bytes([len(dtype)]) + dtype
        for tag, value in draw(st.lists(st.tuples(st.sampled_from([0, 1, 3, 4, 6, 7, 8] * 3 + [2, 9]),
                                                  st.sampled_from([b"", b"\x02", b"\x01", b"test", b"5:12",
                                                                   b"jdoe"] * 3 + [b"\xff", b"a\x00"])),
                                        max_size=4)):
            raw += bytes([tag, len(value)]) + value
        raw += draw(st.sampled_from([b""] * 6 + [b"\x01", b"\x01\xff"]))
        raw = bytes(raw)
    else:
        raw = draw(st.binary(max_size=40))
    q = base64.b64encode(raw)
    mangle = draw(st.sampled_from(["none"] * 6 + ["quote", "unpad", "extra", "cut", "quote-all"]))
    if mangle == "quote":
        q = q.replace(b"=", b"%3D").replace(b"+", b"%2B").replace(b"/", b"%2f")
    elif mangle == "unpad":
        q = q.rstrip(b"=")
    elif mangle == "extra":
        q += b"==="
    elif mangle == "cut" and q:
        q = q[:-1]
    elif mangle == "quote-all":
        q = b"".join(b"%%%02X" % c for c in q[:10]) + q[10:]
    return q


_QUERIES = _plain_queries() | _base64_queries() | st.binary(max_size=60) | \
    st.sampled_from([b"", b"&", b"Cmd=Sync", b"AAAA", b"AAAA&", b"A=A", b"=" * 3, b"x" * 4097])


def _basic(creds):
    return "Basic " + base64.b64encode(creds).decode()


_HEADER_VALUES = {
    "Authorization": st.sampled_from([_basic(b"CORP\\jdoe:pa:ss"), _basic(b"jdoe:x")] * 4 + [ _basic(b"nocolon"),
                                      _basic(b"\xff\xfe:x"), _basic(b"a\x01:x"), _basic(b":x"),
                                      "Basic !!", "basic  " + base64.b64encode(b"u:p").decode() + " ",
                                      "Bearer abc", "Basic", "", " ", "Basic é"]),
    "MS-ASProtocolVersion": st.sampled_from(["14.1"] * 12 + [" 16.1 ", "141", "1.2.3", "\u0661\u0664.1", "\u00b2.1",
                                             "14.", ".1", "100.1", "14.10", "14.1\n", "", "a.b", "1\u0660.1"]),
    "X-MS-PolicyKey": st.sampled_from(["3942919513", "0", "", "é"]),
    "User-Agent": st.sampled_from(["Apple-iPhone9C1/1602.92", "", "\xe9\xff"]),
    "MS-ASAcceptMultiPart": st.sampled_from(["T", "t", " T ", "F", "", "TT"]),
    "Content-Type": st.just("application/vnd.ms-sync.wbxml"),
    "Host": st.just("mail.example.com"),
}


@st.composite
def _headers(draw):
    out = []
    for name in draw(st.lists(st.sampled_from(sorted(_HEADER_VALUES)), max_size=8)):
        value = draw(_HEADER_VALUES[name])
        name = draw(st.sampled_from([name, name.lower(), name.upper()]))
        if name == "X-MS-POLICYKEY" and draw(st.booleans()):
            name = "X-MS-Policy\u212aey"       # KELVIN SIGN lowercases to 'k' in str.lower()
        if draw(st.booleans()):
            out.append((name.encode("latin-1", "replace"), value.encode("latin-1", "replace")))
        else:
            out.append((name, value))
    return out


def _bare(name: str) -> str:
    # The documented agreement rule, written out again: no DOMAIN\\, no @domain, any case.
    return re.sub(r"@.*", "", re.sub(r".*\\\\", "", name.lower(), flags=re.S), flags=re.S)


def _expected(method, target, headers, client_ip):
    """The reference parser's outcome plus what was added since: header refusals (two
    Authorization headers, control characters), User= agreeing with the credential,
    and the scheme and identity fields."""
    ref = _outcome(_reference_parse_request, method, target, headers, client_ip)
    if isinstance(ref, tuple) and ref[1].startswith(("request path", "query longer")):
        return ref                   # read before any header
    # Both are refusals; two Authorization headers are named first, wherever they stand.
    if sum(1 for name, _ in headers if name.lower() in (b"authorization", "authorization")) > 1:
        return (EASRequestError, "more than one Authorization header")
    for name, value in headers:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if any(ord(c) < 32 and c != "\t" or c == "\x7f" for c in text):
            return (EASRequestError, "a header value holds a control character")
    if not isinstance(ref, EasRequest):
        return ref
    auth = next((v for n, v in headers if n.lower() in (b"authorization", "authorization")), None)
    if not auth:
        return ref
    auth = auth.decode("latin-1") if isinstance(auth, bytes) else auth
    scheme = auth.strip().partition(" ")[0].lower()
    if scheme != "basic":            # the oracle's headers hold Basic and opaque Bearer tokens only
        ref.auth_scheme = scheme[:20]
        return ref
    without_auth = [h for h in headers if h[0].lower() not in (b"authorization", "authorization")]
    claimed = _reference_parse_request(method, target, without_auth, client_ip).user
    if claimed and _bare(claimed) != _bare(ref.user):
        return (EASRequestError, "User= names another user than the credential")
    ref.auth_scheme, ref.identity = "basic", "credential"
    return ref


@settings(max_examples=600, deadline=None)
@example(method="POST", query=b"Cmd=Sync&AttachmentName=%00", headers=[], as_str=False, client_ip="", path=PATH)
@example(method="POST", query=b"Cmd=Sync&DeviceType=a/b", headers=[], as_str=False, client_ip="", path=PATH)
@example(method="POST", query=b"Cmd=Sync&User=a%0Ab&DeviceId=X", headers=[], as_str=False, client_ip="", path=PATH)
@example(method="POST", query=b"Cmd=Sync&DeviceId==&DeviceType=a=b", headers=[], as_str=False, client_ip="", path=PATH)
@given(method=st.sampled_from(["POST", "OPTIONS"]), query=_QUERIES, headers=_headers(),
       as_str=st.booleans(), client_ip=st.sampled_from(["", "10.0.0.9"]),
       path=st.sampled_from([PATH, b"/Microsoft-Server-ActiveSync/", b"/\xe9"]))
def test_parser_matches_the_original_implementation(method, query, headers, as_str, client_ip, path):
    target = path + b"?" + query if query or as_str else path
    if as_str:
        target = target.decode("latin-1") + ("\u20ac" if query.endswith(b"!") else "")
    new = _outcome(parse_request, method, target, headers, client_ip)
    assert new == _expected(method, target, headers, client_ip)
