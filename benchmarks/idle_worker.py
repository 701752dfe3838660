"""What a gateway worker costs while it waits: CPU and wake-ups per second, beside a base tree.

    git worktree add --detach /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/idle_worker.py --base /tmp/base [--workers 3] [--seconds 20] [--rounds 3]

A worker's housekeeping (loop-lag sample, policy clock and flush, log flush, stats file, the
policy store's poll, GC duties) costs it CPU whether or not devices talk, and several workers
share a core at scale (six at 50,000 devices, twelve at 100,000). Each round starts
``--workers`` idle ``seg-fast serve --worker`` processes of each tree in turn (the same config:
plain listener, no devices, the SQLite policy store, transaction log on), lets them settle,
then reads each process's utime+stime and its context switches (/proc) over ``--seconds``.
Rounds alternate the order of the trees. Medians per worker; writes results/idle_worker.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from big_answer_cpu import wait_accepting  # noqa: E402
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(pid: int) -> tuple[float, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    switches = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            switches += int(line.split()[1])
    return (int(fields[11]) + int(fields[12])) / TICK, switches


def one_round(tree: Path, workers: int, seconds: float, settle: float) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="idle-worker-"))
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), SEG_FAST_STATE_DIR=str(work))
    procs, ports = [], []
    for k in range(workers):
        port = _free_port()
        ports.append(port)
        cfg = work / f"g{k}.toml"
        cfg.write_text(f'state_dir = "{work}"\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                       '[upstream]\nurl = "http://127.0.0.1:9"\n[admin]\nenabled = false\n'
                       f'[log]\ntransactions = "{work}/g{k}.log"\nlevel = "warn"\n'
                       f'[policy]\nsqlite_path = "{work}/policy.db"\n'
                       f'[security]\nmaster_key_file = "{work}/master.key"\nkey_state_file = "{work}/keys.json"\n')
        procs.append(subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--worker", "--config", str(cfg)],
                                      env=env, cwd=work, stdout=subprocess.DEVNULL,
                                      stderr=open(work / f"g{k}.err", "wb")))
    try:
        for k, (port, proc) in enumerate(zip(ports, procs)):
            wait_accepting(port, proc, f"a worker of {tree}", work / f"g{k}.err")
        time.sleep(settle)
        before = [_sample(p.pid) for p in procs]
        t0 = time.monotonic()
        time.sleep(seconds)
        after = [_sample(p.pid) for p in procs]
        dt = time.monotonic() - t0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return [{"cpu_pct": round(100 * (c1 - c0) / dt, 3), "wakeups_per_s": round((s1 - s0) / dt, 1)}
            for (c0, s0), (c1, s1) in zip(before, after)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a checkout of the tree to compare with (extensions built)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "idle_worker.json"))
    args = ap.parse_args()
    trees = {"base": Path(args.base).resolve(), "this": HERE.parent}
    got: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(reversed(trees))):
            rows = one_round(trees[name], args.workers, args.seconds, args.settle)
            got[name] += rows
            print(f"round {r + 1} {name:>4}: " + ", ".join(f"{x['cpu_pct']:.2f}% {x['wakeups_per_s']:.1f}/s" for x in rows),
                  flush=True)
    summary = {}
    for name, rows in got.items():
        summary[name] = {"cpu_pct_per_worker": statistics.median(x["cpu_pct"] for x in rows),
                         "wakeups_per_s_per_worker": statistics.median(x["wakeups_per_s"] for x in rows),
                         "workers": rows}
    for name in trees:
        commit = subprocess.run(["git", "-C", str(trees[name]), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        summary[name]["commit"] = commit
        print(f"{name} ({commit}): {summary[name]['cpu_pct_per_worker']:.2f}% of a core and "
              f"{summary[name]['wakeups_per_s_per_worker']:.1f} wake-ups a second per idle worker (medians)")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average": os.getloadavg(),
           "options": vars(args), "trees": summary}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
