"""Ping long-polls: the heartbeat that sets how long the mail server may take to answer.

The first Ping of a device carries HeartbeatInterval (MS-ASCMD 2.2.3.79.1); later
empty Pings reuse it, so the gateway caches it per (user, device).
"""
from __future__ import annotations

from seg_fast.errors import WBXMLError

# MS-ASWBXML code page 13 (Ping): HeartbeatInterval.
PING_PAGE = 13
HEARTBEAT_TAG = "HeartbeatInterval"
MAX_CACHED = 500_000


def heartbeat_of(body: bytes) -> int | None:
    """The HeartbeatInterval (seconds) of a Ping request body, or None."""
    if not body:
        return None
    try:
        from seg_fast.eas.wbxml import decode
    except ImportError:          # the codec is not built: fall back to the configured default
        return None
    try:
        tree = decode(body)
    except (WBXMLError, ValueError):
        return None
    text = _find_text(tree, HEARTBEAT_TAG)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 1 <= value <= 3540 else None


def _find_text(node, name: str) -> str | None:
    stack = [node]
    while stack:
        item = stack.pop()
        tag = getattr(item, "tag", None)
        if tag is not None and (tag == name or str(tag).endswith(":" + name)):
            text = getattr(item, "text", None)
            if isinstance(text, bytes):
                text = text.decode("ascii", "replace")
            return text
        stack.extend(getattr(item, "children", ()) or ())
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
