"""The sizing run's CPU sums over a process tree never go back when a process exits
(sim/sizing.proc_usage with ``seen``): a short-lived child's exit once made a window's
load-side CPU negative."""
import os
import subprocess
import sys

from seg_fast.sim.sizing import proc_usage

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint('ok', flush=True)\ninput()"


def test_an_exited_process_keeps_its_cpu_in_the_sum():
    child = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ok"      # it has used its 0.3 s
        pids = [os.getpid(), child.pid]
        seen: dict = {}
        before = proc_usage(pids, seen)[0]
        plain_before = proc_usage(pids)[0]
        assert proc_usage([child.pid])[0] >= 0.25
    finally:
        child.stdin.close()
        child.wait(timeout=20)
    after = proc_usage(pids, seen)[0]
    # Without ``seen`` the child's share is gone from the sum; with it, it stays.
    assert proc_usage(pids)[0] < plain_before - 0.2
    assert after >= before


NAPS = "import time\nfor _ in range(60): time.sleep(0.002)\nprint('ok', flush=True)\ninput()"


def test_the_times_a_process_was_put_on_a_cpu_count_its_wake_ups():
    """The fourth figure (schedstat's run count) counts wake-ups: a child that slept 60 times
    was put on a CPU at least 60 times; an exited one keeps its count in the ``seen`` sum."""
    child = subprocess.Popen([sys.executable, "-c", NAPS], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    seen: dict = {}
    try:
        assert child.stdout.readline().strip() == b"ok"
        runs = proc_usage([child.pid], seen)[3]
        assert runs >= 60
        assert proc_usage([child.pid, os.getpid()])[3] > runs
    finally:
        child.stdin.close()
        child.wait(timeout=20)
    assert proc_usage([child.pid])[3] == 0                 # gone: nothing to read
    assert proc_usage([child.pid], seen)[3] == runs     # its last reading stays counted
