"""The seams between the proxy shell, the policy engine and the content pipeline.

The proxy knows only these shapes: it asks a Gatekeeper for a Decision per
request, answers a blocked device with what the Gatekeeper builds, and runs the
Decision's transforms over answers it would otherwise stream untouched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec
import trio

if TYPE_CHECKING:
    from seg_fast.eas.request import EasRequest

Headers = list[tuple[bytes, bytes]]


class Transform(Protocol):
    """A pure rewrite of one answer (or request) body; never does I/O."""

    # EAS command names this transform looks at ("Sync", "ItemOperations", ...).
    commands: frozenset[str]

    def transform_answer(self, req: "EasRequest", status: int, headers: Headers, body: bytes) -> bytes:
        """Return the new answer body (the proxy fixes Content-Length)."""
        ...

    # Optional: a Transform that must also change the answer's headers (the Content-Type
    # and Content-Disposition of an attachment it sealed or replaced) defines
    #     transform_answer_and_headers(req, status, headers, body) -> (headers, body)
    # and the proxy calls it instead of transform_answer. Headers are (name, value) byte
    # pairs; Content-Length is the proxy's to fix either way.
    # Optional too: transform_answer_parts(req, status, headers, body) -> (headers, body),
    # preferred over both, may return the body as a list of bytes-like parts (gather
    # output pointing into the answer it was given); the proxy writes them with writev.


class RequestTransform(Protocol):
    """A transform that must see the device's request body before it goes upstream.

    It returns the body to forward, or None to refuse the request (the proxy then
    answers with ``Gatekeeper.blocked_answer``).
    """

    commands: frozenset[str]

    def transform_request(self, req: "EasRequest", body: bytes) -> bytes | None: ...


class Decision(msgspec.Struct, frozen=True):
    allowed: bool
    # Stable code a dashboard can show: "allowed.whitelisted", "blocked.no_policies", ...
    reason: str
    # Transform / RequestTransform objects for this request; empty means stream untouched.
    transforms: tuple = ()
    # Test mode: the decision was "blocked" but the request is let through and recorded.
    test_mode: bool = False


class Gatekeeper(Protocol):
    def decide(self, req: "EasRequest") -> Decision:
        """Pure and fast: no I/O on the request path."""
        ...

    def blocked_answer(self, req: "EasRequest", decision: Decision) -> tuple[int, Headers, bytes]:
        """The answer a blocked device understands for its protocol version."""
        ...

    def record(self, req: "EasRequest", decision: Decision, status: int) -> None:
        """Note what the gateway saw (device discovery); must not block."""
        ...

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background upkeep (snapshot refresh, change subscription) for one worker."""
        ...


class AllowAll:
    """The gatekeeper before any policy is configured: lets everything through."""

    def decide(self, req: "EasRequest") -> Decision:
        return ALLOW_ALL

    def blocked_answer(self, req: "EasRequest", decision: Decision) -> tuple[int, Headers, bytes]:
        return 403, [(b"content-length", b"0")], b""

    def record(self, req: "EasRequest", decision: Decision, status: int) -> None:
        pass

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


ALLOW_ALL = Decision(allowed=True, reason="allowed.no_gatekeeper")
