"""Workers are forked from a template process the control forked before it entered trio
(proxy/forked.py): the first ones and those that replace a worker alike, each the control's
child and sharing the imported modules' pages; nothing is forked for a start that fails, and
without its template a serve replaces workers with new interpreters. Checked against running
`seg-fast serve` processes, with what the kernel says (/proc), not what the gateway says."""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from processes import REPO, http_server, options_answer, start_serve, stop_process, wait_listening
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
    with http_server(_MailServer) as port:
        yield port


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def _wait_workers(pid: int, n: int, bound: float = 60) -> list[int]:
    end = time.monotonic() + bound
    while len(kids := workers_of(pid)) < n:
        assert time.monotonic() < end, f"{len(kids)} of {n} workers"
        time.sleep(0.05)
    return kids


def _shared_kib(pid: int) -> int:
    # Anonymous pages it maps that other processes map too (the template's imports): an
    # interpreter of its own would hold them all privately (Pss_Anon ~ Anonymous).
    mem = _rollup(pid)
    return mem["Anonymous"] - mem["Pss_Anon"]


def _replacement(pid: int, before: list[int], bound: float = 60) -> int:
    end = time.monotonic() + bound
    while True:
        kids = workers_of(pid)
        new = [p for p in kids if p not in before]
        if len(kids) == len(before) and new:
            return new[0]
        assert time.monotonic() < end, f"no replacement worker: {kids}"
        time.sleep(0.05)


def _replacement_listening(proc, bound: float = 60) -> None:
    """The replacement said it listens (after the control said it started one)."""
    end = time.monotonic() + bound
    while b"worker listening" not in b"".join(_stderr_so_far(proc)).rpartition(b"starting another")[2]:
        assert time.monotonic() < end, b"".join(_stderr_so_far(proc)).decode(errors="replace")
        time.sleep(0.1)


def _children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class _Serve:
    """A running `seg-fast serve --workers 2` in front of the mail server: its process, port and
    first workers; ``err`` is all it wrote to stderr once stopped."""

    def __init__(self, tmp_path, mail_server):
        self.port = free_port()
        self.proc = start_serve(_config(tmp_path, self.port, 2, mail_server), tmp_path)
        self.err = ""

    def __enter__(self):
        try:
            wait_listening(self.port, self.proc)
            self.first = _wait_workers(self.proc.pid, 2)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        stop_process(self.proc)
        self.err = (b"".join(_seen.pop(self.proc.pid, [])) + self.proc.stderr.read()).decode()

    def answers(self) -> None:
        for _ in range(6):                       # both workers answer (SO_REUSEPORT spreads them)
            assert options_answer(self.port).startswith(b"HTTP/1.1 200")


def test_workers_are_forked_from_the_template_first_ones_and_replacements_alike(tmp_path, mail_server):
    with _Serve(tmp_path, mail_server) as gw:
        pid, first = gw.proc.pid, gw.first
        control_cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        # The control's children: the two workers (adopted: the template's grandchildren) and
        # the template, named so that worker_pids leaves it out.
        others = [p for p in _children_of(pid) if p not in first]
        assert len(others) == 1
        assert Path(f"/proc/{others[0]}/comm").read_bytes() == b"seg-fast-tmpl\n"
        for worker in first:
            assert Path(f"/proc/{worker}/cmdline").read_bytes() == control_cmdline      # forked, not exec'd
            assert Path(f"/proc/{worker}/comm").read_bytes() == Path(f"/proc/{pid}/comm").read_bytes()
            assert _shared_kib(worker) >= 4 * MIB, f"worker {worker}: only {_shared_kib(worker)} KiB shared"
        gw.answers()
        # A worker that dies is replaced the same way: forked, sharing the pages, the control's child.
        os.kill(first[0], signal.SIGKILL)
        new = _replacement(pid, first)
        assert new in _children_of(pid)
        assert Path(f"/proc/{new}/cmdline").read_bytes() == control_cmdline
        _replacement_listening(gw.proc)
        assert _shared_kib(new) >= 4 * MIB, f"replacement {new}: only {_shared_kib(new)} KiB shared"
        gw.answers()
    assert f"worker {first[0]} exited with -9; starting another" in gw.err
    assert "Traceback" not in gw.err and "warning" not in gw.err


def test_without_its_template_a_serve_replaces_a_worker_with_a_new_interpreter(tmp_path, mail_server):
    with _Serve(tmp_path, mail_server) as gw:
        template = [p for p in _children_of(gw.proc.pid) if p not in gw.first][0]
        os.kill(template, signal.SIGKILL)
        os.kill(gw.first[0], signal.SIGKILL)
        new = _replacement(gw.proc.pid, gw.first)
        end = time.monotonic() + 60
        # (Popen's child shows the control's command line until its exec: polled)
        while b"seg_fast.proxy.worker" not in Path(f"/proc/{new}/cmdline").read_bytes().split(b"\0"):
            assert time.monotonic() < end, Path(f"/proc/{new}/cmdline").read_bytes()
            time.sleep(0.05)
        _replacement_listening(gw.proc)
        gw.answers()
    assert "warning: the template process" in gw.err and "workers start as new interpreters from now on" in gw.err
    assert "Traceback" not in gw.err


def test_a_worker_that_cannot_be_started_is_tried_again_and_the_serve_lives_on(tmp_path, mail_server):
    # The control process may open no descriptor (its limit at 3, stdio): a replacement worker's
    # channel cannot be made. The control says so once, keeps the other worker serving and
    # starts the replacement as soon as it can (a start failing used to end the control).
    with _Serve(tmp_path, mail_server) as gw:
        pid = gw.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
        try:
            os.kill(gw.first[0], signal.SIGKILL)
            end = time.monotonic() + 60
            while b"cannot start a worker" not in b"".join(_stderr_so_far(gw.proc)):
                assert time.monotonic() < end and gw.proc.poll() is None
                time.sleep(0.05)
            # (the killed worker may still be listed until the control has reaped it)
            while workers_of(pid) != gw.first[1:] and time.monotonic() < end:
                time.sleep(0.05)
            assert workers_of(pid) == gw.first[1:]
            gw.answers()                         # the other worker serves on
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        new = _replacement(pid, gw.first)
        end = time.monotonic() + 60
        while f"worker {new} started".encode() not in b"".join(_stderr_so_far(gw.proc)):
            assert time.monotonic() < end
            time.sleep(0.05)
        _replacement_listening(gw.proc)
        gw.answers()
    assert gw.err.count("cannot start a worker") == 1 and "Too many open files" in gw.err
    assert "Traceback" not in gw.err


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
    # The admin port is bound in the control's trio run before any worker is forked: taken,
    # the start fails, no worker is made, and the template (forked before the run) is reaped.
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


def test_the_template_forks_workers_the_forking_process_adopts(tmp_path):
    # Run in a process of its own: pytest's has threads, which the fork refuses (next test).
    r = _run(f"""
        import os, socket, trio
        from seg_fast.proxy import forked
        bad = ["--config", "{tmp_path}/missing.toml"]      # worker_cli fails: 2
        template = forked.Template.start({{}}, bad)

        async def main():
            a, b = socket.socketpair()
            child = await template.fork(b.fileno())
            b.close()
            status = os.waitpid(child.pid, 0)[1]          # our child, though the template forked it
            print(os.waitstatus_to_exitcode(status), os.getpid() != template.pid)

        trio.run(main)
        template.reap()                                    # its socket closed: it ends, and is reaped
        try:
            os.waitpid(template.pid, os.WNOHANG)
        except ChildProcessError:
            print("reaped")
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "True", "reaped"]
    assert "missing.toml" in r.stderr                      # the worker ran worker_cli


def test_a_fork_with_another_thread_running_is_refused():
    r = _run("""
        import threading
        from seg_fast.proxy import forked
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        for fork in (lambda: forked.fork_worker([]), lambda: forked.Template.start({}, [])):
            try:
                fork()
            except RuntimeError as exc:
                print("refused:", exc)
        stop.set()
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("refused: cannot fork a worker: 1 other thread(s) running") == 2


def test_an_exited_child_waiting_to_be_reaped_is_not_counted_a_worker():
    # A worker's own child is adopted by the control (the subreaper) when the worker dies
    # first; if it has exited too, it lingers as a zombie and is no worker.
    from seg_fast.proxy.forked import worker_pids

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        end = time.monotonic() + 30
        while Path(f"/proc/{dead.pid}/stat").read_bytes().rpartition(b")")[2].split()[0] != b"Z":
            assert time.monotonic() < end, "the child never exited"
            time.sleep(0.02)
        pids = worker_pids(os.getpid())
        assert live.pid in pids and dead.pid not in pids, (pids, live.pid, dead.pid)
    finally:
        live.kill()
        live.wait()
        dead.wait()


def test_the_control_reaps_an_adopted_child_and_leaves_a_workers_status_to_poll():
    # What a subreaper adopts (a dead worker's own child) nothing else waits for; a worker's
    # exit status is the control's supervision loop's to read (``Forked.poll``).
    from seg_fast.proxy.forked import reap_adopted

    def state(pid: int) -> bytes:
        return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]

    before = {int(p) for t in os.listdir(f"/proc/{os.getpid()}/task")
              for p in Path(f"/proc/{os.getpid()}/task/{t}/children").read_text().split()}
    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    adopted = subprocess.Popen([sys.executable, "-c", "pass"])
    end = time.monotonic() + 30
    while state(worker.pid) != b"Z" or state(adopted.pid) != b"Z":
        assert time.monotonic() < end, "the children never exited"
        time.sleep(0.02)
    assert reap_adopted(before | {worker.pid}) == [adopted.pid]
    assert not Path(f"/proc/{adopted.pid}").exists()
    assert state(worker.pid) == b"Z" and worker.wait() == 3      # its status kept for its owner
    assert reap_adopted(before) == []
    adopted.wait()
