"""451 / 302 redirects from the mail server: the device is sent back to the gateway.

The mail server names another server (X-MS-Location for 451, Location for 302);
the device is told the gateway's own URL with the same path, and the gateway
remembers, per user, to forward that user's requests to the named server. With a
gatekeeper that shares them (``redirects`` dict and ``note_redirect``: the policy
store), every worker and every node forwards the user there; otherwise the
mapping is this worker's own.
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
        self.shared: dict[str, str] | None = None     # user -> URL, kept current by the gatekeeper
        self._note = None
        self._origins: dict[str, Origin] = {}

    def attach(self, gatekeeper) -> None:
        """Share mappings through the gatekeeper when it can (optional attributes)."""
        shared = getattr(gatekeeper, "redirects", None)
        note = getattr(gatekeeper, "note_redirect", None)
        if isinstance(shared, dict) and note is not None:
            for key, origin in self.by_user.items():        # learned before: not lost
                if key not in shared:
                    note(key, f"{origin.scheme}://{origin.host_header.decode()}/")
            self.shared, self._note = shared, note
        else:
            self.shared, self._note = None, None

    def origin_for(self, user: str | None) -> Origin:
        if user and (self.shared or self.by_user):
            key = user.lower()
            if self.shared is not None:
                url = self.shared.get(key)
                return self.default if url is None else self._origin(url)
            return self.by_user.get(key, self.default)
        return self.default

    def _origin(self, url: str) -> Origin:
        origin = self._origins.get(url)
        if origin is None:
            try:
                origin = origin_of(url)
            except UpstreamError:
                origin = self.default       # a damaged shared entry: the default server
            if len(self._origins) >= 1024:
                self._origins.clear()
            self._origins[url] = origin
        return origin

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
        if req.user and self._note is not None:
            self._note(req.user.lower(), "" if target == self.default else text)
        elif req.user:
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
