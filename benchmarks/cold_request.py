"""Gateway CPU per request when every request wakes an idle worker: a base tree beside this one.

    python benchmarks/cold_request.py --base-tree DIR [--new-tree DIR] [--rounds 5] \
        [--requests 1500] [--gap-ms 10] [--conns 50] [--pollute-mib 32] [--key K]

At real rates a worker sleeps between events, and what a request costs is mostly what its
wake-ups cost: the interpreter's, trio's and the gateway's code and data read back into
caches that the core's other processes (five more workers at 50,000 devices) and the
hypervisor's other guests have emptied. wrk measures a saturated worker (its caches warm:
~150 µs per request); the sizing run measures the real thing but its rounds spread ~25%
(two processes per core, a fleet, a simulator), too much to see a change of a few per cent.
This is the part between them, alone:

- ``seg-fast serve --worker`` of each tree (one worker, plain HTTP, the policy engine with
  an allow-all policy, transaction log on), both at once, pinned to CPU 0;
- a polluter on CPU 0 at SCHED_IDLE walking ``--pollute-mib`` MiB (it runs only while the
  worker sleeps, and stands for the core's other workers; 0 for none);
- a fixed-answer mail server and the client on CPU 1: ``--conns`` keep-alive device
  connections to each worker, one 103-byte Sync every ``--gap-ms``, to the two workers in
  turn (one at a time, each answer read whole and checked 200), so each request finds its
  worker asleep, and both workers see the same moments of the host.

The figure is the worker's CPU (every thread's schedstat) per request over the measured
requests (the first 200 warm up), and its runs onto the CPU (wake-ups) per request; which
tree's worker starts first and is asked first alternates by round; medians of ``--rounds``. Writes a key of results/cold_request.json.

``--floors`` adds four more sides, asked in the same turn. Two are the least a proxy can do
here, in Python, scheduled two ways. Each forwards a request whole once its Content-Length is in, over
an upstream connection of its own per device connection, and the answer back the same way; no
policy, no log, no parsing past the framing. ``floor_trio`` waits as the gateway does (a trio
task per connection on ``wait_readable`` of a raw socket); ``floor_epoll`` has one level-
triggered epoll set, each socket registered once, and a plain loop. The gateway against
``floor_trio`` is what the gateway's own code costs a request; ``floor_trio`` against
``floor_epoll`` is what trio's scheduling costs one on a cold core. The third is the compiled
peer, ``nginx`` as wrk_bench.py runs it (one worker, upstream keep-alive, no log, deferred
accept; master and worker counted). The fourth, ``floor_compiled``, is ``floor_epoll`` with the compiled steps
of the gateway's fast lane (``proxy/_http1.pyx`` of the base tree: the request head parsed, the EAS
request identified, the head for the mail server and the answer's written as the gateway writes
them): what a loop of the gateway's own would cost before its policy decision, pool, deadlines
and log.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "benchmarks"))
from ping_resume_bench import start_worker  # noqa: E402  (the same worker and mail-server set-up)
from wrk_bench import _free_port, start_nginx_proxy  # noqa: E402  (nginx as wrk_bench runs it)
OUT = HERE / "benchmarks" / "results" / "cold_request.json"
WARMUP = 200

MAIL = r'''
import os, select, socket, sys
BODY = bytes.fromhex("03016a00000d45470331000101")
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: %d\r\n\r\n"
          % len(BODY) + BODY)
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(1024); ls.setblocking(False)
print(ls.getsockname()[1], flush=True)
ep = select.epoll(); ep.register(ls.fileno(), select.EPOLLIN)
conns, bufs = {}, {}
while True:
    for fd, _ in ep.poll():
        if fd == ls.fileno():
            c, _ = ls.accept(); c.setblocking(False)
            conns[c.fileno()] = c; bufs[c.fileno()] = b""; ep.register(c.fileno(), select.EPOLLIN)
            continue
        c = conns[fd]
        try:
            data = c.recv(65536)
        except BlockingIOError:
            continue
        if not data:
            ep.unregister(fd); c.close(); del conns[fd], bufs[fd]; continue
        buf = bufs[fd] + data
        while b"\r\n\r\n" in buf:      # a head, then its Content-Length body
            head, _, rest = buf.partition(b"\r\n\r\n")
            m = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
            n = int(m[0].split(b":")[1]) if m else 0
            if len(rest) < n:
                break
            buf = rest[n:]
            c.sendall(ANSWER)
        bufs[fd] = buf
'''

CLIENT = r'''
import base64, socket, sys, time
ports = [int(p) for p in sys.argv[1].split(",")]
conns, total, gap = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) / 1000
BODY = b"x" * 103
socks, reqs = [], []
for i in range(conns):                 # connection i of every gateway: k = i * len(ports) + g
    auth = base64.b64encode(b"user%d:secret" % i)
    req = (b"POST /Microsoft-Server-ActiveSync?Cmd=Sync&User=user%d&DeviceId=DEV%08d&DeviceType=iPhone HTTP/1.1\r\n"
           b"Host: gw\r\nAuthorization: Basic %s\r\nMS-ASProtocolVersion: 14.1\r\n"
           b"User-Agent: Apple-iPhone9C1/1602.92\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (i, i, auth, len(BODY), BODY))
    for port in ports:
        reqs.append(req)
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
bufs = [b""] * len(socks)
def one(k):
    s = socks[k]
    s.sendall(reqs[k])
    buf = bufs[k]
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("the gateway closed a connection")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit("not 200: %r" % head[:200])
    n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
    while len(buf) < n:
        buf += s.recv(65536)
    bufs[k] = buf[n:]
print("ready", flush=True)
sys.stdin.readline()
nxt = time.perf_counter()
for i in range(total):
    if i == int(sys.argv[5]):
        print("mark", flush=True)
        sys.stdin.readline()
        nxt = time.perf_counter()
    nxt += gap
    pause = nxt - time.perf_counter()
    if pause > 0:
        time.sleep(pause)
    one(i % len(socks))               # the gateways in turn, each its connections in turn
print("done", flush=True)
'''

POLLUTE = r'''
import os, sys
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
buf = bytearray(int(sys.argv[1]) << 20)
mv = memoryview(buf)
while True:
    for off in range(0, len(buf), 4096):
        mv[off] = (mv[off] + 1) & 255       # one write per page: every page's lines, in turn
    bytes(buf)                              # and a read of all of it
'''

# The floors' framing (the client and MAIL write ``Content-Length`` in that case): one whole
# message's length at the start of buf, or 0.
FRAME = r'''
import socket, sys
def frame(buf):
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return 0
    j = buf.find(b"Content-Length:", 0, i)
    n = i + 4 + (int(buf[j + 15:buf.find(b"\r\n", j)]) if j >= 0 else 0)
    return n if len(buf) >= n else 0
def upstream():
    up = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    up.setblocking(False)
    return up
def listener():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)
    ls.setblocking(False)
    print(ls.getsockname()[1], flush=True)
    return ls
'''

FLOOR_TRIO = FRAME + r'''
import trio
from trio.lowlevel import wait_readable
async def serve(dev):
    up, dbuf, ubuf = upstream(), b"", b""
    while True:
        while not (n := frame(dbuf)):
            await wait_readable(dev)
            data = dev.recv(65536)
            if not data:
                dev.close(); up.close(); return
            dbuf += data
        up.send(dbuf[:n]); dbuf = dbuf[n:]
        while not (n := frame(ubuf)):
            await wait_readable(up)
            ubuf += up.recv(65536)
        dev.send(ubuf[:n]); ubuf = ubuf[n:]
async def main():
    ls = listener()
    async with trio.open_nursery() as nursery:
        while True:
            await wait_readable(ls)
            dev, _ = ls.accept()
            dev.setblocking(False)
            nursery.start_soon(serve, dev)
trio.run(main)
'''

# One level-triggered epoll set, each socket registered once; ``forward(buf, up)`` and
# ``back(buf, dev)`` (each floor's own) send what is whole in buf and return the rest.
EPOLL_LOOP = r'''
import select
ls, ep, pairs = listener(), select.epoll(), {}
ep.register(ls.fileno(), select.EPOLLIN)
while True:
    for fd, _ in ep.poll():
        if fd == ls.fileno():
            dev, _ = ls.accept()
            dev.setblocking(False)
            pair = [dev, upstream(), b"", b""]
            for sock in pair[:2]:
                pairs[sock.fileno()] = pair
                ep.register(sock.fileno(), select.EPOLLIN)
            continue
        pair = pairs[fd]
        dev, up = pair[0], pair[1]
        if fd == dev.fileno():
            data = dev.recv(65536)
            if not data:
                for sock in (dev, up):
                    del pairs[sock.fileno()]
                    sock.close()
                continue
            pair[2] = forward(pair[2] + data, up)
        else:
            pair[3] = back(pair[3] + up.recv(65536), dev)
'''

FLOOR_EPOLL = FRAME + r'''
def forward(buf, to):
    n = frame(buf)
    if n:
        to.send(buf[:n])
    return buf[n:]
back = forward
''' + EPOLL_LOOP

# floor_epoll's loop with the gateway's compiled steps of its fast lane (proxy/_http1.pyx, imported
# from the base tree): the request head parsed, the EAS request identified, the head for the mail
# server rewritten, the answer head parsed and rewritten. What a loop of the gateway's own would
# cost before the policy decision, the pool, the deadlines and the log.
FLOOR_COMPILED = FRAME + r'''
from seg_fast.proxy._http1 import (FRAMING_LENGTH, RequestHead, ResponseHead, identify, parse_request,
                                   parse_response, write_answer, write_upstream)
HOST = b"127.0.0.1:" + sys.argv[1].encode()
def forward(buf, up):
    head = parse_request(buf, 65536)
    if type(head) is not RequestHead or len(buf) < head.head_len + head.length:
        return buf
    end = head.head_len + head.length
    if identify("POST", head.target, head.headers, "127.0.0.1") is None:
        raise SystemExit("not identified")
    up.send(write_upstream(b"POST", head.target, head.headers, HOST, b"127.0.0.1", b"http", head.length)
            + buf[head.head_len:end])
    return buf[end:]
def back(buf, dev):
    answer = parse_response(buf, b"POST", 65536)
    if type(answer) is not ResponseHead or len(buf) < answer.head_len + answer.length:
        return buf
    end = answer.head_len + answer.length
    dev.send(write_answer(answer.status_code, answer.reason, answer.headers, FRAMING_LENGTH,
                          answer.length, True) + buf[answer.head_len:end])
    return buf[end:]
''' + EPOLL_LOOP
FLOORS = {"floor_trio": FLOOR_TRIO, "floor_epoll": FLOOR_EPOLL, "nginx": None, "floor_compiled": FLOOR_COMPILED}


def start_floor(name: str, mail_port: int, tree: str) -> tuple[subprocess.Popen, int]:
    """A floor proxy pinned to CPU 0 in front of the mail server (``tree``: whose seg_fast
    floor_compiled imports); the process and its port."""
    if name == "nginx":
        port = _free_port()
        work = Path(tempfile.mkdtemp(prefix="cold-request-nginx-"))
        return start_nginx_proxy(work, port, mail_port), port
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", FLOORS[name], str(mail_port)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(Path(tree) / "src")))
    return proc, int(proc.stdout.readline())


def cpu_and_runs(pid: int) -> tuple[int, int]:
    """CPU ns and runs onto a CPU of every thread of ``pid`` and of its children so far
    (schedstat; nginx's master and worker). (No user/kernel split: this kernel's stime is
    charged by whole ticks to whoever a tick finds, noise at these rates.)"""
    ns = runs = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [pid, *map(int, f.read().split())]
    except OSError:
        pids = [pid]
    for p in pids:
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    a = f.read().split()
            except OSError:
                continue
            ns += int(a[0])
            runs += int(a[2])
    return ns, runs


def one_round(sides: dict[str, str], order: tuple[str, ...], mail_port: int, args) -> dict:
    """Every side's proxy at once, the client's requests to them in turn: the sides share
    every moment of the host (its speed moves by tens of per cent within minutes)."""
    serves: dict[str, tuple[subprocess.Popen, int]] = {}
    polluter = client = None
    try:
        for side in order:
            serves[side] = (start_floor(side, mail_port, sides["base"]) if side in FLOORS else
                            start_worker(sides[side], mail_port, cpu=0, prefix="cold-request-"))
        if args.pollute_mib:
            polluter = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", POLLUTE,
                                         str(args.pollute_mib)])
        ports = ",".join(str(serves[side][1]) for side in order)
        client = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", CLIENT, ports, str(args.conns),
                                   str(len(order) * (WARMUP + args.requests)), str(args.gap_ms),
                                   str(len(order) * WARMUP)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def expect(word: str) -> None:
            line = client.stdout.readline().strip()
            if line != word:
                client.wait(30)
                raise RuntimeError(f"client: expected {word!r}, got {line!r} (exit {client.returncode})")

        def go() -> None:
            client.stdin.write("\n")
            client.stdin.flush()

        expect("ready")
        go()
        expect("mark")                 # the warm-up is over
        before = {side: cpu_and_runs(p.pid) for side, (p, _) in serves.items()}
        t0 = time.perf_counter()
        go()
        expect("done")
        after = {side: cpu_and_runs(p.pid) for side, (p, _) in serves.items()}
        wall = time.perf_counter() - t0
        client.wait(30)
    finally:
        for p in (client, polluter):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for p, _ in serves.values():
            p.terminate()
            p.wait(30)
    n = args.requests
    return {side: {"requests": n, "cpu_us_per_request": round((after[side][0] - before[side][0]) / n / 1000, 1),
                   "runs_per_request": round((after[side][1] - before[side][1]) / n, 2), "wall_s": round(wall, 2)}
            for side in order}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-tree", required=True)
    ap.add_argument("--new-tree", default=str(HERE))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--pollute-mib", type=int, default=32)
    ap.add_argument("--key", default=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    ap.add_argument("--floors", action="store_true",
                    help="add the floor_trio, floor_epoll, nginx and floor_compiled sides")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    mail = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", MAIL], stdout=subprocess.PIPE, text=True)
    sides = {"base": args.base_tree, "new": args.new_tree}
    if args.floors:
        sides.update((name, "") for name in FLOORS)
    names = tuple(sides)
    runs: dict[str, list[dict]] = {side: [] for side in names}
    try:
        mail_port = int(mail.stdout.readline())
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]     # who starts and is asked first rotates
            res = one_round(sides, order, mail_port, args)
            for side in names:
                runs[side].append(res[side])
                print(f"round {r + 1} {side}: {res[side]}", flush=True)
    finally:
        mail.kill()
        mail.wait()
    med = {side: statistics.median(x["cpu_us_per_request"] for x in v) for side, v in runs.items()}
    summary = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg(),
        "note": args.note, "argv": sys.argv[1:] if argv is None else argv,
        "trees": {"base": args.base_tree, "new": args.new_tree},
        "cpu_us_per_request_median": med,
        "runs_per_request_median": {side: statistics.median(x["runs_per_request"] for x in v)
                                    for side, v in runs.items()},
        **{f"{side}_vs_base": round(med[side] / med["base"], 3) for side in names[1:]},
        **{f"rounds_{side}_vs_base": [round(o["cpu_us_per_request"] / b["cpu_us_per_request"], 3)
                                      for b, o in zip(runs["base"], runs[side])] for side in names[1:]},
        "runs": runs,
    }
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[args.key] = summary
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("when", "load_average", "note", "argv",
                                                                    "trees", "runs")}))
    print(f"wrote {OUT} [{args.key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
