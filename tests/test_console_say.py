"""The serve's processes share one stderr pipe: each line must reach it in one write."""

import io
import os
import sys

from seg_fast.proxy import console


class Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def write(self, s):
        self.calls.append(s)
        return super().write(s)


def test_a_line_is_one_write(monkeypatch):
    err = Writes()
    monkeypatch.setattr(sys, "stderr", err)
    console.say("worker listening on 127.0.0.1:1")
    assert err.calls == [f"seg-fast[{os.getpid()}]: worker listening on 127.0.0.1:1\n"]

