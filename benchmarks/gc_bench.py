"""What a full (generation-2) garbage collection costs a worker holding parked Pings,
without and with gc.freeze() (proxy/gcpause.py), and how long a sliced drain stalls the loop.

    python benchmarks/gc_bench.py [--parked 3000]

One process: a gateway (in-process, as tests/test_proxy.py runs it), a mail server that
never answers (so every Ping parks) and raw device sockets. Prints ms per collection and
µs per parked Ping; the drain's loop-lag maximum and histogram (Gateway.looplag); writes
benchmarks/results/gc_bench.json. The devices' and mail server's own objects are in the
same heap, so the per-Ping figures are an upper bound for a worker.
"""
from __future__ import annotations

import argparse
import base64
import gc
import json
import pathlib
import sys
import tempfile
import time

import h11
import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from seg_fast.config import load_config  # noqa: E402
from seg_fast.hooks import AllowAll  # noqa: E402
from seg_fast.proxy import gcpause  # noqa: E402
from seg_fast.proxy.gateway import Gateway  # noqa: E402


def timed_collect(generation: int, repeat: int = 3) -> float:
    # CPU time of the collection (process time): the pause itself, not the scheduler's.
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        gc.collect(generation)
        best = min(best, time.process_time() - t0)
    return best * 1000.0


async def run(n: int) -> dict:
    held = []

    async def silent(stream):
        held.append(stream)
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gc-bench-"))
    out: dict = {"parked": n}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        port = listeners[0].socket.getsockname()[1]
        env = {"SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0",
               "SEG_FAST_UPSTREAM_URL": f"http://127.0.0.1:{port}", "SEG_FAST_LOG_TRANSACTIONS": "",
               "SEG_FAST_SECURITY_MASTER_KEY_FILE": str(tmp / "master.key"),
               "SEG_FAST_SECURITY_KEY_STATE_FILE": str(tmp / "keys.json"),
               "SEG_FAST_LIMITS_MAX_CONNECTIONS_PER_ADDRESS": "0"}      # every device is 127.0.0.1 here
        gw = Gateway(load_config(None, env=env), gatekeeper_factory=lambda c: AllowAll())
        async with trio.open_nursery() as gw_nursery:
            await gw_nursery.start(gw.serve)
            request = h11.Connection(h11.CLIENT).send(h11.Request(
                method=b"POST", target=b"/Microsoft-Server-ActiveSync?Cmd=Ping&User=test&DeviceId=D&DeviceType=T",
                headers=[(b"Host", b"gw"), (b"Authorization", b"Basic " + base64.b64encode(b"test:secret")),
                         (b"Content-Length", b"0")]))
            devices = []
            for _ in range(n):
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(request)
                devices.append(stream)
            with trio.move_on_after(60):
                while gw.parking.count < n:
                    await trio.sleep(0.05)
            if gw.parking.count < n:
                raise SystemExit(f"only {gw.parking.count} of {n} Pings parked; one device got "
                                 f"{(await devices[0].receive_some(300))!r}")
            gc.disable()
            out["objects"] = len(gc.get_objects())
            out["full_ms"] = timed_collect(2)
            out["gen1_ms"] = timed_collect(1, repeat=1)
            gc.freeze()
            out["frozen"] = gc.get_freeze_count()
            out["full_after_freeze_ms"] = timed_collect(2)
            out["gen1_after_freeze_ms"] = timed_collect(1, repeat=1)
            gc.unfreeze()
            gc.enable()
            out["full_us_per_parked"] = out["full_ms"] * 1000 / n
            # The drain, with the worker's GC settings (tune: freeze + gen-2 threshold).
            old = gc.get_threshold()
            gcpause.tune()
            try:
                async def read(stream):
                    while await stream.receive_some(65536):
                        pass
                    await stream.aclose()

                async with trio.open_nursery() as readers:
                    for stream in devices:
                        readers.start_soon(read, stream)
                    await trio.sleep(0.5)
                    gw.looplag.max_ms = 0.0
                    gen2_before = gw.looplag.gc.count[2]
                    hist_before = list(gw.looplag.histogram)
                    t0 = time.perf_counter()
                    gw.drain()
                out["drain_s"] = time.perf_counter() - t0
            finally:
                gc.unfreeze()
                gc.set_threshold(*old)
        out["drain_lag"] = gw.looplag.snapshot()
        out["drain_gen2_collections"] = gw.looplag.gc.count[2] - gen2_before
        out["drain_lag_histogram_ms"] = {k: v - b for (k, v), b in zip(out["drain_lag"]["histogram_ms"].items(),
                                                                       hist_before) if v - b}
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parked", type=int, default=3000)
    ap.add_argument("--one-step", action="store_true",
                    help="drain as before slicing (every parked Ping released in one loop step), to compare")
    args = ap.parse_args()
    if args.one_step:
        from seg_fast.proxy import gateway, looplag

        async def all_at_once(items, action, **kw):
            for item in items:
                action(item)
            await trio.sleep(0)

        looplag.in_slices = gateway.in_slices = all_at_once
    r = trio.run(run, args.parked)
    print(f"parked Pings {r['parked']}, objects tracked {r['objects']}")
    print(f"full collection: {r['full_ms']:.1f} ms ({r['full_us_per_parked']:.1f} µs per parked Ping); "
          f"after gc.freeze(): {r['full_after_freeze_ms']:.2f} ms")
    print(f"generation-1 collection: {r['gen1_ms']:.2f} ms; after gc.freeze(): {r['gen1_after_freeze_ms']:.2f} ms")
    lag = r["drain_lag"]
    print(f"drain of {r['parked']} parked Pings: {r['drain_s']:.2f} s, loop lag max {lag['max_ms']:.1f} ms, "
          f"gen-2 collections during it {r['drain_gen2_collections']}")
    print("loop lag during the drain (samples per bucket):", r["drain_lag_histogram_ms"])
    out = ROOT / "benchmarks" / "results" / "gc_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.one_step:
        out = out.with_name("gc_bench_one_step.json")
    out.write_text(json.dumps({"python": sys.version.split()[0], "one_step_drain": args.one_step, **r}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
