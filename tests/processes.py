"""Child processes the end-to-end tests start: `seg-fast serve`, and a clean stop."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_serve(config: Path, tmp_path: Path) -> subprocess.Popen:
    """`seg-fast serve --config CONFIG` from this checkout, its state under tmp_path."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp_path / "state"))
    return subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(config)], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_process(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_listening(port: int, proc: subprocess.Popen, bound: float = 60) -> None:
    """Until ``port`` accepts on 127.0.0.1 (a generous bound); a serve that exited fails with its stderr."""
    end = time.monotonic() + bound
    while time.monotonic() < end:
        assert proc.poll() is None, "seg-fast serve exited: " + proc.stderr.read().decode()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("gateway did not start listening")


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for ``proc`` to exit (stopping it after ``timeout``); its stderr."""
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            stop_process(proc)
    return proc.stderr.read().decode()


def options_answer(port: int) -> bytes:
    """One `OPTIONS` through the gateway at 127.0.0.1:``port`` on a connection of its own: the raw answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"OPTIONS /Microsoft-Server-ActiveSync HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@contextlib.contextmanager
def http_server(handler):
    """A ThreadingHTTPServer with ``handler`` on 127.0.0.1 (a stand-in mail server): its port."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
