"""CPU cost of the mailbox simulator per request, on the busy-hour request mix.

The sizing benchmark is only valid while the simulator (the load side) has CPU
to spare; this says how many device-hours one simulator core can serve. The
simulator runs as a child process (`seg-fast sim`); its CPU time (utime+stime
from /proc) is read around each phase, so the client's own cost is not counted:

    python benchmarks/sim_cpu.py [--devices 50] [--rounds 20]

Phases (each device provisioned and synced first): Ping released by new mail
then Sync of one new message (half Body Type 2, half Type 4, as BENCH-PROFILE);
ItemOperations Fetch of attachments; SendMail of a 20 KB message. Prints CPU
microseconds per request and the implied device-hours per simulator core.
Writes benchmarks/results/sim_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent

from seg_fast.sim.client import EasClient  # noqa: E402
from seg_fast.sim.tree import E, find, kids, text  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
# BENCH-PROFILE busy hour per device: 12 Ping->Sync, 2 idle Pings, 3 SendMail,
# 2 Fetch, 1 small command.
PER_HOUR = {"ping_sync": 12, "fetch": 2, "send": 3}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def run(args, port: int, pid: int) -> dict:
    devices = []
    for k in range(args.devices):
        c = EasClient("127.0.0.1", port, f"b{k}", "secret", f"CPU{k:05d}")
        await c.provision()
        devices.append(c)
    for c in devices:
        r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
                            E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", "1")))))
        c.sync_key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
    results = {}

    async def ping_sync(c, k):
        ping = E("Ping:Ping", E("Ping:HeartbeatInterval", 900), E("Ping:Folders", E("Ping:Folder",
                 E("Ping:Id", "1"), E("Ping:Class", "Email"))))
        r = await c.request("Ping", ping)
        assert text(r.doc, "Ping:Status") == "2", r.body
        btype = 2 if k % 2 else 4
        r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
                            E("AirSync:SyncKey", c.sync_key), E("AirSync:CollectionId", "1"),
                            E("AirSync:GetChanges"), E("AirSync:WindowSize", 25),
                            E("AirSync:Options", E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", btype)))))))
        coll = find(r.doc, "AirSync:Collections", "AirSync:Collection")
        c.sync_key = text(coll, "AirSync:SyncKey")
        for add in kids(find(coll, "AirSync:Commands"), "AirSync:Add"):
            for att in kids(find(add, "AirSync:ApplicationData", "AirSyncBase:Attachments"), "AirSyncBase:Attachment"):
                c.refs.append(text(att, "AirSyncBase:FileReference"))

    for c in devices:
        c.refs = []
    # Phase 1: Ping parked, mail delivered (through the side door), Sync.
    t_cpu, t_wall, n = cpu_seconds(pid), time.monotonic(), 0
    for rnd in range(args.rounds):
        async with trio.open_nursery() as nursery:
            for k, c in enumerate(devices):
                nursery.start_soon(ping_sync, c, rnd + k)
            await trio.sleep(0.05)
            await trio.to_thread.run_sync(deliver_all, port, len(devices))   # in the simulator
        n += 2 * len(devices)
    results["ping_sync"] = _phase(pid, t_cpu, t_wall, n)
    # Phase 2: attachment fetches (the size mix comes from the corpus).
    refs = [(c, ref) for c in devices for ref in c.refs]
    t_cpu, t_wall = cpu_seconds(pid), time.monotonic()
    for c, ref in refs:
        r = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E("ItemOperations:Fetch",
                            E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", ref))))
        assert r.status == 200
    results["fetch"] = _phase(pid, t_cpu, t_wall, max(1, len(refs)))
    # Phase 3: SendMail with a 20 KB message (14.1 ComposeMail).
    mime = (b"From: b@seg-fast.test\r\nTo: x@example.com\r\nSubject: s\r\n\r\n" + b"x" * 76 + b"\r\n") * 260
    t_cpu, t_wall = cpu_seconds(pid), time.monotonic()
    n = 0
    for _ in range(max(1, args.rounds // 4)):
        for c in devices:
            r = await c.request("SendMail", E("ComposeMail:SendMail", E("ComposeMail:ClientId", str(n)),
                                              E("ComposeMail:Mime", mime)))
            assert r.status == 200
            n += 1
    results["send"] = _phase(pid, t_cpu, t_wall, n)
    for c in devices:
        await c.aclose()
    return results


def deliver_all(port: int, n: int) -> None:
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/sim/deliver?users={n}&prefix=b", method="POST"), timeout=60).read()


def _phase(pid: int, t_cpu: float, t_wall: float, n: int) -> dict:
    cpu = cpu_seconds(pid) - t_cpu
    return {"requests": n, "cpu_s": round(cpu, 3), "wall_s": round(time.monotonic() - t_wall, 3),
            "cpu_us_per_request": round(cpu / n * 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--seed", "3"],
                             stdout=subprocess.PIPE, env=env, text=True)
    try:
        ready = json.loads(child.stdout.readline())
        results = trio.run(run, args, ready["sim_port"], ready["pid"])
    finally:
        child.terminate()
        child.wait(timeout=10)
    # CPU per device-hour: Ping+Sync pairs, fetches, sends at the profile's rates.
    per_hour = (PER_HOUR["ping_sync"] * 2 * results["ping_sync"]["cpu_us_per_request"]
                + PER_HOUR["fetch"] * results["fetch"]["cpu_us_per_request"]
                + PER_HOUR["send"] * results["send"]["cpu_us_per_request"]) / 1e6
    results["cpu_s_per_device_hour"] = round(per_hour, 4)
    results["device_hours_per_core"] = int(3600 / per_hour)
    for name in ("ping_sync", "fetch", "send"):
        r = results[name]
        print(f"{name:<10} {r['requests']:>6} requests  {r['cpu_us_per_request']:>9.1f} µs CPU each")
    print(f"simulator CPU per device-hour {per_hour * 1000:.1f} ms -> one simulator core serves "
          f"~{results['device_hours_per_core']} devices at the busy-hour rate")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_cpu.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
