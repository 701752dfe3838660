"""Memory per idle TLS device connection on the fleet's side (the load side's client end):
wire.TlsStream (OpenSSL's socket BIO on the bare socket: the fleet now) beside
trio.SSLStream over wire.RawStream (two memory BIOs: the fleet before), side by side.

    python benchmarks/fleet_tls_memory.py [--devices 2000] [--answers 228,300000]

A server process (TLS 1.3, a trustme certificate) answers one request per connection with
``--answers`` bytes and then holds the connection open; this process opens N connections
(after 50 warm-up ones), makes that request on each, reads the answer whole (status and
length checked) and keeps the connection idle, as a parked device's is. Memory per device
is the growth of this process's RSS over the N, after a collection. Writes
benchmarks/results/fleet_tls_memory.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import trio
import trustme

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
from seg_fast.sim.wire import SERVER_NAME, HttpConn, TlsStream, connect  # noqa: E402

WARM = 50
SERVER = r'''
import socket, ssl, sys, trio
sys.path.insert(0, sys.argv[4])
from seg_fast.sim.wire import TlsStream
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
size = int(sys.argv[3])
answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
async def conn(sock):
    s = TlsStream(sock, ctx, server_side=True)
    got = b""
    while b"\r\n\r\n" not in got:
        got += await s.receive_some()
    await s.send_all(answer)
    await trio.sleep_forever()
async def main():
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(4096); ls.setblocking(False)
    print(ls.getsockname()[1], flush=True)
    async with trio.open_nursery() as n:
        while True:
            await trio.lowlevel.wait_readable(ls)
            while True:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                n.start_soon(conn, c)
trio.run(main)
'''


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _measure(kind: str, port: int, n: int, size: int, ctx: ssl.SSLContext) -> float:
    conns = []

    async def one() -> None:
        raw = await connect("127.0.0.1", port, None)
        if kind == "TlsStream":
            stream = TlsStream(raw.socket, ctx, server_hostname=SERVER_NAME)
        else:
            stream = trio.SSLStream(raw, ctx, server_hostname=SERVER_NAME, https_compatible=True)
        conn = HttpConn(stream)
        await stream.do_handshake()
        status, _h, body = await conn.request(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"")
        assert status == 200 and len(body) == size
        conns.append(conn)

    for _ in range(WARM):
        await one()
    gc.collect()
    r0 = _rss()
    for _ in range(n):
        await one()
    gc.collect()
    return (_rss() - r0) / n / 1024


def _child(kind: str, port: int, n: int, size: int, cafile: str) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    print(trio.run(_measure, kind, port, n, size, ctx))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--answers", default="228,300000", help="answer sizes in bytes, comma-separated")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fleet_tls_memory.json"))
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)   # kind port n size cafile
    a = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.child:
        kind, port, n, size, cafile = a.child
        _child(kind, int(port), int(n), int(size), cafile)
        return 0
    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_NAME)
    results = []
    with tempfile.TemporaryDirectory() as d:
        cert.private_key_pem.write_to_path(f"{d}/key.pem")
        cert.cert_chain_pems[0].write_to_path(f"{d}/cert.pem")
        ca.cert_pem.write_to_path(f"{d}/ca.pem")
        for size in (int(x) for x in a.answers.split(",")):
            for kind in ("TlsStream", "SSLStream"):
                srv = subprocess.Popen([sys.executable, "-c", SERVER, f"{d}/cert.pem", f"{d}/key.pem", str(size),
                                        str(REPO / "src")], stdout=subprocess.PIPE, text=True)
                try:
                    port = int(srv.stdout.readline())
                    # each measurement in a fresh process: no heap left over from another
                    out = subprocess.run([sys.executable, __file__, "--child", kind, str(port), str(a.devices),
                                          str(size), f"{d}/ca.pem"], check=True, capture_output=True, text=True)
                    kib = float(out.stdout.split()[-1])
                finally:
                    srv.kill()
                    srv.wait()
                label = {"TlsStream": "wire.TlsStream (socket BIO, the fleet now)",
                         "SSLStream": "trio.SSLStream over wire.RawStream (memory BIOs, the fleet before)"}[kind]
                print(f"answers {size:>7} B  {label}: {kib:.1f} KiB per idle device connection")
                results.append({"answer_bytes": size, "stream": kind, "kib_per_connection": round(kib, 1)})
    out = {"what": "fleet-side RSS growth per idle TLS 1.3 device connection after one answer, over "
                   f"{a.devices} connections (benchmarks/fleet_tls_memory.py)",
           "command": f"python benchmarks/fleet_tls_memory.py --devices {a.devices} --answers {a.answers}",
           "results": results}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
