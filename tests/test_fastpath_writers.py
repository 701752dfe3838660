"""The compiled head writers that rewrite on the way (``write_upstream``, ``write_answer``) write
exactly what proxy/headers.py's rewriting followed by ``write_request``/``write_response``
writes, for generated header lists; and h11 parses what they write back to the same headers."""
from __future__ import annotations

import h11
from hypothesis import given, settings, strategies as st

from seg_fast.proxy import headers as hdrs
from seg_fast.proxy import http1
from seg_fast.proxy._http1 import write_answer, write_upstream

_NAMES = st.sampled_from([
    "Host", "Content-Type", "Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive", "TE", "Trailer",
    "Upgrade", "Proxy-Connection", "Proxy-Authorization", "Proxy-Authenticate", "Expect", "X-Forwarded-For",
    "X-Forwarded-Proto", "Forwarded", "X-Real-IP", "X-Forwarded-Host", "X-Forwarded-Port", "Authorization",
    "User-Agent", "MS-ASProtocolVersion", "X-Custom", "Set-Cookie", "Location", "Date",
])
_VALUES = st.sampled_from(["x", "", "close", "keep-alive", "Keep-Alive", "x-custom", "X-Custom, date",
                           "te, close", "1.2.3.4", "a b\tc", "chunked", "123"])


@st.composite
def _full(draw):
    out = []
    for name, value in draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=10)):
        name = draw(st.sampled_from([name, name.lower(), name.upper()])).encode()
        out.append((name, name.lower(), value.encode()))
    return out


@settings(max_examples=300, deadline=None)
@given(full=_full(), length=st.sampled_from([-1, 0, 103, 65536]),
       method=st.sampled_from([b"POST", b"GET"]), ip=st.sampled_from(["127.0.0.1", "2001:db8::1"]),
       proto=st.sampled_from([b"http", b"https"]))
def test_write_upstream_is_the_rewrite_then_write_request(full, length, method, ip, proto):
    target = b"/Microsoft-Server-ActiveSync?Cmd=Sync"
    got = write_upstream(method, target, full, b"mail.example:8080", ip.encode(), proto, length)
    framing = hdrs.content_length(length) if length >= 0 else []
    head = hdrs.upstream_request_headers(full, host=b"mail.example:8080", client_ip=ip, proto=proto,
                                         behind_proxy=False, framing=framing)
    want = http1.write_request(method, target, head, http1.FRAMING_LENGTH if framing else http1.FRAMING_NONE,
                               max(length, 0))
    if got is None:
        # Only when the Python path has header names to drop that the writer does not know.
        assert hdrs._connection_tokens(full)
        return
    assert got == want
    # h11 reads it back: Host first, forwarding headers ours, framing as asked.
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(got)
    event = conn.next_event()
    names = [k.lower() for k, _ in event.headers]
    assert names[0] == b"host" and names.count(b"host") == 1
    assert (b"content-length" in names) == (length >= 0) and b"transfer-encoding" not in names
    assert dict(event.headers)[b"x-forwarded-for"] == ip.encode()


@settings(max_examples=300, deadline=None)
@given(full=_full(), framing=st.sampled_from([http1.FRAMING_LENGTH, http1.FRAMING_CHUNKED, http1.FRAMING_NONE]),
       keep=st.booleans(), status=st.sampled_from([200, 404, 503, 207]), reason=st.sampled_from([b"OK", b""]))
def test_write_answer_is_answer_headers_then_write_response(full, framing, keep, status, reason):
    got = write_answer(status, reason, full, framing, 64, keep)
    if got is None:
        assert hdrs._connection_tokens(full)
        return
    assert got == http1.write_response(status, reason, hdrs.answer_headers(full), framing, 64, keep)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(got)
    event = conn.next_event()
    names = [k.lower() for k, _ in event.headers]
    assert not set(names) & (hdrs.HOP_BY_HOP - {b"connection", b"transfer-encoding"})
    assert (b"connection" in names) == (not keep)
