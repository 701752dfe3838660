"""Descriptor counts of the sizing run (the fleet's own, and the gateway's sampled each
second by the orchestrator) come from a stat of /proc/PID/fd, not a listing: a listing
costs ~1 us a descriptor, each time, however idle the devices (issue 11's per-second costs)."""
import gc
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
    # In a long test session an earlier test's garbage (a socket) may be closed by the
    # collector, or a leftover thread close one, between two counts: collect first, no
    # collections meanwhile, and compare each count with a listing taken right beside it.
    gc.collect()
    gc.disable()
    try:
        def both() -> tuple[int, int]:
            for _ in range(20):      # the same count twice in a row: nothing moved between
                a, b, c = fleet.open_fds(), listed() - 1, fleet.open_fds()
                if a == c:
                    return a, b
            return a, b
        # The independent count: a listing, less the descriptor the listing itself holds open.
        # Compared as changes: the stat also counts descriptors a thread has reserved and not
        # yet installed (one blocked in accept() holds one), which a listing does not show.
        before, listed_before = both()
        assert before - listed_before in (0, 1, 2)
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
        try:
            during, listed_during = both()
            assert during - before == listed_during - listed_before == 300
            calls = []
            real = os.listdir
            monkeypatch.setattr(os, "listdir", lambda p: calls.append(p) or real(p))
            fleet.open_fds()
            assert calls == []                      # counted without listing the directory
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        gc.enable()


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
