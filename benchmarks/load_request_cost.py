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
    python benchmarks/load_request_cost.py --tls-connect 400   # + a resumed TLS connection

``--tls-connect N``: also the fleet side's CPU per resumed TLS 1.3 connection, what
each foreground request (SendMail, Fetch, FolderSync...) opens: ``HttpConn.open``
with the device's session, the handshake, a short answer read (the server's new
tickets with it) and the close, N times against a TLS server in a child process
(its CPU is not counted); every connection must resume. ``--tls-setup N``: the same
for the connection a device sets up with (a full handshake, the answer read and the
session kept to resume later ones, as ``Device.checked`` keeps it: the ramp's share).

Works on trees before the simulator recorded facts (they decode the answer instead).
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
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


TLS_SERVER = r"""
import socket, ssl, sys
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(64)
print(ls.getsockname()[1], flush=True)
while True:
    c, _ = ls.accept()
    try:
        s = ctx.wrap_socket(c, server_side=True)
        s.sendall(b"ok")
        s.recv(1)               # the client's close_notify (or EOF)
    except OSError:
        pass
    c.close()
"""


async def tls_connect(n: int, setup: int = 0) -> dict:
    """Fleet-side CPU µs per resumed TLS connection (see the module's doc); with
    ``setup``, also per set-up connection (a full handshake, the answer read and the
    session kept to resume, as ``Device.checked`` keeps it), ``setup`` of them."""
    import trustme
    from seg_fast.sim.wire import SERVER_NAME, HttpConn

    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        pem, key, ca_pem = (os.path.join(tmp, f) for f in ("server.pem", "server.key", "ca.pem"))
        with open(pem, "wb") as f:
            f.write(b"".join(b.bytes() for b in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(key)
        ca.cert_pem.write_to_path(ca_pem)
        server = subprocess.Popen([sys.executable, "-c", TLS_SERVER, pem, key], stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            ctx = ssl.create_default_context(cafile=ca_pem)      # the fleet's context
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3

            async def one(session):
                conn = await HttpConn.open("127.0.0.1", port, None, ctx, session)
                await conn.stream.do_handshake()
                got = b""
                while len(got) < 2:
                    got += await conn.stream.receive_some(16)
                reused, session = conn.stream.session_reused, (session or conn.stream.session)
                await conn.aclose()
                return session, reused

            session, _ = await one(None)
            for _ in range(20):
                await one(session)
            t = time.process_time()
            reused = 0
            for _ in range(n):
                reused += (await one(session))[1]
            us = (time.process_time() - t) / max(1, n) * 1e6
            t = time.process_time()
            fresh = 0
            for _ in range(setup):
                kept, was = await one(None)
                fresh += kept is not None and not was
            us_setup = (time.process_time() - t) / max(1, setup) * 1e6
        finally:
            server.kill()
            server.wait()
    if reused != n:
        raise SystemExit(f"only {reused} of {n} TLS connections resumed")
    if fresh != setup:
        raise SystemExit(f"only {fresh} of {setup} set-up connections made a full handshake and kept a session")
    result = {"tls_connections": n, "us_per_resumed_tls_connection": round(us, 1)} if n else {}
    if setup:
        result.update(tls_setup_connections=setup, us_per_setup_tls_connection=round(us_setup, 1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--tls-connect", type=int, default=0, metavar="N",
                    help="also: fleet-side CPU per resumed TLS connection, N connections")
    ap.add_argument("--tls-setup", type=int, default=0, metavar="N",
                    help="also: fleet-side CPU per set-up TLS connection (full handshake, session kept), N of them")
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args()
    result = trio.run(measure, a.devices, a.repeat, a.seed)
    if a.tls_connect or a.tls_setup:
        result.update(trio.run(tls_connect, a.tls_connect, a.tls_setup))
    if a.tls_connect:
        print(f"{result['us_per_resumed_tls_connection']} us per resumed TLS connection "
              f"(fleet side, {a.tls_connect} connections)")
    if a.tls_setup:
        print(f"{result['us_per_setup_tls_connection']} us per set-up TLS connection: full handshake, "
              f"session kept (fleet side, {a.tls_setup} connections)")
    tree = Path(seg_fast.__file__).resolve().parents[2]      # the tree measured (PYTHONPATH)
    result["commit"] = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                                      capture_output=True, text=True).stdout.strip()
    print(f"{result['us_per_delivery_and_sync']} us per delivery + Sync answered and checked, "
          f"{result['us_per_ping']} us per Ping answered ({a.devices} devices, median of {a.repeat})")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
