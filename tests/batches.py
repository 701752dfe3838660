"""A trio Instrument numbering the scheduler's batches (one per I/O wait): tests count
what happens per batch instead of timing it."""
from __future__ import annotations

import trio


class Batches(trio.abc.Instrument):
    def __init__(self):
        self.n = 0

    def after_io_wait(self, timeout) -> None:
        self.n += 1
