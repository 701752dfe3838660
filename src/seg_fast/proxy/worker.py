"""A gateway worker process's first instructions: die with the control process.

The control process starts ``python -m seg_fast.proxy.worker [--config FILE]``.
Before anything heavy is imported (trio, the gateway, the content pipeline: a
second or more), the worker asks the kernel for SIGTERM when its parent dies
(PR_SET_PDEATHSIG), then checks that its parent is still the control process that
started it: one killed before the prctl has already handed the worker to init,
and nothing would ever stop it listening. Only then does the worker load the rest.
"""
import os
import sys

ENV_CONTROL_PID = "SEG_FAST_CONTROL_PID"
_PR_SET_PDEATHSIG = 1
_SIGTERM = 15


def die_with_parent() -> bool:
    """True when the process that started us (``SEG_FAST_CONTROL_PID``) is still our parent."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, _SIGTERM)
    except (OSError, AttributeError):
        pass   # not Linux: the parent check below still catches a control process already gone
    expected = os.environ.get(ENV_CONTROL_PID, "")
    return not expected.isdigit() or os.getppid() == int(expected)


if __name__ == "__main__":
    if not die_with_parent():
        from seg_fast.proxy.console import say
        say("control process gone before the worker started; exiting")
        sys.exit(1)
    from seg_fast.proxy.server import worker_cli

    sys.exit(worker_cli(sys.argv[1:]))
