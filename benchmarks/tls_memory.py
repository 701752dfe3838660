"""Memory per idle TLS device connection through a running gateway: the device leg's TLS
(proxy/tlsio.py) as it is beside the TLS stream of an earlier commit, side by side.

    python benchmarks/tls_memory.py [--devices 3000] [--answers 300000,228] [--baseline 7a1fb0b]

Each of N devices opens a TLS connection to one gateway worker, makes one request whose
answer is ``--answers`` bytes (300 KB: the profile's attachment; 228: a FolderSync), reads
it whole (length checked), then sends a Ping the mail server never answers: the Ping
parks, and the connection stays open and idle, as a device's does for hours. Memory per
device is the growth of the worker's RSS over N (after 50 warm-up devices), and beside it
the kernel's memory for the worker's sockets (``ss -tmn`` skmem of the device and mail
server sides) and /proc/net/sockstat's TCP page count (machine-wide: anything else running
moves it). Every device must still be parked when it is measured (asserted: its connection
quiet, no answer, EOF or reset; as many connections established at the gateway and upstream).

The baseline is the same tree with gateway.TLSStream taken from ``git show
<commit>:src/seg_fast/proxy/tlsio.py`` (before this change: an SSLObject over two memory
BIOs), patched in at start-up as tls_bench.py --baseline does; nothing else differs between
the two gateways. The gateway (``seg-fast serve --workers 1``, the worker's RSS measured; TLS
1.3, a trustme ECDSA certificate) is pinned to CPU 0, the mail server and the devices to CPU 1.

Beside it, the worker's CPU time (utime+stime) per device over the ramp: a full handshake,
the answer, the Ping forwarded and parked. Prints KiB per device for each stream and answer
size; writes
benchmarks/results/tls_memory.json.
"""
from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import proxy_bench
import tls_bench
import wrk_bench
from proxy_bench import (
    _count_established,
    _raise_nofile,
    _request_bytes,
    _rss_kb,
    _socket_memory,
)

from seg_fast.proxy.forked import worker_pids

WARM = 50

# The mail server: a Ping is held (never answered), anything else gets an answer of `size` bytes.
# Arguments: port, size, the CPU it runs on, and (https://) a certificate and key.
UPSTREAM_MAIN = r"""
import os, random, re, ssl, sys, resource, trio
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, size, cpu = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.sched_setaffinity(0, {cpu})
ctx = None
if len(sys.argv) > 4:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(sys.argv[4], sys.argv[5])
answer = (f"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
          f"Content-Length: {size}\r\n\r\n").encode() + random.Random(1).randbytes(size)

async def serve(stream):
    if ctx is not None:
        stream = trio.SSLStream(stream, ctx, server_side=True)
    buf = bytearray()
    try:
        async for data in stream:
            buf += data
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", bytes(buf[:end]))
                need = end + 4 + (int(length.group(1)) if length else 0)
                if len(buf) < need:
                    break
                held = b"Cmd=Ping" in bytes(buf[:buf.find(b"\r\n")])
                del buf[:need]
                if not held:
                    await stream.send_all(answer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass

async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: trio.serve_tcp(serve, port, host="127.0.0.1", backlog=65535,
                                                               task_status=task_status))
        print("ready", flush=True)

trio.run(main)
"""

def start_gateway(workdir: Path, name: str, upstream: int, cert: Path, key: Path, baseline: str):
    """``seg-fast serve --workers 1`` with device-leg TLS (tls_bench's, pinned to CPU 0; ``baseline``:
    its TLSStream from that commit); (process, port, the worker's pid)."""
    port = proxy_bench._free_port()
    proc = tls_bench.start_seg_fast_tls(workdir, port, upstream, cert, key, name, baseline=baseline)
    end = time.monotonic() + 20
    while not (workers := worker_pids(proc.pid)):
        assert time.monotonic() < end, "no worker process"
        time.sleep(0.05)
    return proc, port, workers[0]


def start_upstream(port: int, size: int, cpu: int = 1, tls: tuple[Path, Path] | None = None) -> subprocess.Popen:
    """The mail server on ``cpu``; with ``tls`` (certificate, key), at https://."""
    args = [str(port), str(size), str(cpu)] + ([str(p) for p in tls] if tls else [])
    proc = subprocess.Popen([sys.executable, "-c", UPSTREAM_MAIN, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def read_answer(s: ssl.SSLSocket) -> tuple[int, int]:
    """(status, body length) of one answer."""
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = s.recv(65536)
        if not data:
            raise RuntimeError("the gateway closed a connection")
        buf += data
    head = bytes(buf[:end]).lower()
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
    need = int(m.group(1)) if m else 0
    got = len(buf) - end - 4
    while got < need:
        data = s.recv(262144)
        if not data:
            raise RuntimeError("the gateway closed a connection mid-answer")
        got += len(data)
    return int(head[9:12]), got


def device(port: int, ctx: ssl.SSLContext, i: int, size: int, pause: float = 0.0) -> ssl.SSLSocket:
    """A TLS device that fetches ``size`` bytes, then (``pause`` seconds later) parks a Ping."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(_request_bytes("ItemOperations", 120, i))
    status, got = read_answer(s)
    assert status == 200 and got == size, (status, got, size)
    if pause:
        time.sleep(pause)     # the device thinks: its connection idles first (the lane holds its Ping)
    s.sendall(_request_bytes("Ping", 0, i))     # parks: the mail server holds it
    return s


def stop(socks: list, upstream: subprocess.Popen, gw: subprocess.Popen) -> None:
    """The devices' connections closed, the mail server and the gateway stopped."""
    for s in socks:
        s.close()
    upstream.terminate()
    wrk_bench.stop_all([gw])
    upstream.wait(30)


def sockstat_tcp_pages() -> int:
    m = re.search(r"TCP: .* mem (\d+)", Path("/proc/net/sockstat").read_text())
    return int(m.group(1)) if m else 0


def measure(name: str, workdir: Path, cert, key, ctx, baseline: str, size: int, n: int) -> dict:
    up_port = proxy_bench._free_port()
    upstream = start_upstream(up_port, size)
    gw, gw_port, pid = start_gateway(workdir, f"{name}-{size}", up_port, cert, key, baseline)
    socks = []
    try:
        for i in range(WARM):
            socks.append(device(gw_port, ctx, 900_000 + i, size))
        time.sleep(1.0)
        base, sk_base, pages_base = _rss_kb(pid), _socket_memory(gw_port, up_port), sockstat_tcp_pages()
        t0, cpu0 = time.monotonic(), proxy_bench._cpu_seconds(pid)
        for i in range(n):
            socks.append(device(gw_port, ctx, i, size))
        ramp = time.monotonic() - t0
        # Every Ping has parked once the mail server holds a connection for each.
        while _count_established(up_port) < n + WARM and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        time.sleep(1.0)
        cpu = proxy_bench._cpu_seconds(pid) - cpu0      # the worker's: handshake, answer, Ping, each device
        grown = _rss_kb(pid) - base
        sk_grown = _socket_memory(gw_port, up_port) - sk_base
        pages = sockstat_tcp_pages() - pages_base
        alive, upstream_alive = _count_established(gw_port), _count_established(up_port)
        # Every device still parked: its connection open and quiet (nothing to read, no EOF,
        # no reset), and as many connections established on the gateway's side and upstream
        # (>=: /proc/net/tcp is the machine's, another process may share a port number).
        poll = select.poll()
        for s in socks:
            poll.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
        stirred = poll.poll(0)
        assert not stirred, f"{name}: {len(stirred)} parked devices were answered or closed"
        assert alive >= n + WARM, f"{name}: {alive} device connections established, expected {n + WARM}"
        assert upstream_alive >= n + WARM, f"{name}: {upstream_alive} upstream connections, expected {n + WARM}"
    finally:
        stop(socks, upstream, gw)
    r = {"name": name, "answer_bytes": size, "devices": n, "rss_growth_kb": grown,
         "kib_per_device": round(grown / n, 2), "socket_memory_growth_bytes": sk_grown,
         "socket_kib_per_device": round(sk_grown / n / 1024, 2),
         "sockstat_tcp_pages_growth": pages,
         "total_kib_per_device": round((grown * 1024 + sk_grown) / n / 1024, 2),
         "ramp_seconds": round(ramp, 1), "worker_cpu_ms_per_device": round(cpu / n * 1000, 3), "device_connections_established": alive,
         "upstream_connections_established": upstream_alive}
    print(f"{name:9s} answer {size:7d} B: {r['kib_per_device']:6.2f} KiB RSS per device "
          f"+ {r['socket_kib_per_device']:.2f} KiB kernel socket memory (ss skmem; sockstat TCP "
          f"+{pages} pages) over {n} parked TLS devices; worker CPU {r['worker_cpu_ms_per_device']:.2f} ms "
          f"per device (handshake, answer, Ping)", flush=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=3000)
    ap.add_argument("--answers", default="300000,228", help="answer sizes in bytes, comma-separated")
    ap.add_argument("--baseline", default="7a1fb0b", help="the commit whose tlsio.TLSStream is the baseline "
                                                            "('' for the current stream alone)")
    ap.add_argument("--out", default=str(HERE / "results" / "tls_memory.json"))
    args = ap.parse_args(argv)
    nofile = _raise_nofile()
    if 3 * (args.devices + WARM) + 64 > nofile:
        sys.exit(f"RLIMIT_NOFILE hard limit {nofile} is too low for {args.devices} devices")
    os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="tls-memory-"))
    cert, key = tls_bench.make_certificate(workdir)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE     # the server is measured, not verified
    streams = [("baseline", args.baseline)] if args.baseline else []
    streams.append(("tlsio", ""))
    results = []
    try:
        for size in (int(x) for x in args.answers.split(",")):
            for name, baseline in streams:
                results.append(measure(name, workdir, cert, key, ctx, baseline, size, args.devices))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    by = {(r["name"], r["answer_bytes"]): r for r in results}
    comparison = []
    for size in sorted({r["answer_bytes"] for r in results}, reverse=True):
        old, new = by.get(("baseline", size)), by[("tlsio", size)]
        if old is not None:
            row = {"answer_bytes": size, "baseline_kib_per_device": old["kib_per_device"],
                   "tlsio_kib_per_device": new["kib_per_device"],
                   "saved_kib_per_device": round(old["kib_per_device"] - new["kib_per_device"], 2),
                   "ratio": round(old["kib_per_device"] / new["kib_per_device"], 2),
                   "baseline_cpu_ms_per_device": old["worker_cpu_ms_per_device"],
                   "tlsio_cpu_ms_per_device": new["worker_cpu_ms_per_device"]}
            comparison.append(row)
            print(f"answer {size:7d} B: {row['baseline_kib_per_device']:.2f} -> {row['tlsio_kib_per_device']:.2f} "
                  f"KiB RSS per parked TLS device ({row['ratio']}x less); worker CPU "
                  f"{row['baseline_cpu_ms_per_device']:.2f} -> {row['tlsio_cpu_ms_per_device']:.2f} ms per device")
    tls_bench.write_summary(args.out, {
        "command": "python benchmarks/tls_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "baseline_commit": args.baseline,
        "tls": "TLS 1.3 (trustme ECDSA certificate)", "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION, "comparison": comparison, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
