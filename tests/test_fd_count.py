"""Descriptor counts of the sizing run (the fleet's own, and the gateway's sampled each
second by the orchestrator) come from a stat of /proc/PID/fd, not a listing: a listing
costs ~1 us a descriptor, each time, however idle the devices (issue 11's per-second costs)."""
import os
import subprocess
import sys

import pytest

from seg_fast.sim import fleet, sizing

needs_fd_size = pytest.mark.skipif(os.stat("/proc/self/fd").st_size == 0,
                                   reason="kernel before 6.2: /proc/PID/fd has no size (the listing is used)")


def listed(pid="self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@needs_fd_size
def test_own_count_follows_opened_descriptors_without_listing(monkeypatch):
    before = fleet.open_fds()
    # the independent count: a listing, less the descriptor the listing itself holds open
    assert before == listed() - 1
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
    try:
        calls = []
        real = os.listdir
        monkeypatch.setattr(os, "listdir", lambda p: calls.append(p) or real(p))
        assert fleet.open_fds() == before + 300
        assert calls == []                      # counted without listing the directory
    finally:
        for fd in fds:
            os.close(fd)
    assert fleet.open_fds() == before


@needs_fd_size
def test_max_fds_of_another_process_without_listing(monkeypatch):
    code = "import os, sys; fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(500)]; print('ok', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ok"
        expected = listed(child.pid)
        assert expected >= 500
        mine = listed() - 1
        calls = []
        real = os.listdir
        monkeypatch.setattr(os, "listdir", lambda p: calls.append(p) or real(p))
        assert sizing.max_fds([child.pid, os.getpid()]) == max(expected, mine)
        assert calls == []
    finally:
        child.stdin.close()
        child.wait(timeout=20)


def test_an_older_kernel_falls_back_to_the_listing(monkeypatch):
    real_stat = os.stat

    class NoSize:
        st_size = 0

    monkeypatch.setattr(os, "stat", lambda p, *a, **k: NoSize() if str(p).endswith("/fd") else real_stat(p, *a, **k))
    assert fleet.open_fds() == listed() - 1
