"""Child processes the end-to-end tests start: `seg-fast serve`, and a clean stop."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
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
