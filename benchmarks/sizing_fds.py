"""Do the sizing benchmark's descriptors and ports scale to 100,000+ devices?

The sizing run (seg_fast.sim.sizing) splits N devices into shards under the
per-process descriptor limit, gives each shard its own gateway worker and its own
127.x addresses (simulator 127.11.k.1, gateway 127.12.k.1, device sources
127.14-29.k.1, one per 2,000 devices). This opens exactly the connections that plan
makes at N, with the same addresses, socket options and process layout, and holds
them all at once:

- per shard, a "fleet" process: the simulator's listening socket, one device
  connection per device from its source address to the shard's gateway worker, and
  the simulator's side of every upstream connection (what a shard holds on the
  gateway path; on the direct path it holds the same count);
- per shard, a "gateway worker" process: the device's connection accepted, and one
  upstream connection per device to the shard's simulator (a parked Ping holds one).

No requests, no TLS: descriptors, ports and the kernel's socket tables only. It
prints and writes benchmarks/results/sizing-fds-N{devices}.json: descriptors per process
against the limit, connections per (source, destination) address pair against the
ephemeral port range, failures (EMFILE, EADDRNOTAVAIL, ...).

    python benchmarks/sizing_fds.py --devices 100000
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from seg_fast.sim import sizing
from seg_fast.sim.wire import IP_BIND_ADDRESS_NO_PORT

RESULTS = Path(__file__).resolve().parent / "results"


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def gateway_worker(listen: tuple[str, int], sim: tuple[str, int], devices: int, ready, report, hold) -> None:
    """Accept `devices` device connections; open one upstream connection for each."""
    _raise_nofile()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(listen)
    ls.listen(4096)
    ready.set()
    kept, errors = [], Counter()
    for _ in range(devices):
        try:
            c, _addr = ls.accept()
            kept.append(c)
            u = socket.socket()
            u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            u.connect(sim)
            kept.append(u)
        except OSError as exc:
            errors[exc.strerror or type(exc).__name__] += 1
            if sum(errors.values()) > 50:
                break
    report.put(("gateway", listen[0], _fds(), len(kept), dict(errors)))
    hold.wait()


def fleet_shard(spec: sizing.ShardSpec, gateway: tuple[str, int], ready, report, hold) -> None:
    """The simulator's listener (accepting upstream connections in a thread) and one
    device connection per device from the shard's source addresses."""
    _raise_nofile()
    sim = socket.socket()
    sim.bind((spec.sim_host, spec.sim_port))
    sim.listen(4096)
    accepted, errors = [], Counter()

    def accept() -> None:
        for _ in range(spec.devices):
            try:
                accepted.append(sim.accept()[0])
            except OSError as exc:
                errors["accept " + (exc.strerror or type(exc).__name__)] += 1
                return
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    ready.set()
    devices, pairs = [], Counter()
    hosts = spec.source_hosts
    for i in range(spec.devices):
        local = hosts[(spec.first_device + i) % len(hosts)]        # Device.local's rule
        try:
            s = socket.socket()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((local, 0))
            s.connect(gateway)
            devices.append(s)
            pairs[local] += 1
        except OSError as exc:
            errors[exc.strerror or type(exc).__name__] += 1
            s.close()
            if sum(errors.values()) > 50:
                break
    t.join(timeout=120)
    report.put(("fleet", spec.sim_host, _fds(), len(devices), dict(errors), max(pairs.values(), default=0)))
    hold.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=8000)
    a = ap.parse_args()
    opts = sizing.Options(devices=a.devices, shard_size=a.shard_size, tls=False)
    specs = sizing.plan_shards(opts, Path("/tmp"), "fds")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ctx = mp.get_context("fork")
    report, hold = ctx.Queue(), ctx.Event()
    procs = []
    t0 = time.monotonic()
    for k, spec in enumerate(specs):
        spec.sim_port = sizing.free_port(spec.sim_host)
        gw = (f"127.12.{k // 250}.{k % 250 + 1}", 0)
        gw = (gw[0], sizing.free_port(gw[0]))
        r1, r2 = ctx.Event(), ctx.Event()
        fleet = ctx.Process(target=fleet_shard, args=(spec, gw, r1, report, hold))
        worker = ctx.Process(target=gateway_worker, args=(gw, (spec.sim_host, spec.sim_port), spec.devices,
                                                          r2, report, hold))
        worker.start()
        r2.wait(30)
        fleet.start()
        procs += [fleet, worker]
    rows = [report.get(timeout=600) for _ in procs]
    opened_s = time.monotonic() - t0
    with open("/proc/net/sockstat") as fh:
        sockstat = fh.read()
    hold.set()
    for p in procs:
        p.join(timeout=60)
    fleets = [r for r in rows if r[0] == "fleet"]
    workers = [r for r in rows if r[0] == "gateway"]
    errors = Counter()
    for r in rows:
        errors.update(r[4])
    out = {
        "devices": a.devices, "shards": len(specs), "shard_size_cap": sizing.shard_limit(),
        "fd_hard_limit": hard, "ephemeral_ports": hi - lo + 1,
        "device_connections": sum(r[3] for r in fleets),
        "gateway_side_sockets": sum(r[3] for r in workers),
        "fds_fleet_side_total": sum(r[2] for r in fleets),
        "fds_gateway_side_total": sum(r[2] for r in workers),
        "fds_max_per_process": max(r[2] for r in rows),
        "fd_headroom_per_process": hard - max(r[2] for r in rows),
        "max_connections_per_source_destination_pair": max(r[5] for r in fleets),
        "source_addresses": sum(len(s.source_hosts) for s in specs),
        "errors": dict(errors), "seconds_to_open": round(opened_s, 1),
        "command": f"python benchmarks/sizing_fds.py --devices {a.devices} --shard-size {a.shard_size}",
        "commit": sizing.machine()["commit"],
        "sockstat": sockstat.strip().splitlines(),
    }
    out["ok"] = (not errors and out["device_connections"] == a.devices
                 and out["gateway_side_sockets"] == 2 * a.devices and out["fds_max_per_process"] < hard)
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sizing-fds-N{a.devices}.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
