"""What a gateway worker holds per MDM device record and per device it has seen.

    python benchmarks/policy_memory.py [--records 25000] [--seen 25000] [--base TREE] [--json PATH]

Every worker keeps the whole snapshot of device records (the policy engine decides
without I/O) and, for each device that reached it, a cached decision and the device's
first sighting. With several workers per core (one per ~8,300 devices under a
20,000-descriptor limit) both are paid once per worker: at 100,000 devices per core,
twelve times. This measures them with tracemalloc (bytes Python allocated, the same on
every run of the same tree), through the worker's own code: the sizing run's records
(`sizing.policy_file`: half the fleet enrolled) written to a SQLite store and read back
by the gatekeeper's own start (`Store.snapshot` into `Engine.load`); then ``--seen``
devices' requests (the fleet's URL, headers and Basic credential, parsed by
`parse_request`) decided, recorded and flushed into sightings by the gatekeeper.

``--base TREE``: the same measurement run with another checkout's `src` (side by side).
Prints bytes per record and per device seen; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def measure(records: int, seen: int) -> dict:
    import msgspec
    import trio

    from seg_fast.eas.request import parse_request
    from seg_fast.policy.gate import PolicyGatekeeper
    from seg_fast.policy.model import PolicyFile
    from seg_fast.policy.settings import PolicySettings
    from seg_fast.policy.store import SqliteStore
    from seg_fast.sim.fleet import device_identity
    from seg_fast.sim.sizing import policy_file

    out: dict = {"records": records, "seen": seen}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SEG_FAST_STATE_DIR"] = tmp
        pf = msgspec.json.decode(msgspec.json.encode(policy_file("off", 2 * records)), type=PolicyFile)
        settings = PolicySettings(sqlite_path=str(Path(tmp) / "policy.db"))

        async def run():
            loader = SqliteStore(settings.sqlite_path)     # what `seg-fast policy load` writes
            await loader.open()
            await loader.replace_all(pf.policies, pf.devices)
            await loader.aclose()
            gk = PolicyGatekeeper(settings, node="bench/1")
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            await gk._open_and_load()                      # the worker's start: open, snapshot, load
            assert gk.store_ok and len(gk.engine.devices) == records
            # trio keeps a finished thread call's result (the store's rows) until the task
            # next resumes: let it, as the worker's gatekeeper task does
            await trio.sleep(0)
            loaded = tracemalloc.get_traced_memory()[0]
            out["bytes_per_record"] = round((loaded - before) / max(1, records), 1)
            for i in range(seen):
                user, device_id, _ = device_identity(i)
                auth = "Basic " + base64.b64encode(f"{user}:secret".encode()).decode()
                req = parse_request(
                    "POST", f"/Microsoft-Server-ActiveSync?Cmd=Sync&User={user}&DeviceId={device_id}"
                            "&DeviceType=iPhone",
                    [("Authorization", auth), ("MS-ASProtocolVersion", "14.1"),
                     ("User-Agent", "Apple-iPhone15C2/2104.100")], client_ip=f"127.14.0.{i % 250 + 1}")
                gk.record(req, gk.decide(req), 200)
                if len(gk._pending) >= 1000:
                    await gk.flush()
            await gk.flush()
            await trio.sleep(0)
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            out["bytes_per_device_seen"] = round((after - loaded) / max(1, seen), 1)
            out["device_records"] = len(gk.engine.devices)
            await gk.store.aclose()

        trio.run(run)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=25_000)
    ap.add_argument("--seen", type=int, default=25_000)
    ap.add_argument("--base", type=Path, help="another checkout, measured the same way")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.records, a.seen)))
        return 0
    trees = {"this tree": HERE} | ({"base": a.base.resolve()} if a.base else {})
    results = {}
    for name, tree in trees.items():
        env = os.environ | {"PYTHONPATH": str(tree / "src")}
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                            "--records", str(a.records), "--seen", str(a.seen)],
                           env=env, capture_output=True, text=True, check=True)
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        res = results[name]
        git = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True)
        res["commit"] = git.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") or None
        print(f"{name} ({tree}): {res['bytes_per_record']:.0f} B per device record "
              f"({res['device_records']} records), {res['bytes_per_device_seen']:.0f} B per device seen "
              f"({res['seen']} devices)")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
