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


SYSCALLS = ("import os, time\nfd = os.open('/dev/zero', os.O_RDONLY)\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: os.read(fd, 1 << 20)\nprint('ok', flush=True)\ninput()")

# (BURN asks the kernel for its CPU time on every turn: a system call each; this does not)
SPIN = ("import resource\nwhile resource.getrusage(resource.RUSAGE_SELF).ru_utime < 0.3:\n"
        "    for _ in range(100000): pass\nprint('ok', flush=True)\ninput()")


def test_the_kernel_part_of_a_process_cpu_is_counted_apart():
    """The fifth figure is the kernel's part of the first (system time): a child copying
    /dev/zero in 1 MiB reads spends most of its CPU there, a busy loop almost none."""
    kernel = subprocess.Popen([sys.executable, "-c", SYSCALLS], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    user = subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    seen: dict = {}
    try:
        assert kernel.stdout.readline().strip() == b"ok" and user.stdout.readline().strip() == b"ok"
        cpu, _, _, _, system = proc_usage([kernel.pid])
        assert cpu >= 0.25 and system > cpu / 2
        cpu, _, _, _, system = proc_usage([user.pid])
        assert cpu >= 0.25 and system < cpu / 2
        both = proc_usage([kernel.pid, user.pid], seen)
        assert both[4] <= both[0]
    finally:
        for child in (kernel, user):
            child.stdin.close()
            child.wait(timeout=20)
    # exited: their figures stay in the ``seen`` sum, the kernel's part with them
    assert proc_usage([kernel.pid, user.pid], seen)[4] == both[4]
