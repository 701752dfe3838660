"""A 10 MB fetch through `seg-fast serve --workers 1` beside N parked TLS Pings.

    python benchmarks/big_fetch_tail.py [--parked 3000] [--fetches 12] [--size 10485760]
        [--upstream-tls] [--syscalls]
        [--body x|pdf] [--security off|on] [--base TREE] [--rounds 3] [--json PATH] [--key KEY]
        [--load K] [--contend SHARE]

A stand-in mail server (plain HTTP, pinned to CPU 1) holds every Ping unanswered, answers
ItemOperations with ``--size`` bytes and anything else with a few bytes. The gateway
(security off, TLS on the device leg, `serve` with one worker, pinned to CPU 0) carries:
``--parked`` TLS devices whose Pings it parks; a probe device sending a small Sync every
10 ms over one keep-alive TLS connection (its latency says how long others waited while a
big answer went through); and ``--fetches`` big fetches one after the other, each on a
new TLS connection, read to the last byte by a blocking ssl socket (CPU 1). Per run:
time to last byte (median, max), the probe's p99 and max during the fetches, the
worker's CPU per fetch, and from its slow-step log (SEG_FAST_SLOW_STEP_MS=5) the steps
and batches over 5 ms of CPU. ``--base TREE``: another checkout (built) run alternately.
Claims nothing about devices per core: it isolates what one big answer costs the loop.
``--reader-pause-ms P``: the fetching device (both paths) pauses P ms after each read of at most
``--reader-chunk`` bytes, as a busy device does (a sizing run's fleet shard reads its answers
between its other devices' work): the answer then waits in the sockets, and how often the
gateway must be woken to refill the device's socket shows (``serve_wakeups_per_fetch``: the
serve's voluntary context switches per fetch).
``--upstream-tls``: the gateway reaches the stand-in at https:// (TLS 1.3, verified against
the test CA), as Exchange and Office 365 are reached. ``--syscalls``: the workers' read(2),
write(2), writev(2) and epoll_wait(2) calls per fetch, counted by ``perf stat`` on the kernel's
tracepoints (a count: it does not move with the machine's speed).
``--contend 0.4``: six neighbour processes on core 0 take 40% of it in bursts (mean 2 ms, up
to 30 ms), as the other workers of the 50,000-device run do: the fetch shares the core.

``--body pdf``: the answer is what a device's fetch of a PDF of ``--size`` bytes gets (one
ItemOperations Data string of its base64, ~1.33 x the size), not ``--size`` bytes of "x".
``--security on`` (implies pdf): the profile's email-security policies, the fetching device
managed, so the gateway seals the file as it streams; every such answer is opened with the
gateway's keys and compared with the PDF by SHA-256 (after its timing). Each fetch is also
made straight from the stand-in's TLS listener (the same answer, Python's ssl in a thread of
the stand-in, CPU 1: the sizing run's direct path), alternating which goes first; the
figure the service level uses is the paired difference: ``added_ms`` (gateway minus direct
TLS, per fetch; its median, p90 and max per run). Every fetch is timed from its request's
write to the answer's last byte, the connection's TLS handshake made before.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE / "benchmarks"), str(HERE / "tests")]
from big_answer_cpu import tree_cpu, tree_stat, wait_accepting  # noqa: E402  (the serve and its worker's CPU)
from processes import stop_process  # noqa: E402
PATH = "/Microsoft-Server-ActiveSync?Cmd={cmd}&User=u1&DeviceId=DEV{n}&DeviceType=iPhone"
HEADERS = ("Authorization: Basic dTE6c2VjcmV0\r\nMS-ASProtocolVersion: 14.1\r\n"
           "User-Agent: Apple-iPhone15C2/2104.100\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n")
PING_BODY = bytes.fromhex("03016a00000d454803363030000101")   # Ping, HeartbeatInterval 600
SYNC_BODY = bytes.fromhex("03016a00455c4f4b033100015203310001010101")
FETCH_BODY = bytes.fromhex("03016a000014454647034d61696c626f780001001151036174743100010101")

POLICY_GENERAL = {"mail_client": {"enabled": True, "mode": "allow", "values": ["Apple-iPhone*"]}}

# The stand-in mail server (plain HTTP; argv[1] the fetch answer's size). BIG_FETCH_BODY (env):
# a file holding the answer instead of "x"s; BIG_FETCH_TLS (env): a directory with cert.pem and
# key.pem, for a second, TLS listener answering the same (a thread, blocking ssl: the direct
# path), its port printed on a second line, and a third, the mail server at https:// (the
# same answers as the first; --upstream-tls), its port on a third line.
MAIL = r'''
import os, socket, ssl, sys, threading, trio
from seg_fast.testing.rawhttp import heads, stream_requests
SIZE = int(sys.argv[1])
BIG = open(os.environ["BIG_FETCH_BODY"], "rb").read() if os.environ.get("BIG_FETCH_BODY") else b"x" * SIZE
SIZE = len(BIG)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: %d\r\n\r\n"
SMALL = HEAD % 13 + bytes.fromhex("03016a00000d45470331000101")
def tls_listener(cert_dir, answer):
    # a TLS listener (blocking ssl, a thread per connection): answer(request line) -> bytes, or
    # None to hold the connection (read to the peer's close)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_dir + "/cert.pem", cert_dir + "/key.pem")
    lsock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    def serve(conn):
        with conn:
            try:
                s = ctx.wrap_socket(conn, server_side=True)
                for line, _fields in heads(s):
                    out = answer(line)
                    if out is None:
                        while s.recv(65536):
                            pass
                        return
                    s.sendall(out)
            except (OSError, ValueError):
                pass
    def accept():
        while True:
            conn, _ = lsock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return lsock.getsockname()[1]
def upstream_answer(line):
    # --upstream-tls: the mail server's own TLS listener answers as the plain one
    if b"Cmd=Ping" in line:
        return None
    return HEAD % SIZE + BIG if b"Cmd=ItemOperations" in line else SMALL
async def conn(stream):
    try:
        async for head, _body in stream_requests(stream):
            first = head.split(b"\r\n", 1)[0]
            if b"Cmd=Ping" in first:       # held: read to the gateway's close, then let go
                while await stream.receive_some(65536):
                    pass
                return
            elif b"Cmd=ItemOperations" in first:
                await stream.send_all(HEAD % SIZE)
                await stream.send_all(BIG)
            else:
                await stream.send_all(SMALL)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    if os.environ.get("BIG_FETCH_TLS"):
        print(tls_listener(os.environ["BIG_FETCH_TLS"], lambda line: HEAD % SIZE + BIG), flush=True)
        print(tls_listener(os.environ["BIG_FETCH_TLS"], upstream_answer), flush=True)
    await trio.serve_listeners(conn, listeners)
trio.run(main)
'''


# --contend: a neighbour process on core 0, standing for the gateway's other workers there (the
# 50,000-device sizing run: 6 more workers, together ~40% of the core, uninterrupted runs up to ~30 ms).
# Busy bursts of exponential length (mean 2 ms, at most 30), paused so that it uses SHARE of the core.
NEIGHBOUR = r'''
import random, sys, time
share, rng = float(sys.argv[1]), random.Random(int(sys.argv[2]))
while True:
    burst = min(rng.expovariate(500.0), 0.030)
    end = time.perf_counter() + burst
    while time.perf_counter() < end:
        pass
    time.sleep(burst * (1.0 - share) / share)
'''
NEIGHBOURS = 6


def tls_files(prefix: str) -> tuple[trustme.CA, Path]:
    """A trustme CA and a new directory holding what the listener and the devices need:
    cert.pem (the chain for localhost and 127.0.0.1), key.pem, ca.pem."""
    ca = trustme.CA()
    cert_dir = Path(tempfile.mkdtemp(prefix=prefix))
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert_dir / "cert.pem"))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_dir / "cert.pem"), append=True)
    leaf.private_key_pem.write_to_path(str(cert_dir / "key.pem"))
    ca.cert_pem.write_to_path(str(cert_dir / "ca.pem"))
    return ca, cert_dir


def request(cmd: str, n: int, body: bytes = b"") -> bytes:
    return (f"POST {PATH.format(cmd=cmd, n=n)} HTTP/1.1\r\nHost: gw\r\n{HEADERS}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


READER = {"pause": 0.0, "chunk": 1 << 20}     # --reader-pause-ms / --reader-chunk


def read_answer(s, keep: bytearray | None = None) -> int:
    """Read one HTTP answer (Content-Length or chunked) from a blocking socket to its last
    byte; its body length (a chunked one's on the wire). ``keep``: a bytearray the body is
    appended to (de-chunked), else nothing of it is kept. Each body read takes at most
    READER["chunk"] bytes and is followed by a pause of READER["pause"] seconds."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise ConnectionError("closed before the answer head")
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    n, chunked = 0, False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
        elif line.lower() == b"transfer-encoding: chunked":
            chunked = True
    raw = bytearray(rest) if keep is not None else None
    got = len(rest)
    last = bytes(rest[-7:])           # the end of a chunked answer: its last chunk, no trailers
    scratch = memoryview(bytearray(READER["chunk"]))
    pause = READER["pause"]
    while (last != b"\r\n0\r\n\r\n") if chunked else got < n:
        if pause:
            time.sleep(pause)
        k = s.recv_into(scratch)
        if not k:
            raise ConnectionError("closed mid-answer")
        got += k
        last = (last + bytes(scratch[max(0, k - 7):k]))[-7:]
        if raw is not None:
            raw += scratch[:k]
    if status != 200:
        raise ConnectionError(f"answer {status}: {rest[:200]!r}")
    if raw is not None:
        keep += dechunk(raw) if chunked else raw
    return got


def dechunk(raw) -> bytes:
    out, at = [], 0
    while True:
        eol = raw.index(b"\r\n", at)
        size = int(raw[at:eol], 16)
        if not size:
            return b"".join(out)
        out.append(bytes(raw[eol + 2:eol + 2 + size]))
        at = eol + 4 + size


# A line of the worker's slow-step log (proxy/slowsteps.py): epoch, CPU ms, task, where.
SLOW_STEP = re.compile(r"^(\S+) slow step \S+ ms cpu (\S+) ms .*task=(\S+) at (.*)$")


def slow_counts(log: Path, t0: float, t1: float, over_cpu: float = 5.0) -> dict:
    """Steps and batches over ``over_cpu`` ms of CPU between t0 and t1 (epoch s)."""
    step = SLOW_STEP
    batch = re.compile(r"^(\S+) slow batch \S+ ms cpu (\S+) ms steps (\d+)")
    steps: dict[str, list] = {}
    batches = []
    for line in log.read_text(errors="replace").splitlines():
        m = step.match(line)
        if m and t0 <= float(m.group(1)) <= t1 and float(m.group(2)) >= over_cpu:
            key = m.group(3).rsplit(".", 1)[-1] + " @ " + m.group(4).split(" (")[0]
            steps.setdefault(key, []).append(float(m.group(2)))
            continue
        m = batch.match(line)
        if m and t0 <= float(m.group(1)) <= t1 and float(m.group(2)) >= over_cpu:
            batches.append(float(m.group(2)))
    return {"steps_over": sum(len(v) for v in steps.values()),
            "step_max_cpu_ms": max((max(v) for v in steps.values()), default=0.0),
            "steps_by_place": {k: [len(v), round(max(v), 1)] for k, v in sorted(steps.items(), key=lambda kv: -len(kv[1]))[:6]},
            "batches_over": len(batches), "batch_max_cpu_ms": max(batches, default=0.0)}


def start_serve(tree: Path, tmp: Path, mail_url: str, cert_dir: Path, slow_steps: bool, security: str = "off",
                managed: tuple[str, ...] = ()):
    """One TLS worker of ``tree`` pinned to core 0, its state in ``tmp``, the sizing run's general
    policies loaded (security off; ``security`` "on": the profile's policies, the devices
    ``managed`` enrolled as user u1's managed devices): (port, process, its stderr file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "gateway.toml"
    cfg.write_text(f'workers = 1\nstate_dir = "{tmp}"\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'tls_cert = "{cert_dir}/cert.pem"\ntls_key = "{cert_dir}/key.pem"\n'
                   f'[upstream]\nurl = "{mail_url}"\nca_file = "{cert_dir}/ca.pem"\n[admin]\nenabled = false\n'
                   f'[log]\nlevel = "warn"\n[limits]\nmax_connections_per_address = 0\n'
                   f'[policy]\nsqlite_path = "{tmp}/policy.db"\n'
                   f'[security]\nmaster_key_file = "{tmp}/master.key"\nkey_state_file = "{tmp}/keys.json"\n')
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), SEG_FAST_STATE_DIR=str(tmp / "state"))
    if slow_steps:
        env["SEG_FAST_SLOW_STEP_MS"] = "5"     # the instrument costs CPU per step: not in timed runs
    if security == "on":
        from seg_fast.sim.sizing import policy_file
        doc = policy_file("on", 0)
        doc["devices"] = [{"device_id": d, "user": "u1", "managed": True, "compliant": True, "compromised": False,
                           "encrypted": True, "platform": "Apple", "model": "iPhone 15", "os": "17.4",
                           "last_checkin": time.time(), "eas_profile": True} for d in managed]
    else:                             # the sizing run's general policies without its managed-device ones
        doc = {"policies": {"general": POLICY_GENERAL}, "devices": []}
    (tmp / "policies.json").write_text(json.dumps(doc))
    subprocess.run([sys.executable, "-m", "seg_fast", "policy", "load", str(tmp / "policies.json"), "--config",
                    str(cfg)], env=env, cwd=tmp, check=True, capture_output=True)
    err = tmp / "serve.err"
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=err.open("wb"),
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    return port, proc, err


FETCH_DEV = 1000000                   # the fetching devices: DEV1000000, DEV1000001, ...


def check_fetch(tls, args, tmp: Path, expect: dict) -> None:
    """One fetch kept whole and checked: the answer as the mail server sent it (pass-through),
    or (security on) its Data an envelope that opens with the gateway's keys to the PDF."""
    body = bytearray()
    s = tls()
    s.sendall(request("ItemOperations", FETCH_DEV, FETCH_BODY))
    read_answer(s, body)
    s.close()
    if args.security != "on":
        if hashlib.sha256(body).digest() != expect["answer_sha256"]:
            raise SystemExit("a pass-through answer was not the mail server's bytes")
        return
    from seg_fast.eas.wbxml import scan
    from seg_fast.sim.oracle import Opener
    (sp,) = scan(bytes(body), ["ItemOperations:Data"])
    blob = base64.b64decode(bytes(body[sp.offset:sp.offset + sp.length]), validate=True)
    plain = Opener(str(tmp / "master.key"), str(tmp / "keys.json"))(f"DEV{FETCH_DEV}", "u1", blob)
    if hashlib.sha256(plain).digest() != expect["pdf_sha256"]:
        raise SystemExit("a sealed answer did not open to the PDF")


def one_run(tree: Path, args, mail_port: int, mail_url: str, ca, cert_dir: Path, tls_port: int | None = None,
            expect: dict | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="seg-bigfetch-"))
    port, proc, err = start_serve(tree, tmp, mail_url, cert_dir, args.slow_steps, args.security,
                                  tuple(f"DEV{FETCH_DEV + i}" for i in range(args.fetches)))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    held = []
    spawned: list[subprocess.Popen] = []          # the probe and load children, ended however the run ends
    try:
        wait_accepting(port, proc, f"serve of {tree}", err)

        def tls(to=port):
            raw = socket.create_connection(("127.0.0.1", to), 30)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return ctx.wrap_socket(raw, server_hostname="localhost")

        if expect is not None:
            check_fetch(tls, args, tmp, expect)     # (and warm: the key, the first big buffers)

        for i in range(args.parked):            # parked Pings, left unread
            s = tls()
            s.sendall(request("Ping", i, PING_BODY))
            held.append(s)
        time.sleep(2.0)                         # they park; the ramp's refreeze and collections settle
        probe_out = tmp / "probe.txt"
        probe_out.write_text("")
        probe = subprocess.Popen([sys.executable, __file__, "--probe-child", str(port), str(cert_dir / "ca.pem"),
                                  str(probe_out)], preexec_fn=lambda: os.sched_setaffinity(0, {1})) \
            if args.probe else None
        deadline = time.monotonic() + 30
        while probe is not None and not probe_out.read_text():   # its imports take ~1-2 s here
            if time.monotonic() > deadline or probe.poll() is not None:
                raise SystemExit("the probe device did not start")
            time.sleep(0.05)
        # --load: more devices like the probe (a small Sync every --load-gap-ms), unmeasured
        loaders = [subprocess.Popen([sys.executable, __file__, "--probe-child", str(port), str(cert_dir / "ca.pem"),
                                     os.devnull, str(args.load_gap_ms)], preexec_fn=lambda: os.sched_setaffinity(0, {1}))
                   for _ in range(args.load)]
        spawned += loaders + ([probe] if probe is not None else [])
        spawned += [subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(args.contend / NEIGHBOURS), str(i)],
                                     preexec_fn=lambda: os.sched_setaffinity(0, {0}))
                    for i in range(NEIGHBOURS if args.contend > 0 else 0)]
        time.sleep(1.0 + (2.0 if loaders else 0.0))     # (their imports take ~1-2 s)
        ttlb, direct, direct_tls = [], [], []
        lag_seconds: dict[int, float] = {}

        def lag_snapshot() -> dict:
            for f in (tmp / "state" / "stats").glob("worker-*.json"):
                lag = json.loads(f.read_text()).get("loop_lag") or {}
                for sec, ms in lag.get("max_per_second", []):
                    lag_seconds[sec] = max(ms, lag_seconds.get(sec, 0.0))
                return lag
            return {}

        hist0 = lag_snapshot().get("histogram_ms", {})
        counter = count_syscalls(proc.pid) if args.syscalls else None
        t_wall0, c0, st0, w0 = time.time(), tree_cpu(proc.pid), tree_stat(proc.pid), wakeups(proc.pid)
        p0 = time.perf_counter()
        for i in range(args.fetches):
            if tls_port is not None and i % 2:      # the direct TLS fetch first every other time
                direct_tls.append(timed_fetch(lambda: tls(tls_port), FETCH_DEV + i))
            ttlb.append(timed_fetch(tls, FETCH_DEV + i))
            if tls_port is not None and not i % 2:
                direct_tls.append(timed_fetch(lambda: tls(tls_port), FETCH_DEV + i))
            t = time.perf_counter()
            d = socket.create_connection(("127.0.0.1", mail_port), 30)
            d.sendall(request("ItemOperations", FETCH_DEV + i, FETCH_BODY))
            read_answer(d)
            direct.append((time.perf_counter() - t) * 1000.0)
            d.close()
            time.sleep(0.2)
            lag_snapshot()
        p1 = time.perf_counter()
        cpu = tree_cpu(proc.pid) - c0
        st = [b - a for a, b in zip(st0, tree_stat(proc.pid))]
        woken = wakeups(proc.pid) - w0
        calls = counted(counter, args.fetches) if counter is not None else {}
        t_wall1 = time.time()
        time.sleep(1.1)
        hist1 = lag_snapshot().get("histogram_ms", {})
        lag_in = [ms for sec, ms in lag_seconds.items() if t_wall0 <= sec <= t_wall1]
        over = {k: hist1.get(k, 0) - hist0.get(k, 0) for k in hist1}
        for child in ([probe] if probe is not None else []) + loaders:
            child.terminate()
            child.wait(10)
        probe_lat = [tuple(map(float, line.split())) for line in probe_out.read_text().splitlines() if line]
        during = sorted(ms for t, ms in probe_lat if p0 <= t <= p1)
        k = max(0, int(len(during) * 0.99) - 1)
        time.sleep(0.5)
        added = sorted(g - d for g, d in zip(ttlb, direct_tls))
        paired = {"direct_tls_ms_median": round(statistics.median(direct_tls), 1),
                  "added_ms_median": round(statistics.median(added), 1),
                  "added_ms_p90": round(added[max(0, int(len(added) * 0.9 + 0.5) - 1)], 1),
                  "added_ms_max": round(added[-1], 1),
                  "ttlb_ms": [round(x, 1) for x in ttlb], "direct_tls_ms": [round(x, 1) for x in direct_tls]} \
            if added else {}
        return {"ttlb_ms_median": round(statistics.median(ttlb), 1), "ttlb_ms_max": round(max(ttlb), 1),
                "direct_plain_ms_median": round(statistics.median(direct), 1), **paired,
                "probe_n": len(during), "probe_p99_ms": round(during[k], 2) if during else None,
                "probe_max_ms": round(during[-1], 2) if during else None,
                "loop_lag_max_ms": round(max(lag_in, default=0.0), 1),
                "loop_lag_samples_over_20ms": sum(v for k, v in over.items() if k in ("le_50", "le_100", "le_200",
                                                                                       "le_500", "le_1000", "inf")),
                "serve_cpu_ms_per_fetch": round(cpu / args.fetches * 1000.0, 1),
                "serve_sys_ms_per_fetch": round(st[1] / args.fetches * 1000.0, 1),
                "serve_faults_per_fetch": round(st[2] / args.fetches),
                "serve_wakeups_per_fetch": round(woken / args.fetches, 1), **calls,
                **slow_counts(err, t_wall0, t_wall1)}
    finally:
        for child in spawned:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        for s in held:
            s.close()
        stop_process(proc, 30)
        if not args.slow_steps:
            shutil.rmtree(tmp, ignore_errors=True)    # (with --slow-steps the worker's log stays)


def wakeups(pid: int) -> int:
    """Voluntary context switches of ``pid``'s and its children's threads: each is a sleep
    the thread was woken from (a worker's loop: one per wait on its sockets or timers)."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if int(name) != pid and int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            for task in os.listdir(f"/proc/{name}/task"):
                for line in Path(f"/proc/{name}/task/{task}/status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


SYSCALLS = ("read", "write", "writev", "epoll_wait")


def count_syscalls(pid: int) -> subprocess.Popen:
    """``perf stat`` counting SYSCALLS (kernel tracepoints: a count, whatever the machine's
    speed) in ``pid``'s children (the serve's workers), until counted() stops it."""
    kids = [name for name in os.listdir("/proc") if name.isdigit() and _parent(name) == pid]
    events = ",".join(f"syscalls:sys_enter_{c}" for c in SYSCALLS)
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", events, "-p", ",".join(kids)],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)                   # (its start-up; the fetches have not begun)
    return perf


def counted(perf: subprocess.Popen, fetches: int) -> dict:
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate(timeout=30)
    out = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_") and fields[0].isdigit():
            out[f"serve_{fields[2].removeprefix('syscalls:sys_enter_')}_per_fetch"] = round(int(fields[0]) / fetches, 1)
    if not out:
        raise SystemExit(f"perf stat counted nothing: {err.strip()[-300:]}")
    return out


def _parent(name: str) -> int:
    try:
        return int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def timed_fetch(connect, device: int) -> float:
    """ms from the request's write to the answer's last byte, on a new connection (TLS set up first)."""
    s = connect()
    try:
        t = time.perf_counter()
        s.sendall(request("ItemOperations", device, FETCH_BODY))
        read_answer(s)
        return (time.perf_counter() - t) * 1000.0
    finally:
        s.close()


def probe_child(port: int, ca_path: str, out: str, gap_ms: float = 10.0) -> None:
    """A small Sync every ``gap_ms`` on one keep-alive TLS connection: (perf_counter at send, ms) lines."""
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.check_hostname = False
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 30), server_hostname="localhost")
    msg = request("Sync", 999999, SYNC_BODY)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    with open(out, "w", buffering=1) as f:
        while True:
            t = time.perf_counter()
            s.sendall(msg)
            read_answer(s)
            f.write(f"{t:.6f} {(time.perf_counter() - t) * 1000.0:.3f}\n")
            time.sleep(gap_ms / 1000.0)


def on_load_core() -> None:
    """This process (and what it starts) on core 1, the gateway's worker alone on core 0,
    with every descriptor the hard limit allows."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {1})


def alternated(base: Path | None, rounds: int, one) -> dict[str, list]:
    """``one(tree)`` for the base tree (if any) and this one, alternated round by round (an
    A/B on one machine state); each run's figures printed as they come."""
    trees = {"this": HERE}
    if base:
        trees = {"base": base.resolve(), **trees}
    runs: dict[str, list] = {k: [] for k in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            r = one(tree)
            runs[name].append(r)
            print(name, json.dumps(r), flush=True)
    return runs


def write_keyed(path: Path, key: str, out) -> None:
    """``out`` under ``key`` in the JSON file ``path``, its other keys kept."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = out
    path.write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--probe-child":
        probe_child(int(argv[1]), argv[2], argv[3], *map(float, argv[4:5]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--parked", type=int, default=3000)
    ap.add_argument("--fetches", type=int, default=12)
    ap.add_argument("--size", type=int, default=10 * 1024 * 1024)
    ap.add_argument("--base", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--key", default="big_fetch")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="no probe device (the worker's CPU is then the fetches' and the parked Pings' alone)")
    ap.add_argument("--load", type=int, default=0, help="devices sending small Syncs beside the fetches (unmeasured)")
    ap.add_argument("--load-gap-ms", type=float, default=2.0, help="each --load device's pause between Syncs")
    ap.add_argument("--contend", type=float, default=0.0,
                    help=f"share of core 0 that {NEIGHBOURS} neighbour processes use beside the gateway (0.4: "
                         "the 50,000-device run's other workers)")
    ap.add_argument("--reader-pause-ms", type=float, default=0.0,
                    help="the fetching device pauses this long after each read (a busy device)")
    ap.add_argument("--reader-chunk", type=int, default=1 << 20, help="... of at most this many bytes")
    ap.add_argument("--slow-steps", action="store_true", help="log the worker's steps over 5 ms (costs CPU)")
    ap.add_argument("--body", choices=("x", "pdf"), default="x",
                    help="the answer: --size bytes of x, or a device's fetch of a PDF of --size bytes")
    ap.add_argument("--security", choices=("off", "on"), default="off",
                    help="on: the profile's policies, the fetching devices managed: the PDF sealed (implies --body pdf)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count the workers' read/write/writev/epoll_wait calls per fetch (perf stat; Linux's perf)")
    ap.add_argument("--upstream-tls", action="store_true",
                    help="the gateway reaches the mail server at https:// (TLS 1.3, its certificate verified)")
    args = ap.parse_args(argv)
    READER.update(pause=args.reader_pause_ms / 1000.0, chunk=args.reader_chunk)
    if args.security == "on":
        args.body = "pdf"
    on_load_core()
    ca, cert_dir = tls_files("seg-bigfetch-certs-")
    env = dict(os.environ, BIG_FETCH_TLS=str(cert_dir))
    expect = {}
    if args.body == "pdf":
        from stream_seal_latency import fetch_answer
        from seg_fast.sim.corpus import _make_pdf
        import random
        pdf = _make_pdf(random.Random(args.size), args.size)
        answer = fetch_answer(pdf)
        (cert_dir / "answer.bin").write_bytes(answer)
        env["BIG_FETCH_BODY"] = str(cert_dir / "answer.bin")
        expect = {"pdf_sha256": hashlib.sha256(pdf).digest(), "answer_sha256": hashlib.sha256(answer).digest()}
    else:
        expect = {"answer_sha256": hashlib.sha256(b"x" * args.size).digest()}
    mail = subprocess.Popen([sys.executable, "-c", MAIL, str(args.size)], stdout=subprocess.PIPE, env=env,
                            preexec_fn=lambda: os.sched_setaffinity(0, {1}))
    mail_port = int(mail.stdout.readline())
    tls_port = int(mail.stdout.readline())
    https_port = int(mail.stdout.readline())     # the mail server's own TLS listener
    mail_url = f"https://127.0.0.1:{https_port}" if args.upstream_tls else f"http://127.0.0.1:{mail_port}"
    try:
        runs = alternated(args.base, args.rounds,
                          lambda tree: one_run(tree, args, mail_port, mail_url, ca, cert_dir, tls_port, expect))
    finally:
        mail.kill()
        shutil.rmtree(cert_dir, ignore_errors=True)
    summary = {}
    for name, rs in runs.items():
        # (None: a figure no run had, the probe's with --no-probe)
        summary[name] = {f: round(statistics.median(v), 2) if None not in (v := [r.get(f) for r in rs]) else None
                         for f in ("loop_lag_max_ms", "loop_lag_samples_over_20ms", "ttlb_ms_median", "ttlb_ms_max",
                                   "direct_plain_ms_median", "direct_tls_ms_median", "added_ms_median", "added_ms_p90",
                                   "added_ms_max", "probe_p99_ms",
                                   "probe_max_ms", "serve_cpu_ms_per_fetch", "serve_sys_ms_per_fetch",
                                   "serve_faults_per_fetch", *(f"serve_{c}_per_fetch" for c in SYSCALLS if args.syscalls),
                                   "steps_over", "step_max_cpu_ms",
                                   "batches_over", "batch_max_cpu_ms")}
    out = {"parked": args.parked, "fetches": args.fetches, "size": args.size, "body": args.body,
           "upstream": "https" if args.upstream_tls else "http",
           "security": args.security, "contend": args.contend, "load": args.load,
           "reader_pause_ms": args.reader_pause_ms, "reader_chunk": args.reader_chunk, "medians": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.json:
        write_keyed(args.json, args.key, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
