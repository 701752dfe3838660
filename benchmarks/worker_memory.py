"""Where a gateway worker's memory goes, for the 2 GiB bound at 100,000 devices per core.

    python benchmarks/worker_memory.py [--connections 2000] [--devices 1000] [--workers 6] [--base TREE]
    python benchmarks/worker_memory.py --only-fork --base TREE --replace 4   (added to the JSON)
    python benchmarks/worker_memory.py --only-python --ping-after-ms 10 --out FILE   (Pings the lane holds)

Three measurements, each printed and written to benchmarks/results/worker_memory.json:

1. ``tls``: the C heap (glibc ``mallinfo2``: bytes in use) an idle device-leg TLS 1.3
   connection holds after its handshake and one small exchange, through the gateway's own
   context (``gateway.server_tls_context``) and SSL object (``tlsio.socket_bio``), the
   client in a forked process; per connection over N after 20 warm-up ones.
2. ``python``: what Python allocated per parked TLS device in one running
   ``seg-fast serve --workers 1`` worker (tracemalloc, started by a signal after 50 warm-up
   devices and read after N more have each fetched a 228-byte answer and parked a Ping;
   a ``sitecustomize`` written to a temporary directory installs the signal handler), the
   largest allocation sites first. Beside it the worker's RSS growth per device (tracemalloc's
   own bookkeeping included, so above benchmarks/tls_memory.py's figure).
3. ``fork`` (with ``--base``): the proportional set size (PSS, what the sizing run's memory
   bound sums) of ``seg-fast serve --workers W`` idle, this tree's (its workers forked from a
   template that imported what they run, proxy/forked.py) against a checkout's from before
   (a9409cb: each worker a new interpreter that imports everything again; 9642206: the first
   workers forked, a replacement a new interpreter); with ``--replace K``, again after K
   workers were killed (SIGKILL, one at a time) and replaced.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import json
import os
import signal
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
sys.path.insert(0, str(REPO / "src"))
import proxy_bench
import tls_memory
import trustme
import wrk_bench

from seg_fast.proxy.forked import worker_pids

WARM_TLS = 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def tls_heap(n: int, key_type: str) -> dict:
    """C heap per idle server-side TLS 1.3 connection (the gateway's context and SSL object)."""
    from seg_fast.proxy.gateway import server_tls_context
    from seg_fast.proxy.tlsio import socket_bio

    d = Path(tempfile.mkdtemp())
    ca = trustme.CA(key_type=getattr(trustme.KeyType, key_type))
    cert = ca.issue_cert("gw.test")
    cert.private_key_pem.write_to_path(d / "k.pem")
    cert.cert_chain_pems[0].write_to_path(d / "c.pem")
    ca.cert_pem.write_to_path(d / "ca.pem")
    server = server_tls_context(str(d / "c.pem"), str(d / "k.pem"))
    pairs = [socket.socketpair() for _ in range(n + WARM_TLS)]
    pid = os.fork()
    if pid == 0:                                   # the devices
        try:
            client = ssl.create_default_context(cafile=str(d / "ca.pem"))
            client.minimum_version = ssl.TLSVersion.TLSv1_3
            held = []
            for a, b in pairs:
                a.close()
                s = client.wrap_socket(b, server_hostname="gw.test")
                s.sendall(b"GET")
                if s.recv(5) != b"hello":
                    os._exit(2)
                held.append(s)
            signal.pause()
        finally:
            os._exit(0)
    try:
        for _, b in pairs:
            b.close()
        gc.collect()
        objs = []

        def one(sock):
            o = socket_bio(server, sock, True)
            o.do_handshake()
            assert o.read(3) == b"GET"
            o.write(b"hello")
            return o

        for a, _ in pairs[:WARM_TLS]:
            objs.append(one(a))
        before = _heap_in_use()
        for a, _ in pairs[WARM_TLS:]:
            objs.append(one(a))
        grown = _heap_in_use() - before
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    r = {"key": key_type, "connections": n, "heap_bytes_per_connection": round(grown / n)}
    print(f"tls     {key_type:5s}: {grown / n / 1024:.2f} KiB of C heap per idle TLS 1.3 connection "
          f"(the gateway's context and SSL object; {n} connections)", flush=True)
    return r


_SITECUSTOMIZE = r'''
import os, signal
if os.environ.get("WM_DIR"):
    import tracemalloc
    def _tm(sig, frm):
        d = os.environ["WM_DIR"]
        if not tracemalloc.is_tracing():
            tracemalloc.start(8)
            open(f"{d}/started-{os.getpid()}", "w").close()
        else:
            tracemalloc.take_snapshot().dump(f"{d}/snap.tmp")
            os.rename(f"{d}/snap.tmp", f"{d}/snap-{os.getpid()}")
    signal.signal(signal.SIGUSR2, _tm)
'''


def python_growth(n: int, top: int = 12, pause: float = 0.0) -> dict:
    """Python's allocations per parked TLS device in one worker (tracemalloc); with ``pause``
    each device's Ping follows its fetch that much later, so the keep-alive lane holds it."""
    import tracemalloc

    work = Path(tempfile.mkdtemp())
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(work / "c.pem")
    cert.private_key_pem.write_to_path(work / "k.pem")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    up_port, port = proxy_bench._free_port(), proxy_bench._free_port()
    upstream = tls_memory.start_upstream(up_port, 228)
    (work / "gw").mkdir()
    gw = wrk_bench.start_seg_fast(work / "gw", port, up_port, tls=(work / "c.pem", work / "k.pem"),
                                  env_extra={"PYTHONPATH": f"{work / 'site'}{os.pathsep}{REPO / 'src'}",
                                             "WM_DIR": str(work)})
    socks = []
    try:
        end = time.monotonic() + 30
        while not (workers := worker_pids(gw.pid)):
            assert time.monotonic() < end, "no worker"
            time.sleep(0.05)
        pid = workers[0]

        def signalled(name: str) -> Path:
            os.kill(pid, signal.SIGUSR2)
            f = work / name
            end = time.monotonic() + 300
            while not f.exists():
                assert time.monotonic() < end, f"the worker did not write {name}"
                time.sleep(0.1)
            return f

        for i in range(50):
            socks.append(tls_memory.device(port, ctx, 900_000 + i, 228, pause))
        time.sleep(1.0)
        signalled(f"started-{pid}")
        rss0 = proxy_bench._rss_kb(pid)
        for i in range(n):
            socks.append(tls_memory.device(port, ctx, i, 228, pause))
        end = time.monotonic() + 120
        while proxy_bench._count_established(up_port) < n + 50:
            assert time.monotonic() < end, "the Pings did not all park"
            time.sleep(0.2)
        time.sleep(1.0)
        snap = tracemalloc.Snapshot.load(str(signalled(f"snap-{pid}")))
        rss = proxy_bench._rss_kb(pid) - rss0
    finally:
        tls_memory.stop(socks, upstream, gw)
    stats = snap.statistics("traceback")
    total = sum(s.size for s in stats)
    sites = []
    for s in stats[:top]:
        frames = [f"{f.filename.split('site-packages/')[-1].split('src/')[-1]}:{f.lineno}"
                  for f in list(s.traceback)[::-1][:3]]
        sites.append({"bytes_per_device": round(s.size / n, 1), "objects_per_device": round(s.count / n, 2),
                      "where": frames})
    r = {"devices": n, "ping_after_s": pause, "python_bytes_per_device": round(total / n), "rss_kib_per_device_traced": round(rss / n, 2),
         "largest_sites": sites}
    print(f"python  : {total / n / 1024:.2f} KiB allocated by Python per parked TLS device ({n} devices; "
          f"RSS {rss / n:.1f} KiB with tracemalloc's own bookkeeping)", flush=True)
    for s in sites[:6]:
        print(f"          {s['bytes_per_device']:7.1f} B  {s['objects_per_device']:5.2f} objects  {s['where'][0]}",
              flush=True)
    return r


def _tree(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                todo += [int(x) for x in Path(t).read_text().split()]
            except OSError:
                pass
    return out


def _pss_kib(pids: list[int]) -> dict:
    tot = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0, "Rss": 0}
    for p in pids:
        try:
            lines = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]
        except OSError:                          # gone meanwhile (a helper serve ran and ended)
            continue
        for line in lines:
            k, v = line.split(":", 1)
            if k in tot:
                tot[k] += int(v.split()[0])
    return tot


def forked_workers(workers: int, base: str, replace: int = 0) -> dict:
    """PSS of ``seg-fast serve --workers W`` idle, from this tree (its workers forked from a
    template, proxy/forked.py) and from ``base`` (a checkout from before), one after the other;
    with ``replace``, again once that many workers were killed and replaced."""
    out = {}
    for how, tree in (("base", Path(base).resolve()), ("this tree", REPO)):
        work = Path(tempfile.mkdtemp())
        port, up = proxy_bench._free_port(), proxy_bench._free_port()
        cfg = work / "gateway.toml"
        cfg.write_text(f"""workers = {workers}
[listener]
host = "127.0.0.1"
port = {port}
[upstream]
url = "http://127.0.0.1:{up}"
[admin]
enabled = false
[log]
transactions = ""
[policy]
allow_if_no_policies = true
sqlite_path = "{work}/policy.db"
[security]
block_attachments_without_policy = false
master_key_file = "{work}/master.key"
key_state_file = "{work}/keys.json"
""")
        env = dict(os.environ, SEG_FAST_STATE_DIR=str(work / "state"), PYTHONPATH=str(tree / "src"))
        proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env,
                                cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wrk_bench._wait_port(port)
            end = time.monotonic() + 60
            while len(kids := worker_pids(proc.pid)) < workers:
                assert time.monotonic() < end, f"{how}: {len(kids)} of {workers} workers"
                time.sleep(0.2)
            time.sleep(3.0)                      # start-up done, idle
            pids = _tree(proc.pid)               # the control, its workers and (if any) its template
            out[how] = {"tree": str(tree), "processes": len(pids),
                        **{k.lower() + "_mib": round(v / 1024, 1) for k, v in _pss_kib(pids).items()}}
            print(f"fork    {how}: {out[how]['pss_mib']:.1f} MiB PSS ({out[how]['pss_anon_mib']:.1f} anonymous) "
                  f"for serve's {workers} idle workers and its control process ({len(pids)} processes)",
                  flush=True)
            if replace:
                # One at a time, each replacement listening before the next kill (the crash limit
                # is 5 in 60 s, so at most 4).
                for victim in kids[:replace]:
                    os.kill(victim, signal.SIGKILL)
                    end = time.monotonic() + 60
                    while victim in (now := worker_pids(proc.pid)) or len(now) < workers:
                        assert time.monotonic() < end and proc.poll() is None, f"{how}: no replacement"
                        time.sleep(0.1)
                    wrk_bench._wait_port(port)
                time.sleep(3.0)
                pids = _tree(proc.pid)
                out[how]["replaced"] = {"workers": replace, "processes": len(pids),
                                        **{k.lower() + "_mib": round(v / 1024, 1)
                                           for k, v in _pss_kib(pids).items()}}
                print(f"fork    {how}: {out[how]['replaced']['pss_mib']:.1f} MiB PSS after {replace} workers "
                      f"were killed and replaced", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    saved = (out["base"]["pss_mib"] - out["this tree"]["pss_mib"]) / workers
    out["pss_mib_saved_per_worker"] = round(saved, 1)
    print(f"fork    : {saved:.1f} MiB of PSS less per idle worker", flush=True)
    if replace:
        grown = {how: out[how]["replaced"]["pss_mib"] - out[how]["pss_mib"] for how in ("base", "this tree")}
        out["pss_mib_grown_per_replaced_worker"] = {how: round(g / replace, 1) for how, g in grown.items()}
        print(f"fork    : PSS grown per replaced worker: base {grown['base'] / replace:.1f} MiB, "
              f"this tree {grown['this tree'] / replace:.1f} MiB", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--base", help="a checkout whose serve starts each worker as a new interpreter "
                                   "(e.g. a9409cb); without it the fork comparison is skipped")
    ap.add_argument("--replace", type=int, default=0, choices=range(5),
                    help="with --base: also measure after K workers were killed and replaced (at most 4)")
    ap.add_argument("--ping-after-ms", type=float, default=0.0,
                    help="each device's Ping this long after its fetch: held by the keep-alive lane, not parked by its task")
    ap.add_argument("--only-python", action="store_true", help="the Python measurement alone")
    ap.add_argument("--only-fork", action="store_true", help="with --base: the fork comparison alone")
    ap.add_argument("--out", default=str(HERE / "results" / "worker_memory.json"))
    ap.add_argument("--only-tls", action="store_true",
                    help="the TLS connections alone, nothing written (e.g. under valgrind --tool=massif)")
    args = ap.parse_args(argv)
    proxy_bench._raise_nofile()
    if args.only_tls:
        tls_heap(args.connections, "RSA")
        return 0
    if args.only_python:
        r = python_growth(args.devices, pause=args.ping_after_ms / 1000)
        Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    r = {"commit": commit, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.only_fork:
        if not args.base:
            ap.error("--only-fork needs --base")
        out = Path(args.out)
        kept = json.loads(out.read_text()) if out.exists() else {}
        kept["fork_" + Path(args.base).name] = {**r, **forked_workers(args.workers, args.base, args.replace)}
        out.write_text(json.dumps(kept, indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    r.update({"tls": [tls_heap(args.connections, "ECDSA"), tls_heap(args.connections, "RSA")],
              "python": python_growth(args.devices),
              "fork": forked_workers(args.workers, args.base, args.replace) if args.base else None})
    Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
