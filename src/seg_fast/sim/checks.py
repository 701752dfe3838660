"""The email-security oracle's work on a large answer, off the shard's event loop.

Opening a sealed 10 MB attachment (base64 of 13.6 MB, AES-GCM, a comparison) or parsing
a sampled 13 MB MIME message with the ``email`` package takes the shard 50-300 ms of
CPU. Done in the loop, it held every other device's answer unread that long, on the
gateway path only (the direct path's answers are not sealed, so nothing is opened),
and the paired latency charged the stall to the gateway: in a 10,000-device
security-on run (2026-11-30 11:10) the shard's loop lagged up to 202 ms on the gateway
path against 31 ms direct, and the pooled class's p99.9 was one such sample.

Here a large answer's check runs in one thread of the shard's own. It still costs the
load core what it cost; the loop gets the GIL back at every switch interval
(``SWITCH_S``, set when the thread starts) of Python-level work, while a single C call
holds it for its length: so base64 is decoded by pybase64 (libbase64's SIMD decoder,
~1 ms for 13 MB, about 35x binascii) where it is canonical, and otherwise in slices
(``b64decode``), never 13 MB in one binascii call (it holds the GIL ~60-90 ms for that,
and the loop with it).
The thread keeps the shard's scheduling policy. Run below the loop (nice 19, out of
``--realtime load``'s SCHED_RR) it held the GIL while the other shards' real-time loops
held the core, and its own loop waited for the lock as long: at 80,000 devices the load
side stalled 2.4 s and 392 checks overflowed into the loops (benchmarks/README.md, 2026-12-06).
Every check still happens and a failure is counted as before; the run waits for
the last one before it reports (``wait``). Past ``MAX_PENDING`` checks in flight
(each holds its answer) the next one runs in the loop: bounded memory.
"""
from __future__ import annotations

import binascii
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pybase64

# Fetched attachments this large (or larger) are checked in the thread, smaller ones
# in the loop (a thread hand-off costs more than their check); sampled whole-MIME
# parses always go to the thread (~25 ms for a 500 KB message). The variable is for tests.
BIG = int(os.environ.get("SEG_FAST_ORACLE_THREAD_BYTES", 256 << 10))
MAX_PENDING = 8
SWITCH_S = 0.001          # how long the thread may keep the GIL from the loop (default 5 ms)
SLICE = 1 << 18           # base64 characters per binascii call (~1 ms)


def b64decode(s: str | bytes, step: int = 0) -> bytes:
    """``binascii.a2b_base64(s)`` (lenient, as the email package decodes) in slices
    of about ``step`` (``SLICE``) characters, so the loop gets the GIL between them. A slice ends
    at a line end where there are lines (MIME's hold whole 4-character quanta), else on
    a quantum boundary; anything that does not decode that way is decoded whole, so the
    result is always what one call gives. Canonical base64 on one line (a fetched
    attachment's Data) is what a strict decode accepts, and that gives the same bytes:
    pybase64's, without slices (the GIL ~1 ms for 13 MB; the load side's CPU on a sealed
    fetch was a fifth of a security-on shard's busy time in binascii)."""
    try:
        return pybase64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        pass                            # lines, or not canonical: binascii's lenient reading
    step = step or SLICE
    n = len(s)
    if n <= step:
        return binascii.a2b_base64(s)
    nl = "\n" if isinstance(s, str) else b"\n"
    lines = s.find(nl, 0, 1024) >= 0
    out = []
    i = 0
    try:
        while i < n:
            j = i + step
            if j >= n:
                j = n
            elif lines:
                k = s.find(nl, j)
                j = n if k < 0 else k + 1
            out.append(binascii.a2b_base64(s[i:j]))
            i = j
    except binascii.Error:
        return binascii.a2b_base64(s)
    return b"".join(out)


class Checks:
    def __init__(self, stats) -> None:
        self.stats = stats
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._switch = 0.0           # the interpreter's switch interval before the thread
        self.offloaded = 0           # checks run in the thread (reported with the stats)
        self.in_loop = 0             # checks run in the loop: MAX_PENDING in flight (reported too)

    def run(self, kind: str, device_id: str, check, *args) -> None:
        """``check(*args)`` -> None, or why the answer is wrong (a failure of ``kind``)."""
        self._pending = [f for f in self._pending if not f.done()]
        if len(self._pending) >= MAX_PENDING:
            self.in_loop += 1
            self._one(kind, device_id, check, args)
            return
        if self._pool is None:
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_S)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="oracle")
        self.offloaded += 1
        self._pending.append(self._pool.submit(self._one, kind, device_id, check, args))

    def _one(self, kind: str, device_id: str, check, args) -> None:
        try:
            why = check(*args)
        except Exception as exc:         # the oracle itself broke: a failure, never a pass
            why = f"the oracle failed: {exc!r}"
        if why:
            self.stats.fail(kind, f"{device_id} {why}")

    def wait(self) -> None:
        """Every check handed to the thread has finished (blocking: call from a thread)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            sys.setswitchinterval(self._switch)
        self._pending = []
