"""Header rewriting between the device leg and the mail-server leg (RFC 9110 7.6.1).

The hot path works on h11's own header triples (name as sent, lower-case name,
value), so no name is lower-cased twice, and hands them back to h11 as a
``Headers`` object, which h11 takes without normalising again. Every header in
them was validated by h11's parser or is one of ours, built well-formed here.
"""
from __future__ import annotations

import functools
import ipaddress
from http import HTTPStatus

import h11

Headers = list[tuple[bytes, bytes]]
Full = list[tuple[bytes, bytes, bytes]]          # (name as sent, lower-case name, value)

# Connection-level headers that never cross a proxy.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Request headers the gateway sets itself (Host names the mail server; the gateway
# answers 100-continue itself; the forwarding headers are rebuilt).
_REQUEST_OWN = frozenset({b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto"})
# What a proxy says about the device: passed on from a trusted proxy, dropped from anyone else
# (a device must not choose the address or scheme the mail server believes).
_FORWARDING = frozenset({b"forwarded", b"x-real-ip", b"x-forwarded-host", b"x-forwarded-port"})
_REQUEST_DROP = HOP_BY_HOP | _REQUEST_OWN | _FORWARDING
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

_H11Headers = type(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"h")]).headers)


def items(headers) -> Full:
    """The triples of an h11 event's headers (h11's own list: do not modify it)."""
    full = getattr(headers, "_full_items", None)
    if full is None:                              # an h11 without the attribute
        full = [(name, name.lower(), value) for name, value in headers.raw_items()]
    return full


def pairs(full: Full) -> Headers:
    return [(raw, value) for raw, _, value in full]


def from_pairs(raw: Headers) -> Full:
    return [(name, name.lower(), value) for name, value in raw]


def facts(full: Full) -> tuple[bytes | None, bytes | None, bytes | None]:
    """Content-Length, Host and Connection of a request (the first of each), in one pass."""
    length = host = connection = None
    for _, low, value in full:
        if low == b"content-length":
            if length is None:
                length = value
        elif low == b"host":
            if host is None:
                host = value
        elif low == b"connection" and connection is None:
            connection = value
    return length, host, connection


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})     # hop-by-hop already


def _connection_tokens(full: Full) -> frozenset[bytes]:
    """Header names the Connection header marks hop-by-hop (RFC 9110 7.6.1)."""
    tokens = set()
    for _, low, value in full:
        if low == b"connection" and value.lower() not in _PLAIN_CONNECTION:
            tokens.update(t.strip().lower() for t in value.split(b","))
    # Framing is the gateway's to decide (h11 parsed the body by it): a Connection
    # listing Content-Length must not make the body and its declared length disagree.
    return frozenset(tokens - _FRAMING)


def upstream_request_headers(full: Full, *, host: bytes, client_ip: str, proto: bytes,
                             behind_proxy: bool, framing: Full | None = None) -> Full:
    """The device's request headers as the mail server gets them.

    ``client_ip`` is the peer's address. ``behind_proxy``: the peer is a trusted proxy
    (listener.trusted_proxies), so its X-Forwarded-For chain is extended, its
    X-Forwarded-Proto kept and its Forwarded/X-Real-IP/X-Forwarded-Host/-Port passed
    on; from anyone else those are dropped and rebuilt from the connection itself.
    ``framing``: None keeps the device's body framing (the body streams through);
    otherwise the device's Content-Length/Transfer-Encoding give way to these headers
    (the body was read whole).
    """
    extra = _connection_tokens(full)
    fwd_for = fwd_proto = None
    chunked = False
    out: Full = [(b"Host", b"host", host)]
    append = out.append
    for item in full:
        low = item[1]
        if low in _REQUEST_DROP:
            if low == b"transfer-encoding":
                chunked = True
            elif low == b"x-forwarded-for":
                fwd_for = item[2] if fwd_for is None else fwd_for + b", " + item[2]
            elif low == b"x-forwarded-proto":
                fwd_proto = item[2]
            elif behind_proxy and low in _FORWARDING:
                append(item)
            continue
        if extra and low in extra:
            continue
        if framing is not None and low == b"content-length":
            continue
        append(item)
    ip = client_ip.encode()
    append((b"X-Forwarded-For", b"x-forwarded-for", fwd_for + b", " + ip if fwd_for and behind_proxy else ip))
    # Behind a TLS-terminating load balancer the balancer knows the device's scheme.
    append((b"X-Forwarded-Proto", b"x-forwarded-proto", fwd_proto if fwd_proto and behind_proxy else proto))
    if framing is not None:
        out += framing
    elif chunked:
        append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
    return out


class TrustedProxies:
    """listener.trusted_proxies: the addresses whose forwarding headers are believed.

    ``ip in proxies`` answers for a peer (cached per address); ``client_of`` walks the
    X-Forwarded-For chain from the right, past trusted proxies, to the first address
    that is not one: the device (the rest of the chain was written by whoever sent it).
    """

    MAX_CACHED = 4096

    def __init__(self, cidrs=()):
        # ValueError names the bad entry (config.py turns it into a ConfigError for the key).
        self.networks = tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, ip) -> bool:
        if not self.networks:
            return False
        known = self._known.get(ip)
        if known is None:
            addr = _address(ip)
            known = addr is not None and self._trusted(addr)
            if len(self._known) >= self.MAX_CACHED:
                self._known.clear()
            self._known[ip] = known
        return known

    def _trusted(self, addr) -> bool:
        return any(addr in net for net in self.networks if net.version == addr.version)

    def client_of(self, peer: str, headers) -> str:
        """The device's address behind the trusted proxy ``peer``."""
        chain = []
        real_ip = None
        for name, value in headers:
            low = name.lower()
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if low == b"x-forwarded-for" or low == "x-forwarded-for":
                chain += value.split(",")
            elif (low == b"x-real-ip" or low == "x-real-ip") and real_ip is None:
                real_ip = value
        if not chain and real_ip is not None:
            chain = [real_ip]
        client = peer
        for entry in reversed(chain):
            addr = _address(entry)
            if addr is None:
                break                      # garbage: the last address a trusted hop vouched for
            client = str(addr)
            if not self._trusted(addr):
                break
        return client


def _address(text: str):
    """An IP address from a forwarding entry ("1.2.3.4", "1.2.3.4:5678", "[::1]:443"), or None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def answer_headers(full: Full) -> Full:
    """The mail server's answer headers as the device gets them (h11 re-frames the body)."""
    extra = _connection_tokens(full)
    return [item for item in full if item[1] not in HOP_BY_HOP and not (extra and item[1] in extra)]


def content_length(n: int) -> Full:
    return [(b"Content-Length", b"content-length", str(n).encode())]


def get(raw: Headers, name: bytes) -> bytes | None:
    for key, value in raw:
        if key.lower() == name:
            return value
    return None


def replace(raw: Headers, name: bytes, value: bytes) -> Headers:
    """Every header but ``name``, then ``name: value``."""
    return [(k, v) for k, v in raw if k.lower() != name] + [(name, value)]


@functools.cache                  # statuses are three digits: at most 900 entries
def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for an answer the gateway makes itself (h11 writes none)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


# -- h11 events from triples ----------------------------------------------------------------
# The public constructors re-normalise and re-validate every header (the largest
# per-request cost in h11); these set the same fields h11's own parser sets.

def _fast_request(method: bytes, target: bytes, full: Full) -> h11.Request:
    event = object.__new__(h11.Request)
    setattr_ = object.__setattr__
    setattr_(event, "method", method)
    setattr_(event, "target", target)
    setattr_(event, "headers", _H11Headers(full))
    setattr_(event, "http_version", b"1.1")
    return event


def _fast_response(status: int, full: Full, reason: bytes) -> h11.Response:
    event = object.__new__(h11.Response)
    setattr_ = object.__setattr__
    setattr_(event, "status_code", status)
    setattr_(event, "headers", _H11Headers(full))
    setattr_(event, "http_version", b"1.1")
    setattr_(event, "reason", reason)
    return event


def _slow_request(method: bytes, target: bytes, full: Full) -> h11.Request:
    return h11.Request(method=method, target=target, headers=pairs(full), http_version=b"1.1")


def _slow_response(status: int, full: Full, reason: bytes) -> h11.Response:
    return h11.Response(status_code=status, headers=pairs(full), reason=reason, http_version=b"1.1")


def _fast_path_agrees() -> bool:
    # An h11 whose events differ from what these builders make gets its own constructors.
    full = [(b"Host", b"host", b"h"), (b"Content-Length", b"content-length", b"3")]
    try:
        return (_fast_request(b"POST", b"/x", full) == _slow_request(b"POST", b"/x", full)
                and _fast_response(200, full, b"OK") == _slow_response(200, full, b"OK")
                and h11.Connection(h11.CLIENT).send(_fast_request(b"POST", b"/x", full))
                == h11.Connection(h11.CLIENT).send(_slow_request(b"POST", b"/x", full)))
    except Exception:
        return False


if _fast_path_agrees():
    request_event, response_event = _fast_request, _fast_response
else:                                             # pragma: no cover - depends on the h11 release
    request_event, response_event = _slow_request, _slow_response
