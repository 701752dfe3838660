"""451 / 3xx redirects from the mail server: the device is sent back to the gateway.

The mail server names another server (X-MS-Location for 451, Location for any 3xx:
Exchange's 302, Domino's 301 from /servlet/traveler to /traveler, a 307/308 to TLS);
the device is told the gateway's own URL (listener.external_url) with the same
path, and the gateway remembers, per user, to forward that user's requests to the
named server.

One rule for every such redirect, whatever host it names: an ActiveSync device only
speaks ActiveSync, so wherever the mail server sends it serves ActiveSync for that
user. Passing another host's URL on would let the device leave the gateway (and its
policy) and would tell it an internal name; so an absolute (or scheme-relative)
http(s) Location always becomes the gateway's URL. A relative one ("/traveler") is
passed as it is: the device resolves it against the gateway's URL already. With a gatekeeper that shares them (``redirects`` dict and
``note_redirect``: the policy store), every worker and every node forwards the user
there; otherwise the mapping is this worker's own.

The device's Host header is never used to build that URL: it is the device's to
choose (or a load balancer's internal name). Without external_url the device gets
503 with Retry-After instead, and its retry, to the URL it already uses, reaches
the new server through the mapping; a 3xx that changes the path gets a relative
Location (the new path alone) instead, since a retry on the old path would loop.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from seg_fast.proxy import headers as hdrs
from seg_fast.proxy.upstream import Origin, UpstreamError, origin_of

MAX_USERS = 200_000


RETRY_AFTER = b"1"       # seconds: the mapping is in force at once, the retry can follow


def is_redirect(status: int) -> bool:
    """A mail-server answer whose Location (X-MS-Location for 451) rewrite() handles
    (304 Not Modified is a 3xx that sends nowhere)."""
    return status == 451 or (300 <= status < 400 and status != 304)


class RedirectMap:
    def __init__(self, default: Origin, external_url: str = ""):
        self.default = default
        # scheme://host[:port] devices reach the gateway at (no trailing slash); b"": unknown.
        self.external = external_url.rstrip("/").encode("ascii")
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

    def rewrite(self, req, status: int, headers: hdrs.Full, reason: bytes) -> tuple[int, hdrs.Full, bytes]:
        """The (status, headers, reason) the device gets for the mail server's 451/3xx."""
        name = b"x-ms-location" if status == 451 else b"location"
        location = None
        for _, low, value in headers:
            if low == name:
                location = value
                break
        if location is None:
            return status, headers, reason
        try:
            text = location.decode("ascii").strip()
            if text.startswith("//"):         # scheme-relative: the scheme of the server that said it
                text = f"{self.origin_for(req.user).scheme}:{text}"
            target = origin_of(text)
        except (UnicodeDecodeError, UpstreamError):
            return status, headers, reason  # not an absolute http(s) URL: pass it on as it is
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
        path = parts.path or "/"
        if not self.external:
            if status != 451 and req.path and path != req.path:
                # A path change (Domino's /servlet/traveler -> /traveler): a retry where the
                # device is would loop; a relative Location names no host (RFC 9110 10.2.2).
                own = (path + ("?" + parts.query if parts.query else "")).encode()
                return status, [(raw, low, own) if low == name else (raw, low, value)
                                for raw, low, value in headers], reason
            kept = [item for item in headers if item[1] != name and item[1] != b"retry-after"]
            kept.append((b"Retry-After", b"retry-after", RETRY_AFTER))
            return 503, kept, b"Service Unavailable"
        own = self.external + path.encode() + (b"?" + parts.query.encode() if parts.query else b"")
        return status, [(raw, low, own) if low == name else (raw, low, value) for raw, low, value in headers], reason
