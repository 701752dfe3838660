"""What a gateway worker costs while it waits: CPU, wake-ups and memory, beside a base tree.

    git worktree add --detach /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/idle_worker.py --base /tmp/base [--workers 3] [--seconds 20] [--rounds 3]
    python benchmarks/idle_worker.py --base /tmp/base --devices 100000 --seconds 5   # + a fleet's MDM records

A worker's housekeeping (loop-lag sample, policy clock and flush, log flush, stats file, the
policy store's poll, GC duties) costs it CPU whether or not devices talk, and several workers
share a core at scale (six at 50,000 devices, twelve at 100,000). Each round starts
``--workers`` idle ``seg-fast serve --worker`` processes of each tree in turn (the same config:
plain listener, no devices, the SQLite policy store, transaction log on), lets them settle,
then reads each process's utime+stime and its context switches (/proc) over ``--seconds``,
and at the end its memory: resident anonymous and file pages, and its proportional share (PSS:
a page the workers share counts once among them). ``--devices N`` first loads the policy
store the sizing run loads for N devices (half of them enrolled: N/2 MDM records, which every
worker needs). Rounds alternate the order of the trees. Medians per worker; writes
results/idle_worker.json.
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


def _memory(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    pss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
               if line.startswith("Pss:"))
    return {"rss_anon_kib": int(status["RssAnon"].split()[0]), "rss_file_kib": int(status["RssFile"].split()[0]),
            "pss_kib": pss}


def _policy_store(work: Path, cfg: Path, env: dict, devices: int) -> None:
    """The sizing run's policy store for ``devices``, loaded by `seg-fast policy load` of the tree ``env`` names."""
    code = ("import sys, msgspec; from seg_fast.sim.sizing import policy_file; "
            f"sys.stdout.buffer.write(msgspec.json.encode(policy_file('off', {devices})))")
    doc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    (work / "policies.json").write_bytes(doc)
    subprocess.run([sys.executable, "-m", "seg_fast", "policy", "load", str(work / "policies.json"),
                    "--config", str(cfg)], env=env, cwd=work, capture_output=True, check=True)


def _sample(pid: int) -> tuple[float, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    switches = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            switches += int(line.split()[1])
    return (int(fields[11]) + int(fields[12])) / TICK, switches


def one_round(tree: Path, workers: int, seconds: float, settle: float, devices: int = 0) -> list[dict]:
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
        if k == 0 and devices:
            _policy_store(work, cfg, env, devices)
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
        memory = [_memory(p.pid) for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return [{"cpu_pct": round(100 * (c1 - c0) / dt, 3), "wakeups_per_s": round((s1 - s0) / dt, 1), **mem}
            for (c0, s0), (c1, s1), mem in zip(before, after, memory)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a checkout of the tree to compare with (extensions built)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=0, help="load the sizing run's policy store for N devices")
    ap.add_argument("--out", default=str(HERE / "results" / "idle_worker.json"))
    args = ap.parse_args()
    trees = {"base": Path(args.base).resolve(), "this": HERE.parent}
    got: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(reversed(trees))):
            rows = one_round(trees[name], args.workers, args.seconds, args.settle, args.devices)
            got[name] += rows
            print(f"round {r + 1} {name:>4}: " + ", ".join(
                f"{x['cpu_pct']:.2f}% {x['wakeups_per_s']:.1f}/s {x['pss_kib'] / 1024:.1f} MiB PSS "
                f"({(x['rss_anon_kib'] + x['rss_file_kib']) / 1024:.1f} RSS)" for x in rows), flush=True)
    summary = {}
    for name, rows in got.items():
        summary[name] = {"cpu_pct_per_worker": statistics.median(x["cpu_pct"] for x in rows),
                         "wakeups_per_s_per_worker": statistics.median(x["wakeups_per_s"] for x in rows),
                         **{f"{k}_per_worker": statistics.median(x[k] for x in rows)
                            for k in ("rss_anon_kib", "rss_file_kib", "pss_kib")},
                         "workers": rows}
    for name in trees:
        commit = subprocess.run(["git", "-C", str(trees[name]), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        summary[name]["commit"] = commit
        print(f"{name} ({commit}): {summary[name]['cpu_pct_per_worker']:.2f}% of a core and "
              f"{summary[name]['wakeups_per_s_per_worker']:.1f} wake-ups a second per idle worker; "
              f"{summary[name]['pss_kib_per_worker'] / 1024:.1f} MiB PSS, "
              f"{summary[name]['rss_anon_kib_per_worker'] / 1024:.1f} anonymous + "
              f"{summary[name]['rss_file_kib_per_worker'] / 1024:.1f} file RSS (medians)")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average": os.getloadavg(),
           "options": vars(args), "trees": summary}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
