"""Transaction summaries: one JSON object per line per request.

What goes in is chosen field by field (identity, sizes, times, decision); bodies
and header values such as Authorization have no field to land in.
"""
from __future__ import annotations

import logging
import sys
import time

import msgspec

# The admin API's logging areas for transactions (seg_fast.policy.gate.LOG_AREAS): the
# records written follow these loggers' levels, enabled at INFO. By default every
# transaction summary is written; "device transactions: blocked" alone writes the
# blocked ones only.
SUMMARY_LOGGER = "seg_fast.tx.summary"
ALL_LOGGER = "seg_fast.tx.all"
BLOCKED_LOGGER = "seg_fast.tx.blocked"
if logging.getLogger(SUMMARY_LOGGER).level == logging.NOTSET:
    logging.getLogger(SUMMARY_LOGGER).setLevel(logging.INFO)

WRITE_ALL, WRITE_BLOCKED, WRITE_NONE = 0, 1, 2
_write_mode = WRITE_ALL


def refresh_levels() -> int:
    """Re-read the transaction loggers' levels (call after changing them); the mode."""
    global _write_mode
    on = lambda name: logging.getLogger(name).isEnabledFor(logging.INFO)
    if on(SUMMARY_LOGGER) or on(ALL_LOGGER):
        _write_mode = WRITE_ALL
    elif on(BLOCKED_LOGGER):
        _write_mode = WRITE_BLOCKED
    else:
        _write_mode = WRITE_NONE
    return _write_mode


class Transaction(msgspec.Struct, kw_only=True, omit_defaults=True):
    ts: float                      # wall clock at the end of the transaction
    method: str
    command: str | None = None
    user: str | None = None
    device_id: str | None = None
    device_type: str | None = None
    protocol_version: str | None = None   # EAS version the device spoke ("16.1": header or base64 query)
    client_ip: str = ""
    status: int = 0
    bytes_in: int = 0              # request body bytes from the device
    bytes_out: int = 0             # answer body bytes to the device
    upstream_ms: float = 0.0       # from sending the request upstream to the answer head
    total_ms: float = 0.0
    decision: str = ""
    upstream: str = ""             # "host:port" of the mail server that answered
    error: str = ""                # why the gateway answered itself (503, 400, ...)


class TransactionLog:
    """Buffered JSON-lines writer; flushed by the worker every second and at exit."""

    def __init__(self, target: str):
        self.target = target
        self._encoder = msgspec.json.Encoder()
        self._buffer = bytearray()
        self._file = None
        if target == "-":
            self._file = sys.stdout.buffer
        elif target:
            self._file = open(target, "ab")
        self.enabled = self._file is not None

    def write(self, record: Transaction) -> None:
        if self._file is None:
            return
        if _write_mode != WRITE_ALL and (_write_mode == WRITE_NONE or not record.decision.startswith("blocked")):
            return
        self._encoder.encode_into(record, self._buffer, -1)
        self._buffer += b"\n"
        if len(self._buffer) > 64 * 1024:
            self.flush()

    def flush(self) -> None:
        if self._file is None or not self._buffer:
            return
        try:
            self._file.write(self._buffer)
            self._file.flush()
        except OSError:
            pass                   # a full disk must not stop the gateway
        self._buffer.clear()

    def reopen(self) -> None:
        """After logrotate moved the file: write on in a new one at the same path."""
        if self._file is None or self._file is sys.stdout.buffer:
            return
        self.flush()
        try:
            new = open(self.target, "ab")
        except OSError:
            return                 # keep writing where we were rather than lose records
        self._file.close()
        self._file = new

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._file is not sys.stdout.buffer:
            self._file.close()
        self._file = None


def now() -> float:
    return time.time()
