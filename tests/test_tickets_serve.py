"""Session tickets across the workers of a running `seg-fast serve --workers 2` (proxy/tickets.py).

A device's connections land on either worker (SO_REUSEPORT). One session, got from one
connection, is offered on many new ones: each must resume (the client's
``session_reused``, real TLS with trustme certificates), and the connections must have
landed on both workers. Which worker holds a connection is read from the kernel
(/proc/net/tcp gives the accepted socket's inode for the client's port; /proc/<pid>/fd
says which worker holds it), not from anything the gateway says. Before the control
process made the keys, the connections on the worker that did not issue the ticket got
full handshakes. The same holds after a worker is killed and restarted (it gets the ring
the others use) and after a reload (a new SSLContext, keyed on its first connection).
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import trustme
from prometheus_client import parser
from workers_of import free_port, worker_holding, workers_of

REPO = Path(__file__).resolve().parent.parent
TOKEN = "tickets-admin-token"
CONNECTIONS = 24            # both workers get some: all on one is a 2**-23 chance


class TwoWorkers:
    def __init__(self, tmp: Path, rotation: float = 3600, admin_port: int = 0):
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        self.client = ssl.create_default_context()
        ca.configure_trust(self.client)
        self.port = free_port()
        cfg = tmp / "gateway.toml"
        cfg.write_text("\n".join([
            "workers = 2", "[listener]", 'host = "127.0.0.1"', f"port = {self.port}",
            f'tls_cert = "{tmp / "cert.pem"}"', f'tls_key = "{tmp / "key.pem"}"',
            f"tls_ticket_key_rotation = {rotation}", "[upstream]", f'url = "http://127.0.0.1:{free_port()}"', "[admin]", *([f"port = {admin_port}", f'token = "{TOKEN}"'] if admin_port else ["enabled = false"]),
            "[log]", 'transactions = ""', f'file = "{tmp / "gateway.log"}"',
            "[policy]", "allow_if_no_policies = true", f'sqlite_path = "{tmp / "policy.db"}"',
            "[security]", f'master_key_file = "{tmp / "master.key"}"', f'key_state_file = "{tmp / "keys.json"}"',
            "[timeouts]", "shutdown_grace = 5.0"]) + "\n")
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp / "state"))
        self.admin_port = admin_port
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env,
                                     cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.until(lambda: len(self.workers()) == 2 and self.said("worker listening on") >= 2, "two workers listening")

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def said(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def until(self, found, what: str, bound: float = 30):
        end = time.monotonic() + bound
        while not (value := found()):
            assert self.proc.poll() is None, "serve exited: " + "".join(self.lines)[-3000:]
            assert time.monotonic() < end, f"gave up waiting for {what}: " + "".join(self.lines)[-3000:]
            time.sleep(0.05)
        return value

    def workers(self) -> list[int]:
        return workers_of(self.proc.pid)

    def worker_of(self, sock) -> int:
        return worker_holding(self.port, sock.getsockname()[1], self.workers())

    def connect(self, session=None) -> tuple[ssl.SSLSocket, int]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        sock = self.client.wrap_socket(raw, server_hostname="localhost", session=session)
        # One answer (the gateway's own 404 for a path it does not serve): the TLS 1.3 tickets come with it.
        sock.sendall(b"GET /nothing-here HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            assert data, "the gateway closed without an answer"
            head += data
        assert head.startswith(b"HTTP/1.1 "), head[:100]
        pid = self.worker_of(sock)
        assert pid is not None, "no worker holds a connection it answered"
        return sock, pid

    def resumes(self, session) -> dict[int, list[bool]]:
        """Per worker, whether each of CONNECTIONS new connections offering ``session`` resumed it."""
        seen: dict[int, list[bool]] = {}
        for _ in range(CONNECTIONS):
            sock, pid = self.connect(session)
            seen.setdefault(pid, []).append(sock.session_reused)
            sock.close()
        return seen

    def metrics(self) -> dict:
        """The admin endpoint's /metrics, parsed by prometheus_client (an independent parser)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/metrics",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            return {f.name: f for f in parser.text_string_to_metric_families(answer.read().decode())}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def serve(tmp_path):
    gw = TwoWorkers(tmp_path)
    yield gw
    assert gw.stop() == 0, "".join(gw.lines)[-3000:]


def test_a_session_resumes_on_every_worker(serve):
    first, issuer = serve.connect()
    assert first.version() == "TLSv1.3" and not first.session_reused and first.session.has_ticket
    session = first.session
    first.close()
    seen = serve.resumes(session)
    assert set(seen) == set(serve.workers()), f"connections landed on {set(seen)} only"
    assert all(all(r) for r in seen.values()), f"not resumed on some worker (issuer {issuer}): {seen}"

    # A worker killed and started again takes the ring the others use: the old ticket still resumes.
    victim = serve.workers()[0]
    os.kill(victim, signal.SIGKILL)
    serve.until(lambda: victim not in serve.workers() and len(serve.workers()) == 2
                and serve.said("worker listening on") >= 3, "the worker's restart")
    seen = serve.resumes(session)
    assert set(seen) == set(serve.workers())
    assert all(all(r) for r in seen.values()), seen

    # A reload makes each worker a new SSLContext: keyed on its first connection, same ring.
    serve.proc.send_signal(signal.SIGHUP)
    serve.until(lambda: serve.said("config reloaded") >= 2, "both workers' reload")
    seen = serve.resumes(session)
    assert set(seen) == set(serve.workers())
    assert all(all(r) for r in seen.values()), seen
    assert "ticket" not in "".join(serve.lines).lower(), "".join(serve.lines)   # no warning, no key material


def value(fams: dict, family: str, sample: str, **labels) -> float | None:
    """The one sample named ``sample`` of ``family`` with exactly these labels (None: absent)."""
    fam = fams.get(family)
    found = [s.value for s in (fam.samples if fam else []) if s.name == sample and s.labels == labels]
    assert len(found) <= 1, (sample, labels, found)
    return found[0] if found else None


def test_resumptions_counted_on_the_admin_metrics(tmp_path):
    """Real TLS resumptions through `seg-fast serve --workers 2`: each worker's
    seg_fast_worker_tls_tickets_accepted_total is the number of resumed connections the kernel
    says it held, the sum is theirs, every resumption renewed the ticket, none refused; the key
    age runs from the serve's start."""
    serve = TwoWorkers(tmp_path, admin_port=free_port())
    try:
        first, issuer = serve.connect()
        assert not first.session_reused
        session = first.session
        first.close()
        seen = serve.resumes(session)
        assert all(all(r) for r in seen.values()), seen
        landed = {pid: len(r) for pid, r in seen.items()}
        pids = serve.workers()

        def counted():
            fams = serve.metrics()
            per = {pid: value(fams, "seg_fast_worker_tls_tickets_accepted", "seg_fast_worker_tls_tickets_accepted_total",
                              worker=str(pid), key="current") for pid in pids}
            return (fams, per) if per == {pid: landed.get(pid, 0) for pid in pids} else None

        fams, per = serve.until(counted, f"/metrics to count the resumptions per worker ({landed})")
        total = value(fams, "seg_fast_tls_tickets_accepted", "seg_fast_tls_tickets_accepted_total", key="current")
        assert total == CONNECTIONS == sum(per.values())
        assert value(fams, "seg_fast_tls_tickets_accepted", "seg_fast_tls_tickets_accepted_total", key="other") == 0
        assert value(fams, "seg_fast_tls_tickets_refused", "seg_fast_tls_tickets_refused_total") == 0
        for pid in pids:
            w = {"worker": str(pid)}
            renewed = value(fams, "seg_fast_worker_tls_tickets_renewed", "seg_fast_worker_tls_tickets_renewed_total", **w)
            issued = value(fams, "seg_fast_worker_tls_tickets_issued", "seg_fast_worker_tls_tickets_issued_total", **w)
            assert renewed >= per[pid], (pid, renewed, per)
            # the issuer also made the first session's tickets (a full handshake: not renewals)
            assert issued >= renewed + (1 if pid == issuer else 0), (pid, issued, renewed)
            age = value(fams, "seg_fast_worker_tls_ticket_key_age_seconds",
                        "seg_fast_worker_tls_ticket_key_age_seconds", **w)
            assert 0 <= age <= time.time() - serve.started + 1, age
        assert "ticket" not in "".join(serve.lines).lower(), "".join(serve.lines)
    finally:
        assert serve.stop() == 0, "".join(serve.lines)[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SEG_FAST_SLOW"), reason="slow: SEG_FAST_SLOW=1 runs it")
def test_rotation_in_a_running_serve(tmp_path):
    """listener.tls_ticket_key_rotation = 60 (the least): the first session's key leaves the ring
    two rotations on; the ticket the last resumption before that brought (under the key that was
    current then, previous now) still resumes, on both workers. ~2-3 minutes."""
    serve = TwoWorkers(tmp_path, rotation=60)
    try:
        first, _ = serve.connect()
        s0 = first.session
        first.close()
        latest = None
        end = time.monotonic() + 240
        while True:
            assert time.monotonic() < end, "the first session still resumes after 4 minutes: no rotation"
            sock, _ = serve.connect(s0)
            if not sock.session_reused:
                sock.close()
                break
            latest = sock.session            # renewed: a ticket under the key current now
            sock.close()
            time.sleep(2)
        assert latest is not None, "the first session never resumed"
        seen = serve.resumes(latest)
        assert set(seen) == set(serve.workers()) and all(all(r) for r in seen.values()), seen
    finally:
        assert serve.stop() == 0, "".join(serve.lines)[-3000:]
