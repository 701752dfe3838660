"""Mail-server connections NTLM/Negotiate authenticated, kept for one device connection.

NTLM and Negotiate authenticate a connection, not a request (MS-NLMP, RFC 4559): the
handshake's legs (type 1 -> 401 challenge -> type 3) must reach the mail server on one
connection, and the server then takes later requests on it, even without credentials,
as the user it authenticated. So such a connection never goes back to the shared pool:
it is pinned to the device connection (its stream) that authenticated it, used by that
device connection's next request alone, and closed with it. Used by ActiveSync
(exchange.py) and EWS/webmail (passthrough.py) alike.

The policy decision follows the mail server: a request without credentials on a pinned
connection is decided as the pin's user (``inherit``); before the type 3 was accepted
there is no user (identity NONE, so policy.user_without_credential applies to User=).
"""
from __future__ import annotations

import weakref

import h11

from seg_fast.eas import credentials
from seg_fast.proxy.upstream import Origin, UpstreamConn


class Pin:
    """A device connection's authenticated mail-server connection (``up`` None while a
    request holds it, or once let go) and the user it was authenticated for."""

    __slots__ = ("up", "origin", "scheme", "user")

    def __init__(self):
        self.up: UpstreamConn | None = None
        self.origin: Origin | None = None
        self.scheme = ""
        self.user: str | None = None

    def drop(self, pool) -> None:
        if self.up is not None:
            pool.discard(self.up)
            self.up = None


class Pins:
    def __init__(self):
        # Device stream -> Pin: weak, so a device connection gone takes its pin along.
        # Tested per request as `by_stream.data` (the plain dict): the weak dict's len() is Python code.
        self.by_stream: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _get(self, stream) -> Pin | None:
        try:
            return self.by_stream.get(stream)
        except TypeError:                 # a stream that cannot be weakly referenced was never pinned
            return None

    def inherit(self, stream, req, origin: Origin) -> bool:
        """A request without credentials on a device connection with a pinned connection to
        ``origin``: decided as the user the mail server will take it for. False if the
        request's User= names another user (the caller refuses it)."""
        pin = self._get(stream)
        if pin is None or pin.up is None or req.auth_scheme or pin.origin != origin:
            return True
        if pin.user and req.user and not credentials.same_user(req.user, pin.user):
            return False
        req.auth_scheme, req.user = pin.scheme, pin.user or req.user
        req.identity = credentials.CREDENTIAL if pin.user else credentials.NONE
        return True

    def take(self, pool, stream, origin: Origin, scheme: str) -> UpstreamConn | None:
        """The pinned connection this request may use (taken out of the pin), or None. A
        request with another scheme's credentials (Basic, Bearer) or for another origin
        lets it go."""
        pin = self._get(stream)
        if pin is None or pin.up is None:
            return None
        up, pin.up = pin.up, None
        if pin.origin != origin or (scheme and scheme not in credentials.CONNECTION_SCHEMES) \
                or not up.looks_alive():
            pool.discard(up)
            return None
        up.reused = True
        return up

    def keep(self, pool, stream, up: UpstreamConn, origin: Origin, req, status: int, closing: bool) -> None:
        """After an NTLM/Negotiate request's answer: pin ``up`` to the device connection, or
        close it if it cannot carry another request (or the device connection closes)."""
        h = up._h11
        if h is None:
            done = up.reusable        # the fast path read the answer to its end, keep-alive
        else:
            done = h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0]
        if closing or not done:
            pool.discard(up)
            return
        up._h11, up.reusable, up.sent, up.rest = None, False, None, b""     # next request: a fresh cycle
        pin = self.by_stream.get(stream)
        if pin is None:
            pin = self.by_stream[stream] = Pin()
            # The device connection gone (its stream freed), the pinned connection closes too.
            weakref.finalize(stream, pin.drop, pool)
        if req.identity == credentials.HANDSHAKE or status == 401:
            pin.user = None                   # a handshake under way, or refused: nobody yet
        elif req.identity == credentials.CREDENTIAL and req.user:
            pin.user = req.user               # an NTLM type 3 the mail server accepted
        pin.up, pin.origin, pin.scheme = up, origin, req.auth_scheme


PINS = Pins()       # one per worker process: keyed by device streams, which are its own
