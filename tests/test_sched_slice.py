"""oslimits.set_sched_slice: the kernel takes the slice, and the process's niceness is kept."""
import os
import subprocess
import sys

import pytest

CHILD = """
import os
from seg_fast.oslimits import set_sched_slice
os.nice(3)
why = set_sched_slice(0, 300)
print(repr(why))
for line in open("/proc/self/sched"):
    if line.startswith("se.slice"):
        print(line.split()[-1])
print(os.getpriority(os.PRIO_PROCESS, 0))
"""


def test_slice_set_and_nice_kept():
    if not os.path.exists("/proc/self/sched"):
        pytest.skip("no /proc/self/sched on this kernel")
    # a child process: the test runner's own scheduling stays as it was
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.splitlines()
    why, rest = out[0], out[1:]
    if why != "''":
        pytest.skip(f"the kernel refuses a custom slice here: {why}")
    slice_ns, nice = rest
    assert slice_ns == "300000"
    assert nice == str(min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3))    # (19 caps a niced runner)


def test_unknown_thread_is_reported_not_raised():
    from seg_fast.oslimits import set_sched_slice
    assert set_sched_slice(2**22 + 12345, 300) != ""
