"""One `seg-fast serve` per listener address.

The workers of one serve share their port through SO_REUSEPORT, and so would any
other process of the same user that sets it: a second serve (or the workers an
earlier one left behind) would silently take half the connections. Before any
worker starts, the control process

- takes an exclusive lock on ``<state_dir>/listener-<host>-<port>.lock`` (flock) and
  writes its PID into it. The workers inherit the locked descriptor, so the lock
  lives as long as any process of this serve listens, even one orphaned by a
  ``kill -9`` of the control process;
- binds the address once *without* SO_REUSEPORT: that fails while anything at all
  listens there (a serve with another state_dir, another program), so the start is
  refused with the cause instead of workers restarting forever on a taken port.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
from pathlib import Path

from seg_fast.errors import StartupError
from seg_fast.statedir import ensure_parent


def lock_path(state_dir: str, host: str, port: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host or "any")
    return Path(state_dir) / f"listener-{safe}-{port}.lock"


def _holder(path: Path) -> str:
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if not pid:
        return "another seg-fast serve"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"workers left behind by seg-fast serve PID {pid} (which is gone)"
    except PermissionError:
        pass
    return f"seg-fast serve PID {pid}"


def lock_listener(state_dir: str, host: str, port: int) -> int:
    """The locked descriptor (keep it open, pass it to the workers); StartupError if taken.

    A read-only state_dir with no lock file yet: no lock (-1), the probe bind still guards.
    """
    path = lock_path(state_dir, host, port)
    try:
        ensure_parent(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        writable = True
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
            raise StartupError(f"{path}: cannot create the listener lock: {exc.strerror}") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)   # flock needs no write access
            writable = False
        except OSError:
            return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"key listener.port: {host}:{port} is already served by {_holder(path)} "
                           f"(lock {path})") from None
    if writable:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass     # a full disk: the lock holds, only the PID in it is missing
    return fd


def bind_error(host: str, port: int) -> OSError | None:
    """Why nothing new can listen on host:port (None: it is free). Bound without
    SO_REUSEPORT, so a listener sharing the port through it counts as taken; TIME_WAIT does not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc
    return None


def probe_bind(host: str, port: int) -> None:
    """StartupError if anything listens on host:port."""
    exc = bind_error(host, port)
    if exc is not None:
        held = " (another process holds it)" if exc.errno == errno.EADDRINUSE else ""
        raise StartupError(f"key listener.port: cannot listen on {host}:{port}: {exc.strerror or exc}{held}")
