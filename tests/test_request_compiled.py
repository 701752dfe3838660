"""The compiled EAS identification (proxy/_http1.pyx ``identify``) against the reference
(eas/request.py ``parse_request``): for generated and mutated targets and headers it returns
exactly the reference's EasRequest, or None (the caller then asks the reference), and None
whenever the reference refuses the request."""
from __future__ import annotations

import base64
import subprocess
import sys

from hypothesis import example, given, settings, strategies as st

from seg_fast.eas.request import EasRequest, parse_request
from seg_fast.errors import EASRequestError
from seg_fast.proxy import http1
from seg_fast.proxy._http1 import identify
from test_request import _QUERIES, _headers

PATH = b"/Microsoft-Server-ActiveSync"


def _reference(method, target, full, client_ip):
    try:
        return parse_request(method, target, [(low, value) for _, low, value in full], client_ip)
    except EASRequestError:
        return EASRequestError


def _check(method, target, full, client_ip="10.0.0.9"):
    """identify agrees with the reference; returns what identify returned."""
    ref = _reference(method, target, full, client_ip)
    got = identify(method, target, full, client_ip)
    if got is not None:
        assert ref is not EASRequestError, (target, full)
        assert type(got) is EasRequest and got == ref, (got, ref)
    return got


def _triples(headers):
    out = []
    for name, value in headers:
        if isinstance(name, str):
            name = name.encode("latin-1", "replace")
        if isinstance(value, str):
            value = value.encode("latin-1", "replace")
        out.append((name, name.lower(), value))
    return out


def _basic(creds: bytes) -> bytes:
    return b"Basic " + base64.b64encode(creds)


WRK_HEADERS = _triples([(b"Host", b"gw.example"), (b"Authorization", _basic(b"user1:secret")),
                        (b"MS-ASProtocolVersion", b"14.1"), (b"User-Agent", b"Apple-iPhone9C1/1602.92"),
                        (b"Content-Type", b"application/vnd.ms-sync.wbxml"), (b"Content-Length", b"103")])


def test_the_common_request_is_identified_in_compiled_code():
    target = PATH + b"?Cmd=Sync&User=user1&DeviceId=DEV000001&DeviceType=iPhone&CollectionId=7"
    got = _check("POST", target, WRK_HEADERS)
    assert got is not None
    assert (got.command, got.user, got.device_id, got.device_type) == ("Sync", "user1", "DEV000001", "iPhone")
    assert got.params == {"CollectionId": "7"} and got.identity == "credential" and got.auth_scheme == "basic"
    assert got.protocol_version == "14.1" and got.user_agent == "Apple-iPhone9C1/1602.92"
    # No credential: User= is the claim; no query at all: nothing but the headers.
    assert _check("POST", target, WRK_HEADERS[:1] + WRK_HEADERS[2:]).identity == "none"
    assert _check("OPTIONS", PATH, WRK_HEADERS).command is None


_SHARING = """
from seg_fast.proxy._http1 import identify

def ping(device, agent):
    target = b"/Microsoft-Server-ActiveSync?Cmd=Ping&User=user1&DeviceId=DEV%06d&DeviceType=iPhone" % device
    full = [(b"Authorization", b"authorization", b"Basic dXNlcjE6c2VjcmV0"),
            (b"MS-ASProtocolVersion", b"ms-asprotocolversion", b"14.1"), (b"User-Agent", b"user-agent", agent)]
    req = identify("POST", target, full, "10.0.0.9")
    assert req is not None
    return req

# Two devices' requests share the path, command, type, protocol version and User-Agent objects.
a, b = ping(1, b"Apple-iPhone9C1/1602.92"), ping(2, b"Apple-iPhone9C1/1602.92")
for field in ("path", "command", "device_type", "protocol_version", "user_agent"):
    assert getattr(a, field) is getattr(b, field), field
assert a.device_id is not b.device_id
# A long made-up value is never kept (two requests carrying it get two objects)...
assert ping(3, b"X" * 129).user_agent is not ping(4, b"X" * 129).user_agent
# ...and once 4,096 values are kept, a new one is not: the table stops growing.
for i in range(4096):
    ping(5, b"made-up/%d" % i)
assert ping(6, b"Late-Agent/1.0").user_agent is not ping(7, b"Late-Agent/1.0").user_agent
assert ping(8, b"Apple-iPhone9C1/1602.92").user_agent is a.user_agent     # the kept ones stay
print("ok")
"""


def test_values_devices_send_alike_are_kept_once_and_made_up_ones_cannot_grow_the_table():
    # A parked Ping keeps its request for minutes. In a process of its own: the table is the
    # process's, and other tests' requests fill it.
    r = subprocess.run([sys.executable, "-c", _SHARING], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_refusals_and_unusual_requests_are_left_to_the_reference():
    cases = [
        (PATH + b"?Cmd=Sync&User=mallory&DeviceId=A&DeviceType=B", WRK_HEADERS),            # another user
        (PATH + b"?Cmd=Sync&DeviceId=A&DeviceId=B", WRK_HEADERS),                          # twice
        (PATH + b"?Cmd=Sy=nc&DeviceId=A", WRK_HEADERS),                                     # Cmd not a name
        (PATH + b"?Cmd=Sync&DeviceId=A%41", WRK_HEADERS),                                   # to unquote
        (PATH + b"?Cmd=Sync", WRK_HEADERS),                                                 # no '&'
        (PATH + b"?" + b"A=" + b"x" * 1025 + b"&B=1", WRK_HEADERS),                         # value too long
        (PATH + b"?Cmd=Sync&DeviceId=A", WRK_HEADERS + _triples([(b"Authorization", b"Basic eDp5")])),
        (PATH + b"?Cmd=Sync&DeviceId=A", _triples([(b"Authorization", b"Bearer abc")])),
        (PATH + b"?Cmd=Sync&DeviceId=A", _triples([(b"User-Agent", b"a\x01b")])),
        (PATH + b"?Cmd=Sync&DeviceId=A", _triples([(b"MS-ASProtocolVersion", b"141")])),
        (PATH + b"?Cmd=Sync&DeviceId=A", _triples([(b"MS-ASProtocolVersion", b"\xa014.1")])),
        (PATH + b"?Cmd=Sync&DeviceId=A", _triples([(b"Authorization", _basic(b"nocolon"))])),
        (PATH + b"?Cmd=Sync&DeviceId=A", _triples([(b"Authorization", _basic(b"a\x01:x"))])),
        (PATH + b"?Cmd=Sync&DeviceId=A", _triples([(b"Authorization", _basic(b"\xff:x"))])),
        (b"/\xe9?Cmd=Sync&DeviceId=A", WRK_HEADERS),
    ]
    for target, full in cases:
        assert _check("POST", target, full) is None, target


# -- generated and mutated requests ----------------------------------------------------------

_NAMES = st.sampled_from(["Cmd", "User", "DeviceId", "DeviceType", "CollectionId", "ItemId", "AttachmentName",
                          "cmd", "user", "X", ""])
_VALUE_BYTES = st.sampled_from(list(b"ABCXYZabcxyz0189_.-:@\\=") + [ord("%"), ord("+"), ord(" "), 0xe9, 0x01])
_VALUES = st.one_of(*[st.sampled_from(["Sync", "user1", "DEV01", "iPhone", "7"])] * 4, st.sampled_from(["Sync", "Ping", "user1", "jdoe@corp.example", "CORP\\jdoe", "DEV01", "iPhone",
                                     "", "a=b", "Sy nc"]),
                    st.lists(_VALUE_BYTES, max_size=12).map(lambda cs: bytes(cs).decode("latin-1")))


@st.composite
def _common_queries(draw):
    pairs = draw(st.lists(st.tuples(_NAMES, _VALUES), min_size=0, max_size=7, unique_by=lambda p: p[0]))
    parts = []
    for name, value in pairs:
        form = draw(st.sampled_from(["pair"] * 12 + ["empty", "noeq"]))
        parts.append("" if form == "empty" else (name if form == "noeq" else f"{name}={value}"))
    return "&".join(parts).encode("latin-1")


_USERS = st.sampled_from([b"user1"] * 4 + [b"User1", b"CORP\\user1", b"user1@corp.example", b"jdoe", b"", b"u\x01",
                          b"\xc3\xa9", b"\xff"])
_PASSWORDS = st.sampled_from([b"secret", b"pa:ss", b"", b"\xff"])


@st.composite
def _authorization(draw):
    user, password = draw(_USERS), draw(_PASSWORDS)
    creds = user + (b"" if draw(st.integers(0, 19)) == 0 else b":") + password
    token = base64.b64encode(creds)
    if draw(st.integers(0, 19)) == 0:
        token = token.rstrip(b"=") + draw(st.sampled_from([b"!", b"", b"=", b" x"]))
    scheme = draw(st.sampled_from([b"Basic"] * 6 + [b"basic", b"BASIC", b"Bearer", b"Basi", b"Basicx"]))
    blank = draw(st.sampled_from([b" "] * 6 + [b"  ", b"\t", b" \t", b""]))
    tail = draw(st.sampled_from([b"", b"", b" ", b"\t"]))
    return scheme + blank + token + tail


_COMMON_HEADERS = {
    b"Authorization": _authorization(),
    b"MS-ASProtocolVersion": st.sampled_from([b"14.1"] * 8 + [b"16.1", b" 2.5 ", b"\t12.0", b"141", b"14.", b"1.234",
                                              b"100.1", b"\xb2.1", b"14.1\x0b", b""]),
    b"X-MS-PolicyKey": st.sampled_from([b"3942919513", b"", b"\xe9"]),
    b"User-Agent": st.sampled_from([b"Apple-iPhone9C1/1602.92", b"", b"\xe9\xff", b"a\tb", b"a\x7fb"]),
    b"MS-ASAcceptMultiPart": st.sampled_from([b"T", b"t", b" T ", b"F", b"", b"TT", b"\xa0T"]),
    b"Content-Type": st.just(b"application/vnd.ms-sync.wbxml"),
    b"Host": st.just(b"mail.example.com"),
    b"X-Other": st.sampled_from([b"x"] * 6 + [b"\x00", b"\t", b"\x1f"]),
}


@st.composite
def _common_headers(draw):
    out = []
    for name in draw(st.lists(st.sampled_from(sorted(_COMMON_HEADERS)), max_size=7)):
        value = draw(_COMMON_HEADERS[name])
        name = draw(st.sampled_from([name, name.lower(), name.upper()]))
        out.append((name, name.lower(), value))
    return out


@settings(max_examples=300, deadline=None)
@example(query=b"Cmd=Sync&User=user1&DeviceId=D&DeviceType=T", full=WRK_HEADERS, path=PATH)
@example(query=b"Cmd=Sync&User=jdoe&DeviceId=D", full=WRK_HEADERS, path=PATH)
@example(query=b"Cmd=Sync&&User=USER1&", full=WRK_HEADERS, path=PATH)
@given(query=_common_queries(), full=_common_headers(), path=st.sampled_from([PATH, PATH + b"/", b"/\xe9", b"/"]))
def test_compiled_identification_matches_the_reference(query, full, path):
    _check("POST", path + b"?" + query if query else path, full)


@settings(max_examples=200, deadline=None)
@given(query=_QUERIES, headers=_headers(), method=st.sampled_from(["POST", "OPTIONS"]),
       client_ip=st.sampled_from(["", "10.0.0.9"]))
def test_compiled_identification_matches_the_reference_on_any_query(query, headers, method, client_ip):
    _check(method, PATH + b"?" + query if query else PATH, _triples(headers), client_ip)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_identification_of_mutated_heads(data):
    """Byte-level mutations of a whole request head, parsed by the compiled HTTP parser first:
    the identification of what it accepts agrees with the reference."""
    head = (b"POST " + PATH + b"?Cmd=Sync&User=user1&DeviceId=DEV000001&DeviceType=iPhone HTTP/1.1\r\n"
            b"Host: gw.example\r\nAuthorization: Basic dXNlcjE6c2VjcmV0\r\nMS-ASProtocolVersion: 14.1\r\n"
            b"User-Agent: Apple-iPhone9C1/1602.92\r\nContent-Length: 0\r\n\r\n")
    raw = bytearray(head)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.sampled_from(list(b"&=%:? \t\x01\x7fAaZz09\xe9+@\\")))
        if op == "set":
            raw[at] = byte
        elif op == "insert":
            raw.insert(at, byte)
        else:
            del raw[at]
    try:
        parsed = http1.parse_request(bytes(raw), 65536)
    except Exception:
        return
    if type(parsed) is http1.RequestHead:
        _check(parsed.method.decode("ascii", "replace"), parsed.target, parsed.headers)
