"""Proxy cost beside nginx: CPU per proxied request, requests/s, memory per parked Ping.

    python benchmarks/proxy_bench.py [--seconds 5] [--conns 32] [--parked 9000]

Both proxies (seg-fast with one worker, Debian nginx with one worker, proxy_pass and
upstream keepalive) sit in front of the same upstream and get the same request mix
from the same load generator, side by side in one run; the proxy under test is
pinned to CPU 0, everything else to the other CPUs. CPU per request is the proxy
process's utime+stime (from /proc) over the requests it completed, so a slow load
generator lowers requests/s but not the per-request figure.

Parked Pings: N device connections each send a Ping the upstream never answers;
memory per parked Ping is the growth of the proxy worker's RSS plus the kernel's
memory for its sockets, both of each Ping (``ss -tmn`` skmem), over N.
The bench asserts every answer of the load was 200, the upstream connections stayed
pooled (at most one per client connection), and each parked Ping holds exactly one
device and one upstream connection. N is bounded
by this machine's hard RLIMIT_NOFILE (a proxy holds two descriptors per Ping).

Prints the figures and the ratios, writes benchmarks/results/proxy_bench.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EAS = "/Microsoft-Server-ActiveSync"
TICK = os.sysconf("SC_CLK_TCK")

# (command, request body bytes, answer body bytes, weight per device-hour) per BENCH-PROFILE.md.
MIX = [
    ("Ping", 60, 13, 14),
    ("Sync", 90, 30_000, 12),
    ("SendMail", 20_000, 0, 3),
    ("ItemOperations", 120, 50_000, 2),
    ("FolderSync", 13, 228, 1),
]
from seg_fast.eas.wbxml import Element, encode  # noqa: E402

# Small requests only (a FolderSync-sized exchange): the per-request overhead alone.
SMALL_MIX = [("FolderSync", 13, 228, 1)]
# A Ping whose HeartbeatInterval is 900 s, as devices send it.
PING_BODY = encode(Element("Ping:Ping", children=[
    Element("Ping:HeartbeatInterval", text="900"),
    Element("Ping:Folders", children=[Element("Ping:Folder", children=[
        Element("Ping:Id", text="1"), Element("Ping:Class", text="Email")])])]))


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _workers(pid: int, timeout: float = 20.0) -> list[int]:
    """An nginx master's workers, once it has forked them (its port answers before that:
    the master holds the listening socket)."""
    deadline = time.monotonic() + timeout
    while not (kids := _children(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return kids


# -- nginx ---------------------------------------------------------------------------------

def _nginx_conf(workdir: Path, listen: int, body: str, nofile: int) -> Path:
    conf = workdir / f"nginx-{listen}.conf"
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
pid {workdir}/nginx-{listen}.pid;
error_log {workdir}/nginx-{listen}.err warn;
events {{ worker_connections {nofile}; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body-{listen};
    proxy_temp_path {workdir}/proxy-{listen};
    fastcgi_temp_path {workdir}/fcgi-{listen};
    uwsgi_temp_path {workdir}/uwsgi-{listen};
    scgi_temp_path {workdir}/scgi-{listen};
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_max_body_size 100m;
    {body}
}}
""")
    return conf


def start_upstream_nginx(workdir: Path, port: int, nofile: int) -> subprocess.Popen:
    """The mail server for the CPU run: static answers of the mix's sizes, any method."""
    files = workdir / "answers" / "f"
    files.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(1)
    for cmd, _, size, _ in MIX:
        (files / f"{cmd}.bin").write_bytes(bytes(rnd.getrandbits(8) for _ in range(size)))
    body = f"""
    server {{
        listen 127.0.0.1:{port} reuseport;
        location = {EAS} {{ rewrite ^ /f/$arg_Cmd.bin last; }}
        location /f/ {{ root {workdir}/answers; default_type application/vnd.ms-sync.wbxml;
                       error_page 405 =200 $uri; }}
    }}"""
    conf = _nginx_conf(workdir, port, body, nofile)
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc


def start_proxy_nginx(workdir: Path, port: int, upstream_port: int, nofile: int) -> subprocess.Popen:
    body = f"""
    upstream mail {{ server 127.0.0.1:{upstream_port}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port} reuseport deferred;
        location {EAS} {{
            proxy_pass http://mail;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}"""
    conf = _nginx_conf(workdir, port, body, nofile)
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc


# -- seg-fast ------------------------------------------------------------------------------

def start_gateway(workdir: Path, port: int, upstream_port: int, gatekeeper: str) -> tuple[subprocess.Popen, int]:
    cfg = workdir / f"gateway-{port}.toml"
    cfg.write_text(f"""workers = 1
[listener]
host = "127.0.0.1"
port = {port}
[upstream]
url = "http://127.0.0.1:{upstream_port}"
[admin]
enabled = false
[log]
transactions = ""
[timeouts]
idle_keepalive = 3600.0
[limits]
# Every parked Ping comes from 127.0.0.1 here: the per-address cap (a defence) is not measured.
max_connections_per_address = 100000
[policy]
allow_if_no_policies = true
sqlite_path = "{workdir}/policy-{port}.db"
[security]
block_attachments_without_policy = false
max_transform_bytes = 67108864
master_key_file = "{workdir}/master-{port}.key"
key_state_file = "{workdir}/keys-{port}.json"
""")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_BENCH_GATEKEEPER=gatekeeper)
    proc = subprocess.Popen([sys.executable, "-c", GATEWAY_MAIN, str(cfg)], env=env,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"worker (\d+) ready", line)
    if not m:
        raise RuntimeError(f"gateway did not start: {line}{proc.stderr.read()}")
    _wait_port(port)
    return proc, int(m.group(1))


# One worker in the foreground (no control process), so the pid measured is the proxy.
GATEWAY_MAIN = r"""
import os, sys, trio
from seg_fast.config import load_config
from seg_fast.proxy.gateway import Gateway
from seg_fast.hooks import AllowAll
cfg = load_config(sys.argv[1])
factory = (lambda c: AllowAll()) if os.environ.get("SEG_FAST_BENCH_GATEKEEPER") == "allow-all" else None
gw = Gateway(cfg, gatekeeper_factory=factory)
async def main():
    async with trio.open_nursery() as n:
        await n.start(gw.serve)
        print(f"worker {os.getpid()} ready", file=sys.stderr, flush=True)
trio.run(main)
"""


# -- load: request mix ---------------------------------------------------------------------

def _request_bytes(cmd: str, body_len: int, i: int) -> bytes:
    body = PING_BODY if cmd == "Ping" else bytes(body_len)
    query = f"Cmd={cmd}&User=user{i}&DeviceId=DEV{i:06d}&DeviceType=iPhone"
    # the credentials name the same user as the query (the gateway refuses a mismatch)
    auth = base64.b64encode(f"user{i}:secret".encode()).decode()
    head = (f"POST {EAS}?{query} HTTP/1.1\r\nHost: gw.example\r\n"
            f"Authorization: Basic {auth}\r\nMS-ASProtocolVersion: 14.1\r\n"
            f"User-Agent: Apple-iPhone9C1/1602.92\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


DRAIN_SECONDS = 30.0


def run_load(port: int, conns: int, seconds: float, cpus: set[int], mix=None) -> dict:
    """Closed-loop keep-alive load in this process; returns counts per command."""
    os.sched_setaffinity(0, cpus)
    mix = mix or MIX
    weights = [w for *_, w in mix]
    rnd = random.Random(2)
    sel = selectors.DefaultSelector()
    state = {}
    for i in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        state[s] = {"i": i, "buf": bytearray(), "need": None, "cmd": None}
        sel.register(s, selectors.EVENT_READ)
    counts = {cmd: 0 for cmd, *_ in mix}
    statuses: dict[int, int] = {}

    def send_next(s):
        st = state[s]
        cmd, req_len, _, _ = rnd.choices(mix, weights)[0]
        st["cmd"] = cmd
        s.setblocking(True)
        s.sendall(_request_bytes(cmd, req_len, st["i"]))
        s.setblocking(False)

    for s in state:
        send_next(s)
    start = time.monotonic()
    deadline = start + seconds
    done = 0
    # Past the deadline no new request is sent and the ones in flight are read to the end:
    # a client closed mid-request leaves its answer's mail-server connection to the pool,
    # which the next run's pooled-connection check would count as the proxy's.
    outstanding = conns
    while outstanding:
        if time.monotonic() > deadline + DRAIN_SECONDS:
            raise RuntimeError(f"{outstanding} answers still missing {DRAIN_SECONDS} s after the load stopped")
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            st = state[s]
            data = s.recv(262144)
            if not data:
                raise RuntimeError("proxy closed a connection")
            buf = st["buf"]
            buf += data
            while True:
                if st["need"] is None:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = bytes(buf[:end]).lower()
                    status = int(head[9:12])
                    statuses[status] = statuses.get(status, 0) + 1
                    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                    st["need"] = end + 4 + (int(m.group(1)) if m else 0)
                if len(buf) < st["need"]:
                    break
                del buf[:st["need"]]
                st["need"] = None
                counts[st["cmd"]] += 1
                done += 1
                if time.monotonic() < deadline:
                    send_next(s)
                else:
                    outstanding -= 1
                    sel.unregister(s)     # its last answer: nothing more is read from it
                    break
    elapsed = time.monotonic() - start
    for s in state:
        s.close()
    return {"requests": done, "seconds": elapsed, "counts": counts, "statuses": statuses}


def measure_cpu(name: str, pids: list[int], port: int, args) -> dict:
    # Warm up (connections, pools, caches), then measure.
    mix = SMALL_MIX if args.mix == "small" else MIX
    run_load(port, args.conns, 1.0, args.load_cpus, mix)
    before = sum(_cpu_seconds(p) for p in pids)
    result = run_load(port, args.conns, args.seconds, args.load_cpus, mix)
    used = sum(_cpu_seconds(p) for p in pids) - before
    upstream = _upstream_connections_of(pids, args.upstream_port)
    # Honest only if every request got the upstream's answer, through pooled connections.
    assert result["requests"] and set(result["statuses"]) == {200}, f"{name}: statuses {result['statuses']}"
    assert 1 <= upstream <= args.conns, f"{name}: {upstream} upstream connections for {args.conns} clients"
    result["upstream_connections_established"] = upstream
    result.update(name=name, cpu_seconds=used,
                  cpu_us_per_request=used / max(result["requests"], 1) * 1e6,
                  requests_per_second=result["requests"] / result["seconds"],
                  cpu_utilisation=used / result["seconds"])
    return result


# -- parked Pings --------------------------------------------------------------------------

HOLD_MAIN = r"""
import os, selectors, socket, sys, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
port = int(sys.argv[1])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(65535); ls.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(ls, selectors.EVENT_READ)
conns = {}; got = 0
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            while True:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    break
                c.setblocking(False); conns[c] = bytearray(); sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        data = c.recv(65536)
        if not data:
            sel.unregister(c); c.close(); conns.pop(c, None); continue
        buf = conns[c]; buf += data
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            import re
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", bytes(buf[:end]))
            if len(buf) >= end + 4 + (int(m.group(1)) if m else 0):
                got += 1; buf.clear()
                if got % 500 == 0:
                    print(got, flush=True)
"""


def measure_parked(name: str, pid: int, port: int, hold_port: int, args) -> dict:
    """Open N device connections, each sending one Ping the upstream holds; RSS growth / N."""
    os.sched_setaffinity(0, args.load_cpus)
    n = args.parked
    socks = []
    # Warm-up: a few parked Pings first, so one-time allocations are in the baseline.
    for i in range(50):
        socks.append(_park_one(port, 900_000 + i))
    time.sleep(1.0)
    base = _rss_kb(pid)
    sk_base = _socket_memory(port, hold_port)
    t0 = time.monotonic()
    for i in range(n):
        socks.append(_park_one(port, i))
    # Wait until the proxy has forwarded all of them (RSS settles).
    last, stable = -1, 0
    while stable < 3 and time.monotonic() - t0 < 120:
        time.sleep(0.5)
        rss = _rss_kb(pid)
        stable = stable + 1 if rss == last else 0
        last = rss
    grown = _rss_kb(pid) - base
    sk_grown = _socket_memory(port, hold_port) - sk_base
    alive = _count_established(port)
    upstream_alive = _count_established(hold_port)
    for s in socks:
        s.close()
    # Every Ping parked: one device connection and one upstream connection each (a Ping
    # is held open upstream, it cannot share a connection), the warm-up's included.
    assert alive == n + 50, f"{name}: {alive} device connections established, expected {n + 50}"
    assert upstream_alive == n + 50, f"{name}: {upstream_alive} upstream connections, expected {n + 50}"
    return {"name": name, "parked": n, "rss_growth_kb": grown, "bytes_per_parked_ping": grown * 1024 / n,
            "socket_memory_growth_bytes": sk_grown, "socket_bytes_per_parked_ping": sk_grown / n,
            "total_bytes_per_parked_ping": (grown * 1024 + sk_grown) / n,
            "device_connections_established": alive, "upstream_connections_established": upstream_alive}


_SKMEM = re.compile(r"skmem:\(r(\d+),rb\d+,t(\d+),tb\d+,f(\d+),w(\d+),o(\d+),bl(\d+)")


def _socket_memory(port: int, upstream_port: int) -> int:
    """Kernel memory of the proxy's sockets (``ss -tmn`` skmem: receive queue r, send
    queue w, forward-allocated f, options o, backlog bl), both sides of each proxied
    connection: the device side (local port = the proxy's) and the upstream side
    (remote port = the upstream's)."""
    out = subprocess.run(["ss", "-tmnH", "state", "established",
                          f"( sport = :{port} or dport = :{upstream_port} )"],
                         capture_output=True, text=True, check=True).stdout
    total = 0
    for m in _SKMEM.finditer(out):
        r, _t, f, w, o, bl = map(int, m.groups())
        total += r + f + w + o + bl
    return total


def _upstream_connections_of(pids: list[int], port: int) -> int:
    """Established connections to ``port`` owned by these processes (the other proxy's
    idle pool to the same upstream is not counted)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines()
               if any(int(p) in pids for p in re.findall(r"pid=(\d+)", line)))


def _count_established(port: int) -> int:
    hexport = f"{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(":" + hexport) and parts[3] == "01":
            count += 1
    return count


def _park_one(port: int, i: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(_request_bytes("Ping", 0, i))
    return s


# -- main ----------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--parked", type=int, default=9000)
    ap.add_argument("--gatekeeper", choices=["policy", "allow-all"], default="policy",
                    help="policy: the policy engine decides every request (allow when no policies)")
    ap.add_argument("--mix", choices=["profile", "small"], default="profile",
                    help="profile: BENCH-PROFILE.md's request mix; small: 228-byte answers only")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-parked", action="store_true")
    args = ap.parse_args(argv)
    nofile = _raise_nofile()
    if 2 * args.parked + 64 > nofile:
        args.parked = (nofile - 64) // 2
        print(f"(RLIMIT_NOFILE hard limit {nofile}: parked Pings capped at {args.parked})")
    if not shutil.which("nginx"):
        print("nginx not found (Debian package nginx-light)", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu = {cpus[0]}
    args.load_cpus = set(cpus[1:]) or proxy_cpu
    results: dict = {"machine_cpus": len(cpus), "gatekeeper": args.gatekeeper, "mix": args.mix}
    workdir = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    os.chmod(workdir, 0o755)         # nginx workers run as an unprivileged user
    procs: list[subprocess.Popen] = []
    try:
        if not args.skip_cpu:
            up_port, ng_port, gw_port = _free_port(), _free_port(), _free_port()
            up = start_upstream_nginx(workdir, up_port, 4096)
            args.upstream_port = up_port
            procs.append(up)
            for w in _workers(up.pid):
                os.sched_setaffinity(w, args.load_cpus)
            ng = start_proxy_nginx(workdir, ng_port, up_port, 4096)
            procs.append(ng)
            ng_workers = _workers(ng.pid)
            for w in ng_workers:
                os.sched_setaffinity(w, proxy_cpu)
            gw, gw_pid = start_gateway(workdir, gw_port, up_port, args.gatekeeper)
            procs.append(gw)
            os.sched_setaffinity(gw_pid, proxy_cpu)
            cpu_ng = measure_cpu("nginx", ng_workers, ng_port, args)
            cpu_gw = measure_cpu("seg-fast", [gw_pid], gw_port, args)
            results["cpu"] = {"nginx": cpu_ng, "seg-fast": cpu_gw,
                              "ratio_cpu_per_request": cpu_gw["cpu_us_per_request"] / cpu_ng["cpu_us_per_request"]}
            for r in (cpu_ng, cpu_gw):
                print(f"{r['name']:>9}: {r['cpu_us_per_request']:7.1f} CPU-us/request  "
                      f"{r['requests_per_second']:8.0f} req/s  (proxy core {100 * r['cpu_utilisation']:.0f}% busy, "
                      f"{r['requests']} requests, statuses {r['statuses']})")
            print(f"    ratio: seg-fast / nginx CPU per request = {results['cpu']['ratio_cpu_per_request']:.2f}x")
            for p in procs:
                p.send_signal(signal.SIGQUIT if p in (up, ng) else signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            procs.clear()
        if not args.skip_parked:
            hold_port, ng_port, gw_port = _free_port(), _free_port(), _free_port()
            hold = subprocess.Popen([sys.executable, "-c", HOLD_MAIN, str(hold_port),
                                     ",".join(map(str, args.load_cpus))], stdout=subprocess.PIPE, text=True)
            procs.append(hold)
            hold.stdout.readline()
            parked = {}
            ng = start_proxy_nginx(workdir, ng_port, hold_port, nofile)
            procs.append(ng)
            ng_worker = _children(ng.pid)[0]
            os.sched_setaffinity(ng_worker, proxy_cpu)
            parked["nginx"] = measure_parked("nginx", ng_worker, ng_port, hold_port, args)
            ng.send_signal(signal.SIGQUIT)
            ng.wait(10)
            time.sleep(1.0)
            gw, gw_pid = start_gateway(workdir, gw_port, hold_port, args.gatekeeper)
            procs.append(gw)
            os.sched_setaffinity(gw_pid, proxy_cpu)
            parked["seg-fast"] = measure_parked("seg-fast", gw_pid, gw_port, hold_port, args)
            parked["ratio"] = parked["seg-fast"]["bytes_per_parked_ping"] / parked["nginx"]["bytes_per_parked_ping"]
            results["parked"] = parked
            for name in ("nginx", "seg-fast"):
                r = parked[name]
                print(f"{name:>9}: {r['total_bytes_per_parked_ping']:7.0f} bytes per parked Ping: "
                      f"{r['bytes_per_parked_ping']:.0f} of RSS + {r['socket_bytes_per_parked_ping']:.0f} of kernel "
                      f"socket buffers, ss skmem ({r['parked']} parked; open connections: "
                      f"{r['device_connections_established']} device, "
                      f"{r['upstream_connections_established']} upstream)")
            parked["ratio_total"] = (parked["seg-fast"]["total_bytes_per_parked_ping"]
                                     / parked["nginx"]["total_bytes_per_parked_ping"])
            print(f"    ratio: seg-fast / nginx memory per parked Ping = {parked['ratio_total']:.2f}x "
                  f"(RSS alone {parked['ratio']:.2f}x)")
    finally:
        for p in procs:
            if p.poll() is None:
                for child in _children(p.pid):     # nginx workers outlive a killed master
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    results["command"] = "python " + " ".join(["benchmarks/proxy_bench.py", *(argv if argv is not None else sys.argv[1:])])
    results["note"] = "shared 2-core machine; both proxies measured side by side in one run"
    (out / "proxy_bench.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'proxy_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
