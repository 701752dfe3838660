"""The gateway's CPU for TLS answers over TCP, this tree's tlsio beside a commit's (A/B).

``--answers``: server-thread CPU per exchange (a 400-byte request in, a 180-byte head and a
body of each ``--sizes`` out, through sockio.send_parts with the device-write pace, as the
gateway writes an answer) over a loopback TCP connection to a blocking TLS client in a forked
process, the stream alternating between tlsio.TLSStream as of ``--baseline`` (git show) and
as it is here; medians of ``--rounds``. (tls_bench.py --stream-loop does this over a
socketpair, where TCP segmentation, which this measures too, does not exist.)

``--sizing``: benchmarks/sizing.py (a short development run, TLS, the gateway path only) with
each tree's sources alternately (PYTHONPATH=<tree>/src), the gateway process's CPU-s per
device-hour from each run's JSON, and the load side's CPU per request in the hold (the fleet
and simulator shards: a change to them is compared the same way); medians. ``--base-args``/``--new-args`` add options to one
side's runs: with one tree for both, an A/B of a setting (e.g. the workers a core is cut into:
``--base-args "--shard-size 500" --new-args "--shard-size 3000"``); ``--base-env``/``--new-env`` give
one side's runs an environment variable (a config override: ``--base-env SEG_FAST_LIMITS_HUGE_PAGES=false``).

``--base-python``/``--new-python``: the interpreter each side runs (default: this one), for
--sizing and --connections; with one tree for both sides this compares interpreters (e.g. a
pyenv build against Debian's /usr/bin/python3, libpython linked in), the same code.

``--connections N``: per-connection cost, each tree's ``seg-fast serve --workers 1`` (pinned to CPU
0, device-leg TLS, a trustme ECDSA certificate) taking N sequential TLS 1.3 connections that each
resume the same session, send one request the gateway answers itself (a 404) and close, from a
Python client here: the worker's CPU (every thread's schedstat) per connection; trees alternate
round by round, medians of ``--rounds``. A fleet device opens such a connection for each
foreground command (about 6 per device-hour in BENCH-PROFILE).

Results go into a key (``--key``) of benchmarks/results/gateway_cpu_ab.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
OUT = HERE / "benchmarks" / "results" / "gateway_cpu_ab.json"
SIZING = ["--devices", "3000", "--paths", "gateway", "--rate-scale", "10", "--ramp", "20",
          "--settle", "10", "--hold", "60", "--drain", "15", "--repeat", "1", "--seed", "3", "--tls"]


def answers(sizes: list[int], exchanges: int, rounds: int, baseline: str) -> dict:
    import multiprocessing

    import trio
    import trustme

    from seg_fast.proxy.gateway import server_tls_context
    from seg_fast.proxy.tlsio import TLSStream

    sys.path.insert(0, str(HERE / "benchmarks"))
    from tls_bench import baseline_tlsio, serve_exchanges

    workdir = Path(tempfile.mkdtemp(prefix="gw-cpu-ab-"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(workdir / "c.pem"))
    cert.private_key_pem.write_to_path(str(workdir / "k.pem"))
    sctx = server_tls_context(str(workdir / "c.pem"), str(workdir / "k.pem"))
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    request = b"x" * 400
    streams = {f"base@{baseline}": baseline_tlsio(baseline, workdir), "new": TLSStream}

    def client(port, size):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with cctx.wrap_socket(raw, server_hostname="localhost") as s:
                for _ in range(exchanges):
                    s.sendall(request)
                    got = 0
                    while got < size:
                        got += len(s.recv(262144))

    async def serve(kind, body):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        peer = multiprocessing.get_context("fork").Process(target=client, args=(port, 180 + body))
        peer.start()
        sock, _ = await trio.to_thread.run_sync(listener.accept)
        listener.close()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # as the gateway's sockets
        transport = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        stream = streams[kind](transport, sctx)
        await stream.do_handshake()
        return await serve_exchanges(stream, request, [b"h" * 180, b"S" * body], exchanges, peer)

    out = {}
    for body in sizes:
        runs: dict[str, list] = {}
        for _ in range(rounds):
            for kind in streams:
                runs.setdefault(kind, []).append(trio.run(serve, kind, body))
        out[str(body)] = {kind: {"server_cpu_us_per_exchange": statistics.median(r), "runs": r}
                          for kind, r in runs.items()}
        print(body, {k: v["server_cpu_us_per_exchange"] for k, v in out[str(body)].items()}, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def interpreter(python: str) -> dict:
    """What a side's interpreter is: version, and whether libpython is a shared library (-fPIC,
    calls through the PLT) or linked into the executable, as Debian's is."""
    code = ("import json, sys, sysconfig; print(json.dumps({'version': sys.version.split()[0], "
            "'executable': sys.executable, 'shared_libpython': bool(sysconfig.get_config_var('Py_ENABLE_SHARED')), "
            "'config_args': sysconfig.get_config_var('CONFIG_ARGS')}))")
    info = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    ldd = subprocess.run(["ldd", os.path.realpath(python)], capture_output=True, text=True).stdout
    info["executable_links_libpython"] = "libpython" in ldd
    return info


def sizing(sides: dict[str, tuple[str, str]], rounds: int, args: list[str],
           extra: dict[str, list[str]] | None = None, side_env: dict[str, dict] | None = None) -> dict:
    runs: dict[str, list] = {}
    for _ in range(rounds):
        for name, (tree, python) in sides.items():
            outdir = Path(tempfile.mkdtemp(prefix=f"gw-cpu-sizing-{name}-"))
            env = dict(os.environ, PYTHONPATH=str(Path(tree) / "src"), **(side_env or {}).get(name, {}))
            subprocess.run([python, str(Path(tree) / "benchmarks" / "sizing.py"), *args,
                            *(extra or {}).get(name, []),
                            "--quiet", "--out", str(outdir)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            found = [p for p in outdir.glob("sizing-*.json") if not p.name.endswith(".raw.json")]
            point = json.loads(found[0].read_text())["points"][0]
            m = point["verdict"]["metrics"]["gateway"]
            raw = json.loads(found[0].with_name(found[0].stem + ".raw.json").read_text())
            g = raw["points"][0]["runs"][0]["paths"]["gateway"]
            cpu, n = g["server"]["cpu_s"], g["requests_in_window"]
            # On a shared machine the load side may fall behind its schedule: fewer requests
            # per device-hour, so less CPU per device-hour. CPU per request in the same
            # window does not depend on that.
            runs.setdefault(name, []).append({
                "cpu_s_per_device_hour": m["cpu_s_per_device_hour"], "cpu_share": m["cpu_share"],
                "wakeups_per_device_hour": m.get("wakeups_per_device_hour"),
                "hold_cpu_s": cpu, "hold_requests": n, "hold_cpu_us_per_request": round(cpu / n * 1e6, 1),
                "failures": sum(g["failures"].values()), "invalid": point["verdict"]["invalid"],
                # the load side (fleet and simulator shards, the other core): a change to them shows here
                "load_cpu_share": g["load"]["cpu_share"], "load_cpu_vs_gateway": point["verdict"]["metrics"].get("load_cpu_vs_gateway"),
                "load_hold_cpu_us_per_request": round(g["load"]["cpu_share"] * g["window_s"] / n * 1e6, 1)})
            print(name, runs[name][-1], flush=True)
            shutil.rmtree(outdir, ignore_errors=True)
    return {name: {"cpu_s_per_device_hour_median": statistics.median(r["cpu_s_per_device_hour"] for r in rs),
                   "hold_cpu_us_per_request_median": statistics.median(r["hold_cpu_us_per_request"] for r in rs),
                   "load_cpu_share_median": statistics.median(r["load_cpu_share"] for r in rs),
                   "load_hold_cpu_us_per_request_median": statistics.median(r["load_hold_cpu_us_per_request"] for r in rs),
                   "runs": rs}
            for name, rs in runs.items()}


def connections(sides: dict[str, tuple[str, str]], n: int, rounds: int) -> dict:
    import ssl

    import trustme

    sys.path[:0] = [str(HERE / "benchmarks"), str(HERE / "tests")]
    from processes import stop_process
    from tls_tickets_bench import free_port, one, threads_cpu_ns

    from seg_fast.proxy.forked import worker_pids

    def run(tree: str, python: str, tmp: Path, ctx) -> dict:
        tmp.mkdir(parents=True)
        port = free_port()
        (tmp / "gw.toml").write_text("\n".join([
            "workers = 1", "[listener]", 'host = "127.0.0.1"', f"port = {port}",
            f'tls_cert = "{tmp.parent / "cert.pem"}"', f'tls_key = "{tmp.parent / "key.pem"}"',
            "[upstream]", f'url = "http://127.0.0.1:{free_port()}"', "[admin]", "enabled = false",
            "[log]", 'transactions = ""', f'file = "{tmp / "gateway.log"}"', "[policy]",
            "allow_if_no_policies = true", f'sqlite_path = "{tmp / "policy.db"}"', "[security]",
            f'master_key_file = "{tmp / "master.key"}"', f'key_state_file = "{tmp / "keys.json"}"']) + "\n")
        env = dict(os.environ, PYTHONPATH=str(Path(tree) / "src"), SEG_FAST_STATE_DIR=str(tmp / "state"))
        proc = subprocess.Popen(["taskset", "-c", "0", python, "-m", "seg_fast", "serve", "--config",
                                 str(tmp / "gw.toml")], env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                                stderr=open(tmp / "stderr.log", "w"))  # noqa: SIM115 - the child holds it
        try:
            end = time.monotonic() + 60
            while True:
                try:
                    one(port, ctx).close()
                    break
                except OSError:
                    if time.monotonic() > end or proc.poll() is not None:
                        raise RuntimeError((tmp / "stderr.log").read_text()) from None
                    time.sleep(0.2)
            worker = worker_pids(proc.pid)[0]
            for _ in range(30):                   # warm-up
                one(port, ctx).close()
            sock = one(port, ctx)
            session = sock.session
            sock.close()

            c0, t0, resumed = threads_cpu_ns([worker]), time.monotonic(), 0
            for _ in range(n):
                sock = one(port, ctx, session)
                resumed += sock.session_reused
                sock.close()
            time.sleep(0.2)                       # the worker finishes the last close
            cpu, elapsed = threads_cpu_ns([worker]) - c0, time.monotonic() - t0
            return {"cpu_us_per_conn": round(cpu / n / 1000, 1), "resumed": resumed / n,
                    "conn_per_s": round(n / elapsed, 1)}
        finally:
            stop_process(proc, 20)

    workdir = Path(tempfile.mkdtemp(prefix="gw-cpu-conn-"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    runs: dict[str, list] = {}
    try:
        for r in range(rounds):
            for name, (tree, python) in sides.items():
                got = run(tree, python, workdir / f"{name}-{r}", ctx)
                runs.setdefault(name, []).append(got)
                print(name, got, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {name: {"cpu_us_per_conn_median": statistics.median(x["cpu_us_per_conn"] for x in rs), "runs": rs}
            for name, rs in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", action="store_true")
    ap.add_argument("--sizes", default="180,30000,460000")
    ap.add_argument("--exchanges", type=int, default=2000)
    ap.add_argument("--baseline", default="HEAD", help="commit for --answers' base stream")
    ap.add_argument("--sizing", action="store_true")
    ap.add_argument("--connections", type=int, default=0, metavar="N",
                    help="per-connection CPU: N sequential resumed TLS connections per run (see above)")
    ap.add_argument("--base-tree", help="--sizing: the base worktree (git worktree add <dir> <commit>; default: the new tree)")
    ap.add_argument("--new-tree", default=str(HERE), help="--sizing: the changed tree (default: this one)")
    ap.add_argument("--base-python", default=sys.executable, help="--sizing/--connections: the base's interpreter")
    ap.add_argument("--new-python", default=sys.executable, help="--sizing/--connections: the new side's interpreter")
    ap.add_argument("--sizing-args", default=" ".join(SIZING), help="--sizing: sizing.py's options")
    ap.add_argument("--base-args", default="", help="--sizing: options for the base side only (e.g. --shard-size 500)")
    ap.add_argument("--new-args", default="", help="--sizing: options for the new side only")
    ap.add_argument("--base-env", action="append", default=[], metavar="K=V",
                    help="--sizing: an environment variable for the base side's run only (a config "
                         "override the gateway reads, e.g. SEG_FAST_LIMITS_HUGE_PAGES=false)")
    ap.add_argument("--new-env", action="append", default=[], metavar="K=V", help="--sizing: the same for the new side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--key", required=True, help="the key of results/gateway_cpu_ab.json to write")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "load_average": os.getloadavg(), "note": args.note, "argv": sys.argv[1:]}
    if args.answers:
        result["answers"] = answers([int(s) for s in args.sizes.split(",")], args.exchanges,
                                    args.rounds, args.baseline)
    sides = {"base": (args.base_tree or args.new_tree, args.base_python), "new": (args.new_tree, args.new_python)}
    if args.sizing or args.connections:
        result["interpreters"] = {name: interpreter(python) for name, (_, python) in sides.items()}
    if args.sizing:
        extra = {"base": args.base_args.split(), "new": args.new_args.split()}
        side_env = {"base": dict(kv.split("=", 1) for kv in args.base_env),
                    "new": dict(kv.split("=", 1) for kv in args.new_env)}
        result["sizing"] = sizing(sides, args.rounds, args.sizing_args.split(), extra, side_env)
        if args.base_env or args.new_env:
            result["sizing_side_env"] = side_env
        result["sizing_command"] = "python benchmarks/sizing.py " + args.sizing_args
        if args.base_args or args.new_args:
            result["sizing_side_args"] = {"base": args.base_args, "new": args.new_args}
    if args.connections:
        result["connections"] = connections(sides, args.connections, args.rounds)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[args.key] = result
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT} [{args.key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
