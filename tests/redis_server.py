"""A real redis-server (Debian's) on a free loopback port, for the store tests."""
from __future__ import annotations

import random
import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest
from processes import stop_process


def free_port() -> int:
    """A port nobody listens on, kept for a while (Redis down at first, restarted on it).

    Taken below the kernel's ephemeral range: a port from ``bind(0)``, once released, is
    what the next ``bind(0)`` of another test process (two run side by side) gets, and
    that process's server would then answer in place of the Redis this test starts later.
    """
    low, _ = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    rng = random.Random()                       # not the tests' seeded one: processes must differ
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def _pid_answering(port: int) -> int | None:
    """The process id of the Redis on ``port`` (INFO server), None if none answers yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"\r\nprocess_id:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    m = re.search(rb"\r\nprocess_id:(\d+)\r\n", data)
    return int(m.group(1)) if m else None


@contextmanager
def running_redis(tmp_path, port: int | None = None):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (scripts/test.sh installs it)")
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            # Ours, not another test process's Redis that took the port meanwhile.
            pid = _pid_answering(port)
            if pid == proc.pid:
                break
            if pid is not None:
                raise RuntimeError(f"port {port} is another Redis's (pid {pid}): ours cannot listen there")
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc, grace=5)
