"""Judging a server's answer to one fuzzed request (no hypothesis here).

``classify(command, version, answer)`` returns a ``Verdict``: ``ok`` or one of
the failure kinds

- ``http-5xx``: any 5xx except 501 (the server does not implement the command)
  and 503 with Retry-After (load shedding, MS-ASHTTP: the client backs off);
- ``reset``: the connection closed or reset before a whole answer
  (``classify_error``), ``hang``: no answer within the deadline;
- ``malformed-wbxml``: a 200 answer that claims WBXML (by content type or the
  03 01 header) but does not decode, or an unparseable multipart answer;
- ``wrong-root``: a WBXML answer whose root is not the command's own element;
- ``status-out-of-range``: a Status element with a value MS-ASCMD does not
  define for it at that protocol version (spec.status_ok).
4xx answers are ok: refusing a broken request is the point.
"""
from __future__ import annotations

import msgspec

from seg_fast.eas.multipart import parse_multipart
from seg_fast.eas.wbxml import Element, decode
from seg_fast.errors import MultipartError, WBXMLError
from seg_fast.testing import spec

FAILURES = ("http-5xx", "reset", "hang", "malformed-wbxml", "wrong-root", "status-out-of-range")


class Answer(msgspec.Struct, kw_only=True):
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class Verdict(msgspec.Struct, frozen=True):
    kind: str            # "ok", "parked" (a long poll that did not answer: allowed) or one of FAILURES
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind in FAILURES


OK = Verdict("ok")


def answer_document(answer: Answer) -> Element | None:
    """The WBXML tree of an answer (part 0 of a multipart one), None when it has none.
    Raises WBXMLError/MultipartError when it claims one but it does not decode."""
    ctype = (answer.header("content-type") or "").lower()
    body = answer.body
    if "multipart" in ctype:
        parts = parse_multipart(body)
        return decode(bytes(parts[0])) if parts and len(parts[0]) else None
    if "wbxml" in ctype or body[:2] == b"\x03\x01":
        return decode(body) if body else None
    return None


def classify(command: str, version: str, answer: Answer) -> Verdict:
    if answer.status >= 500:
        if answer.status == 501 or (answer.status == 503 and answer.header("retry-after")):
            return OK
        return Verdict("http-5xx", f"HTTP {answer.status}")
    if answer.status != 200:
        return OK
    try:
        doc = answer_document(answer)
    except (WBXMLError, MultipartError) as exc:
        return Verdict("malformed-wbxml", str(exc))
    if doc is None:
        return OK
    root = spec.ROOTS.get(command)
    if root is not None and doc.tag != root:
        return Verdict("wrong-root", f"answer root {doc.tag}, expected {root}")
    v = spec.vnum(version) if version else 161
    for el in doc.iter():
        if el.tag.endswith(":Status") and el.text is not None and not spec.status_ok(el.tag, el.text, v):
            return Verdict("status-out-of-range", f"{el.tag} = {el.text!r} at {version}")
    return OK


def classify_error(exc: BaseException) -> Verdict:
    """A transport error while waiting for the answer."""
    return Verdict("reset", f"{type(exc).__name__}: {exc}")
