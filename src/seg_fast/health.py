"""`/healthz` and `/readyz` for load balancers, served by the control process.

Unauthenticated on purpose (a load balancer has no token), so they say nothing but
yes or no and a few words why: no versions, no host names, no counts.

- ``GET /healthz``: 200 while the control process runs and at least one worker is alive.
- ``GET /readyz``: 200 when the gateway can serve devices: policies loaded (or
  ``policy.allow_if_no_policies``), the policy store answered at the last check, and
  the mail server accepted a connection at the last check; else 503.

The listener faces the network the load balancer is on, so it is as guarded as the
device listener: one small head per connection, a deadline for it, a connection cap,
every error kept to its connection.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import h11
import msgspec
import trio

from seg_fast.proxy.headers import reason_phrase

log = logging.getLogger("seg_fast.health")

MAX_HEAD = 4096
HEAD_DEADLINE = 5.0
MAX_CONNECTIONS = 64


class Readiness:
    """What the last checks found; refreshed every ``health.check_interval`` seconds."""

    def __init__(self, allow_if_no_policies: bool):
        self.allow_if_no_policies = allow_if_no_policies
        self.policies_loaded = False
        self.store_ok = False
        self.upstream_ok = False
        self.checked_at = 0.0

    def problems(self) -> list[str]:
        if not self.checked_at:
            return ["starting"]
        out = []
        if not self.store_ok:
            out.append("policy store unreachable")
        elif not self.policies_loaded and not self.allow_if_no_policies:
            out.append("no policies loaded")
        if not self.upstream_ok:
            out.append("mail server unreachable")
        return out


async def check_store(ready: Readiness, store) -> None:
    try:
        doc = await store.get_document()
    except Exception as exc:          # an unreachable or broken store is a "not ready", not a crash
        log.warning("readiness: policy store: %s", exc)
        ready.store_ok = False
        return
    ready.store_ok = True
    ready.policies_loaded = doc is not None


async def check_upstream(ready: Readiness, pool, origin) -> None:
    from seg_fast.proxy.upstream import UpstreamError

    try:
        conn = await pool.connect(origin)
    except UpstreamError as exc:
        if ready.upstream_ok:
            log.warning("readiness: %s", exc)
        ready.upstream_ok = False
        return
    ready.upstream_ok = True
    await conn.aclose()


async def keep_checking(config, ready: Readiness) -> None:
    from seg_fast.policy.store import open_store
    from seg_fast.proxy.upstream import UpstreamPool, origin_of

    pool = UpstreamPool(config.upstream, config.timeouts)
    origin = origin_of(config.upstream.url)
    store = open_store(config.policy)
    opened = False
    try:
        while True:
            if not opened:
                try:
                    await store.open()
                    opened = True
                except Exception as exc:
                    log.warning("readiness: policy store: %s", exc)
            if opened:
                await check_store(ready, store)
            await check_upstream(ready, pool, origin)
            ready.checked_at = time.time()
            await trio.sleep(config.health.check_interval)
    finally:
        if opened:
            with trio.CancelScope(shield=True):
                await store.aclose()


def answer_for(target: bytes, ready: Readiness, workers_alive: int) -> tuple[int, bytes]:
    path = target.split(b"?", 1)[0]
    if path == b"/healthz":
        if workers_alive > 0:
            return 200, b'{"status":"ok"}'
        return 503, b'{"status":"down","why":["no worker running"]}'
    if path == b"/readyz":
        problems = ready.problems()
        if workers_alive <= 0:
            problems.insert(0, "no worker running")
        if not problems:
            return 200, b'{"status":"ready"}'
        return 503, msgspec.json.encode({"status": "not ready", "why": problems})
    return 404, b'{"status":"not found"}'


async def _serve_one(stream, ready: Readiness, workers_alive: Callable[[], int]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        with trio.move_on_after(HEAD_DEADLINE):           # the whole head, not each read
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(MAX_HEAD)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                break
            if isinstance(event, h11.Request):
                if event.method in (b"GET", b"HEAD"):
                    status, body = answer_for(event.target, ready, workers_alive())
                else:
                    status, body = 405, b'{"status":"method not allowed"}'
            else:
                return
            headers = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode()),
                       (b"Cache-Control", b"no-store"), (b"Connection", b"close")]
            out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason_phrase(status)))
            if event.method != b"HEAD":
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
    except h11.RemoteProtocolError:
        try:
            with trio.move_on_after(1):
                await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception as exc:          # never let one probe end the listener
        log.warning("health: %s: %s", type(exc).__name__, exc)
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def run(config, workers_alive: Callable[[], int], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``health.host:health.port`` until cancelled; reports the bound port."""
    from seg_fast.errors import StartupError

    ready = Readiness(config.policy.allow_if_no_policies)
    try:
        listeners = await trio.open_tcp_listeners(config.health.port, host=config.health.host)
    except OSError as exc:
        raise StartupError(f"key health.port: cannot listen on {config.health.host}:{config.health.port}: "
                           f"{exc.strerror or exc}") from None
    open_now = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_checking, config, ready)
        task_status.started(listeners[0].socket.getsockname()[1])
        while True:
            stream = await listeners[0].accept()
            if open_now >= MAX_CONNECTIONS:          # refused cheaply: a flood cannot grow memory
                await trio.aclose_forcefully(stream)
                continue
            open_now += 1

            async def one(stream=stream):
                nonlocal open_now
                try:
                    await _serve_one(stream, ready, workers_alive)
                finally:
                    open_now -= 1
            nursery.start_soon(one)
