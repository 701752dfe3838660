"""What hostile or broken traffic did to a worker: counters, and a rate-limited JSON log.

Every exception contained at a connection, every connection refused at accept and
every deadline that ends a connection is counted here (``Incidents.counts``, read
by metrics) and logged as one JSON object per line on stderr, at most one line per
kind per second (the line says how many were not logged since), so a flood of bad
requests cannot flood the log. A line never holds a body or a header value: byte
strings quoted in an exception's message (h11 quotes the offending line, which may
be an Authorization header) are replaced by their length.
"""
from __future__ import annotations

import json
import re
import sys
import time
import traceback

# bytearray(b'...') / b'...' / b"..." as repr() writes them
_BYTES_REPR = re.compile(rb"""(?:bytearray\()?b(['"])(?:\\.|(?!\1).)*\1\)?""".decode(), re.S)


def redact(message: str, limit: int = 200) -> str:
    """An exception message without the bytes it quotes."""
    return _BYTES_REPR.sub(lambda m: f"<{len(m.group(0))} chars>", message)[:limit]


def where(exc: BaseException) -> str:
    """file:line of the innermost seg_fast frame (and the library's), for finding a bug
    without a traceback per request."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    ours = [f for f in tb if "seg_fast" in f.filename]
    frame, inner = (ours or tb)[-1], tb[-1]
    text = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    if inner is not frame:            # raised inside a library (h11): name where, too
        text += f" > {inner.filename.rsplit('/', 1)[-1]}:{inner.lineno}"
    return text


class Incidents:
    """Counts by kind, and at most one log line per kind per second."""

    def __init__(self, stream=None, interval: float = 1.0):
        self.stream = stream
        self.interval = interval
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def note(self, kind: str, **fields) -> None:
        if self._count(kind):
            self._write(kind, fields)

    def _count(self, kind: str) -> bool:
        """Count one; True if a line is due for this kind."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.interval:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return False
        self._last[kind] = now
        return True

    def _write(self, kind: str, fields: dict) -> None:
        line = {"ts": round(time.time(), 3), "incident": kind, **fields}
        skipped = self._unlogged.pop(kind, 0)
        if skipped:
            line["not_logged_since_last"] = skipped
        try:
            # One write per line: workers share stderr, and a pipe keeps writes under 4 KB whole.
            out = self.stream or sys.stderr
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
            out.flush()
        except (OSError, ValueError):
            pass                      # a closed or full stderr must not end the worker

    def exception(self, kind: str, exc: BaseException, client_ip: str) -> None:
        # A burst (thousands of slowloris cut in one tick) costs a count each; the
        # message and the traceback walk only for the line that is written.
        if self._count(kind):
            self._write(kind, {"client_ip": client_ip, "error": type(exc).__name__,
                               "message": redact(str(exc)), "at": where(exc)})
