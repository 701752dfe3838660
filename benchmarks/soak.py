"""A sizing soak that says *why* requests failed (issue 10, "Find the 503s").

Runs `seg-fast bench sizing ... --keep` (one point, one run), samples every 10 s what
the kernel and /proc say about the run's processes, and then sorts every failed
transaction of the gateway's logs by mechanism:

- descriptors: each gateway worker's and each shard's (fleet + mailbox simulator) open
  descriptors against its RLIMIT_NOFILE;
- listen queues: Recv-Q (waiting to be accepted) of the simulators' (127.11.*) and
  the gateway workers' (127.12.*) listeners, and the kernel's ListenOverflows/Drops;
- CPU: each process's run and run-queue wait (schedstat): a process that waits more
  than it runs is starved by others, and every deadline in it is then partly our lag;
- the 503 records: error text with numbers taken out, split by command and by the
  upstream connection they failed on (new, or kept-alive and how idle).

    python benchmarks/soak.py --devices 25000 --hold 600 -- --no-tls --nice -5
    python benchmarks/soak.py --summarise /tmp/seg-sizing-25000-xxxx --monitor mon.jsonl \
        --sizing-raw results/raw/soak-sizing/sizing-off-STAMP.raw.json

Writes results/soak-N{devices}-STAMP.json (the summary, with what the devices saw from
sizing's raw JSON under `fleet`); the samples, sizing's own files and its output go to
results/raw/ (gitignored). Failures here are facts about the run; whether the run measured
the gateway at all is the sizing verdict's `invalid` list (load side behind, etc.).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NSTAT_KEYS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPReqQFullDrop", "TcpExtTCPBacklogDrop",
              "TcpAttemptFails", "TcpEstabResets", "TcpExtTCPAbortOnTimeout")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            kids.setdefault(int(raw[raw.rindex(b")") + 2:].split()[1]), []).append(int(name))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def _role(cmdline: str) -> str | None:
    if "seg_fast.sim.fleet" in cmdline:
        m = re.search(r'"shard":(\d+)', cmdline)
        return f"shard{m.group(1) if m else '?'}"
    if "serve --worker" in cmdline:
        m = re.search(r"gateway(\d+)\.toml", cmdline)
        return f"gateway{m.group(1) if m else '?'}"
    if "nginx" in cmdline:
        return "nginx"
    return None


def _nofile(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def nstat() -> dict[str, int]:
    out = subprocess.run(["nstat", "-asz", *NSTAT_KEYS], check=False, capture_output=True, text=True).stdout
    return {f[0]: int(f[1]) for f in (line.split() for line in out.splitlines()) if f and not f[0].startswith("#")}


def sample(root: int) -> dict:
    """One look at the run: per role descriptors and schedstat, listen queues, kernel counters."""
    procs = {}
    for pid in _tree(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            role = _role(cmd)
            if role is None:
                continue
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            run_ns, wait_ns = (int(x) for x in Path(f"/proc/{pid}/schedstat").read_text().split()[:2])
        except OSError:
            continue
        procs[role] = {"pid": pid, "fds": fds, "nofile": _nofile(pid), "run_ns": run_ns, "wait_ns": wait_ns}
    queues = {}
    ss = subprocess.run(["ss", "-ltnH"], check=False, capture_output=True, text=True).stdout
    for line in ss.splitlines():
        f = line.split()
        if len(f) >= 4 and (f[3].startswith("127.11.") or f[3].startswith("127.12.")):
            queues[f[3]] = [int(f[1]), int(f[2])]           # Recv-Q (waiting for accept), backlog
    return {"t": round(time.time(), 1), "procs": procs, "listen": queues, "nstat": nstat()}


def monitor(root: int, path: Path, every: float = 10.0) -> None:
    with path.open("a") as out:
        while os.path.exists(f"/proc/{root}") and Path(f"/proc/{root}/stat").read_text().split()[2] != "Z":
            out.write(json.dumps(sample(root)) + "\n")
            out.flush()
            time.sleep(every)


_NUM = re.compile(r"\d+(\.\d+)?")


def mechanism(error: str) -> str:
    """The failure's mechanism from the gateway's error text (upstream connection facts included)."""
    if "connecting to" in error and "timed out" in error:
        return "upstream connect timed out"
    if "cannot connect" in error:
        return "upstream connect refused/failed: " + error.split(":")[-1].strip()
    if "did not answer the Ping" in error:
        return "parked Ping unanswered until heartbeat + margin"
    if "did not answer within" in error:
        if "(new connection" in error:
            return "no answer head within upstream_read, new connection"
        if "kept-alive" in error:
            return "no answer head within upstream_read, kept-alive connection"
        return "no answer head within upstream_read"
    if "closed the connection before answering" in error:
        return "mail server closed before answering"
    if "broke" in error:
        return "mail server connection broke"
    if "pool_size" in error:
        return "upstream.pool_size exhausted"
    return _NUM.sub("N", error)[:100] or "(no error text)"


def summarise_logs(workdir: Path) -> dict:
    by_mech: collections.Counter = collections.Counter()
    by_cmd: collections.Counter = collections.Counter()
    by_status: collections.Counter = collections.Counter()
    by_minute: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kept_idle: list[float] = []
    examples: dict[str, str] = {}
    total = 0
    for log in sorted(workdir.glob("gateway*.log")):
        with log.open(errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "status" not in rec:
                    continue
                total += 1
                if rec["status"] < 500:
                    continue
                error = rec.get("error", "")
                mech = mechanism(error)
                by_mech[mech] += 1
                by_cmd[(mech, rec.get("command"))] += 1
                by_status[rec["status"]] += 1
                by_minute[time.strftime("%H:%M", time.gmtime(rec.get("ts", 0)))][mech] += 1
                examples.setdefault(mech, error[:240])
                m = re.search(r"idle ([\d.]+) s before it", error)
                if m:
                    kept_idle.append(float(m.group(1)))
    incidents: collections.Counter = collections.Counter()
    lag_max = 0.0
    for err in sorted(workdir.glob("gateway*.err")):
        for line in err.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                kind = rec.get("incident")
                if kind:
                    incidents[kind] += 1
                    if kind == "loop_lag":
                        lag_max = max(lag_max, rec.get("lag_ms", 0.0))
    return {"transactions": total, "failed_by_status": dict(by_status), "failed_by_mechanism": dict(by_mech.most_common()),
            "failed_by_mechanism_and_command": {f"{m} | {c}": n for (m, c), n in by_cmd.most_common(40)},
            "failed_by_minute": {k: dict(v) for k, v in sorted(by_minute.items())},
            "kept_alive_idle_s_max": max(kept_idle) if kept_idle else None,
            "examples": examples, "gateway_incidents": dict(incidents), "gateway_loop_lag_ms_max": lag_max}


def summarise_monitor(path: Path) -> dict:
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not samples:
        return {}
    fds: dict[str, int] = {}
    nofile: dict[str, int] = {}
    queue_max: dict[str, int] = {}
    for s in samples:
        for role, p in s["procs"].items():
            fds[role] = max(fds.get(role, 0), p["fds"])
            if p.get("nofile"):
                nofile[role] = p["nofile"]
        for addr, (recv_q, _backlog) in s["listen"].items():
            kind = "simulator" if addr.startswith("127.11.") else "gateway"
            queue_max[kind] = max(queue_max.get(kind, 0), recv_q)
    first, last = samples[0], samples[-1]
    counters = {k: last["nstat"].get(k, 0) - first["nstat"].get(k, 0) for k in NSTAT_KEYS}
    share = {}
    for role, p in last["procs"].items():
        t0, p0 = next((s["t"], s["procs"][role]) for s in samples if role in s["procs"])
        if t0 < last["t"] and p["run_ns"]:
            run, wait = p["run_ns"] - p0["run_ns"], p["wait_ns"] - p0["wait_ns"]
            dt = (last["t"] - t0) * 1e9
            share[role] = {"run_pct": round(100 * run / dt, 1), "runqueue_wait_pct": round(100 * wait / dt, 1)}
    backlog = max((b for s in samples for _, b in s["listen"].values()), default=None)
    return {"samples": len(samples), "seconds": round(last["t"] - first["t"]), "fds_max": fds, "nofile": nofile,
            "fds_max_share_of_limit": max((fds[r] / nofile[r] for r in fds if nofile.get(r)), default=None),
            "listen_recv_q_max": queue_max, "listen_backlog": backlog, "kernel_counters_delta": counters,
            "cpu_share_of_a_core": share}


def fleet_side(sizing_raw: Path) -> dict:
    """What the devices saw (every answer checked by the fleet), from sizing's raw JSON."""
    raw = json.loads(sizing_raw.read_text())
    point = raw["points"][0]
    out = {"verdict": {k: point["verdict"].get(k) for k in ("broke", "invalid")}, "paths": {}}
    for name, p in point["runs"][0]["paths"].items():
        out["paths"][name] = {
            "requests": p["requests_total"], "failures": sum(p["failures"].values()),
            "failures_by_kind": dict(sorted(p["failures"].items(), key=lambda kv: -kv[1])),
            "devices_ready": p["ready"],
            "load_side": {k: p["load"].get(k) for k in ("cpu_share", "runqueue_wait", "lag_p99", "lag_max",
                                                        "fds_max", "fd_limit", "conn_errors")}}
    return out


def verdict(logs: dict, mon: dict) -> list[str]:
    """What the evidence says, in order of how directly it says it."""
    out = []
    fails = logs["failed_by_mechanism"]
    if not logs["transactions"]:
        out.append("no gateway transaction log (direct or nginx path): see fleet.paths for what the devices saw")
    elif not fails:
        out.append("no failed transaction on the gateway path")
    if mon:
        if (mon.get("fds_max_share_of_limit") or 0) >= 0.95:
            out.append("a process reached 95% of its descriptor limit: EMFILE is possible")
        elif fails:
            out.append(f"no process near its descriptor limit (max {mon.get('fds_max_share_of_limit'):.0%})")
        if mon["kernel_counters_delta"].get("TcpExtListenOverflows", 0):
            out.append("listen queues overflowed (SYNs dropped: connects retried after 1 s, 3 s, ...)")
        elif fails:
            out.append("no listen queue overflowed")
        starved = [r for r, s in mon.get("cpu_share_of_a_core", {}).items()
                   if s["runqueue_wait_pct"] > s["run_pct"]]
        if starved:
            out.append(f"starved by other processes (waited on the run queue longer than they ran): {', '.join(sorted(starved))}")
    if any("connect timed out" in m for m in fails) and logs["gateway_loop_lag_ms_max"] > 1000:
        out.append(f"upstream connects timed out while the gateway's loop lagged up to "
                   f"{logs['gateway_loop_lag_ms_max'] / 1000:.1f} s (a connect takes several loop passes)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=25000)
    ap.add_argument("--hold", type=float, default=600)
    ap.add_argument("--paths", default="gateway")
    ap.add_argument("--summarise", metavar="WORKDIR", help="only summarise a kept sizing work directory")
    ap.add_argument("--monitor", metavar="JSONL", help="with --summarise: the samples taken during that run")
    ap.add_argument("--sizing-raw", metavar="JSON", help="with --summarise: that run's sizing-*.raw.json")
    ap.add_argument("--note", default="", help="free text kept in the JSON (machine state, say)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("sizing_args", nargs="*", help="after --: more options for seg-fast bench sizing")
    a = ap.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    command = None
    if a.summarise:
        workdir, mon_path = Path(a.summarise), Path(a.monitor) if a.monitor else None
        sizing_raw = Path(a.sizing_raw) if a.sizing_raw else None
    else:
        raw = Path(a.out) / "raw"            # gitignored: samples, sizing's files, its output
        sizing_out = raw / "soak-sizing"
        sizing_out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "seg_fast", "bench", "sizing", "--devices", str(a.devices),
                   "--paths", a.paths, "--hold", str(a.hold), "--repeat", "1", "--keep",
                   "--out", str(sizing_out), *a.sizing_args]
        mon_path = raw / f"soak-N{a.devices}-{stamp}.monitor.jsonl"
        log_path = raw / f"soak-N{a.devices}-{stamp}.out"
        with log_path.open("w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
            monitor(proc.pid, mon_path)
            proc.wait()
        text = log_path.read_text()
        kept = re.findall(r"kept (\S+)", text)
        if not kept:
            print(text[-3000:])
            return 1
        workdir = Path(kept[-1])
        raws = re.findall(r"wrote \S+, (\S+\.raw\.json)", text)
        sizing_raw = Path(raws[-1]) if raws else None
    logs = summarise_logs(workdir)
    mon = summarise_monitor(mon_path) if mon_path and mon_path.exists() else {}
    summary = {"devices": a.devices, "hold_s": a.hold, "command": command, "workdir": str(workdir),
               "note": a.note, "stamp": stamp, "gateway_logs": logs, "monitor": mon, "reading": verdict(logs, mon)}
    if sizing_raw is not None and sizing_raw.exists():
        summary["fleet"] = fleet_side(sizing_raw)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) / f"soak-N{a.devices}-{stamp}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("reading",)}, indent=1))
    print(json.dumps(logs["failed_by_mechanism"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
