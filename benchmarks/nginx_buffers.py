"""nginx's proxy_buffer_size with buffering off: what it costs nginx and the device that reads.

    python benchmarks/nginx_buffers.py [--rounds 3] [--answers 60000:3000,2000000:100,10000000:20]

The sizing harness runs nginx with ``proxy_buffering off`` (the gateway streams answers, so
nginx does too). Unbuffered, nginx reads at most ``proxy_buffer_size`` from the mail server
at a time and passes each read on as it comes: at the default (one memory page) a 2 MB
answer is ~500 reads, ~500 TLS writes and ~500 small TLS records for the device to decrypt.
The gateway reads 64 KiB at a time (upstream.RECEIVE_SIZE) and writes full 16 KiB records.

One process tree per variant, side by side and alternating: an nginx upstream serving fixed
answers (CPU 1), a TLS 1.3 nginx proxy in the harness's settings (CPU 0) with the variant's
``proxy_buffer_size``, and a client on CPU 1 fetching each answer size over one keep-alive
TLS connection (bodies length-checked). Per answer: the proxy's CPU (its process tree,
/proc) and the client's own CPU (getrusage), the TLS records the client received (its
socket bytes over the records' 5-byte headers, read by a counting BIO). Medians over the
rounds; writes benchmarks/results/nginx_buffers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wrk_bench  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {"page": None, "64k": "64k"}      # None: nginx's default (one memory page)


def start_upstream(workdir: Path, port: int, sizes: list[int]) -> object:
    workdir.chmod(0o755)                     # nginx's workers run as nobody under root
    for n in sizes:
        (workdir / f"a{n}").write_bytes(os.urandom(n))
        (workdir / f"a{n}").chmod(0o644)
    return wrk_bench._nginx(workdir, "upstream", 1, f"""
    server {{ listen 127.0.0.1:{port}; root {workdir}; sendfile on; }}""")


def start_proxy(workdir: Path, name: str, port: int, upstream: int, buffer_size: str | None,
                cert: Path, key: Path):
    # The sizing harness's proxy settings (sizing.Proxy.nginx_conf), one worker.
    # (proxy_buffers only has to allow the size: unbuffered, nginx never uses them)
    size = f"proxy_buffer_size {buffer_size}; proxy_buffers 4 {buffer_size};" if buffer_size else ""
    return wrk_bench._nginx(workdir, name, 0, f"""
    upstream mail {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    proxy_http_version 1.1; proxy_set_header Connection "";
    proxy_buffering off; proxy_request_buffering off; {size}
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;
    server {{ listen 127.0.0.1:{port} ssl; location / {{ proxy_pass http://mail; }} }}""")


class Counted:
    """A TLS client over a memory BIO that counts the records it receives."""

    def __init__(self, port: int, ctx: ssl.SSLContext):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname="eas.example")
        self.pending = b""          # bytes of a record header not yet complete
        self.left = 0               # bytes of the current record's body still to come
        self.records = 0
        self._io(self.tls.do_handshake)

    def _count(self, data: bytes) -> None:
        view, i = self.pending + data, 0
        while True:
            if self.left:
                step = min(self.left, len(view) - i)
                self.left -= step
                i += step
                if self.left:
                    break
            if len(view) - i < 5:
                break
            self.left = int.from_bytes(view[i + 3:i + 5], "big")
            self.records += 1
            i += 5
        self.pending = bytes(view[i:])

    def _io(self, op, *args):
        while True:
            try:
                result, done = op(*args), True
            except ssl.SSLWantReadError:
                result, done = None, False
            if self.out.pending:
                self.sock.sendall(self.out.read())
            if done:
                return result
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("proxy closed the connection")
            self._count(data)
            self.inc.write(data)

    def get(self, path: str) -> int:
        self._io(self.tls.write, f"GET {path} HTTP/1.1\r\nHost: eas.example\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._io(self.tls.read, 262144)
        head, body = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head[:80]
        length = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
        got = len(body)
        while got < length:
            got += len(self._io(self.tls.read, 262144))
        assert got == length, (got, length)
        return length


def one(port: int, proxy_pids: list[int], ctx: ssl.SSLContext, size: int, count: int) -> dict:
    c = Counted(port, ctx)
    c.get(f"/a{size}")                                   # warm: handshake and upstream connection
    r0, p0, n0 = resource.getrusage(resource.RUSAGE_SELF), wrk_bench._cpu_seconds(proxy_pids), c.records
    for _ in range(count):
        c.get(f"/a{size}")
    r1, p1 = resource.getrusage(resource.RUSAGE_SELF), wrk_bench._cpu_seconds(proxy_pids)
    c.sock.close()
    return {"client_us": round(1e6 * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / count, 1),
            "proxy_us": round(1e6 * (p1 - p0) / count, 1),
            "records": round((c.records - n0) / count, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answers", default="60000:3000,2000000:100,10000000:20",
                    help="SIZE:COUNT,... bytes of each answer and how many per round")
    ap.add_argument("--out", default=str(HERE / "results" / "nginx_buffers.json"))
    args = ap.parse_args()
    answers = [tuple(int(x) for x in a.split(":")) for a in args.answers.split(",")]
    import trustme
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="nginx-buffers-") as tmp:
        work = Path(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert("eas.example")
        cert.cert_chain_pems[0].write_to_path(work / "server.pem")
        cert.private_key_pem.write_to_path(work / "server.key")
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        up = wrk_bench._free_port()
        procs = [start_upstream(work, up, [s for s, _ in answers])]
        ports = {}
        try:
            wrk_bench._wait_port(up)
            for name, size in VARIANTS.items():
                ports[name] = wrk_bench._free_port()
                procs.append(start_proxy(work, f"proxy-{name}", ports[name], up, size,
                                         work / "server.pem", work / "server.key"))
                wrk_bench._wait_port(ports[name])
            time.sleep(0.2)
            pids = {name: wrk_bench._tree(p.pid) for name, p in zip(VARIANTS, procs[1:])}
            runs = {name: {s: [] for s, _ in answers} for name in VARIANTS}
            for r in range(args.rounds):
                order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
                for name in order:
                    for size, count in answers:
                        got = one(ports[name], pids[name], ctx, size, count)
                        runs[name][size].append(got)
                        print(f"round {r + 1} {name:>4} {size:>9} B: proxy {got['proxy_us']:9.1f} µs, "
                              f"client {got['client_us']:9.1f} µs, {got['records']:7.1f} records", flush=True)
        finally:
            wrk_bench.stop_all(procs)
    summary = {}
    for size, _ in answers:
        row = {}
        for name in VARIANTS:
            got = runs[name][size]
            row[name] = {k: statistics.median(g[k] for g in got) for k in ("proxy_us", "client_us", "records")}
            row[name]["runs"] = got
        for side in ("client", "proxy"):
            a, b = row["page"][f"{side}_us"], row["64k"][f"{side}_us"]
            row[f"{side}_page_over_64k"] = round(a / b, 2) if b else None
        summary[str(size)] = row
        print(f"{size:>9} B  medians: proxy {row['page']['proxy_us']:.0f} (page) vs {row['64k']['proxy_us']:.0f} µs (64k), "
              f"client {row['page']['client_us']:.0f} vs {row['64k']['client_us']:.0f} µs, "
              f"records {row['page']['records']:.0f} vs {row['64k']['records']:.0f}")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rounds": args.rounds,
           "answers": args.answers, "load_average": os.getloadavg(), "by_size": summary}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
