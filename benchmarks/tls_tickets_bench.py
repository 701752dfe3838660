"""Gateway CPU per device connection: full vs resumed TLS handshakes, shared ticket keys or not.

    python benchmarks/tls_tickets_bench.py [--base /tmp/H4-base] [--connections 300] [--rounds 3] [--key rsa]

A `seg-fast serve --workers 2` with device-leg TLS (a trustme certificate, RSA-2048 by
default: what most gateways present; ``--key ecdsa`` for P-256). Each connection: TCP
connect, TLS 1.3 handshake, one request the gateway answers itself (a 404), close. Modes:

- ``full``: no session offered, every handshake full;
- ``resumed``: every connection offers the session one earlier connection got.

Measured: the CPU time of the serve's worker processes (every thread's
/proc/<pid>/task/<tid>/schedstat, ns) over ``--connections`` connections, per connection;
the share that resumed (the client's ``session_reused``); and the connections per worker.
With ``--base TREE`` (a checkout of the commit before the shared keys, its extensions
built) the same runs go to that tree's serve too, alternating tree and mode round by
round (medians over ``--rounds``): there, a connection that reaches the worker that did
not issue the ticket gets a full handshake. The client runs here, in one thread; its CPU
is not counted. Writes benchmarks/results/tls_tickets.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUEST = b"GET /nothing-here HTTP/1.1\r\nHost: localhost\r\n\r\n"
sys.path.insert(0, str(REPO / "tests"))
from processes import stop_process  # noqa: E402  (SIGTERM, then SIGKILL after a grace)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    def __init__(self, tree: Path, tmp: Path, cert_dir: Path):
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = tmp / "gateway.toml"
        cfg.write_text("\n".join([
            "workers = 2", "[listener]", 'host = "127.0.0.1"', f"port = {self.port}",
            f'tls_cert = "{cert_dir / "cert.pem"}"', f'tls_key = "{cert_dir / "key.pem"}"',
            "[upstream]", f'url = "http://127.0.0.1:{free_port()}"', "[admin]", "enabled = false",
            "[log]", 'transactions = ""', f'file = "{tmp / "gateway.log"}"',
            "[policy]", "allow_if_no_policies = true", f'sqlite_path = "{tmp / "policy.db"}"',
            "[security]", f'master_key_file = "{tmp / "master.key"}"', f'key_state_file = "{tmp / "keys.json"}"']) + "\n")
        env = dict(os.environ, PYTHONPATH=str(tree / "src"), SEG_FAST_STATE_DIR=str(tmp / "state"))
        self.proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env,
                                     cwd=tmp, stdout=subprocess.DEVNULL, stderr=open(tmp / "stderr.log", "w"))
        end = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None and time.monotonic() < end, (tmp / "stderr.log").read_text()
            if len(self.workers()) == 2 and (tmp / "stderr.log").read_text().count("worker listening on") >= 2:
                break
            time.sleep(0.1)

    def workers(self) -> list[int]:
        from seg_fast.proxy.forked import worker_pids

        return worker_pids(self.proc.pid)

    def cpu_ns(self) -> int:
        return threads_cpu_ns(self.workers())

    def stop(self) -> None:
        stop_process(self.proc, 20)


def threads_cpu_ns(pids) -> int:
    """CPU time (ns) of every thread of these processes so far (/proc/<pid>/task/<tid>/schedstat)."""
    total = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass                # a thread that just ended
    return total


def one(port: int, ctx: ssl.SSLContext, session=None) -> ssl.SSLSocket:
    """A TLS connection that sent one request and read the answer's head (the gateway's 404)."""
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                           server_hostname="localhost", session=session)
    sock.sendall(REQUEST)
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise RuntimeError("the gateway closed without an answer")
        head += data
    return sock


def run(serve: Serve, ctx: ssl.SSLContext, n: int, session) -> dict:
    resumed = 0
    before = serve.cpu_ns()
    for _ in range(n):
        sock = one(serve.port, ctx, session)
        resumed += sock.session_reused
        sock.close()
    time.sleep(0.2)                 # the workers finish the last close
    cpu = serve.cpu_ns() - before
    return {"cpu_us_per_conn": cpu / n / 1000, "resumed": resumed / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a checkout before the shared ticket keys (extensions built)")
    ap.add_argument("--connections", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--key", choices=("rsa", "ecdsa"), default="rsa")
    ap.add_argument("--out", default=str(HERE / "results" / "tls_tickets.json"))
    args = ap.parse_args()
    key_type = trustme.KeyType.RSA if args.key == "rsa" else trustme.KeyType.ECDSA
    ca = trustme.CA(key_type=key_type)
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=key_type)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    trees = {"shared_keys": REPO}
    if args.base:
        trees["per_worker_keys"] = Path(args.base).resolve()
    with tempfile.TemporaryDirectory(prefix="tickets-bench-") as tmp:
        tmp = Path(tmp)
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        serves = {name: Serve(tree, tmp / name, tmp) for name, tree in trees.items()}
        try:
            sessions = {}
            for name, serve in serves.items():
                for _ in range(20):                          # warm-up: imports, first allocations
                    one(serve.port, ctx).close()
                sock = one(serve.port, ctx)
                sessions[name] = sock.session
                sock.close()
            runs: dict = {name: {"full": [], "resumed": []} for name in serves}
            for r in range(args.rounds):
                for name, serve in serves.items():
                    for mode in ("full", "resumed"):
                        got = run(serve, ctx, args.connections, sessions[name] if mode == "resumed" else None)
                        runs[name][mode].append(got)
                        print(f"round {r + 1} {name:16} {mode:8} {got['cpu_us_per_conn']:7.1f} µs/conn "
                              f"resumed {got['resumed']:.2f}", flush=True)
        finally:
            for serve in serves.values():
                serve.stop()
    summary: dict = {}
    for name, modes in runs.items():
        summary[name] = {mode: {"cpu_us_per_conn_median": round(statistics.median(x["cpu_us_per_conn"] for x in got), 1),
                                "cpu_us_per_conn": [round(x["cpu_us_per_conn"], 1) for x in got],
                                "resumed_share_median": round(statistics.median(x["resumed"] for x in got), 3)}
                         for mode, got in modes.items()}
    new = summary["shared_keys"]
    result = {
        "command": "python benchmarks/tls_tickets_bench.py " + " ".join(sys.argv[1:]),
        "what": "gateway worker CPU (schedstat, all threads) per TLS 1.3 connection (handshake, one 404, close), "
                "seg-fast serve --workers 2; resumed = every connection offers one earlier session",
        "certificate": "RSA-2048" if args.key == "rsa" else "ECDSA P-256",
        "connections_per_run": args.connections, "rounds": args.rounds,
        "results": summary,
        "saved_us_per_resumed_connection": round(new["full"]["cpu_us_per_conn_median"]
                                                 - new["resumed"]["cpu_us_per_conn_median"], 1),
    }
    if "per_worker_keys" in summary:
        base = summary["per_worker_keys"]
        result["offering_a_ticket_per_worker_keys_vs_shared_us"] = [base["resumed"]["cpu_us_per_conn_median"],
                                                                    new["resumed"]["cpu_us_per_conn_median"]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
