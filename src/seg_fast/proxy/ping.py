"""Ping long-polls: the heartbeat that sets how long the mail server may take to answer.

The first Ping of a device carries HeartbeatInterval (MS-ASCMD 2.2.3.79.1); later
empty Pings reuse it, so the gateway caches it per (user, device).
"""
from __future__ import annotations

from seg_fast.errors import WBXMLError

HEARTBEAT_TAGS = frozenset({"Ping:HeartbeatInterval"})
MAX_CACHED = 500_000


def heartbeat_of(body: bytes) -> int | None:
    """The HeartbeatInterval (seconds) of a Ping request body, or None."""
    if not body:
        return None
    from seg_fast.eas.wbxml import scan

    try:
        spans = scan(body, HEARTBEAT_TAGS)
    except WBXMLError:
        return None                    # the mail server judges a malformed Ping; we only time it
    for span in spans:
        if span.kind == "str" and span.path == ("Ping:Ping",):
            try:
                value = int(body[span.offset:span.offset + span.length])
            except ValueError:
                return None
            # MS-ASCMD 2.2.3.79.1: servers accept 60..3540 s; outside it the server answers at once.
            return value if 1 <= value <= 3540 else None
    return None


def upstream_deadline(gw, req, body: bytes | None) -> float:
    """Seconds the gateway waits for the mail server to answer this Ping."""
    timeouts = gw.config.timeouts
    key = (req.user or "", req.device_id or "")
    beat = heartbeat_of(body or b"")
    cache = gw.heartbeats
    if beat is not None:
        if key not in cache and len(cache) >= MAX_CACHED:
            cache.pop(next(iter(cache)))          # oldest first: dicts keep insertion order
        cache[key] = beat
    else:
        beat = cache.get(key, timeouts.ping_default_heartbeat)
    return beat + timeouts.ping_margin


# A Ping answer with Status 1 ("the heartbeat interval expired before any changes"),
# sent to parked Pings when a worker drains: the device simply pings again.
HEARTBEAT_EXPIRED = bytes.fromhex("03016a00000d4547033100 0101".replace(" ", ""))
HEARTBEAT_EXPIRED_HEADERS = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]


async def wait_answer(gw, up, timeout: float):
    """The mail server's answer head to a parked Ping, or None if the worker drains first."""
    import trio

    from seg_fast.proxy.exchange import _answer_head

    scope = trio.CancelScope()
    if gw.draining:
        scope.cancel()
    gw.parked_scopes.add(scope)
    try:
        with scope:
            return await _answer_head(up, timeout)
    finally:
        gw.parked_scopes.discard(scope)
    return None
