"""The compiled HTTP/1.1 fast path (``_http1``) and how its results become h11 events.

h11 stays the reference: a parser answers NEED_MORE, a head (the fields of the
event h11 would produce, with framing and keep-alive), DEFER (give the same bytes
to h11) or raises HTTPProtocolError with the status h11 would hint.
tests/test_http1.py checks that against h11 itself.
"""
from __future__ import annotations

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
    write_request,
    write_response,
)


def request_event(head: RequestHead):
    """The h11.Request h11's parser would have made from the same bytes."""
    return _headers.request_event(head.method, head.target, head.headers)


def response_event(head: ResponseHead):
    """The h11.Response for a final head (informational heads are 1xx: ask ``head.informational``)."""
    return _headers.response_event(head.status_code, head.headers, head.reason)
