"""The first workers are forked from the control process before it enters trio (proxy/forked.py):
they share the imported modules' pages, start only once the control's start-up has succeeded,
and a worker that dies is replaced by a new interpreter. Checked against running `seg-fast serve`
processes, with what the kernel says (/proc), not what the gateway says."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from processes import REPO, start_serve, stop_process, wait_listening
from workers_of import free_port, workers_of

MIB = 1024


def _config(tmp_path: Path, port: int, workers: int, upstream: int) -> Path:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'workers = {workers}\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[upstream]\nurl = "http://127.0.0.1:{upstream}"\n'
                   f'[admin]\nenabled = false\n[policy]\nallow_if_no_policies = true\n')
    return cfg


class _MailServer(BaseHTTPRequestHandler):
    """Answers OPTIONS as an ActiveSync server does."""
    protocol_version = "HTTP/1.1"

    def do_OPTIONS(self):
        self.send_response(200)
        self.send_header("MS-ASProtocolVersions", "14.1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def mail_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MailServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def _options(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"OPTIONS /Microsoft-Server-ActiveSync HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _wait_workers(pid: int, n: int, bound: float = 60) -> list[int]:
    end = time.monotonic() + bound
    while len(kids := workers_of(pid)) < n:
        assert time.monotonic() < end, f"{len(kids)} of {n} workers"
        time.sleep(0.05)
    return kids


def test_the_first_workers_share_the_modules_pages_and_a_replacement_is_a_new_interpreter(tmp_path, mail_server):
    port = free_port()
    proc = start_serve(_config(tmp_path, port, 2, mail_server), tmp_path)
    try:
        wait_listening(port, proc)
        first = _wait_workers(proc.pid, 2)
        control_cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        for pid in first:
            assert Path(f"/proc/{pid}/cmdline").read_bytes() == control_cmdline      # forked, not exec'd
            mem = _rollup(pid)
            # Anonymous pages it maps that other processes map too (the control's imports): an
            # interpreter of its own would hold them all privately (Pss_Anon ~ Anonymous).
            shared = mem["Anonymous"] - mem["Pss_Anon"]
            assert shared >= 4 * MIB, f"worker {pid}: only {shared} KiB of its anonymous pages shared"
        assert _options(port).startswith(b"HTTP/1.1 200")
        # A worker that dies is replaced, by a new interpreter (the control is in its trio run now).
        os.kill(first[0], signal.SIGKILL)
        end = time.monotonic() + 60
        while True:
            kids = workers_of(proc.pid)
            new = [p for p in kids if p not in first]
            if len(kids) == 2 and new:
                break
            assert time.monotonic() < end, f"no replacement worker: {kids}"
            time.sleep(0.05)
        # (Popen's child shows the control's command line until its exec: polled)
        while b"seg_fast.proxy.worker" not in Path(f"/proc/{new[0]}/cmdline").read_bytes().split(b"\0"):
            assert time.monotonic() < end, Path(f"/proc/{new[0]}/cmdline").read_bytes()
            time.sleep(0.05)
        end = time.monotonic() + 60
        while b"worker listening" not in b"".join(_stderr_so_far(proc)):
            assert time.monotonic() < end
            time.sleep(0.1)
        for _ in range(6):                       # both workers answer (SO_REUSEPORT spreads them)
            assert _options(port).startswith(b"HTTP/1.1 200")
    finally:
        stop_process(proc)
    err = (b"".join(_seen.pop(proc.pid, [])) + proc.stderr.read()).decode()
    assert f"worker {first[0]} exited with -9; starting another" in err
    assert "Traceback" not in err


_seen: dict[int, list[bytes]] = {}


def _stderr_so_far(proc) -> list[bytes]:
    """What the serve wrote to stderr so far (kept, so the test's final read sees it too)."""
    import select

    got = _seen.setdefault(proc.pid, [])
    while select.select([proc.stderr], [], [], 0)[0]:
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            break
        got.append(chunk)
    return got


def test_a_start_that_fails_after_the_forks_leaves_no_worker(tmp_path):
    # The admin port is bound in the control's trio run, after the workers were forked: taken,
    # the start fails, the gates close unopened, and the forked children exit without listening.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    admin_port = holder.getsockname()[1]
    port = free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'workers = 3\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[admin]\nhost = "127.0.0.1"\nport = {admin_port}\n')
    try:
        proc = start_serve(cfg, tmp_path)
        _, err = proc.communicate(timeout=60)
    finally:
        holder.close()
    err = err.decode()
    assert proc.returncode == 1 and "key admin.port: cannot listen" in err
    assert "worker listening" not in err and "Traceback" not in err
    # None of the forked children outlived the control (they carry its command line, config path and all).
    cmdline = str(cfg).encode()
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if cmdline in Path(f"/proc/{entry}/cmdline").read_bytes():
                    left.append(int(entry))
            except OSError:
                pass
    assert left == []


def _run(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_gate_decides_whether_a_forked_worker_runs(tmp_path):
    # Run in a process of its own: pytest's has threads, which the fork refuses (next test).
    r = _run(f"""
        from seg_fast.proxy import forked
        bad = ["--config", "{tmp_path}/missing.toml"]      # worker_cli would fail: 2
        shut = forked.fork_worker({{}}, bad, [])
        shut.abandon()                                     # closed unopened: never ran
        opened = forked.fork_worker({{}}, bad, [])
        opened.release()
        opened.abandon()
        print(shut.returncode, opened.returncode)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "2"]
    assert "missing.toml" in r.stderr                      # the opened one ran worker_cli


def test_a_fork_with_another_thread_running_is_refused():
    r = _run("""
        import threading
        from seg_fast.proxy import forked
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        try:
            forked.fork_worker({}, [], [])
        except RuntimeError as exc:
            print("refused:", exc)
        stop.set()
        """)
    assert r.returncode == 0, r.stderr
    assert "refused: cannot fork a worker: 1 other thread(s) running" in r.stdout
