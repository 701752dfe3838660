"""The load side's per-request work alone, without sockets: CPU time per request.

A shard's simulator answers each request in ``MailboxSimulator._answer`` and its
fleet checks each answer (``Device.checked``, ``fleet_eas.sync_answer``); the sizing
runs measure that together with the sockets, trio and the foreground connections,
and on a shared machine their figures move ±5% run to run. This calls the same code
directly, in one process, for DEVICES provisioned devices (the shard's corpus pool,
8 messages each already synced): per device, a delivery, then the Sync the device
sends for it, answered and checked as a shard does (recorded under X-Fleet-Seq, byte
for byte, then the facts); and a Ping answered (parked and unparked at once). The
median over REPEAT passes of CPU µs per (delivery + Sync) and per Ping is printed
and, with --out, written as JSON.

    python benchmarks/load_request_cost.py                 # this tree
    PYTHONPATH=<tree>/src python benchmarks/load_request_cost.py   # another tree (A/B)

Works on trees before the simulator recorded facts (they decode the answer instead).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import trio

import seg_fast
from seg_fast.sim import fleet_eas as eas
from seg_fast.sim.fleet import INITIAL_MESSAGES, Fleet, PooledCorpus, ShardSpec
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, decode, encode, text

PING_HEARTBEAT = 1100


class Shard:
    """A simulator and a fleet as a shard holds them, requests made by direct calls."""

    def __init__(self, devices: int, seed: int) -> None:
        corpus = PooledCorpus(seed)
        corpus.warm()
        self.sim = MailboxSimulator(seed=seed, corpus=corpus, initial_messages=INITIAL_MESSAGES)
        self.fleet = Fleet(ShardSpec(devices=devices, seed=seed), self.sim)
        self.fleet.strict, self.fleet.security, self.fleet.tls = True, False, None
        self.n = 0
        for dev in self.fleet.devices:
            self._provision(dev)

    def request(self, dev, cmd: str, body: bytes, seq: bytes | None = None):
        target = (f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User={dev.user}&DeviceId={dev.device_id}"
                  "&DeviceType=iPhone").encode()
        headers = [(b"host", b"mail.seg-fast.test"), (b"ms-asprotocolversion", b"14.1"),
                   (b"user-agent", b"Apple-iPhone15C2/2101.55"),
                   (b"content-type", b"application/vnd.ms-sync.wbxml"), (b"authorization", dev.auth),
                   (b"x-ms-policykey", dev.policy_key.encode())]
        if seq is not None:
            headers.append((b"x-fleet-seq", seq))
        headers.append((b"content-length", str(len(body)).encode()))
        answer = self.sim._answer(b"POST", target, headers, body)
        return self.sim.answer_tap(seq, answer) if seq is not None else answer

    def _provision(self, dev) -> None:
        def step(*extra):
            body = encode(E("Provision:Provision", E("Provision:Policies", E(
                "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"), *extra))))
            return text(decode(self.request(dev, "Provision", body).body),
                        "Provision:Policies", "Provision:Policy", "Provision:PolicyKey")
        dev.policy_key = step()
        dev.policy_key = step(E("Provision:PolicyKey", dev.policy_key), E("Provision:Status", 1))

    def sync(self, dev) -> None:
        """One Sync as the fleet sends and checks it (fleet.Device.advance/answered)."""
        initial = dev.sync_key == "0"
        first = not initial and not dev.seen
        body = eas.sync_body(dev, eas.SETUP_TRUNCATION if first else None)
        self.n += 1
        seq = f"Sync.{self.n}".encode()
        answer = self.request(dev, "Sync", body, seq)
        res = dev.checked(None, "Sync", None, seq, trio.current_time(), len(body), (answer.status, {}, answer.body))
        if not eas.sync_answer(dev, res, initial, first, dev.delivered):
            raise SystemExit(f"a Sync answer failed its check: {self.fleet.stats.failure_samples[-1:]}")

    def ping(self, dev, body: bytes) -> None:
        self.request(dev, "Ping", body)              # parks: no mail pending
        self.sim.mailbox(dev.user).device(dev.device_id).parked = None


async def measure(devices: int, repeat: int, seed: int) -> dict:
    shard = Shard(devices, seed)
    devs = shard.fleet.devices
    for dev in devs:                 # the initial Sync and the first download, then two rounds
        dev.delivered = INITIAL_MESSAGES
        shard.sync(dev)
        shard.sync(dev)
    ping = eas.ping_body(PING_HEARTBEAT)
    for _ in range(2):
        for dev in devs:
            shard.sim.deliver(dev.user)
            dev.delivered += 1
            shard.sync(dev)
            shard.ping(dev, ping)
    sync_us, ping_us = [], []
    for _ in range(repeat):
        t = time.process_time()
        for dev in devs:
            shard.sim.deliver(dev.user)
            dev.delivered += 1
            shard.sync(dev)
        sync_us.append((time.process_time() - t) / len(devs) * 1e6)
        t = time.process_time()
        for dev in devs:
            shard.ping(dev, ping)
        ping_us.append((time.process_time() - t) / len(devs) * 1e6)
    st = shard.fleet.stats
    if st.failures:
        raise SystemExit(f"failures: {dict(st.failures)}")
    return {"devices": devices, "repeat": repeat, "seed": seed,
            "us_per_delivery_and_sync": round(statistics.median(sync_us), 1),
            "us_per_ping": round(statistics.median(ping_us), 1),
            "passes_us_per_delivery_and_sync": [round(x, 1) for x in sync_us],
            "passes_us_per_ping": [round(x, 1) for x in ping_us],
            "facts_checked": getattr(st, "facts_checked", None), "byte_checked": st.byte_checked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args()
    result = trio.run(measure, a.devices, a.repeat, a.seed)
    tree = Path(seg_fast.__file__).resolve().parents[2]      # the tree measured (PYTHONPATH)
    result["commit"] = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                                      capture_output=True, text=True).stdout.strip()
    print(f"{result['us_per_delivery_and_sync']} us per delivery + Sync answered and checked, "
          f"{result['us_per_ping']} us per Ping answered ({a.devices} devices, median of {a.repeat})")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
