"""The compiled HTTP/1.1 fast path (``_http1``) and how its results become h11 events.

h11 stays the reference: a parser answers NEED_MORE, a head (the fields of the
event h11 would produce, with framing and keep-alive), DEFER (give the same bytes
to h11) or raises HTTPProtocolError with the status h11 would hint.
tests/test_http1.py checks that against h11 itself.
"""
from __future__ import annotations

import h11

from seg_fast.proxy import headers as _headers
from seg_fast.proxy._http1 import (  # noqa: F401  (the module's public names)
    DEFER,
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    FRAMING_NONE,
    NEED_MORE,
    ChunkedDecoder,
    RequestHead,
    ResponseHead,
    parse_request,
    parse_response,
    write_answer,
    write_request,
    write_response,
    write_upstream,
)


_END = h11.EndOfMessage()


def request_event(head: RequestHead):
    """The h11.Request h11's parser would have made from the same bytes."""
    return _headers.request_event(head.method, head.target, head.headers)


def response_event(head: ResponseHead):
    """The h11.Response for a final head (informational heads are 1xx: ask ``head.informational``)."""
    return _headers.response_event(head.status_code, head.headers, head.reason)


def prime_h11(conn, head: RequestHead, rest: bytes = b"", event=None):
    """Leave a server-side h11.Connection (IDLE) where parsing ``head`` itself would have left
    it (request method, HTTP version, body framing, keep-alive; ``rest``, what followed the
    head, buffered as the body) and return the h11.Request (``event``, if already made from
    ``head``). The event goes through h11's own state machine (``_process_event``, what
    ``next_event`` calls after its parser), so the rest of the exchange runs through h11
    unchanged; tests/test_http1.py checks that the events, states and answer bytes that
    follow are h11's own."""
    if event is None:
        event = request_event(head)
    process = getattr(conn, "_process_event", None)
    if process is None:                           # pragma: no cover - an h11 without it: parse a canned head
        conn.receive_data(write_request(head.method, b"/", _CANNED_HOST, head.framing, head.length,
                                        head.keep_alive))
        conn.next_event()
    else:
        process(conn.their_role, event)
    if rest:
        conn.receive_data(rest)
    return event


_CANNED_HOST = [(b"Host", b"host", b"x")]


def body_done(conn) -> None:
    """Tell an h11.Connection that the peer's message body ended, without h11 reading it:
    the fast path read it itself (a whole Content-Length body). What ``next_event`` does
    when its reader returns EndOfMessage."""
    conn._process_event(conn.their_role, _END)


def sent(conn, event) -> None:
    """Tell an h11.Connection that ``event`` (a Request, Response or EndOfMessage) went out
    without h11 writing it: the fast path wrote it (write_request, write_response). What
    ``send`` does besides serialising."""
    conn._process_event(conn.our_role, event)


def prime_h11_response(conn, head: ResponseHead, rest: bytes = b""):
    """The client side of prime_h11: an h11.Connection that sent its request gets the
    mail server's answer head without parsing it; returns the h11 Response (or
    InformationalResponse for a 1xx). Body framing follows h11's rules for the request's
    method (HEAD, 204, 304), as ``head.framing`` does."""
    if head.informational:
        import h11

        event = object.__new__(h11.InformationalResponse)
        for name, value in (("status_code", head.status_code), ("headers", _headers._H11Headers(head.headers)),
                            ("http_version", b"1.1"), ("reason", head.reason)):
            object.__setattr__(event, name, value)
    else:
        event = response_event(head)
    conn._process_event(conn.their_role, event)
    if rest:
        conn.receive_data(rest)
    return event
