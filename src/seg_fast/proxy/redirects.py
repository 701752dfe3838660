"""451 / 302 redirects from the mail server: the device is sent back to the gateway.

The mail server names another server (X-MS-Location for 451, Location for 302);
the device is told the gateway's own URL with the same path, and the gateway
remembers, per user, to forward that user's requests to the named server.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from seg_fast.proxy import headers as hdrs
from seg_fast.proxy.upstream import Origin, UpstreamError, origin_of

MAX_USERS = 200_000


class RedirectMap:
    def __init__(self, default: Origin):
        self.default = default
        self.by_user: dict[str, Origin] = {}

    def origin_for(self, user: str | None) -> Origin:
        if user and self.by_user:
            return self.by_user.get(user.lower(), self.default)
        return self.default

    def rewrite(self, req, status: int, headers, host: bytes, proto: bytes) -> list:
        name = b"x-ms-location" if status == 451 else b"location"
        location = hdrs.get(headers, name)
        if location is None:
            return headers
        try:
            text = location.decode("ascii")
            target = origin_of(text)
        except (UnicodeDecodeError, UpstreamError):
            return headers                  # not an absolute http(s) URL: pass it on as it is
        if req.user:
            key = req.user.lower()
            if key not in self.by_user and len(self.by_user) >= MAX_USERS:
                self.by_user.pop(next(iter(self.by_user)))
            if target == self.default:
                self.by_user.pop(key, None)
            else:
                self.by_user[key] = target
        parts = urlsplit(text)
        own = proto + b"://" + host + (parts.path or "/").encode() + (
            b"?" + parts.query.encode() if parts.query else b"")
        return [(k, own if k.lower() == name else v) for k, v in headers]
