"""The load side's TLS read-ahead (sim/tlssession.read_ahead) alone: CPU time and read()
system calls per answer moved over one loopback TLS 1.3 connection, both ends in this
process as on the sizing run's direct path (the simulator's writer: head and body in one
write under 64 KB, else two, as lean_serve writes them; the device's reader:
HttpConn.poll_answer when the socket is readable, as the Parker reads). Each pass runs in
a fresh process, read-ahead off and on alternated, and the median is reported.

    python benchmarks/tls_read_ahead.py [--passes 3] [--answers 400] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import ssl
import statistics
import subprocess
import sys
import time

SIZES = (50_000, 300_000, 2_000_000)     # BENCH-PROFILE attachment sizes (60% / 30% / 9%)
NAME = "mail.seg-fast.test"


def syscalls() -> tuple[int, int]:
    with open("/proc/self/io") as f:
        v = dict(line.split(": ") for line in f.read().splitlines())
    return int(v["syscr"]), int(v["syscw"])


def one_pass(on: bool, answers: int, buffer: int) -> dict:
    import trustme

    from seg_fast.proxy.tlsio import socket_bio
    from seg_fast.sim import tlssession
    from seg_fast.sim.wire import FALLBACK, HttpConn, TlsStream

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    if on and not (tlssession.read_ahead(client, buffer) and tlssession.read_ahead(server, buffer)):
        raise SystemExit("read-ahead not available in this process")
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    for sock in (c, s):
        sock.setblocking(False)
    stream = TlsStream(c, client, server_hostname=NAME)
    srv = socket_bio(server, s, True)
    done = [False, False]
    while not all(done):
        for i, obj in enumerate((stream.ssl, srv)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    select.select([c, s], [], [], 1)
    conn = HttpConn(stream)
    out = {}
    for size in SIZES:
        body = os.urandom(size)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
        writes = [head + body] if size < 65536 else [head, body]
        cpu0, (r0, w0) = time.process_time(), syscalls()
        for _ in range(answers):
            pending = list(writes)
            res = None
            while res is None:
                while pending:                   # the simulator's side: as lean_serve._flush
                    try:
                        srv.write(pending[0])
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        break
                    pending.pop(0)
                select.select([c], [], [], 5)    # the Parker's epoll: readable
                res = conn.poll_answer()
                assert res is not FALLBACK
            assert res[0] == 200 and len(res[2]) == size
            conn.reusable = True
        cpu1, (r1, w1) = time.process_time(), syscalls()
        out[str(size)] = {"us_per_answer": round((cpu1 - cpu0) / answers * 1e6, 1),
                          "reads_per_answer": round((r1 - r0) / answers, 1),
                          "writes_per_answer": round((w1 - w0) / answers, 1)}
    c.close()
    s.close()
    ls.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--answers", type=int, default=400)
    ap.add_argument("--out")
    ap.add_argument("--buffer", type=int, default=0, help="read buffer (0: tlssession.READ_AHEAD_BUFFER)")
    ap.add_argument("--one", choices=("off", "on"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        from seg_fast.sim import tlssession
        print(json.dumps(one_pass(a.one == "on", a.answers, a.buffer or tlssession.READ_AHEAD_BUFFER)))
        return 0
    runs: dict[str, list] = {"off": [], "on": []}
    for _ in range(a.passes):
        for mode in ("off", "on"):
            p = subprocess.run([sys.executable, __file__, "--one", mode, "--answers", str(a.answers),
                                "--buffer", str(a.buffer)],
                               check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(p.stdout))
    summary = {}
    for mode, passes in runs.items():
        summary[mode] = {size: {k: statistics.median(p[size][k] for p in passes) for k in passes[0][size]}
                         for size in passes[0]}
    result = {"command": "python benchmarks/tls_read_ahead.py " + " ".join(sys.argv[1:]),
              "passes": runs, "median": summary}
    for size in summary["off"]:
        off, on = summary["off"][size], summary["on"][size]
        print(f"{int(size):>9} B: {off['us_per_answer']:8.1f} -> {on['us_per_answer']:8.1f} us per answer, "
              f"read() {off['reads_per_answer']:6.1f} -> {on['reads_per_answer']:6.1f}, "
              f"write() {off['writes_per_answer']:6.1f} -> {on['writes_per_answer']:6.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
