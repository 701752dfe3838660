"""The gateway's own log: one JSON object per line, to stderr or `log.file`.

Every area (the admin page's logging areas: policy updates, policy cache, content,
reporting, health, admin...) is a logger under ``seg_fast``; `log.level` sets them
all at start and the admin API can change one area at run time. Messages are the
gateway's own sentences: never a body, a password or a token (nothing calls the
log with one). SIGUSR1 reopens the files (logrotate's ``postrotate``).
"""
from __future__ import annotations

import logging
import os
import sys

import msgspec

ROOT = "seg_fast"
_encoder = msgspec.json.Encoder()


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "area": record.name.removeprefix(ROOT + ".") or ROOT,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            # The exception's type and text, not a traceback: tracebacks show locals' reprs.
            out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return _encoder.encode(out).decode()


class ReopenableHandler(logging.StreamHandler):
    """stderr, or a file that `reopen()` opens anew after logrotate moved it."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(sys.stderr if path in ("", "-") else self._open())

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", buffering=1)

    def reopen(self) -> None:
        if self.path in ("", "-"):
            return
        self.acquire()
        try:
            old, self.stream = self.stream, self._open()
            old.close()
        finally:
            self.release()


_handler: ReopenableHandler | None = None


def configure(config) -> None:
    """Send every ``seg_fast`` logger to `log.file` as JSON lines at `log.level`."""
    global _handler
    from seg_fast.policy.gate import LOG_AREAS, LOG_LEVELS

    root = logging.getLogger(ROOT)
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    _handler = ReopenableHandler(config.log.file)
    _handler.setFormatter(JsonLines())
    root.addHandler(_handler)
    root.propagate = False
    level = LOG_LEVELS[config.log.level]
    root.setLevel(level)
    # The transaction areas decide what the transaction log writes and keep their own
    # defaults (summary on, "all" and "blocked" off), whatever log.level says.
    from seg_fast.observe import refresh_levels

    for area, name in LOG_AREAS.items():
        logger = logging.getLogger(name)
        if not area.startswith(("transaction", "device_transactions")):
            logger.setLevel(logging.NOTSET)                      # follow log.level
        elif logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)                     # off unless the admin turns it on
    refresh_levels()


def reopen() -> None:
    if _handler is not None:
        _handler.reopen()
