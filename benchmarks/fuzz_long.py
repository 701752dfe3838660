"""Long-run fuzzing with the project's own kit (not in the default suite).

    python benchmarks/fuzz_long.py --seconds 600                 # the simulator, in process
    python benchmarks/fuzz_long.py --seconds 600 --gateway       # seg-fast serve in front of it
    python benchmarks/fuzz_long.py --target http://127.0.0.1:8443 --seconds 3600

Runs seg_fast.testing's Fuzzer in batches of --batch examples (seeds --seed,
--seed+1, ...) until --seconds have passed, every protocol version and command;
prints executions per second, verdicts and failures every batch, writes failure
files under --out and a summary to benchmarks/results/fuzz_long.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent

from seg_fast.sim.mailbox import MailboxSimulator  # noqa: E402
from seg_fast.testing.runner import Device, Fuzzer, Target  # noqa: E402
from seg_fast.testing.spec import VERSIONS  # noqa: E402


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(sim_port: int, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = tmp / "gw.toml"
    cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n[admin]\nenabled = false\n'
                   f'[log]\ntransactions = ""\n[policy]\nallow_if_no_policies = true\n')
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp / "state"))
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


async def wait_port(port: int, proc: subprocess.Popen) -> None:
    with trio.fail_after(30):
        while True:
            if proc.poll() is not None:
                raise SystemExit("seg-fast serve exited")
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return
            except OSError:
                await trio.sleep(0.1)


async def run(args) -> dict:
    summary: dict = {"seconds": args.seconds, "batch": args.batch, "versions": list(VERSIONS),
                     "executions": 0, "verdicts": {}, "failures": [], "batches": 0}
    async with trio.open_nursery() as nursery:
        proc = None
        if args.target:
            url, summary["target"] = args.target, "external"
        else:
            sim = MailboxSimulator(password="secret", seed=args.seed, initial_messages=8)
            await nursery.start(sim.serve, "127.0.0.1", 0)
            url, summary["target"] = f"http://127.0.0.1:{sim.port}", "simulator"
            if args.gateway:
                tmp = Path(tempfile.mkdtemp(prefix="fuzz-long-"))
                proc, port = start_gateway(sim.port, tmp)
                await wait_port(port, proc)
                url, summary["target"] = f"http://127.0.0.1:{port}", "gateway+simulator"
        try:
            fz = Fuzzer(Target.parse(url), Device(), versions=VERSIONS, out=Path(args.out),
                        park_wait=args.park_wait)
            await fz.setup()
            t0 = time.monotonic()
            seed = args.seed
            while time.monotonic() - t0 < args.seconds:
                before = len(fz.failures)
                await fz.run(args.batch, seed=seed)
                seed += 1
                summary["batches"] += 1
                elapsed = time.monotonic() - t0
                print(f"[{elapsed:7.1f} s] {fz.executions} executions, {fz.executions / elapsed:.1f}/s, "
                      f"verdicts {dict(sorted(fz.verdicts.items()))}, HTTP {dict(sorted(fz.http.items()))}, failures {len(fz.failures)}"
                      f"{' (new: ' + str(len(fz.failures) - before) + ')' if len(fz.failures) > before else ''}",
                      flush=True)
            elapsed = time.monotonic() - t0
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(15)
            nursery.cancel_scope.cancel()
    summary.update(executions=fz.executions, elapsed=round(elapsed, 1),
                   per_second=round(fz.executions / elapsed, 1), verdicts=fz.verdicts, http=fz.http,
                   failures=[str(p) for p in fz.written])
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--batch", type=int, default=200, help="examples per hypothesis run")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gateway", action="store_true", help="fuzz seg-fast serve in front of the simulator")
    ap.add_argument("--target", help="fuzz this endpoint instead (loopback or your own server)")
    ap.add_argument("--park-wait", type=float, default=0.2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fuzz-failures"))
    args = ap.parse_args()
    summary = trio.run(run, args)
    out = REPO / "benchmarks" / "results" / "fuzz_long.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"\n{summary['target']}: {summary['executions']} executions in {summary['elapsed']} s = "
          f"{summary['per_second']}/s; failures: {len(summary['failures'])} (summary in {out})")
    for f in summary["failures"]:
        print("  ", f)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
