"""N parked TLS devices leaving together: the gateway's longest task step (CPU) at the leave.

    python benchmarks/park_leave.py [--devices 3000] [--then 32] [--base TREE] [--rounds 3]
        [--json PATH] [--key KEY]

`seg-fast serve --workers 1` (TLS on the device leg, security off, pinned to CPU 0) in front of
big_fetch_tail's stand-in mail server, which holds every Ping unanswered (CPU 1). A child
process (CPU 1) opens ``--devices`` TLS connections, each sends a Ping (HeartbeatInterval 600)
that the gateway parks, and once the worker reports them all parked the child exits: the
kernel closes every device socket at once (the fleet's devices leaving at a hold's end).
Then ``--then`` more devices park and leave together, so the parking task wakes once more
after the wave (what a live worker always does). The worker runs with
SEG_FAST_SLOW_STEP_MS=5; from its log, the steps over 5 ms of CPU from the leave on: the
longest step's CPU (any task, and the parking task's own), and where they parked. Also
checked per run: the worker's parked count and open upstream connections back to 0 and
the mail server's connections all closed. ``--base TREE``: another checkout (built), run
alternately with this one; medians of ``--rounds``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE / "benchmarks"), str(HERE / "tests")]
from big_answer_cpu import wait_accepting  # noqa: E402
from big_fetch_tail import MAIL, SLOW_STEP, alternated, on_load_core, start_serve, tls_files, write_keyed  # noqa: E402
from processes import stop_process  # noqa: E402

# The stand-in mail server, counting the connections it holds open (an upstream the gateway
# never closed stays counted): written to the file in argv[2] every 0.2 s. A held Ping's
# connection is read to its EOF, so the gateway's close is seen.
MAIL_COUNTING = MAIL.replace("await trio.sleep_forever()", "while await stream.receive_some(65536): pass\n                return").replace("trio.run(main)", r'''
import os
OPEN = 0
_conn = conn
async def conn(stream):
    global OPEN
    OPEN += 1
    try:
        await _conn(stream)
    finally:
        OPEN -= 1
async def report():
    while True:
        with open(sys.argv[2] + ".tmp", "w") as f:
            f.write(str(OPEN))
        os.replace(sys.argv[2] + ".tmp", sys.argv[2])
        await trio.sleep(0.2)
async def main2():
    async with trio.open_nursery() as n:
        n.start_soon(report)
        await main()
trio.run(main2)
''')

# The devices: N TLS connections, a Ping each; "parked" on stdout once all are sent; exit
# (every socket closed by the kernel at once) when stdin gets a line.
DEVICES = r'''
import socket, ssl, sys
sys.path.insert(0, sys.argv[4])
from big_fetch_tail import PING_BODY, request
port, n, ca, first = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
held = []
for i in range(first, first + n):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 30), server_hostname="localhost")
    s.sendall(request("Ping", i, PING_BODY))
    held.append(s)
print("parked", flush=True)
sys.stdin.readline()
import os
os._exit(0)
'''

def steps_after(log: Path, t0: float) -> list[tuple[float, str, str]]:
    """(cpu ms, task, where) of the logged steps from epoch ``t0`` on."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = SLOW_STEP.match(line)
        if m and float(m.group(1)) >= t0:
            out.append((float(m.group(2)), m.group(3).rsplit(".", 1)[-1], m.group(4).split(" (")[0]))
    return out


def snapshot(state: Path) -> dict:
    for f in (state / "stats").glob("worker-*.json"):
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            pass                      # being replaced
    return {}


def gauge(state: Path, name: str) -> int | None:
    """A gauge of the worker's latest snapshot (left out of the file when 0); None before the first."""
    snap = snapshot(state)
    return snap.get(name, 0) if snap else None


def wait_for(what, bound: float, why: str):
    end = time.monotonic() + bound
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise SystemExit(f"timed out: {why}")


def wave(port: int, n: int, first: int, cert_dir: Path, state: Path) -> subprocess.Popen:
    """A child holding ``n`` parked TLS devices, once the worker counts them parked."""
    child = subprocess.Popen([sys.executable, "-c", DEVICES, str(port), str(n), str(cert_dir / "ca.pem"),
                              str(HERE / "benchmarks"), str(first)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, preexec_fn=lambda: os.sched_setaffinity(0, {1}))
    if child.stdout.readline().strip() != b"parked":
        raise SystemExit("the devices did not start")
    wait_for(lambda: (gauge(state, "parked_pings") or 0) >= n, 120, f"{n} Pings parked")
    return child


def leave(child: subprocess.Popen) -> None:
    child.stdin.write(b"go\n")
    child.stdin.flush()
    child.wait(30)


def one_run(tree: Path, args, mail_port: int, mail_open: Path, cert_dir: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="seg-parkleave-"))
    state = tmp / "state"
    port, proc, err = start_serve(tree, tmp, f"http://127.0.0.1:{mail_port}", cert_dir, slow_steps=True)
    children = []
    try:
        wait_accepting(port, proc, f"serve of {tree}", err)
        wait_for(lambda: snapshot(state), 60, "the worker's first stats")
        big = wave(port, args.devices, 0, cert_dir, state)
        children.append(big)
        time.sleep(2.0)               # the ramp's collections and refreeze settle
        t_leave = time.time()
        leave(big)
        wait_for(lambda: gauge(state, "parked_pings") == 0, 60, "the parked Pings released")
        time.sleep(1.0)
        then = wave(port, args.then, args.devices, cert_dir, state)
        children.append(then)
        leave(then)
        wait_for(lambda: gauge(state, "parked_pings") == 0 and gauge(state, "upstream_open") == 0, 60,
                 "every upstream connection released")
        wait_for(lambda: mail_open.read_text() == "0", 30, "the mail server's connections closed")
        time.sleep(1.0)
        steps = steps_after(err, t_leave)
        park = [c for c, task, _ in steps if task == "run" or "PingPark" in task]
        places: dict[str, list] = {}
        for cpu, task, where in steps:
            places.setdefault(f"{task} @ {where}", []).append(cpu)
        return {"devices": args.devices, "then": args.then,
                "step_max_cpu_ms": max((c for c, _, _ in steps), default=0.0),
                "park_step_max_cpu_ms": max(park, default=0.0),
                "steps_over_5ms_cpu": sum(1 for c, _, _ in steps if c >= 5.0),
                "by_place": {k: [len(v), max(v)] for k, v in sorted(places.items(), key=lambda kv: -max(kv[1]))[:5]},
                "upstream_open_after": gauge(state, "upstream_open"), "mail_open_after": int(mail_open.read_text())}
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
        stop_process(proc, 30)
        if args.keep:
            print("kept", tmp, flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=3000)
    ap.add_argument("--then", type=int, default=32, help="devices parking and leaving after the wave")
    ap.add_argument("--base", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--key", default="park_leave")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (the worker's log)")
    args = ap.parse_args(argv)
    on_load_core()
    _ca, cert_dir = tls_files("seg-parkleave-certs-")
    mail_open = cert_dir / "mail-open"
    mail = subprocess.Popen([sys.executable, "-c", MAIL_COUNTING, "13", str(mail_open)], stdout=subprocess.PIPE,
                            preexec_fn=lambda: os.sched_setaffinity(0, {1}))
    mail_port = int(mail.stdout.readline())
    try:
        runs = alternated(args.base, args.rounds, lambda tree: one_run(tree, args, mail_port, mail_open, cert_dir))
    finally:
        mail.kill()
        mail.wait()
        shutil.rmtree(cert_dir, ignore_errors=True)
    summary = {name: {f: statistics.median(r[f] for r in rs)
                      for f in ("step_max_cpu_ms", "park_step_max_cpu_ms", "steps_over_5ms_cpu")}
               for name, rs in runs.items()}
    out = {"devices": args.devices, "then": args.then, "rounds": args.rounds, "medians": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.json:
        write_keyed(args.json, args.key, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
