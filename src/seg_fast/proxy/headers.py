"""Header rewriting between the device leg and the mail-server leg (RFC 9110 7.6.1)."""
from __future__ import annotations

Headers = list[tuple[bytes, bytes]]

# Connection-level headers that never cross a proxy.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})


def _connection_tokens(raw: Headers) -> frozenset[bytes]:
    tokens = set()
    for name, value in raw:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def end_to_end(raw: Headers) -> tuple[Headers, bool]:
    """Drop hop-by-hop headers; also say whether the message was chunked."""
    extra = _connection_tokens(raw)
    out = []
    chunked = False
    for name, value in raw:
        low = name.lower()
        if low == b"transfer-encoding":
            chunked = True
            continue
        if low in HOP_BY_HOP or low in extra:
            continue
        out.append((name, value))
    return out, chunked


def upstream_request_headers(raw: Headers, *, host: bytes, client_ip: str, proto: bytes,
                             behind_proxy: bool) -> Headers:
    """The device's request headers as the mail server gets them."""
    out, chunked = end_to_end(raw)
    fwd_for = None
    fwd_proto = None
    headers: Headers = []
    for name, value in out:
        low = name.lower()
        if low == b"host" or low == b"expect":
            continue                  # Host names the mail server; the gateway answers 100-continue itself
        if low == b"x-forwarded-for":
            fwd_for = value
            continue
        if low == b"x-forwarded-proto":
            fwd_proto = value
            continue
        headers.append((name, value))
    ip = client_ip.encode()
    headers.insert(0, (b"Host", host))
    headers.append((b"X-Forwarded-For", fwd_for + b", " + ip if fwd_for and behind_proxy else ip))
    # Behind a TLS-terminating load balancer the balancer knows the device's scheme.
    headers.append((b"X-Forwarded-Proto", fwd_proto if fwd_proto and behind_proxy else proto))
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    return headers


def answer_headers(raw: Headers) -> Headers:
    """The mail server's answer headers as the device gets them (h11 re-frames the body)."""
    out, _ = end_to_end(raw)
    return out


def get(raw: Headers, name: bytes) -> bytes | None:
    for key, value in raw:
        if key.lower() == name:
            return value
    return None


def replace(raw: Headers, name: bytes, value: bytes) -> Headers:
    """Every header but ``name``, then ``name: value``."""
    return [(k, v) for k, v in raw if k.lower() != name] + [(name, value)]
