"""The sizing run's autogroup: --nice sets the nice of a session of the run's own.

This kernel weighs each session (autogroup) as a whole against the others and against its
own threads, so a process's niceness only ranks it inside its session. These tests run
real processes in real sessions; they skip where the kernel has no autogroups.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from seg_fast import oslimits

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = dict(os.environ, PYTHONPATH=SRC)

needs_autogroup = pytest.mark.skipif(not oslimits.autogroup_enabled(), reason="no scheduler autogroups here")


@needs_autogroup
def test_a_sessions_group_nice_is_set_and_ours_is_not():
    ours = oslimits.autogroup_of()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             start_new_session=True)
    try:
        assert oslimits.set_autogroup_nice(7, child.pid) == ""
        theirs = oslimits.autogroup_of(child.pid)
        assert theirs.endswith(" nice 7"), theirs
        # a group of its own ("" for ours: the test runs in the root group, as under a CI runner)
        assert theirs.split()[0] != (ours.split() or [""])[0]
        assert oslimits.autogroup_of() == ours             # the test's own session untouched
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_a_gone_process_is_reported_not_raised():
    assert oslimits.set_autogroup_nice(3, 2**22 + 12345) != ""
    assert oslimits.autogroup_of(2**22 + 12345) == ""


# What the re-run does, in place of the sizing run: say which session it leads, then wait for
# SIGTERM and leave with 5 (the status the outer process must pass on).
CHILD = """
import os, signal, sys
# (os.write: a SIGTERM landing inside the print below must not re-enter its buffered writer)
signal.signal(signal.SIGTERM, lambda *_: (os.write(1, b"got TERM\\n"), os._exit(5)))
print(os.getsid(0) == os.getpid(), os.getsid(0), sys.argv[1:], flush=True)
signal.pause()
"""
OUTER = """
import os, sys
from seg_fast.sim.sizing import in_own_session
print(os.getsid(0), flush=True)
sys.exit(in_own_session(["--nice", "-3"], code=sys.argv[1]))
"""


def test_the_run_leads_a_session_of_its_own_and_hears_sigterm():
    outer = subprocess.Popen([sys.executable, "-c", OUTER, CHILD], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        outer_sid = outer.stdout.readline().split()[0]
        leads, sid, argv = outer.stdout.readline().split(" ", 2)
        assert leads == "True" and sid != outer_sid
        assert argv.strip() == "['--nice', '-3']"
        outer.send_signal(signal.SIGTERM)                 # as `kill` or a CI runner stops the run
        assert outer.stdout.readline() == "got TERM\n"
        assert outer.wait(timeout=30) == 5
    finally:
        if outer.poll() is None:
            outer.kill()
