"""Transaction summaries: one JSON object per line per request.

What goes in is chosen field by field (identity, sizes, times, decision); bodies
and header values such as Authorization have no field to land in.
"""
from __future__ import annotations

import sys
import time

import msgspec


class Transaction(msgspec.Struct, kw_only=True, omit_defaults=True):
    ts: float                      # wall clock at the end of the transaction
    method: str
    command: str | None = None
    user: str | None = None
    device_id: str | None = None
    device_type: str | None = None
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

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._file is not sys.stdout.buffer:
            self._file.close()
        self._file = None


def now() -> float:
    return time.time()
