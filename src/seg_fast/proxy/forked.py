"""Workers forked from a template process that imported the gateway before any trio run.

A worker started as a new interpreter imports the gateway again (~440 modules): ~15 MiB of
private memory per worker, and at 100,000 devices per core a node runs twelve or thirteen
workers (one per ~8,300 devices under the descriptor limit). Forked from a process that has
imported them, the workers share those pages copy-on-write (benchmarks/README.md, "Where a
worker's memory goes": 14.9 MiB of PSS less per idle worker).

A process inside a trio run cannot fork a worker (the child inherits the run and cannot start
its own), and the control process lives in one. So before it enters trio, the control forks
a template: a process that imports the gateway, sets its name to ``seg-fast-tmpl`` (so tools
listing the control's children can leave it out: ``worker_pids``) and then only waits for
requests on a socket. For each worker, the control sends it the worker's channel end; the
template forks twice, the middle process exits at once, and the worker is adopted by the
control process (a child subreaper), whose child it then is as a worker started directly
would be (``waitpid``, the death signal, /proc's list of children). So the first workers and
every worker that replaces one are forked the same way, after the control's start-up has
succeeded: nothing is forked for a start that fails.

Where the template cannot be used (no child subreaper, the template gone), the control
starts a new interpreter (``python -m seg_fast.proxy.worker``), as it did before.
"""
from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import threading
import time

import trio

from seg_fast.proxy.channel import ENV_FD
from seg_fast.proxy.worker import die_with_parent

TEMPLATE_NAME = b"seg-fast-tmpl"     # /proc/PID/comm, at most 15 bytes
GO = b"g"
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36


def preload(huge_pages: bool = False) -> None:
    """Import what a worker runs, and keep the collector off those objects for good: a full
    collection in a worker writes every tracked object's header, which would copy the pages.
    With ``huge_pages`` (limits.huge_pages), pymalloc's arenas go on huge pages first, so
    every worker forked from here has them."""
    if huge_pages:
        from seg_fast.malloc import huge_arenas

        huge_arenas()
    import tomllib  # noqa: F401 - what a worker's start-up imports besides (the config, tickets)

    import seg_fast.policy.syncsettings  # noqa: F401
    import seg_fast.proxy._tickets  # noqa: F401
    import seg_fast.proxy.gateway  # noqa: F401
    import seg_fast.proxy.gcpause  # noqa: F401
    import seg_fast.proxy.server  # noqa: F401
    import seg_fast.proxy.slowsteps  # noqa: F401
    import seg_fast.refshare  # noqa: F401

    gc.collect()
    gc.freeze()


def _prctl(option: int, value) -> bool:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False                  # not Linux


def _children(control_pid: int) -> list[tuple[int, bytes, bytes]]:
    """The control's children: (pid, name, state) of each, from one read of /proc/PID/stat."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{control_pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{control_pid}/task/{task}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    out = []
    for pid in kids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()       # "pid (comm) state ...": the name and the state in one read
        except OSError:
            continue                  # gone already
        head, _, tail = stat.rpartition(b")")
        out.append((pid, head.partition(b"(")[2], tail.split()[0]))
    return out


def worker_pids(control_pid: int) -> list[int]:
    """The control process's workers: its children but its template (the name tells them apart)
    and any that has exited and waits to be reaped (a zombie: a worker's own child, say,
    adopted by the control, the subreaper, when the worker died first)."""
    return [pid for pid, name, state in _children(control_pid) if name != TEMPLATE_NAME and state != b"Z"]


def reap_adopted(known: set[int]) -> list[int]:
    """Reap this process's exited children that are not in ``known`` (its workers and its
    template): as a subreaper it adopts a dead worker's own children, which nothing else
    waits for; each would stay a zombie, and hold its pid, until the control exits. Reaped
    by pid, never ``waitpid(-1)``, which would take a worker's exit status from ``poll``."""
    reaped = []
    for pid, _name, state in _children(os.getpid()):
        if state == b"Z" and pid not in known:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    reaped.append(pid)
            except ChildProcessError:
                pass                  # reaped meanwhile
    return reaped


class Forked:
    """A forked worker, with the part of subprocess.Popen's face the control process uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

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

    def wait(self, timeout: float = 10.0) -> int:
        """Reaped, killed if it outlives ``timeout``."""
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                self.kill()
                end = float("inf")
            time.sleep(0.01)
        return self.returncode


def _no_other_threads() -> None:
    if threading.active_count() > 1:
        # A thread's state (trio's idle worker threads among them) is copied, the thread is not:
        # the child would wait forever on the first job it gave one.
        raise RuntimeError(f"cannot fork a worker: {threading.active_count() - 1} other thread(s) running")


def _worker(argv: list[str]):
    """The child's part: run the worker's entry (``serve --worker`` with ``argv``) and end the
    process with its exit code, never returning into the forking code."""
    code = 1
    try:
        from seg_fast.proxy.server import worker_cli

        code = worker_cli(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
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


def fork_worker(argv: list[str]) -> Forked:
    """A worker forked from this process now (``argv``: its ``seg-fast serve`` arguments); this
    process must be outside any trio run, with no other thread."""
    _no_other_threads()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Forked(pid)
    _worker(argv)


# -- the template -----------------------------------------------------------------------------

class Template:
    """The control's side of its template process: ``await fork(fd)`` makes a worker, the
    control process's child, whose channel end is ``fd``."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock
        self.lock = trio.Lock()        # one request at a time on the socket

    @classmethod
    def start(cls, env: dict[str, str], argv: list[str]) -> "Template | None":
        """Forked now, before the control enters trio; None where the control cannot adopt the
        workers (no child subreaper: they would be the template's grandchildren, not its own)."""
        _no_other_threads()
        if not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            theirs.close()
            ours.setblocking(False)
            return cls(pid, ours)
        code = 1
        try:
            ours.close()
            code = _template_loop(theirs, env, argv)
        except BaseException:                  # noqa: BLE001 - said, then the template ends
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)

    def alive(self) -> bool:
        return self.sock.fileno() >= 0

    async def fork(self, channel_fd: int, timeout: float = 30.0) -> Forked:
        """A new worker; OSError if the template did not make one (gone, or it failed)."""
        if not self.alive():
            raise OSError("the template process is gone")
        async with self.lock:
            answered = False
            try:
                with trio.fail_after(timeout):
                    await trio.lowlevel.wait_writable(self.sock)
                    socket.send_fds(self.sock, [b"F"], [channel_fd])
                    await trio.lowlevel.wait_readable(self.sock)
                    answer = self.sock.recv(64)
                answered = bool(answer)
            except (OSError, trio.TooSlowError) as exc:
                raise OSError(f"the template process did not answer: {exc!r}") from None
            finally:
                if not answered:
                    # Gone, stuck, or a request left half-way (an answer still to come would be
                    # read as the next one's): not asked again.
                    self.close()
        if not answer.isdigit():
            self.close()                       # one way to start workers from then on: new interpreters
            raise OSError(f"the template process could not fork: {answer.decode(errors='replace')}")
        return Forked(int(answer))

    def close(self) -> None:
        """The template ends when its socket closes (``reap`` waits for it)."""
        if self.alive():
            self.sock.close()

    def reap(self, timeout: float = 10.0) -> None:
        self.close()
        Forked(self.pid).wait(timeout)


def _template_loop(sock: socket.socket, env: dict[str, str], argv: list[str]) -> int:
    """The template's life: one worker per request, until the control's end of ``sock`` closes."""
    with open("/proc/self/comm", "rb") as f:
        name = f.read().rstrip(b"\n")         # the control's, given back to each worker
    _prctl(_PR_SET_NAME, TEMPLATE_NAME)
    os.environ.update(env)
    die_with_parent()                          # the control gone: so is the template
    # Ctrl-C in a terminal reaches the whole process group: the control decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
        except InterruptedError:
            continue
        if not msg:
            return 0                           # the control closed its end (or died)
        try:
            if msg != b"F" or len(fds) != 1:
                answer = b"bad request"
            else:
                answer = b"%d" % _fork_adopted(sock, fds[0], argv, name)
        except OSError as exc:
            answer = f"{type(exc).__name__}: {exc}".encode()[:60]
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.send(answer)
        except OSError:
            return 0                           # the control is gone


def _fork_adopted(sock: socket.socket, channel_fd: int, argv: list[str], name: bytes) -> int:
    """Fork twice: the middle process exits at once, so the worker is adopted by the control
    (the subreaper). Its pid is returned once it is the control's child; it starts then."""
    gate_r, gate_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        middle = os.fork()
        if not middle:
            try:
                os.close(gate_w)
                os.close(report_r)
                pid = os.fork()
                if pid:
                    os.write(report_w, b"%d" % pid)
                    os._exit(0)
                os.close(report_w)
                sock.close()
                _prctl(_PR_SET_NAME, name)
                # Until the middle process is reaped, the parent is not the control: the death
                # signal set now would fire when the middle one exits.
                go = os.read(gate_r, 1)
                os.close(gate_r)
                os.environ[ENV_FD] = str(channel_fd)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if go != GO or not die_with_parent():
                    os._exit(0)                # the template gave up on it, or the control is gone
                _worker(argv)
            finally:
                os._exit(1)
        os.close(report_w)
        report_w = -1
        pid_text = os.read(report_r, 32)
        os.waitpid(middle, 0)                  # reaped: its child is the control's now
        if not pid_text.isdigit():
            raise OSError("the middle process did not fork")
        os.write(gate_w, GO)
        return int(pid_text)
    finally:
        for fd in (gate_r, gate_w, report_r, report_w):
            if fd >= 0:
                os.close(fd)


def main(argv: list[str]) -> int:
    """``python -m seg_fast.proxy.forked CONFIG...``: a worker per config file, forked from this
    process as serve's are from its template, with no control process. For the sizing
    benchmark, whose shards each have a config of their own (their own mail-server shard): its
    memory then counts the shared pages as serve's does. SIGTERM here is passed to every worker
    (they drain); a worker that exits stops the others and this process, so whoever started it
    sees the end."""
    from seg_fast.config import load_config

    preload(load_config(argv[0]).limits.huge_pages if argv else False)
    children = [fork_worker(["--config", cfg]) for cfg in argv]

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
