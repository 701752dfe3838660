"""Slow and greedy clients against one gateway worker: do normal devices still get answers?

    python benchmarks/slow_clients.py [--slowloris 10000] [--slow-readers 300] [--devices 20]
                                      [--warmup 10] [--seconds 60]

One `seg-fast serve` worker (the demo's policies loaded: email security on, so the
2.8 MB ItemOperations answer takes the buffered, transformed path) in front of the
mailbox simulator, with its default limits and timeouts. Against it, sustained
for the whole measurement (a connection the gateway cuts is opened again):

- slowloris: N connections, each a request head trickled one byte every
  --trickle seconds (spread over 127.0.1.x source addresses, under
  limits.max_connections_per_address);
- slow readers: M connections, each asking for the 2 MB attachment (about 2.8 MB
  of WBXML) and never reading a byte (SO_RCVBUF 4 KB); cut or refused, it asks
  again a second later.

Meanwhile --devices normal devices (127.0.0.1, in a process of their own so the
load generator cannot delay them) send FolderSync requests, every fifth on a new
connection. Printed and written to benchmarks/results/slow_clients.json:
their p50/p99 latency and failures before (warm-up) and during the attack, the
worker's RSS (before, peak VmHWM, end) and descriptors, the gateway's incident counts
from its log, and every limit and timeout in force.
"""
from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from seg_fast.config import load_config  # noqa: E402
from seg_fast.oslimits import raise_nofile_limit  # noqa: E402
from seg_fast.proxy.forked import worker_pids  # noqa: E402
from seg_fast.sim.client import EasClient  # noqa: E402
from seg_fast.sim.tree import E, encode, text  # noqa: E402

EAS = "/Microsoft-Server-ActiveSync"
PASSWORD = "secret"
SEED, BIG_MESSAGE = 1, 11             # Corpus(1).message(11): a 2 MB docx (allowed for unmanaged devices)
PER_SOURCE = 500                      # slowloris connections per source address


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch_request() -> bytes:
    body = encode(E("ItemOperations:ItemOperations", E(
        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
        E("AirSyncBase:FileReference", f"1:{BIG_MESSAGE + 1}:0"))))
    cred = base64.b64encode(f"reader:{PASSWORD}".encode()).decode()
    head = (f"POST {EAS}?Cmd=ItemOperations&User=reader&DeviceId=SLOWREAD&DeviceType=iPhone HTTP/1.1\r\n"
            f"Host: gw\r\nAuthorization: Basic {cred}\r\nMS-ASProtocolVersion: 14.1\r\n"
            f"User-Agent: Apple-iPhone/1.0\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def _read_all(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(1 << 20):
            out += chunk
        return out


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


class Stats:
    """The attack's own counts (its load generator's view)."""

    def __init__(self):
        self.slowloris_open = 0
        self.slowloris_cut = 0
        self.readers_open = 0
        self.readers_cut = 0


async def _device(port: int, i: int, records: list, stop: trio.Event) -> None:
    """A normal device: FolderSync, every fifth request on a new connection.
    Records (wall-clock end, latency in s or None, error)."""
    n = 0
    c = None
    while not stop.is_set():
        if c is None or n % 5 == 0:
            if c is not None:
                await c.aclose()
            c = EasClient("127.0.0.1", port, f"normal{i}", PASSWORD, f"NORMAL{i}", device_type="iPhone",
                          user_agent="Apple-iPhone/1.0")
        t0 = time.monotonic()
        try:
            with trio.fail_after(60):
                r = await c.request("FolderSync", E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
            if r.status != 200 or text(r.doc, "FolderHierarchy:Status") != "1":
                records.append((time.time(), None, f"status {r.status}"))
            else:
                records.append((time.time(), time.monotonic() - t0, ""))
        except trio.TooSlowError:
            records.append((time.time(), None, "no answer within 60 s"))
            await c.aclose()
            c = None
        except Exception as exc:      # noqa: BLE001 - counted; the device carries on
            records.append((time.time(), None, type(exc).__name__))
            await c.aclose()
            c = None
        n += 1
        await trio.sleep(0.2)
    if c is not None:
        await c.aclose()


def _devices_process(port: int, n: int, stop_file: str, out: str) -> None:
    """The normal devices, in their own process: the attack's load generator cannot delay them."""
    records: list = []

    async def main():
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(_device, port, i, records, stop)
            while not os.path.exists(stop_file):
                await trio.sleep(0.2)
            stop.set()
            nursery.cancel_scope.cancel()

    trio.run(main)
    Path(out).write_text(json.dumps(records))


def _window(records: list, start: float, end: float) -> dict:
    lat = [r[1] for r in records if start <= r[0] < end and r[1] is not None]
    failures: dict[str, int] = {}
    for r in records:
        if start <= r[0] < end and r[1] is None:
            failures[r[2]] = failures.get(r[2], 0) + 1
    return {"requests": len(lat), "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
            "max_ms": _pct(lat, 1.0), "failures": failures}


async def _slowloris(port: int, source: str, trickle: float, stats: Stats, limit: trio.Semaphore) -> None:
    head = b"GET " + EAS.encode() + b"?Cmd=Sync HTTP/1.1\r\nHost: gw\r\nX-Slow: "
    while True:
        sock = trio.socket.socket()
        try:
            await sock.bind((source, 0))
            async with limit:
                await sock.connect(("127.0.0.1", port))
            await sock.send(head)
            stats.slowloris_open += 1
            try:
                while True:
                    # Wait the trickle interval, or until the gateway closes (then reconnect).
                    with trio.move_on_after(trickle):
                        if not await sock.recv(4096):
                            break
                        continue
                    await sock.send(b"s")
            finally:
                stats.slowloris_open -= 1
                stats.slowloris_cut += 1
        except OSError:
            await trio.sleep(1)
        finally:
            sock.close()


async def _slow_reader(port: int, request: bytes, stats: Stats) -> None:
    while True:
        sock = trio.socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            await sock.send(request)
            stats.readers_open += 1
            try:
                # Never read; learn the gateway gave up from the socket's state (it resets).
                while True:
                    await trio.sleep(1)
                    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
                    if info[0] != 1:          # tcpi_state: not ESTABLISHED any more
                        break
            finally:
                stats.readers_open -= 1
                stats.readers_cut += 1
        except OSError:
            pass
        finally:
            sock.close()
        await trio.sleep(1)           # then ask again


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slowloris", type=int, default=10_000)
    ap.add_argument("--slow-readers", type=int, default=300)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement under attack")
    ap.add_argument("--trickle", type=float, default=10.0, help="seconds between slowloris bytes")
    ap.add_argument("--nice", type=int, default=0,
                    help="priority of the worker and the simulator (e.g. -10 on a shared machine; root)")
    ap.add_argument("--out", default=str(HERE / "results" / "slow_clients.json"))
    args = ap.parse_args()
    nofile = raise_nofile_limit()
    need = args.slowloris + args.slow_readers + args.devices * 2 + 200
    if need > nofile:
        sys.exit(f"need {need} descriptors for this load, RLIMIT_NOFILE is {nofile}")

    tmp = Path(tempfile.mkdtemp(prefix="seg-slow-clients-"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SEG_FAST_STATE_DIR": str(tmp / "state")}
    sim = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--seed", str(SEED),
                            "--initial", str(BIG_MESSAGE + 1), "--no-provisioning", "--password", PASSWORD],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    gw = None
    try:
        sim_port = json.loads(sim.stdout.readline())["sim_port"]
        port = _free_port()
        cfg = tmp / "gw.toml"
        cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                       f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n'
                       f'[admin]\nenabled = false\n[log]\ntransactions = ""\n')
        subprocess.run([sys.executable, "-m", "seg_fast", "policy", "--config", str(cfg), "load",
                        str(REPO / "src" / "seg_fast" / "demo_policies.json")], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        config = load_config(cfg, env={})
        gw = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp)
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(line.decode("utf-8", "replace") for line in gw.stderr),
                         daemon=True).start()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        # The reader's mailbox must be the simulator's first (its item i+1 is corpus message i).
        answer = _read_all(port, _fetch_request())
        if not answer.startswith(b"HTTP/1.1 200") or len(answer) < 2_700_000:
            sys.exit(f"the fetch answer is not the 2.8 MB attachment: {answer[:200]!r} ({len(answer)} bytes)")
        print(f"slow readers ask for a {len(answer):,}-byte answer", flush=True)
        workers = worker_pids(gw.pid)
        assert len(workers) == 1, workers
        worker = workers[0]
        if args.nice:
            for pid in (worker, sim.pid):
                os.setpriority(os.PRIO_PROCESS, pid, args.nice)
        devices_out, stop_file = str(tmp / "devices.json"), str(tmp / "stop")
        devices = multiprocessing.get_context("fork").Process(
            target=_devices_process, args=(port, args.devices, stop_file, devices_out), daemon=True)
        devices.start()
        if args.nice:
            os.setpriority(os.PRIO_PROCESS, devices.pid, args.nice)
        result = trio.run(_run, args, port, worker, devices_out, stop_file)
        devices.join(30)
        result["worker_restarted"] = worker_pids(gw.pid) != [worker]
        counts: dict[str, int] = {}
        lag_max = 0.0
        for line in log:
            if line.startswith("{") and '"incident"' in line:
                rec = json.loads(line)
                lag_max = max(lag_max, rec.get("lag_ms", 0.0))
                # The log holds one line per kind per second; the count of lines not written rides along.
                counts[rec["incident"]] = counts.get(rec["incident"], 0) + 1 + rec.get("not_logged_since_last", 0)
        result["incidents_logged"] = counts
        result["loop_lag_max_ms_logged"] = lag_max
        result["machine"] = {"cpus": os.cpu_count(), "load_average_end": os.getloadavg(),
                             "cpu_pressure_end": Path("/proc/pressure/cpu").read_text().split("\n")[0]
                             if Path("/proc/pressure/cpu").exists() else None}
        t, lim = config.timeouts, config.limits
        result["settings"] = {
            "timeouts": {k: getattr(t, k) for k in ("request_head", "request_body", "device_write",
                                                    "idle_keepalive", "upstream_read")},
            "limits": {k: getattr(lim, k) for k in ("max_header_bytes", "max_connections",
                                                    "max_connections_per_address", "min_body_rate",
                                                    "min_send_rate")},
            "security.max_transform_bytes": config.security.max_transform_bytes,
            "upstream.pool_size": config.upstream.pool_size,
        }
        result["args"] = vars(args)
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                          capture_output=True, text=True).stdout.strip()
        print(json.dumps({k: v for k, v in result.items() if k != "memory_samples"}, indent=2))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {out}")
        return 1 if result["worker_restarted"] else 0
    finally:
        for proc in (gw, sim):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def _run(args, port: int, worker: int, devices_out: str, stop_file: str) -> dict:
    mem: list[dict] = []
    attack = Stats()
    t_start = trio.current_time()

    async def sample():
        while True:
            mem.append({"t": round(trio.current_time() - t_start, 1), **_proc_status(worker),
                        "slowloris_open": attack.slowloris_open, "readers_open": attack.readers_open})
            await trio.sleep(1)

    result: dict = {}
    w0, cpu0 = time.time(), _cpu_seconds(worker)
    async with trio.open_nursery() as sampler:
        sampler.start_soon(sample)
        await trio.sleep(args.warmup)
        phases = {"before": (w0, time.time())}
        result["before"] = {"worker_cpu_pct": round(100 * (_cpu_seconds(worker) - cpu0) / (time.time() - w0), 1),
                            **{k: v for k, v in _proc_status(worker).items() if k != "VmHWM"}}
        async with trio.open_nursery() as attackers:
            connecting = trio.Semaphore(200)
            for i in range(args.slowloris):
                source = f"127.0.1.{1 + i // PER_SOURCE}"
                attackers.start_soon(_slowloris, port, source, args.trickle, attack, connecting)
            request = _fetch_request()
            for _ in range(args.slow_readers):
                attackers.start_soon(_slow_reader, port, request, attack)
            # Ramp: until the attack is in place (or 60 s).
            ramp_start = time.time()
            while (attack.slowloris_open < 0.95 * args.slowloris or attack.readers_open < 0.95 * args.slow_readers) \
                    and time.time() - ramp_start < 60:
                await trio.sleep(0.5)
            phases["ramp"] = (ramp_start, time.time())
            print(f"attack in place after {time.time() - ramp_start:.1f} s: {attack.slowloris_open} slowloris, "
                  f"{attack.readers_open} slow readers", flush=True)
            cut0 = (attack.slowloris_cut, attack.readers_cut)
            t0, cpu0, load0 = time.time(), _cpu_seconds(worker), _cpu_seconds(os.getpid())
            peak_open = [0, 0]
            while time.time() - t0 < args.seconds:
                await trio.sleep(1)
                peak_open = [max(peak_open[0], attack.slowloris_open), max(peak_open[1], attack.readers_open)]
                print(f"  t={time.time() - t0:5.0f}s slowloris open {attack.slowloris_open} "
                      f"readers open {attack.readers_open} worker {_proc_status(worker)}", flush=True)
            wall = time.time() - t0
            phases["during"] = (t0, time.time())
            status = _proc_status(worker)
            result["during"] = {
                "seconds": args.seconds,
                "worker_cpu_pct": round(100 * (_cpu_seconds(worker) - cpu0) / wall, 1),
                "load_generator_cpu_pct": round(100 * (_cpu_seconds(os.getpid()) - load0) / wall, 1),
                "slowloris_open_peak": peak_open[0], "slow_readers_open_peak": peak_open[1],
                "slowloris_cut": attack.slowloris_cut - cut0[0], "slow_readers_cut": attack.readers_cut - cut0[1],
                "worker_rss_end": status.get("VmRSS"), "worker_rss_peak": status.get("VmHWM"),
                "worker_fds_end": status.get("fds")}
            attackers.cancel_scope.cancel()
        sampler.cancel_scope.cancel()
    Path(stop_file).touch()
    end = time.monotonic() + 120
    while not Path(devices_out).exists() and time.monotonic() < end:
        await trio.sleep(0.2)
    records = json.loads(Path(devices_out).read_text())
    for name, (a, b) in phases.items():
        result.setdefault(name, {}).update({"normal_devices": _window(records, a, b)})
    result["memory_samples"] = mem
    return result


if __name__ == "__main__":
    sys.exit(main())
