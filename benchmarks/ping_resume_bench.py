"""Gateway CPU per parked-Ping cycle, a base tree beside this one (A/B, alternating).

`seg-fast serve --worker` (plain HTTP, parking on, transaction log on), a mail server that
answers every request after --delay seconds, and --conns devices Pinging back to back for
--seconds each: every Ping parks (parking.py) and is resumed (exchange.resume) when its
answer comes. The figure is the serve process's CPU (utime+stime from /proc) per Ping
answered; medians of --rounds. Writes a key of benchmarks/results/gateway_cpu_ab.json.

``--park N``: the parking lot alone, each tree in a process of its own (alternating): N Pings
over trio sockets (a plain SocketStream device, a trio socket upstream; socketpairs) parked
and handed back (PingPark.park, then _release with a no-op spawn), its CPU per Ping
(process time; best of 7 passes per run), medians of --rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
OUT = HERE / "benchmarks" / "results" / "gateway_cpu_ab.json"
TICK = os.sysconf("SC_CLK_TCK")

MAIL = r'''
import sys, trio
from seg_fast.testing.rawhttp import stream_requests
DELAY = float(sys.argv[1])
BODY = bytes.fromhex("03016a00000d45470331000101")
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: %d\r\n\r\n"
          % len(BODY) + BODY)
async def conn(stream):
    try:
        await answer(stream)
    except trio.BrokenResourceError:
        pass                          # a gateway that stopped: the next run's connects anew
async def answer(stream):
    async for _head, _body in stream_requests(stream):
        await trio.sleep(DELAY)
        await stream.send_all(ANSWER)
async def main():
    ls = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(ls[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(conn, ls)
trio.run(main)
'''

DEVICES = r'''
import base64, sys, trio
port, conns, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
count = 0
async def one(i):
    global count
    s = await trio.open_tcp_stream("127.0.0.1", port)
    auth = b"Basic " + base64.b64encode(b"user%d:secret" % i)
    req = (b"POST /Microsoft-Server-ActiveSync?Cmd=Ping&User=user%d&DeviceId=DEV%08d&DeviceType=iPhone HTTP/1.1\r\n"
           b"Host: gw\r\nAuthorization: %s\r\nMS-ASProtocolVersion: 14.1\r\n"
           b"Content-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: 0\r\n\r\n") % (i, i, auth)
    buf = b""
    while True:
        await s.send_all(req)
        while b"\r\n\r\n" not in buf:
            buf += await s.receive_some(65536)
        head, _, buf = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
        while len(buf) < n:
            buf += await s.receive_some(65536)
        buf = buf[n:]
        count += 1
async def main():
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as n:
            for i in range(conns):
                n.start_soon(one, i)
    print(count)
trio.run(main)
'''

PARK = r'''
import socket, sys, time, trio
from seg_fast.proxy.parking import ANSWER, Parked, PingPark
N = int(sys.argv[1])
class Up:
    pass
async def main():
    park = PingPark(lambda p, why: None)
    socks, parked = [], []
    for _ in range(N):
        u, u2 = socket.socketpair()
        d, d2 = socket.socketpair()
        socks += [u, u2, d, d2]
        up = Up()
        up.sock = trio.socket.from_stdlib_socket(u)
        dev = trio.SocketStream(trio.socket.from_stdlib_socket(d))
        parked.append(Parked(dev, "127.0.0.1", b"http", False, up, None, None, None, b"gw",
                             trio.current_time() + 3600, 0.0, 0.0))
    best = {"park": 1e9, "release": 1e9}
    for _ in range(7):
        park._heap = []
        t0 = time.process_time()
        for p in parked:
            p.done = False
            park.park(p)
        t1 = time.process_time()
        for p in parked:
            park._release(p, ANSWER)
        t2 = time.process_time()
        best = {"park": min(best["park"], t1 - t0), "release": min(best["release"], t2 - t1)}
    print(round(best["park"] / N * 1e6, 2), round(best["release"] / N * 1e6, 2))
trio.run(main)
'''


def park_run(tree: str, n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(tree) / "src"))
    out = subprocess.run([sys.executable, "-c", PARK, str(n)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return {"park_us": float(out[0]), "release_us": float(out[1])}


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start_worker(tree: str, mail_port: int, *, cpu: int | None = None,
                 prefix: str = "ping-bench-", hook_dir: str | None = None) -> tuple[subprocess.Popen, int]:
    """``seg-fast serve --worker`` of ``tree`` (plain HTTP, an allow-all policy, transaction
    log on) in front of the mail server at ``mail_port``, pinned to ``cpu`` if given, with
    ``hook_dir`` (a ``sitecustomize``) first on its path if given; the process and its port
    once it listens."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "state").mkdir()
    cfg = work / "gw.toml"
    cfg.write_text(f'state_dir = "{work}/state"\n[listener]\nhost = "127.0.0.1"\nport = 0\n'
                   f'[upstream]\nurl = "http://127.0.0.1:{mail_port}"\n[admin]\nenabled = false\n'
                   f'[log]\ntransactions = "{work}/tx.log"\nlevel = "warn"\n'
                   f'[policy]\nsqlite_path = "{work}/state/policy.db"\n'
                   f'[security]\nmaster_key_file = "{work}/state/master.key"\n'
                   f'key_state_file = "{work}/state/keys.json"\n')
    (work / "policies.json").write_text(json.dumps(
        {"policies": {"general": {"mail_client": {"enabled": True, "mode": "allow", "values": ["*"]}}},
         "devices": []}))
    path = [hook_dir] if hook_dir else []
    env = dict(os.environ, PYTHONPATH=":".join(path + [str(Path(tree) / "src")]),
               SEG_FAST_STATE_DIR=str(work / "state"))
    subprocess.run([sys.executable, "-m", "seg_fast", "policy", "load", str(work / "policies.json"),
                    "--config", str(cfg)], env=env, cwd=work, check=True, capture_output=True)
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    serve = subprocess.Popen(pin + [sys.executable, "-m", "seg_fast", "serve", "--worker", "--config", str(cfg)],
                             env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        line = serve.stderr.readline()
        if not line:
            raise RuntimeError("serve exited")
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            return serve, int(m.group(1))


def one_run(tree: str, mail_port: int, args) -> dict:
    serve, port = start_worker(tree, mail_port)
    try:
        c0 = cpu_of(serve.pid)
        done = subprocess.run([sys.executable, "-c", DEVICES, str(port), str(args.conns), str(args.seconds)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError("devices failed: " + done.stderr[-1500:])
        out = done.stdout
        used = cpu_of(serve.pid) - c0
        n = int(out.strip().splitlines()[-1])
    finally:
        serve.terminate()
        serve.wait(30)
    return {"pings": n, "cpu_s": round(used, 3), "cpu_us_per_ping": round(used / n * 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-tree", required=True)
    ap.add_argument("--new-tree", default=str(HERE))
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--delay", type=float, default=0.005)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--key", default="ping_resume")
    ap.add_argument("--note", default="")
    ap.add_argument("--park", type=int, default=0, metavar="N", help="the parking lot alone, N Pings (see above)")
    args = ap.parse_args(argv)
    if args.park:
        return park_main(args)
    mail = subprocess.Popen([sys.executable, "-c", MAIL, str(args.delay)], stdout=subprocess.PIPE, text=True)
    try:
        mail_port = int(mail.stdout.readline())
        runs: dict[str, list] = {}
        for _ in range(args.rounds):
            for name, tree in (("base", args.base_tree), ("new", args.new_tree)):
                runs.setdefault(name, []).append(one_run(tree, mail_port, args))
                print(name, runs[name][-1], flush=True)
    finally:
        mail.terminate()
        mail.wait(10)
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg(),
              "note": args.note, "argv": sys.argv[1:],
              "trees": {"base": args.base_tree, "new": args.new_tree},
              **{name: {"cpu_us_per_ping_median": statistics.median(r["cpu_us_per_ping"] for r in rs), "runs": rs}
                 for name, rs in runs.items()}}
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[args.key] = result
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: result[k]["cpu_us_per_ping_median"] for k in runs}), f"-> {OUT} [{args.key}]")
    return 0


def park_main(args) -> int:
    runs: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, tree in (("base", args.base_tree), ("new", args.new_tree)):
            runs.setdefault(name, []).append(park_run(tree, args.park))
            print(name, runs[name][-1], flush=True)
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg(),
              "note": args.note, "argv": sys.argv[1:], "trees": {"base": args.base_tree, "new": args.new_tree},
              **{name: {"park_us_median": statistics.median(r["park_us"] for r in rs),
                        "release_us_median": statistics.median(r["release_us"] for r in rs), "runs": rs}
                 for name, rs in runs.items()}}
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[args.key] = result
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: [result[k]["park_us_median"], result[k]["release_us_median"]] for k in runs}),
          f"-> {OUT} [{args.key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
