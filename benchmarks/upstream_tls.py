"""What an https:// mail server costs the gateway beside an http:// one, side by side.

    python benchmarks/upstream_tls.py [--devices 1000] [--requests 3000] [--rounds 2] [--cpu 0] [--base-tree DIR]

Every sizing figure in benchmarks/README.md was measured with the mailbox simulator at an
http:// address, while a real Exchange, Office 365 or Traveler server is reached over TLS.
This starts ``seg-fast serve --workers 1`` (device leg TLS 1.3, as in the sizing runs) twice
per round, alternating, in front of the same stand-in mail server at http:// and at https://
(TLS 1.3, a trustme certificate the gateway verifies through ``upstream.ca_file``), and
measures the worker:

- **CPU per request**: 20 kept-alive TLS device connections each send small Syncs in turn
  (103-byte body, 228-byte answer), one at a time, ``--requests`` of them after a warm-up;
  the worker's utime + stime per request.
- **Memory per parked device**: ``--devices`` more devices connect, make one Sync and send a
  Ping the mail server holds (as a parked Ping holds its mail-server connection for
  minutes); the worker's RSS growth per device, and that every Ping is still parked.

``--base-tree DIR`` adds a third gateway per round, https:// again, with the code of another
checkout (its ``src``, extensions built, first on PYTHONPATH): a change to the mail-server
leg measured beside what it changed.

Everything (the gateway, the devices, the mail server) runs on ``--cpu`` (the sizing runs
leave core 0 idle while they drive their direct path), so the CPU figures are the worker's
own and the wall-clock ones mean nothing. Medians over ``--rounds``; prints each round and
writes results/upstream_tls.json.
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import proxy_bench  # noqa: E402
import tls_bench  # noqa: E402
import tls_memory  # noqa: E402
import wrk_bench  # noqa: E402
from proxy_bench import _count_established, _cpu_seconds, _request_bytes, _rss_kb  # noqa: E402

from seg_fast.proxy.forked import worker_pids  # noqa: E402

OUT = HERE / "results" / "upstream_tls.json"
ANSWER = 228
KEEPALIVE = 20
WARM = 200

def start_gateway(workdir: Path, name: str, mail_port: int, cert: Path, key: Path, ca: Path | None, cpu: int,
                  tree: str = ""):
    """``seg-fast serve --workers 1`` (wrk_bench's, device leg TLS) with its mail server at
    http:// or, given ``ca``, https:// verified against it (``tree``: that checkout's code);
    (process, port, worker pid)."""
    port = proxy_bench._free_port()
    env = {"SEG_FAST_UPSTREAM_URL": f"{'https' if ca else 'http'}://localhost:{mail_port}"}
    if ca:
        env["SEG_FAST_UPSTREAM_CA_FILE"] = str(ca)
    if tree:
        env["PYTHONPATH"] = str(Path(tree) / "src")
    (workdir / name).mkdir()
    proc = wrk_bench.start_seg_fast(workdir / name, port, mail_port, tls=(cert, key), env_extra=env)
    subprocess.run(["taskset", "-pc", str(cpu), str(proc.pid)], check=True, capture_output=True)
    end = time.monotonic() + 20
    while not (workers := worker_pids(proc.pid)):
        assert time.monotonic() < end, "no worker process"
        time.sleep(0.05)
    subprocess.run(["taskset", "-pc", str(cpu), str(workers[0])], check=True, capture_output=True)
    return proc, port, workers[0]


def _connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _exchange(s: ssl.SSLSocket, i: int) -> None:
    s.sendall(_request_bytes("Sync", 103, i))
    status, got = tls_memory.read_answer(s)
    assert status == 200 and got == ANSWER, (status, got)


def measure(mode: str, workdir: Path, certs: dict, ctx: ssl.SSLContext, args, rnd: int) -> dict:
    mail_port = proxy_bench._free_port()
    tls = certs["mail"] if mode.startswith("https") else None
    mail = tls_memory.start_upstream(mail_port, ANSWER, args.cpu, tls)
    gw, port, pid = start_gateway(workdir, f"{mode}-{rnd}", mail_port, *certs["gateway"],
                                  certs["ca"] if tls else None, args.cpu, args.base_tree if mode == "https-base" else "")
    socks = []
    try:
        conns = [_connect(port, ctx) for _ in range(KEEPALIVE)]
        socks += conns
        for i in range(WARM):
            _exchange(conns[i % KEEPALIVE], i % KEEPALIVE)
        cpu0 = _cpu_seconds(pid)
        for i in range(args.requests):
            _exchange(conns[i % KEEPALIVE], i % KEEPALIVE)
        per_request_us = (_cpu_seconds(pid) - cpu0) / args.requests * 1e6
        time.sleep(0.5)
        base, cpu0 = _rss_kb(pid), _cpu_seconds(pid)
        parked = []
        for i in range(args.devices):
            s = _connect(port, ctx)
            _exchange(s, 1000 + i)
            s.sendall(_request_bytes("Ping", 0, 1000 + i))
            parked.append(s)
        socks += parked
        t0 = time.monotonic()
        while _count_established(mail_port) < args.devices and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        time.sleep(0.5)
        grown, cpu = _rss_kb(pid) - base, _cpu_seconds(pid) - cpu0
        poll = select.poll()
        for s in parked:
            poll.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
        stirred = poll.poll(0)
        assert not stirred, f"{mode}: {len(stirred)} parked devices were answered or closed"
        held = _count_established(mail_port)
        assert held >= args.devices, f"{mode}: {held} mail-server connections for {args.devices} parked Pings"
    finally:
        for s in socks:
            s.close()
        mail.terminate()
        wrk_bench.stop_all([gw])
    r = {"mode": mode, "round": rnd, "requests": args.requests, "worker_us_per_request": round(per_request_us, 1),
         "devices": args.devices, "kib_per_parked_device": round(grown / args.devices, 2),
         "worker_ms_per_parked_device": round(cpu / args.devices * 1000, 3), "mail_connections_held": held}
    print(f"round {rnd} {mode:5s}: {r['worker_us_per_request']:7.1f} us of worker CPU per kept-alive request; "
          f"{r['kib_per_parked_device']:6.2f} KiB RSS and {r['worker_ms_per_parked_device']:.2f} ms CPU per "
          f"parked device ({held} mail-server connections held)", flush=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu", type=int, default=0, help="the core everything runs on")
    ap.add_argument("--base-tree", default="", help="a checkout whose code runs a third, https:// gateway")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    nofile = proxy_bench._raise_nofile()
    if 3 * (args.devices + KEEPALIVE) + 64 > nofile:
        sys.exit(f"RLIMIT_NOFILE hard limit {nofile} is too low for {args.devices} devices")
    os.sched_setaffinity(0, {args.cpu})
    import trustme

    workdir = Path(tempfile.mkdtemp(prefix="upstream-tls-"))
    try:
        gw_cert, gw_key = tls_bench.make_certificate(workdir)
        ca = trustme.CA()
        mail_cert = ca.issue_cert("localhost")
        certs = {"gateway": (gw_cert, gw_key), "ca": workdir / "mail-ca.pem",
                 "mail": (workdir / "mail-cert.pem", workdir / "mail-key.pem")}
        ca.cert_pem.write_to_path(str(certs["ca"]))
        mail_cert.cert_chain_pems[0].write_to_path(str(certs["mail"][0]))
        mail_cert.private_key_pem.write_to_path(str(certs["mail"][1]))
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE     # the gateway is measured, not verified
        modes = ["http", "https"] + (["https-base"] if args.base_tree else [])
        results = []
        for rnd in range(1, args.rounds + 1):
            for mode in modes[rnd - 1:] + modes[:rnd - 1]:          # each first in turn
                results.append(measure(mode, workdir, certs, ctx, args, rnd))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    keys = ("worker_us_per_request", "kib_per_parked_device", "worker_ms_per_parked_device")
    med = {m: {k: statistics.median(r[k] for r in results if r["mode"] == m) for k in keys} for m in modes}
    ratios = {m: {k: round(med[m][k] / med["http"][k], 2) for k in keys if med["http"][k]} for m in modes[1:]}
    for m in modes[1:]:
        print(f"{m} against http (medians of {args.rounds}): CPU per request {med['http']['worker_us_per_request']:.1f} "
              f"-> {med[m]['worker_us_per_request']:.1f} us ({ratios[m].get('worker_us_per_request')}x); memory per "
              f"parked device {med['http']['kib_per_parked_device']:.2f} -> {med[m]['kib_per_parked_device']:.2f} KiB "
              f"({ratios[m].get('kib_per_parked_device')}x)")
    tls_bench.write_summary(args.out, {
        "command": "python benchmarks/upstream_tls.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION, "base_tree": args.base_tree, "medians": med, "against_http": ratios,
        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
