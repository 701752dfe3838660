"""The first workers, forked from the control process before it enters trio.

A worker started as a new interpreter imports the gateway again (~440 modules): ~15 MiB of
private memory per worker, and at 100,000 devices per core a node runs twelve or thirteen
workers (one per ~8,300 devices under the descriptor limit). Forked from the control process
after it has imported them, the workers share those pages copy-on-write
(benchmarks/README.md, "Where a worker's memory goes": 14.9 MiB of PSS less per idle worker).

Forking must happen before ``trio.run``: a child forked out of a trio run inherits the run's
state and cannot start a run of its own. So the control process forks its first workers
early, each parked on a gate (a pipe) before it does anything, and opens the gates once its
own start-up has succeeded (the admin and health ports bound). A start that fails closes the
gates unopened and the children exit without having listened. A worker that dies later is
replaced by a new interpreter (``python -m seg_fast.proxy.worker``), as before.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time

GO = b"g"


def preload() -> None:
    """Import what a worker runs, and keep the collector off those objects for good: a full
    collection in a worker writes every tracked object's header, which would copy the pages."""
    import seg_fast.proxy.gateway  # noqa: F401
    import seg_fast.proxy.gcpause  # noqa: F401
    import seg_fast.proxy.slowsteps  # noqa: F401
    import seg_fast.refshare  # noqa: F401

    gc.collect()
    gc.freeze()


class Forked:
    """A forked worker, with the part of subprocess.Popen's face the control process uses."""

    def __init__(self, pid: int, gate: int):
        self.pid = pid
        self.returncode: int | None = None
        self.gate = gate

    def release(self) -> None:
        """Open the gate: the worker starts (one that died at its gate is left to ``poll``)."""
        try:
            os.write(self.gate, GO)
        except BrokenPipeError:
            pass
        finally:
            self.close_gate()

    def close_gate(self) -> None:
        """Closed unopened, the worker exits without starting."""
        if self.gate >= 0:
            os.close(self.gate)
            self.gate = -1

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:         # reaped elsewhere: gone, its status unknown
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        # Unreaped, the pid is still this child's (a zombie at worst), never another process's.
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def abandon(self, timeout: float = 10.0) -> None:
        """Close the gate if still shut, and reap the child (killed if it outlives ``timeout``)."""
        self.close_gate()
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                self.kill()
                end = float("inf")
            time.sleep(0.01)


def fork_worker(env: dict[str, str], argv: list[str], inherited: list) -> Forked:
    """A worker forked now, waiting at its gate. ``env``: its environment (the control's with the
    worker's own variables); ``argv``: its ``seg-fast serve`` arguments; ``inherited``: what the
    child must not keep of the control's (sockets and descriptors: other workers' channel ends
    and gates), closed in the child first thing."""
    if threading.active_count() > 1:
        # A thread's state (trio's idle worker threads among them) is copied, the thread is not:
        # the child would wait forever on the first job it gave one.
        raise RuntimeError(f"cannot fork a worker: {threading.active_count() - 1} other thread(s) running")
    gate_r, gate_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(gate_r)
        return Forked(pid, gate_w)
    code = 1
    try:
        os.close(gate_w)
        for thing in inherited:
            try:
                thing.close() if hasattr(thing, "close") else os.close(thing)
            except OSError:
                pass
        os.environ.update(env)
        from seg_fast.proxy.worker import die_with_parent

        parent_alive = die_with_parent()       # SIGTERM when the control process dies, from now
        go = os.read(gate_r, 1)
        os.close(gate_r)
        if go != GO or not parent_alive:
            code = 0                           # the start failed (or the control is gone): never listen
        else:
            from seg_fast.proxy.server import worker_cli

            code = worker_cli(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:                  # Ctrl-C at the gate: the control process stops too
        code = 1
    except BaseException:                      # noqa: BLE001 - said, then the child ends with 1
        import traceback

        traceback.print_exc()
    finally:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> int:
    """``python -m seg_fast.proxy.forked CONFIG...``: a worker per config file, forked from this
    process as serve forks its first workers, with no control process. For the sizing benchmark,
    whose shards each have a config of their own (their own mail-server shard): its memory then
    counts the shared pages as serve's does. SIGTERM here is passed to every worker (they drain);
    a worker that exits stops the others and this process, so whoever started it sees the end."""
    preload()
    children = [fork_worker({}, ["--config", cfg], []) for cfg in argv]
    for child in children:
        child.release()

    def stop(signum, frame):
        for child in children:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    by_pid = {child.pid: child for child in children}
    while True:
        try:
            pid, status = os.wait()           # (one reaped by stop's poll is not seen here: done)
        except ChildProcessError:
            break                             # every worker reaped
        by_pid[pid].returncode = os.waitstatus_to_exitcode(status)
        stop(None, None)                      # the first to end ends the rest
    return next((child.returncode for child in children if child.returncode), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
