"""The compiled HTTP/1.1 fast path against h11, the reference (DESIGN.md, wave 2).

For every buffer (well-formed, mutated, garbage; every prefix of it) the fast path
must answer exactly what a fresh h11.Connection fed the same bytes answers (the
same event fields, body framing, keep-alive and head length; NEED_DATA; the same
rejection status), or DEFER. It must never accept what h11 rejects. The writers'
output must parse back with h11 into the event they were given.
"""
from __future__ import annotations

import h11
import pytest
from h11._connection import _body_framing, _keep_alive
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_fast.errors import HTTPProtocolError
from seg_fast.proxy import http1

MAX_HEAD = 2048

# -- the two sides of every comparison --------------------------------------------------------

_FRAMING = {http1.FRAMING_LENGTH: "content-length", http1.FRAMING_CHUNKED: "chunked",
            http1.FRAMING_NONE: "content-length", http1.FRAMING_CLOSE: "http/1.0"}


def _framing_of(head):
    if head.framing == http1.FRAMING_CHUNKED:
        return ("chunked", ())
    if head.framing == http1.FRAMING_CLOSE:
        return ("http/1.0", ())
    return ("content-length", (head.length if head.framing == http1.FRAMING_LENGTH else 0,))


def h11_request(data: bytes, max_head: int = MAX_HEAD):
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    if data:                                   # b"" would tell h11 the peer closed
        conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return ("reject", exc.error_status_hint)
    if event is h11.NEED_DATA:
        return ("need",)
    assert type(event) is h11.Request
    return ("head", event.method, event.target, event.http_version, list(event.headers._full_items),
            len(data) - len(conn.trailing_data[0]), _body_framing(event.method, event), _keep_alive(event))


def fast_request(data: bytes, max_head: int = MAX_HEAD):
    try:
        head = http1.parse_request(data, max_head)
    except HTTPProtocolError as exc:
        return ("reject", exc.status)
    if head is http1.DEFER:
        return ("defer",)
    if head is http1.NEED_MORE:
        return ("need",)
    return ("head", head.method, head.target, head.http_version, head.headers, head.head_len,
            _framing_of(head), head.keep_alive)


def h11_response(data: bytes, method: bytes = b"GET", max_head: int = MAX_HEAD):
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"h")]))
    conn.send(h11.EndOfMessage())
    if data:
        conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return ("reject", exc.error_status_hint)
    if event is h11.NEED_DATA:
        return ("need",)
    head_len = len(data) - len(conn.trailing_data[0])
    if type(event) is h11.InformationalResponse:
        return ("info", event.status_code, event.reason, event.http_version, list(event.headers._full_items),
                head_len)
    framing = _body_framing(method, event)
    return ("head", event.status_code, event.reason, event.http_version, list(event.headers._full_items),
            head_len, framing, _keep_alive(event) and framing[0] != "http/1.0")


def fast_response(data: bytes, method: bytes = b"GET", max_head: int = MAX_HEAD):
    try:
        head = http1.parse_response(data, method, max_head)
    except HTTPProtocolError as exc:
        return ("reject", exc.status)
    if head is http1.DEFER:
        return ("defer",)
    if head is http1.NEED_MORE:
        return ("need",)
    if head.informational:
        assert head.framing == http1.FRAMING_NONE
        return ("info", head.status_code, head.reason, head.http_version, head.headers, head.head_len)
    return ("head", head.status_code, head.reason, head.http_version, head.headers, head.head_len,
            _framing_of(head), head.keep_alive)


def same_or_defer(fast, ref, data):
    assert fast == ("defer",) or fast == ref, (data, fast, ref)


def cuts_of(data: bytes, prefixes: bool):
    """Where a read may end: every byte of a short buffer; of a long one, a spread of points
    plus every point around a line end (where the parsers decide the most)."""
    if not prefixes:
        return [len(data)]
    if len(data) <= 48:
        return range(len(data) + 1)
    cuts = set(range(0, len(data) + 1, 7)) | set(range(len(data) - 4, len(data) + 1))
    for i, c in enumerate(data):
        if c in (10, 13):
            cuts.update((i - 1, i, i + 1, i + 2))
    return sorted(c for c in cuts if 0 <= c <= len(data))


def check_request(data: bytes, *, prefixes: bool = True) -> tuple:
    """The whole buffer and (by default) prefixes of it; returns the fast answer for the whole."""
    cuts = cuts_of(data, prefixes)
    fast = None
    for cut in cuts:
        piece = data[:cut]
        fast = fast_request(piece)
        same_or_defer(fast, h11_request(piece), piece)
    return fast


def check_response(data: bytes, method: bytes = b"GET", *, prefixes: bool = True) -> tuple:
    cuts = cuts_of(data, prefixes)
    fast = None
    for cut in cuts:
        piece = data[:cut]
        fast = fast_response(piece, method)
        same_or_defer(fast, h11_response(piece, method), piece)
    return fast


# -- generators -------------------------------------------------------------------------------

TCHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.binary(min_size=1, max_size=12).map(lambda b: bytes(TCHARS[c % len(TCHARS)] for c in b))
field_chars = st.sampled_from([bytes([c]) for c in range(0x21, 0x7f)] + [b" ", b"\t", b"\x80", b"\xff", b"\x01"])
field_values = st.lists(field_chars, max_size=20).map(b"".join).map(lambda v: v.strip(b" \t"))
targets = st.one_of(
    st.sampled_from([b"/", b"*", b"/Microsoft-Server-ActiveSync?Cmd=Sync&User=u&DeviceId=D1&DeviceType=iPhone",
                     b"/Microsoft-Server-ActiveSync?jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l", b"http://h/x"]),
    st.binary(min_size=1, max_size=30).map(lambda b: bytes(0x21 + c % 94 for c in b)))
NAMES = [b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection",
         b"Expect", b"Upgrade", b"User-Agent", b"Authorization", b"MS-ASProtocolVersion", b"X-MS-PolicyKey",
         b"Content-Type", b"Accept", b"Trailer", b"Keep-Alive"]
VALUES = {b"content-length": [b"0", b"5", b"17", b"007", b"+5", b"5, 5", b"5,6", b"-1", b"", b"1" * 19, b"1" * 21],
          b"transfer-encoding": [b"chunked", b"Chunked", b"chunked, identity", b"identity", b"gzip, chunked"],
          b"connection": [b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade, close", b"x , CLOSE ,"],
          b"expect": [b"100-continue"], b"upgrade": [b"h2c", b"websocket"]}


@st.composite
def header_lines(draw, common: bool):
    """(name, value) pairs; ``common`` keeps to what the fast path must take itself."""
    out = []
    if common:
        out.append((draw(st.sampled_from([b"Host", b"host"])), b"mail.example.com"))
        for _ in range(draw(st.integers(0, 6))):
            name = draw(st.one_of(tokens, st.sampled_from([b"User-Agent", b"Authorization",
                                                           b"MS-ASProtocolVersion", b"Content-Type"])))
            if name.lower() in (b"host", b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                                b"connection"):
                continue
            out.append((name, draw(field_values)))
        framing = draw(st.sampled_from(["none", "length", "chunked"]))
        if framing == "length":
            out.append((b"Content-Length", str(draw(st.integers(0, 10**12))).encode()))
        elif framing == "chunked":
            out.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"Chunked"]))))
        if draw(st.booleans()):
            out.append((b"Connection", draw(st.sampled_from([b"keep-alive", b"close", b"Keep-Alive"]))))
        return draw(st.permutations(out))
    for _ in range(draw(st.integers(0, 7))):
        name = draw(st.one_of(st.sampled_from(NAMES), tokens))
        vals = VALUES.get(name.lower())
        value = draw(st.sampled_from(vals)) if vals and draw(st.booleans()) else draw(field_values)
        out.append((name, value))
    return out


def render(first: bytes, lines, ows=b" ") -> bytes:
    return first + b"\r\n" + b"".join(n + b":" + ows + v + b"\r\n" for n, v in lines) + b"\r\n"


@st.composite
def request_heads(draw, common: bool = False):
    method = draw(st.sampled_from([b"POST", b"GET", b"OPTIONS"]) if common else
                  st.one_of(st.sampled_from([b"POST", b"GET", b"HEAD", b"CONNECT", b"OPTIONS"]), tokens))
    version = b"HTTP/1.1" if common else draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"]))
    ows = b" " if common else draw(st.sampled_from([b" ", b"", b"\t", b"  "]))
    return render(method + b" " + draw(targets) + b" " + version, draw(header_lines(common)), ows)


@st.composite
def response_heads(draw, common: bool = False):
    status = draw(st.sampled_from([200, 200, 204, 304, 404, 503]) if common else
                  st.one_of(st.sampled_from([100, 101, 102, 199, 200, 204, 304, 401, 449, 503]),
                            st.integers(0, 999)))
    reason = draw(st.sampled_from([b" OK", b" Not Found", b"", b" ", b" a\tb", b" \x80"]))
    version = b"HTTP/1.1" if common else draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [(n, v) for n, v in draw(header_lines(common)) if common or n.lower() != b"host"]
    if common:
        lines = [(n, v) for n, v in lines if n.lower() != b"host"]
    return render(version + b" " + b"%03d" % status + reason, lines)


MUTATION_BYTES = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b":", b",", b"\x7f", b"\x80", b"\x0b", b"\x0c",
                  b" \r\n", b"\r\n ", b"\r\n\r\n", b"-"]


@st.composite
def mutated(draw, base):
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "case"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(MUTATION_BYTES))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 3))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.sampled_from(MUTATION_BYTES))[0]
        elif pos < len(data):
            data[pos] = data[pos] ^ 0x20 if chr(data[pos]).isalpha() else data[pos]
    return bytes(data)


# -- request heads ----------------------------------------------------------------------------

@settings(max_examples=100)
@given(request_heads(common=True), st.binary(max_size=8))
def test_common_requests_are_taken_by_the_fast_path(head, rest):
    fast = check_request(head + rest)
    assert fast[0] == "head", (head, fast)        # the common case never needs h11
    assert fast[5] == len(head)


@settings(max_examples=120)
@given(request_heads())
def test_unusual_requests_match_h11_or_defer(head):
    check_request(head)


@settings(max_examples=120)
@given(mutated(request_heads()))
def test_mutated_requests_match_h11_or_defer(data):
    check_request(data)


@settings(max_examples=120)
@given(st.binary(max_size=64))
def test_garbage_requests_match_h11_or_defer(data):
    check_request(data, prefixes=False)
    check_request(b"GET / HTTP/1.1\r\nHost: h\r\n" + data, prefixes=False)


def test_oversized_incomplete_head_is_431_like_h11():
    data = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * MAX_HEAD
    assert fast_request(data) == h11_request(data) == ("reject", 431)
    # A complete head is taken whatever its size, by both.
    whole = data + b"\r\n\r\n"
    assert fast_request(whole)[0] == h11_request(whole)[0] == "head"


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\x0bchunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"9" * 25 + b"\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\n",
    b"POST / HTTP/1.1\nHost: h\nContent-Length: 5\n\n",
    b"POST / HTTP/1.1\r\nHost: h\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nX\x01Y: 1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\n[x]: 1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\n: 1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nX: 1\r\n folded\r\n\r\n",
    b"POST / HTTP/1.1\r\n folded: 1\r\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b" GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
]


@pytest.mark.parametrize("data", SMUGGLING)
def test_smuggling_vectors_are_never_taken(data):
    for cut in range(len(data)):
        same_or_defer(fast_request(data[:cut]), h11_request(data[:cut]), data[:cut])
    fast = check_request(data)
    assert fast[0] != "head", (data, fast)      # each goes to h11 or is refused as h11 refuses it


@pytest.mark.parametrize("data,expected", [
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n", ("content-length", (5,))),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 007\r\n\r\n", ("content-length", (7,))),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: CHUNKED\r\n\r\n", ("chunked", ())),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: \x80\xff \x01z\r\n\r\n", ("content-length", (0,))),
    (b"GET / HTTP/1.1\r\nhost:h\r\nConnection: x ,CLOSE\r\n\r\n", ("content-length", (0,))),
])
def test_well_formed_tricky_heads_are_taken_exactly(data, expected):
    fast = check_request(data)
    assert fast[0] == "head" and fast[6] == expected


# -- response heads ---------------------------------------------------------------------------

@settings(max_examples=100)
@given(response_heads(common=True), st.sampled_from([b"GET", b"POST", b"HEAD"]))
def test_common_responses_are_taken_by_the_fast_path(head, method):
    fast = check_response(head, method)
    assert fast[0] == "head", (head, fast)


@settings(max_examples=120)
@given(st.one_of(response_heads(), mutated(response_heads())), st.sampled_from([b"GET", b"HEAD", b"POST"]))
def test_responses_match_h11_or_defer(head, method):
    check_response(head, method)


@settings(max_examples=100)
@given(st.binary(max_size=48))
def test_garbage_responses_match_h11_or_defer(data):
    check_response(data, prefixes=False)
    check_response(b"HTTP/1.1 200 OK\r\n" + data, prefixes=False)


@pytest.mark.parametrize("data,method", [
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"GET"),
    (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\n", b"GET"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n", b"POST"),
    (b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n", b"GET"),
    (b"HTTP/1.1 200 \r\nContent-Length: 1\r\n\r\n", b"GET"),
    (b"HTTP/1.1 449 Retry With\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", b"POST"),
])
def test_response_framing_rules(data, method):
    fast = check_response(data, method)
    assert fast[0] in ("head", "info")


# -- chunked bodies ---------------------------------------------------------------------------

CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


def h11_body(body: bytes):
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(CHUNKED_HEAD + body)
    assert type(conn.next_event()) is h11.Request
    payload = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return ("need", payload)
            if type(event) is h11.EndOfMessage:
                return ("done", payload, list(event.headers._full_items), conn.trailing_data[0])
            payload += event.data
    except h11.RemoteProtocolError:
        return ("reject",)


def fast_body(body: bytes, cuts):
    """Feed the decoder as a proxy would: pieces cut at ``cuts``, unconsumed bytes kept and resent."""
    dec = http1.ChunkedDecoder(MAX_HEAD)
    payload, buf, prev = b"", b"", 0
    try:
        for cut in sorted(set(cuts)) + [len(body)]:
            buf += body[prev:cut]
            prev = cut
            pieces, used = dec.decode(buf)
            payload += b"".join(pieces)
            buf = buf[used:]
            if dec.done:
                return ("done", payload, dec.trailers, buf + body[prev:])
    except HTTPProtocolError:
        return ("reject",)
    return ("need", payload)


@st.composite
def chunked_bodies(draw):
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        data = draw(st.binary(min_size=1, max_size=20))
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(data)
        ext = draw(st.sampled_from([b"", b";a=1", b"; name=\"v\"", b";", b" ", b"\t", b";\r"]))
        out += size.encode() + ext + b"\r\n" + data + b"\r\n"
    out += b"0" + draw(st.sampled_from([b"", b";x=y", b" "])) + b"\r\n"
    out += draw(st.sampled_from([b"\r\n", b"\n", b"Expires: 0\r\n\r\n", b"A: 1\r\n folded\r\n\r\n", b"A: 1\n\n"]))
    return out + draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n"]))


@settings(max_examples=150)
@given(st.one_of(chunked_bodies(), mutated(chunked_bodies()), st.binary(max_size=40)),
       st.lists(st.integers(0, 200), max_size=4))
def test_chunked_decoder_matches_h11(body, cuts):
    ref = h11_body(body)
    got = fast_body(body, [c for c in cuts if c <= len(body)])
    assert got == ref, (body, got, ref)


@pytest.mark.parametrize("body", [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;ext=1\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n",
    b"0" * 19 + b"5\r\nhello\r\n0\r\n\r\n",
    b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    b"0\r\nX: a\x00b\r\n\r\n",
])
def test_chunked_hand_corpus(body):
    for cut in range(len(body) + 1):
        assert fast_body(body, [cut]) == h11_body(body), (body, cut)


def test_overlong_chunk_size_line_is_refused():
    dec = http1.ChunkedDecoder(64)
    assert dec.decode(b"5;" + b"x" * 40) == ([], 0)          # still waiting: under the bound
    with pytest.raises(HTTPProtocolError):
        dec.decode(b"5;" + b"x" * 100)
    with pytest.raises(HTTPProtocolError):
        http1.ChunkedDecoder().decode(b"f" * 20 + b"\r\n")       # 2**80 bytes: h11 would wait for ever


# -- heads out --------------------------------------------------------------------------------

field_values_out = st.lists(field_chars, max_size=20).map(b"".join).map(lambda v: v.strip(b" \t"))


@settings(max_examples=100)
@given(st.integers(200, 999), st.sampled_from([b"OK", b"", b"Not Found", b"a\tb \x80"]),
       st.lists(st.tuples(tokens, field_values_out), max_size=6),
       st.sampled_from([http1.FRAMING_LENGTH, http1.FRAMING_CHUNKED]), st.integers(0, 10**9), st.booleans())
def test_response_writer_parses_back_with_h11(status, reason, pairs, framing, length, keep_alive):
    full = [(n, n.lower(), v) for n, v in pairs
            if n.lower() not in (b"content-length", b"transfer-encoding", b"connection")]
    out = http1.write_response(status, reason, full, framing, length, keep_alive)
    ref = h11_response(out, b"GET")
    assert ref[0] == "head", ref
    expected = list(full)
    if framing == http1.FRAMING_LENGTH:
        expected.append((b"Content-Length", b"content-length", str(length).encode()))
    else:
        expected.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
    if not keep_alive:
        expected.append((b"Connection", b"connection", b"close"))
    assert ref[1:5] == (status, reason, b"1.1", expected)
    assert ref[5] == len(out) and ref[7] == keep_alive
    assert fast_response(out) == ref                  # and the fast parser reads it the same


@settings(max_examples=80)
@given(st.sampled_from([b"POST", b"GET", b"OPTIONS"]), targets,
       st.lists(st.tuples(tokens, field_values_out), max_size=6), st.integers(0, 10**6))
def test_request_writer_parses_back_with_h11(method, target, pairs, length):
    full = [(n, n.lower(), v) for n, v in pairs
            if n.lower() not in (b"content-length", b"transfer-encoding", b"connection", b"host",
                                 b"expect", b"upgrade")]
    full.append((b"Host", b"host", b"mail.example.com"))
    out = http1.write_request(method, target, full, http1.FRAMING_LENGTH, length)
    ref = h11_request(out)
    assert ref[0] == "head", ref
    # h11's own writer puts Host first too: the same bytes as h11 would send.
    assert out == h11.Connection(h11.CLIENT).send(h11.Request(
        method=method, target=target,
        headers=[(n, v) for n, _, v in full] + [(b"Content-Length", str(length).encode())]))
    assert fast_request(out) == ref


@pytest.mark.parametrize("bad", [(b"X Y", b"1"), (b"X", b"a\r\nInjected: 1"), (b"X", b" lead"), (b"", b"v"),
                                 (b"X", b"nul\x00")])
def test_writer_refuses_headers_that_would_not_parse_back(bad):
    with pytest.raises(HTTPProtocolError):
        http1.write_response(200, b"OK", [(bad[0], bad[0].lower(), bad[1])])


def test_events_built_from_fast_heads_equal_h11s():
    data = (b"POST /Microsoft-Server-ActiveSync?Cmd=Sync&User=u&DeviceId=D&DeviceType=T HTTP/1.1\r\n"
            b"Host: mail\r\nContent-Length: 3\r\nMS-ASProtocolVersion: 14.1\r\n\r\nabc")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    assert http1.request_event(http1.parse_request(data)) == conn.next_event()
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"h")]))
    client.send(h11.EndOfMessage())
    client.receive_data(resp)
    assert http1.response_event(http1.parse_response(resp)) == client.next_event()


# -- handing a fast-parsed head to h11 (the integration seam) --------------------------------

def _drain_events(conn):
    out = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            out.append(("error", exc.error_status_hint))
            return out
        out.append(event)
        if event is h11.NEED_DATA or type(event) in (h11.EndOfMessage, h11.ConnectionClosed):
            return out


@settings(max_examples=60)
@given(request_heads(common=True), st.binary(max_size=40), st.booleans())
def test_primed_h11_goes_on_exactly_as_if_it_had_parsed_the_head(head, body, chunked_ok):
    parsed = http1.parse_request(head)
    assert isinstance(parsed, http1.RequestHead)
    if parsed.framing == http1.FRAMING_CHUNKED and chunked_ok:
        body = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
    ref = h11.Connection(h11.SERVER)
    ref.receive_data(head + body)
    ref_request = ref.next_event()
    fast = h11.Connection(h11.SERVER)
    assert http1.prime_h11(fast, parsed, body) == ref_request
    for conn in (ref, fast):
        conn.events = _drain_events(conn)
    assert fast.events == ref.events
    assert (fast.states, fast.their_http_version, fast._request_method, fast.trailing_data) == \
           (ref.states, ref.their_http_version, ref._request_method, ref.trailing_data)
    if ref.their_state is h11.DONE:
        answer = h11.Response(status_code=200, headers=[(b"Content-Type", b"x")])
        assert fast.send(answer) == ref.send(answer)
        assert fast.send(h11.Data(data=b"abc")) == ref.send(h11.Data(data=b"abc"))
        assert fast.send(h11.EndOfMessage()) == ref.send(h11.EndOfMessage())
        assert fast.states == ref.states


@settings(max_examples=60)
@given(response_heads(common=True), st.sampled_from([b"GET", b"POST", b"HEAD"]), st.binary(max_size=40),
       st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\nX: y\r\n\r\n"]))
def test_primed_h11_client_reads_the_answer_as_if_it_had_parsed_it(head, method, body, interim):
    data = interim + head
    parsed = http1.parse_response(data, method)
    assert isinstance(parsed, http1.ResponseHead)
    if parsed.framing == http1.FRAMING_CHUNKED:
        body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    conns = []
    for _ in range(2):
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"h"), (b"Content-Length", b"0")]))
        conn.send(h11.EndOfMessage())
        conns.append(conn)
    ref, fast = conns
    ref.receive_data(data + body)
    rest = data[parsed.head_len:] + body
    while parsed.informational:                     # a 1xx first, then the answer itself
        assert http1.prime_h11_response(fast, parsed) == ref.next_event()
        parsed = http1.parse_response(rest, method)
        rest = rest[parsed.head_len:]
    assert http1.prime_h11_response(fast, parsed, rest) == ref.next_event()
    assert _drain_events(fast) == _drain_events(ref)
    assert (fast.states, fast.their_http_version, fast.trailing_data) == \
           (ref.states, ref.their_http_version, ref.trailing_data)


def test_any_buffer_type_reads_the_same():
    data = b"xxPOST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    ref = fast_request(data[2:])
    for buf in (bytearray(data[2:]), memoryview(data)[2:], memoryview(bytearray(data))[2:]):
        head = http1.parse_request(buf)
        assert (head.method, head.target, head.headers, head.head_len, head.length) == \
               (ref[1], ref[2], ref[4], ref[5], 3)
        assert all(type(x) is bytes for item in head.headers for x in item)
    body = b"--3\r\nabc\r\n0\r\n\r\n"
    assert http1.ChunkedDecoder().decode(memoryview(body)[2:]) == ([b"abc"], len(body) - 2)
