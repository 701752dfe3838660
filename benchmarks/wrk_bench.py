"""CPU per small request, seg-fast beside nginx, driven by wrk (issue 10's comparison).

    apt install wrk nginx            # Debian packages; not needed by the test suite
    python benchmarks/wrk_bench.py [--seconds 5] [--conns 32] [--runs 3]

One run, side by side: ``seg-fast serve --workers 1`` (baseline policy, transaction
log off) and nginx (one worker, proxy_pass with upstream keepalive, access_log off),
each pinned with taskset to CPU 0; a fixed-answer upstream (nginx) and wrk on CPU 1.
wrk sends a 103-byte Sync POST on 32 keep-alive connections, then the same with
``Connection: close`` (a new connection per request). CPU per request is the proxy's
process tree utime+stime (/proc, the control process included) over the requests wrk
completed, so contention lowers requests/s but hardly the per-request figure.
Every answer must be a 200 (wrk's "Non-2xx" count is asserted zero).

Prints µs CPU per request for each and the ratio; writes benchmarks/results/wrk_bench.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EAS = "/Microsoft-Server-ActiveSync"
TICK = os.sysconf("SC_CLK_TCK")
BODY_LEN = 103                  # the Sync request body of the measurement
ANSWER = "S" * 64               # the fixed answer the mail server gives


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(x) for x in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def _nginx(workdir: Path, name: str, cpu: int, body: str) -> subprocess.Popen:
    conf = workdir / f"{name}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body-{name};
    proxy_temp_path {workdir}/proxy-{name};
    fastcgi_temp_path {workdir}/fcgi-{name};
    uwsgi_temp_path {workdir}/uwsgi-{name};
    scgi_temp_path {workdir}/scgi-{name};
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    {body}
}}
""")
    return subprocess.Popen(["taskset", "-c", str(cpu), "nginx", "-c", str(conf), "-p", str(workdir)],
                            stderr=subprocess.DEVNULL)


def start_upstream(workdir: Path, port: int) -> subprocess.Popen:
    proc = _nginx(workdir, "upstream", 1, f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/vnd.ms-sync.wbxml; return 200 "{ANSWER}"; }}
    }}""")
    _wait_port(port)
    return proc


def start_nginx_proxy(workdir: Path, port: int, upstream: int) -> subprocess.Popen:
    proc = _nginx(workdir, "proxy", 0, f"""
    upstream mail {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port} deferred;
        location {EAS} {{
            proxy_pass http://mail;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}""")
    _wait_port(port)
    return proc


def start_seg_fast(workdir: Path, port: int, upstream: int, *, tls: tuple[Path, Path] | None = None,
                   env_extra: dict | None = None) -> subprocess.Popen:
    """``seg-fast serve --workers 1`` pinned to CPU 0 (``tls``: the listener's certificate and key)."""
    cfg = workdir / "gateway.toml"
    tls_lines = f'tls_cert = "{tls[0]}"\ntls_key = "{tls[1]}"\n' if tls else ""
    cfg.write_text(f"""workers = 1
[listener]
host = "127.0.0.1"
port = {port}
{tls_lines}[upstream]
url = "http://127.0.0.1:{upstream}"
[admin]
enabled = false
[log]
transactions = ""
[timeouts]
idle_keepalive = 3600.0
[limits]
max_connections_per_address = 100000
[policy]
allow_if_no_policies = true
sqlite_path = "{workdir}/policy.db"
[security]
block_attachments_without_policy = false
master_key_file = "{workdir}/master.key"
key_state_file = "{workdir}/keys.json"
""")
    env = dict(os.environ, SEG_FAST_STATE_DIR=str(workdir / "state"), **(env_extra or {}))
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "seg_fast", "serve",
                             "--workers", "1", "--config", str(cfg)],
                            env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, newest first; SIGKILL what has not exited within 20 s."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def _lua(workdir: Path, close: bool) -> Path:
    auth = base64.b64encode(b"user1:secret").decode()
    headers = {
        "Host": "gw.example", "Authorization": f"Basic {auth}", "MS-ASProtocolVersion": "14.1",
        "User-Agent": "Apple-iPhone9C1/1602.92", "Content-Type": "application/vnd.ms-sync.wbxml",
    }
    if close:
        headers["Connection"] = "close"
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script = workdir / f"sync-{'close' if close else 'keep'}.lua"
    script.write_text(f"""wrk.method = "POST"
wrk.path = "{EAS}?Cmd=Sync&User=user1&DeviceId=DEV000001&DeviceType=iPhone"
wrk.body = string.rep("x", {BODY_LEN})
{lines}
""")
    return script


def run_wrk(port: int, script: Path, conns: int, seconds: float) -> dict:
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t", "1", "-c", str(conns), "-d", f"{seconds:g}s",
                          "-s", str(script), f"http://127.0.0.1:{port}{EAS}"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if not m:
        raise RuntimeError(f"wrk said:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": int(m.group(1)), "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": [int(x) for x in errors.groups()] if errors else [0, 0, 0, 0]}


def measure(name: str, root: int, port: int, script: Path, args) -> dict:
    run_wrk(port, script, args.conns, 1.0)          # warm up: connections, pools, caches
    pids = _tree(root)
    before, t0 = _cpu_seconds(pids), time.monotonic()
    result = run_wrk(port, script, args.conns, args.seconds)
    used, wall = _cpu_seconds(pids) - before, time.monotonic() - t0
    assert result["requests"] > 0 and result["non_2xx"] == 0, f"{name}: {result}"
    result.update(cpu_seconds=round(used, 3), requests_per_second=round(result["requests"] / wall),
                  cpu_us_per_request=round(used / result["requests"] * 1e6, 1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="repeat, alternating the proxies; each figure is the median")
    ap.add_argument("--only", choices=["seg-fast", "nginx"], default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "wrk_bench.json"))
    args = ap.parse_args(argv)
    for tool in ("wrk", "nginx", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt install wrk nginx util-linux)")
    if os.cpu_count() < 2:
        sys.exit("needs two CPUs (the proxy on CPU 0, upstream and wrk on CPU 1)")
    workdir = Path(tempfile.mkdtemp(prefix="wrk-bench-"))
    up_port, ng_port, sf_port = _free_port(), _free_port(), _free_port()
    procs = []
    figures: dict[str, dict[str, list]] = {}
    try:
        procs.append(start_upstream(workdir, up_port))
        proxies = []
        if args.only != "nginx":
            sf = start_seg_fast(workdir, sf_port, up_port)
            procs.append(sf)
            proxies.append(("seg-fast", sf.pid, sf_port))
        if args.only != "seg-fast":
            ng = start_nginx_proxy(workdir, ng_port, up_port)
            procs.append(ng)
            proxies.append(("nginx", ng.pid, ng_port))
        for variant, close in (("keepalive", False), ("close", True)):
            script = _lua(workdir, close)
            for _ in range(args.runs):
                for name, pid, port in proxies:
                    r = measure(name, pid, port, script, args)
                    figures.setdefault(variant, {}).setdefault(name, []).append(r)
                    print(f"{variant:9s} {name:8s} {r['cpu_us_per_request']:8.1f} µs CPU/request "
                          f"{r['requests_per_second']:7d} req/s", flush=True)
    finally:
        stop_all(procs)
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {"command": "python benchmarks/wrk_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "conns": args.conns, "seconds": args.seconds, "runs": args.runs, "body_bytes": BODY_LEN,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": {}}
    print()
    for variant, by_name in figures.items():
        row = {}
        for name, runs in by_name.items():
            us = sorted(r["cpu_us_per_request"] for r in runs)[len(runs) // 2]
            row[name] = {"cpu_us_per_request": us, "runs": runs}
        if "seg-fast" in row and "nginx" in row:
            row["ratio"] = round(row["seg-fast"]["cpu_us_per_request"] / row["nginx"]["cpu_us_per_request"], 2)
            print(f"{variant:9s} seg-fast {row['seg-fast']['cpu_us_per_request']:.1f} µs vs nginx "
                  f"{row['nginx']['cpu_us_per_request']:.1f} µs per request: {row['ratio']}x")
        summary["variants"][variant] = row
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
