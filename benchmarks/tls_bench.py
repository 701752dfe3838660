"""CPU per small request with TLS on the device leg, seg-fast beside nginx terminating
the same TLS, driven by wrk over https (issue 10's comparison, issue 11's TLS leg).

    apt install wrk nginx            # Debian packages; not needed by the test suite
    python benchmarks/tls_bench.py [--seconds 5] [--conns 32] [--runs 3] [--with-trio-sslstream]

wrk_bench.py's setup (it is imported: the same upstream, request, CPU accounting), with
TLS on the device listener: ``seg-fast serve --workers 1`` with listener.tls_cert/tls_key
and nginx (one worker, ``listen ... ssl``, session cache and tickets on) with the same
certificate (trustme, ECDSA P-256), each pinned to CPU 0; the fixed-answer upstream and
wrk on CPU 1. Variants: 32 keep-alive connections ("keepalive": the per-record cost), and
``Connection: close`` ("close": a TLS handshake per request; wrk keeps its SSL object
across reconnects with SSL_clear, so each new connection offers the last session's
ticket: a resumed TLS 1.3 handshake, as real devices do). The resumed fraction is
checked on nginx's side ($ssl_session_reused) and written with the figures.

``--baseline COMMIT`` adds a seg-fast whose device leg is tlsio.TLSStream as of COMMIT
(e.g. 7a1fb0b, the memory-BIO design), patched in the same way, measured in the same run.

``--with-trio-sslstream`` adds a third proxy, measured in the same run: seg-fast with
its device leg on trio.SSLStream as before proxy/tlsio.py (patched in at start-up by a
sitecustomize in its PYTHONPATH), so the stream's share is seen without the drift of
a busy machine between two runs.

Prints µs CPU per request (user and system) for each and the ratio; writes
benchmarks/results/tls_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import wrk_bench
from wrk_bench import EAS, TICK


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "gw.example")
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def start_nginx_tls(workdir: Path, port: int, upstream: int, cert: Path, key: Path,
                    check_port: int) -> subprocess.Popen:
    tls = f"""ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;"""
    proc = wrk_bench._nginx(workdir, "proxy", 0, f"""
    upstream mail {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
    log_format reused "$ssl_protocol $ssl_session_reused";
    server {{
        listen 127.0.0.1:{port} deferred ssl;
        {tls}
        location {EAS} {{
            proxy_pass http://mail;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
    server {{
        # Not measured: tells whether wrk's new connections resume their TLS session.
        listen 127.0.0.1:{check_port} ssl;
        {tls}
        access_log {workdir}/reused.log reused;
        location / {{ return 200 "ok"; }}
    }}""")
    wrk_bench._wait_port(port)
    return proc


# --with-trio-sslstream: a second seg-fast whose device leg is trio.SSLStream, as before
# proxy/tlsio.py, patched in at start-up (sitecustomize), measured in the same run.
_TRIO_SSLSTREAM = """
import trio
from seg_fast.proxy import gateway


def _trio_sslstream(stream, context):
    # What gateway.py did before tlsio: SSLStream, the handshake under trio.fail_after.
    s = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    handshake = s.do_handshake

    async def do_handshake(deadline=float("inf")):
        with trio.fail_at(deadline):
            await handshake()

    s.do_handshake, s.handshake_started, s.close = do_handshake, True, stream.socket.close
    return s


gateway.TLSStream = _trio_sslstream
"""


# --baseline COMMIT: a seg-fast whose device leg is tlsio.TLSStream as of COMMIT (its file beside).
_BASELINE_TLSIO = """
import importlib.util, os
from seg_fast.proxy import gateway

spec = importlib.util.spec_from_file_location("tlsio_baseline", os.path.join(os.path.dirname(__file__),
                                                                             "tlsio_baseline.py"))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
gateway.TLSStream = module.TLSStream
"""


def start_seg_fast_tls(workdir: Path, port: int, upstream: int, cert: Path, key: Path,
                       name: str = "gateway", trio_sslstream: bool = False,
                       baseline: str = "") -> subprocess.Popen:
    workdir = workdir / name
    workdir.mkdir()
    env = {}
    if trio_sslstream or baseline:
        (workdir / "patch").mkdir()
        (workdir / "patch" / "sitecustomize.py").write_text(_TRIO_SSLSTREAM if trio_sslstream else _BASELINE_TLSIO)
        if baseline:
            (workdir / "patch" / "tlsio_baseline.py").write_text(baseline_source(baseline))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir / "patch"), os.environ.get("PYTHONPATH")]))
    return wrk_bench.start_seg_fast(workdir, port, upstream, tls=(cert, key), env_extra=env)


def run_wrk(port: int, script: Path | None, conns: int, seconds: float, path: str = EAS) -> dict:
    cmd = ["taskset", "-c", "1", "wrk", "-t", "1", "-c", str(conns), "-d", f"{seconds:g}s"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [f"https://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if not m:
        raise RuntimeError(f"wrk said:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": int(m.group(1)), "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": [int(x) for x in errors.groups()] if errors else [0, 0, 0, 0]}


def _cpu_split(pids: list[int]) -> tuple[float, float]:
    """utime, stime (seconds) of the processes."""
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def measure(name: str, root: int, port: int, script: Path, args) -> dict:
    run_wrk(port, script, args.conns, 1.0)          # warm up: connections, pools, session caches
    pids = wrk_bench._tree(root)
    (u0, s0), t0 = _cpu_split(pids), time.monotonic()
    result = run_wrk(port, script, args.conns, args.seconds)
    (u1, s1), wall = _cpu_split(pids), time.monotonic() - t0
    n = result["requests"]
    assert n > 0 and result["non_2xx"] == 0, f"{name}: {result}"
    used = (u1 - u0) + (s1 - s0)
    result.update(cpu_seconds=round(used, 3), requests_per_second=round(n / wall),
                  cpu_us_per_request=round(used / n * 1e6, 1),
                  user_us_per_request=round((u1 - u0) / n * 1e6, 1),
                  sys_us_per_request=round((s1 - s0) / n * 1e6, 1))
    return result


def resumed_fraction(workdir: Path, check_port: int, close_script: Path) -> dict:
    """wrk with Connection: close against nginx's check server: how many handshakes resumed."""
    log = workdir / "reused.log"
    run_wrk(check_port, close_script, 4, 1.0, "/")
    time.sleep(0.2)                 # nginx writes its access log on each request; let it land
    lines = log.read_text().split() if log.exists() else []
    pairs = list(zip(lines[0::2], lines[1::2]))
    reused = sum(1 for _, r in pairs if r == "r")
    protocols = sorted({p for p, _ in pairs})
    return {"requests": len(pairs), "resumed": reused,
            "fraction": round(reused / len(pairs), 3) if pairs else 0.0, "protocols": protocols}


def baseline_source(commit: str) -> str:
    """src/seg_fast/proxy/tlsio.py as of ``commit``."""
    return subprocess.run(["git", "-C", str(HERE), "show", f"{commit}:src/seg_fast/proxy/tlsio.py"],
                          capture_output=True, text=True, check=True).stdout


async def serve_exchanges(stream, request: bytes, answer: list, exchanges: int, peer) -> float:
    """The server's side of ``exchanges`` rounds (read the request, write the answer with
    the gateway's own sockio), then wait for the peer process and close: CPU µs of this
    thread per round."""
    import trio

    from seg_fast.proxy import sockio

    pace = sockio.Pace(60.0, 1024.0, sockio.Unsent(0))
    t0 = time.thread_time()
    for _ in range(exchanges):
        got = 0
        while got < len(request):
            got += len(await sockio.receive(stream, None, 65536, trio.current_time() + 60))
        await sockio.send_parts(stream, None, answer, pace)
    used = time.thread_time() - t0
    await trio.to_thread.run_sync(peer.join)
    await stream.aclose()
    return round(used / exchanges * 1e6, 1)


def baseline_tlsio(commit: str, workdir: Path):
    """tlsio.TLSStream as it was at ``commit`` (git show), loaded beside today's."""
    import importlib.util

    path = workdir / "tlsio_baseline.py"
    path.write_text(baseline_source(commit))
    spec = importlib.util.spec_from_file_location("tlsio_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TLSStream


def stream_loop(exchanges: int, rounds: int, baseline: str = "", answer_bytes: int = 64) -> dict:
    """Server-thread CPU per small exchange (400 bytes in, 180 + ``answer_bytes`` out, the gateway's
    sockio calls with a device-write pace) over a socketpair, a blocking TLS client in a forked
    process (in a thread it would take the GIL whenever OpenSSL's socket I/O lets it go, and the
    hand-backs would be counted as the server's): trio.SSLStream beside tlsio.TLSStream (and
    ``baseline``'s, a commit), alternating; medians of ``rounds``."""
    import multiprocessing
    import socket
    import ssl

    import trio

    from seg_fast.proxy.gateway import server_tls_context
    from seg_fast.proxy.tlsio import TLSStream

    workdir = Path(tempfile.mkdtemp(prefix="tls-loop-"))
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(workdir / "c.pem"))
    cert.private_key_pem.write_to_path(str(workdir / "k.pem"))
    sctx = server_tls_context(str(workdir / "c.pem"), str(workdir / "k.pem"))
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    request, answer = b"x" * 400, [b"h" * 180, b"S" * answer_bytes]
    size = 180 + answer_bytes
    streams = {"trio.SSLStream": None, "tlsio.TLSStream": TLSStream}
    if baseline:
        streams[f"tlsio.TLSStream@{baseline}"] = baseline_tlsio(baseline, workdir)

    def client(sock):
        with cctx.wrap_socket(sock, server_hostname="localhost") as s:
            for _ in range(exchanges):
                s.sendall(request)
                got = 0
                while got < size:
                    got += len(s.recv(65536))

    async def serve(kind):
        a, b = socket.socketpair()
        peer = multiprocessing.get_context("fork").Process(target=client, args=(b,))
        peer.start()
        b.close()
        transport = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        stream = trio.SSLStream(transport, sctx, server_side=True, https_compatible=True) \
            if streams[kind] is None else streams[kind](transport, sctx)
        await stream.do_handshake()
        return await serve_exchanges(stream, request, answer, exchanges, peer)

    runs: dict[str, list] = {}
    for _ in range(rounds):
        for kind in streams:
            runs.setdefault(kind, []).append(trio.run(serve, kind))
    shutil.rmtree(workdir, ignore_errors=True)
    return {kind: {"server_cpu_us_per_exchange": sorted(r)[len(r) // 2], "runs": r} for kind, r in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="repeat, alternating the proxies; each figure is the median")
    ap.add_argument("--only", choices=["seg-fast", "nginx"], default=None)
    ap.add_argument("--variants", default="keepalive,close")
    ap.add_argument("--with-trio-sslstream", action="store_true",
                    help="also measure seg-fast with trio.SSLStream on the device leg (the code before tlsio)")
    ap.add_argument("--label", default="", help="a note kept in the JSON (e.g. which TLS stream was measured)")
    ap.add_argument("--out", default=str(HERE / "results" / "tls_bench.json"))
    ap.add_argument("--stream-loop", type=int, default=0, metavar="N",
                    help="instead: N small exchanges per stream over a socketpair, server-thread CPU "
                         "(writes results/tls_stream_loop.json)")
    ap.add_argument("--baseline", default="", metavar="COMMIT",
                    help="also measure a seg-fast (or, with --stream-loop, a stream) whose device leg is "
                         "tlsio.TLSStream as of COMMIT (e.g. the memory-BIO design, 7a1fb0b)")
    ap.add_argument("--answer-bytes", type=int, default=64,
                    help="--stream-loop: the answer body's size (the head is 180 bytes)")
    args = ap.parse_args(argv)
    if args.stream_loop:
        loop = stream_loop(args.stream_loop, args.runs, args.baseline, args.answer_bytes)
        for kind, r in loop.items():
            print(f"{kind:16s} {r['server_cpu_us_per_exchange']:6.1f} µs server CPU per exchange {r['runs']}")
        out = Path(args.out if args.out != str(HERE / "results" / "tls_bench.json")
                   else HERE / "results" / "tls_stream_loop.json")
        write_summary(out, {"command": "python benchmarks/tls_bench.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "exchanges": args.stream_loop,
            "answer_bytes": 180 + args.answer_bytes, "baseline_commit": args.baseline,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "streams": loop})
        return 0
    for tool in ("wrk", "nginx", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt install wrk nginx util-linux)")
    if os.cpu_count() < 2:
        sys.exit("needs two CPUs (the proxy on CPU 0, upstream and wrk on CPU 1)")
    workdir = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    up_port, ng_port, sf_port, check_port, old_port, base_port = (wrk_bench._free_port() for _ in range(6))
    cert, key = make_certificate(workdir)
    procs = []
    figures: dict[str, dict[str, list]] = {}
    resumption = None
    try:
        procs.append(wrk_bench.start_upstream(workdir, up_port))
        proxies = []
        if args.only != "nginx":
            sf = start_seg_fast_tls(workdir, sf_port, up_port, cert, key)
            procs.append(sf)
            proxies.append(("seg-fast", sf.pid, sf_port))
            if args.baseline:
                base = start_seg_fast_tls(workdir, base_port, up_port, cert, key, "baseline", baseline=args.baseline)
                procs.append(base)
                proxies.append((f"seg-fast-tlsio@{args.baseline}", base.pid, base_port))
            if args.with_trio_sslstream:
                old = start_seg_fast_tls(workdir, old_port, up_port, cert, key, "trio-sslstream", True)
                procs.append(old)
                proxies.append(("seg-fast-trio-sslstream", old.pid, old_port))
        ng = start_nginx_tls(workdir, ng_port, up_port, cert, key, check_port)
        procs.append(ng)
        if args.only != "seg-fast":
            proxies.append(("nginx", ng.pid, ng_port))
        resumption = resumed_fraction(workdir, check_port, wrk_bench._lua(workdir, True))
        print(f"wrk's new connections resumed their TLS session: {resumption}", flush=True)
        for variant in args.variants.split(","):
            script = wrk_bench._lua(workdir, variant == "close")
            for _ in range(args.runs):
                for name, pid, port in proxies:
                    r = measure(name, pid, port, script, args)
                    figures.setdefault(variant, {}).setdefault(name, []).append(r)
                    print(f"{variant:9s} {name:23s} {r['cpu_us_per_request']:8.1f} µs CPU/request "
                          f"(user {r['user_us_per_request']:.1f}, sys {r['sys_us_per_request']:.1f}) "
                          f"{r['requests_per_second']:7d} req/s", flush=True)
    finally:
        wrk_bench.stop_all(procs)
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {"command": "python benchmarks/tls_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "label": args.label, "conns": args.conns, "seconds": args.seconds, "runs": args.runs,
               "body_bytes": wrk_bench.BODY_LEN, "tls": "TLS 1.3 (trustme ECDSA certificate), session tickets",
               "resumption_check_on_nginx": resumption,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": {}}
    print()
    for variant, by_name in figures.items():
        row = {}
        for name, runs in by_name.items():
            mid = sorted(runs, key=lambda r: r["cpu_us_per_request"])[len(runs) // 2]
            row[name] = {"cpu_us_per_request": mid["cpu_us_per_request"],
                         "user_us_per_request": mid["user_us_per_request"],
                         "sys_us_per_request": mid["sys_us_per_request"], "runs": runs}
        if "seg-fast" in row and "nginx" in row:
            row["ratio"] = round(row["seg-fast"]["cpu_us_per_request"] / row["nginx"]["cpu_us_per_request"], 2)
            print(f"{variant:9s} seg-fast {row['seg-fast']['cpu_us_per_request']:.1f} µs vs nginx "
                  f"{row['nginx']['cpu_us_per_request']:.1f} µs per request: {row['ratio']}x")
        base = row.get(f"seg-fast-tlsio@{args.baseline}")
        if base is not None and "seg-fast" in row:
            row["ratio_to_baseline"] = round(row["seg-fast"]["cpu_us_per_request"] / base["cpu_us_per_request"], 3)
            print(f"{variant:9s} tlsio@{args.baseline} {base['cpu_us_per_request']:.1f} µs: today's stream "
                  f"{row['ratio_to_baseline']}x of it")
        old = row.get("seg-fast-trio-sslstream")
        if old is not None and "nginx" in row:
            row["ratio_trio_sslstream"] = round(old["cpu_us_per_request"] / row["nginx"]["cpu_us_per_request"], 2)
            print(f"{variant:9s} with trio.SSLStream {old['cpu_us_per_request']:.1f} µs: "
                  f"{row['ratio_trio_sslstream']}x nginx")
        summary["variants"][variant] = row
    write_summary(args.out, summary)
    return 0


def write_summary(out: str | Path, summary: dict) -> None:
    """The run's JSON (with the commit measured) under benchmarks/results/ or ``out``."""
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    summary.setdefault("commit", commit.stdout.strip())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
