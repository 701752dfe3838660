"""Certificate authentication with KCD: what it costs per request, and what reaches the KDC.

    python benchmarks/kcd_bench.py [--requests 400] [--devices 4]

A real MIT KDC (tests/kdc_server.py: krb5kdc + its LDAP module in a throw-away slapd), one
`seg-fast serve` worker, `seg-fast sim` in a process of its own. Two gateways in turn, the
same load: --devices devices (each with its own client certificate, all alice's) sending
--requests Pings each (the simulator answers at once: no folders asked for), keep-alive:

- kcd:   client_cert = "required", [kcd] on, the simulator takes only Negotiate tokens,
         each verified with the mail server's keytab (gss_accept_sec_context);
- basic: the same TLS listener without client certificates, Basic credentials, the
         simulator checking the password.

Printed and written to benchmarks/results/kcd_bench.json: requests per second, p50/p99
latency per request, the gateway's CPU time per request (its processes' utime + stime, which
is what KCD adds: the token, and a new mail-server connection per request), the machine's
load average, the KDC's AS/TGS requests during the measured part (its own log), and
that every answer was 200 (the simulator answers 401 to anything but a token it verified).
Needs the KDC packages scripts/test.sh installs, and
python-gssapi. The figures depend on the machine; the KDC count does not.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import sys
import subprocess
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))          # the tests' real-KDC and certificate helpers

from kcd_certs import TestCA                     # noqa: E402
from kdc_server import GATEWAY, MAIL, REALM, running_realm   # noqa: E402
from processes import start_serve, stop_process  # noqa: E402

from seg_fast.sim.client import EasClient        # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sim(keytab: Path | None) -> tuple[subprocess.Popen, int]:
    """`seg-fast sim` (Negotiate only when given the mail server's keytab); its port."""
    cmd = [sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--no-provisioning"]
    if keytab is not None:
        cmd += ["--negotiate-keytab", str(keytab)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc, json.loads(proc.stdout.readline())["sim_port"]


async def load(port: int, ca: TestCA, certs: list, devices: int, requests: int, basic: bool) -> dict:
    latencies: list[float] = []

    async def device(k: int):
        ctx = ssl.create_default_context(cafile=str(ca.ca_file))
        if not basic:
            ctx.load_cert_chain(str(certs[k][0]), str(certs[k][1]))
        async with EasClient("127.0.0.1", port, "alice@kcd.test", "secret", f"BENCH{k}", ssl_context=ctx,
                             server_hostname="localhost") as dev:
            r = await dev.request("Ping")                    # connect + warm
            assert r.status == 200, r.status
            for _ in range(requests):
                t0 = time.perf_counter()
                r = await dev.request("Ping")
                latencies.append(time.perf_counter() - t0)
                assert r.status == 200, r.status

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(devices):
            nursery.start_soon(device, k)
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3)}


async def token_cost(realm, n: int = 300) -> float:
    """Microseconds per token_for() once the user's credentials are kept (this process)."""
    from seg_fast.kcd.delegation import Delegator
    from seg_fast.kcd.settings import KcdSettings

    d = Delegator(KcdSettings(enabled=True, keytab=str(realm.gateway_keytab), service_principal=f"{GATEWAY}@{REALM}",
                              target_spn=f"{MAIL}@{REALM}", kerberos_config=str(realm.krb5_conf)))
    await d.token_for(f"alice@{REALM}")
    t0 = time.perf_counter()
    for _ in range(n):
        await d.token_for(f"alice@{REALM}")
    return round((time.perf_counter() - t0) / n * 1e6, 1)


def cpu_seconds(root: int) -> float:
    """User + system CPU of a process and all its descendants (the gateway's control process and worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == pid]
    return total


def wait_listening(port: int, proc) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"seg-fast serve did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400, help="Pings per device")
    ap.add_argument("--devices", type=int, default=4)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="kcd-bench-"))
    out = {"command": "python benchmarks/kcd_bench.py " + " ".join(sys.argv[1:]),
           "devices": args.devices, "requests_per_device": args.requests}
    with running_realm(base / "realm") as realm:
        # For the simulator's acceptor (a child process): the realm, a replay cache in the temp dir.
        os.environ.update(KRB5_CONFIG=str(realm.krb5_conf), KRB5RCACHEDIR=str(base))
        ca = TestCA(base)
        server = ca.server_cert("gateway")
        certs = [ca.client_cert(f"dev{k}", upn="alice@kcd.test", cn=f"dev{k}") for k in range(args.devices)]
        for mode in ("basic", "kcd"):
            sim, sim_port = start_sim(realm.mail_keytab if mode == "kcd" else None)
            port = free_port()
            cfg = base / f"{mode}.toml"
            text = (f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                    f'tls_cert = "{server[0]}"\ntls_key = "{server[1]}"\n')
            if mode == "kcd":
                text += f'client_cert = "required"\nclient_ca = "{ca.ca_file}"\n'
            text += (f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n[admin]\nenabled = false\n'
                     f'[log]\ntransactions = ""\nfile = "{base / (mode + ".log")}"\n'
                     '[policy]\nallow_if_no_policies = true\n')
            if mode == "kcd":
                text += (f'[cert_map]\nrealm = "{REALM}"\n[kcd]\nenabled = true\n'
                         f'keytab = "{realm.gateway_keytab}"\nservice_principal = "{GATEWAY}@{REALM}"\n'
                         f'target_spn = "{MAIL}@{REALM}"\nkerberos_config = "{realm.krb5_conf}"\n')
            cfg.write_text(text)
            proc = start_serve(cfg, base)
            try:
                wait_listening(port, proc)
                kdc_before = realm.kdc_requests()
                cpu_before = cpu_seconds(proc.pid)
                result = trio.run(load, port, ca, certs, args.devices, args.requests, mode == "basic")
                result["gateway_cpu_us_per_request"] = round(
                    (cpu_seconds(proc.pid) - cpu_before) / (result["requests"] + args.devices) * 1e6)
                result["load_average_1m"] = os.getloadavg()[0]
                result["kdc_requests_during_load"] = realm.kdc_requests() - kdc_before
                result["kdc_requests_in_all"] = realm.kdc_requests() if mode == "kcd" else 0
                out[mode] = result
                print(mode, json.dumps(result))
            finally:
                stop_process(proc)
                stop_process(sim)
        out["token_us"] = trio.run(token_cost, realm)
        print("one Negotiate token from a kept credential (thread hand-off included):", out["token_us"], "us")
    dest = REPO / "benchmarks" / "results" / "kcd_bench.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
