"""`seg-fast serve` refuses a config its workers could not run with, and stops instead of
restarting workers that keep dying (real processes, real signals)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from seg_fast.proxy.forked import worker_pids
from processes import finish, start_serve, stop_process
from redis_server import free_port


def write(tmp_path, extra: str = "") -> object:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                   f'[admin]\nenabled = false\n{extra}')
    return cfg


def test_missing_certificate_refused_before_any_worker(tmp_path):
    cfg = write(tmp_path)
    cfg.write_text(cfg.read_text().replace("[admin]", f'tls_cert = "{tmp_path}/nope.pem"\n'
                                                      f'tls_key = "{tmp_path}/nope.key"\n[admin]'))
    proc = start_serve(cfg, tmp_path)
    err = finish(proc)
    assert proc.returncode == 1
    assert "gw.toml" in err and "key listener.tls_cert" in err and "nope.pem" in err
    assert "Traceback" not in err and "worker" not in err


def test_transaction_log_in_a_missing_directory_refused(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = write(tmp_path, f'[log]\ntransactions = "{tmp_path}/file/tx.jsonl"\n')
    proc = start_serve(cfg, tmp_path)
    err = finish(proc)
    assert proc.returncode == 1 and "key log.transactions" in err and "Traceback" not in err


def _children(pid: int) -> list[int]:
    return worker_pids(pid)


def test_workers_that_keep_dying_stop_the_gateway(tmp_path):
    proc = start_serve(write(tmp_path), tmp_path)
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            for child in _children(proc.pid):
                if child not in killed:
                    os.kill(child, signal.SIGKILL)
                    killed.add(child)
            time.sleep(0.05)
    finally:
        err = finish(proc)
    assert proc.returncode == 1, err
    # Four restarts, then the stop: counted from the control process's own lines (CI under
    # load once saw a sixth child pid among those killed; what it was is not known).
    assert err.count("exited with -9; starting another") == 4, err
    assert len(killed) >= 5
    assert "workers exited 5 times within 60 s" in err and "stopping" in err


def test_serve_says_which_config_and_warns_without_policies(tmp_path):
    cfg = write(tmp_path)
    proc = start_serve(cfg, tmp_path)
    try:
        seen = _log_until(proc, b"every device is blocked")
    finally:
        stop_process(proc)
    text = seen.decode()
    assert f"config: {cfg}" in text
    assert "WARNING: " in text and "no policies loaded, so every device is blocked" in text


def test_workers_per_core_follow_devices_and_the_descriptor_limit():
    from seg_fast.oslimits import workers_for

    assert workers_for(0, 2, 20_000) == 2                    # one per core
    assert workers_for(9_872, 2, 20_000) == 2                # (20,000 - 256) / 2 fit in one
    assert workers_for(9_873, 2, 20_000) == 4
    assert workers_for(100_000, 2, 20_000) == 2 * 11         # 100,000 per core: 11 workers a core
    assert workers_for(100_000, 1, 1_048_576) == 1


def _log_until(proc, marker: bytes = b"worker(s)") -> bytes:
    """serve's stderr up to the line with ``marker`` (or 60 s, or its exit: the caller's
    asserts say what was missing); by default its "N worker(s)" line."""
    deadline = time.monotonic() + 60
    seen = b""
    while marker not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    return seen


def _workers_started(proc, expected: int) -> list[int]:
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return _children(proc.pid)


def test_max_descriptors_raises_the_limit_so_fewer_workers_carry_a_core(tmp_path):
    # 12,000 devices per core: two workers under a 20,000 limit, one under 40,000. Raising the
    # hard limit needs CAP_SYS_RESOURCE: as root serve raises it for itself and its workers;
    # otherwise it says it could not and starts the workers the limit it has needs.
    import resource

    from seg_fast.oslimits import workers_for

    cfg = write(tmp_path, "[limits]\nmax_descriptors = 40000\n")
    cfg.write_text(cfg.read_text().replace("workers = 1\n", "workers = 0\ndevices_per_core = 12000\n"))
    cores = os.cpu_count() or 1
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # whether a process here may raise its hard limit (root is not enough: a container may
    # withhold CAP_SYS_RESOURCE, as this project's own machine does)
    probe = subprocess.run([sys.executable, "-c", "import resource; "
                            "resource.setrlimit(resource.RLIMIT_NOFILE, (40000, 40000))"], capture_output=True)
    raises = probe.returncode == 0 and hard < 40_000
    expected = cores if raises else workers_for(12_000, cores, hard, 256)
    proc = start_serve(cfg, tmp_path)
    try:
        seen = _log_until(proc)
        assert f"control process: {expected} worker(s)".encode() in seen, seen.decode()
        if raises:
            assert b"max_descriptors" not in seen
        elif hard < 40_000:
            assert b"WARNING: limits.max_descriptors 40000: the descriptor limit stays" in seen, seen.decode()
        workers = _workers_started(proc, expected)
        assert len(workers) == expected
        for pid in workers:
            with open(f"/proc/{pid}/limits") as f:
                line = next(x for x in f if x.startswith("Max open files"))
            assert line.split()[3:5] == (["40000", "40000"] if raises else [str(hard), str(hard)]), line
    finally:
        stop_process(proc)


def test_serve_starts_the_workers_devices_per_core_needs(tmp_path):
    import resource

    from seg_fast.oslimits import workers_for

    cfg = write(tmp_path)
    cfg.write_text(cfg.read_text().replace("workers = 1\n", "workers = 0\ndevices_per_core = 12000\n"))
    expected = workers_for(12_000, os.cpu_count() or 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    proc = start_serve(cfg, tmp_path)
    try:
        seen = _log_until(proc)
        assert f"control process: {expected} worker(s)".encode() in seen, seen.decode()
        assert len(_workers_started(proc, expected)) == expected
    finally:
        stop_process(proc)


def _policy(tid: int) -> tuple[int, int]:
    return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority


def test_realtime_priority_runs_each_worker_and_its_threads_under_sched_rr(tmp_path):
    # limits.realtime_priority: every worker, with every thread it starts (trio's, the content
    # pipeline's), runs SCHED_RR at that priority and serves; the control process stays
    # time-shared. Where the policy is not permitted, serve says so and the workers serve
    # time-shared.
    import socket

    probe = subprocess.run([sys.executable, "-c", "import os; "
                            "os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(3))"], capture_output=True)
    permitted = probe.returncode == 0
    cfg = write(tmp_path, "[limits]\nrealtime_priority = 3\n")
    port = int(cfg.read_text().split("port = ")[1].split()[0])
    proc = start_serve(cfg, tmp_path)
    try:
        seen = _log_until(proc, b"worker listening")
        assert b"worker listening" in seen, seen.decode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"OPTIONS /Microsoft-Server-ActiveSync HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 "), "the worker did not answer"
        (worker,) = _children(proc.pid)
        tasks = [int(t) for t in os.listdir(f"/proc/{worker}/task")]
        assert len(tasks) >= 1
        want = (os.SCHED_RR, 3) if permitted else (os.SCHED_OTHER, 0)
        assert {tid: _policy(tid) for tid in tasks} == {tid: want for tid in tasks}
        assert _policy(proc.pid) == (os.SCHED_OTHER, 0)
        if not permitted:
            assert b"WARNING: limits.realtime_priority 3: SCHED_RR 3:" in seen, seen.decode()
        else:
            assert b"WARNING: limits.realtime_priority" not in seen, seen.decode()
    finally:
        stop_process(proc)
