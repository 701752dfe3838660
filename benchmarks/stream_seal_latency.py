"""Time to the last byte of a sealed ItemOperations fetch: sealed as it streams vs read whole.

    python benchmarks/stream_seal_latency.py [--sizes 2097152,10485760] [--rounds 7] [--json PATH]

A stand-in mail server (this process, CPU 1) answers ItemOperations with one inline Data
string of a PDF of the asked size (BENCH-PROFILE's 2 MB and 10 MB fetches), Content-Length
framed. Two `seg-fast serve --workers 1` of this tree, each pinned to CPU 0, security on
(the profile's policies: a managed device's PDF is sealed): one as it is (the fetch sealed
while it streams, proxy/sealstream.py), one with ``security.stream_seal = false`` (read
whole, sealed in the transform thread, written whole). Each round fetches once directly from the
stand-in server and once through each gateway, in turn, each on a new plain connection,
timed from the request's write to the answer's last byte (a blocking socket on CPU 1);
every gateway answer is checked (status 200, the envelope opens with the gateway's keys to
the PDF). Printed and written (``--json``): per size and path the median time to the last
byte, the median added to the direct fetch (paired per round), and the gateway's CPU per
fetch (its process tree). The gateways run one after the other, never at once.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from big_answer_cpu import free_port, mail_server, store, tree_cpu, wait_accepting  # noqa: E402

from seg_fast.eas.wbxml import Element as E, encode, scan  # noqa: E402
from seg_fast.sim.corpus import _make_pdf  # noqa: E402
from seg_fast.sim.oracle import Opener  # noqa: E402

REQUEST = encode(E("ItemOperations:ItemOperations", [E("ItemOperations:Fetch", [
    E("ItemOperations:Store", text="Mailbox"), E("AirSyncBase:FileReference", text="ref:1")])]))
PATH = "/Microsoft-Server-ActiveSync?Cmd=ItemOperations&User=u1&DeviceId=DEV1&DeviceType=iPhone"
TREE = Path(__file__).resolve().parent.parent


def fetch_answer(pdf: bytes) -> bytes:
    marker = "\x01DATA\x01"
    doc = encode(E("ItemOperations:ItemOperations", [
        E("ItemOperations:Status", text="1"),
        E("ItemOperations:Response", [E("ItemOperations:Fetch", [
            E("ItemOperations:Status", text="1"), E("AirSyncBase:FileReference", text="ref:1"),
            E("ItemOperations:Properties", [E("AirSyncBase:ContentType", text="application/pdf"),
                                            E("ItemOperations:Data", text=marker)])])])]))
    return doc.replace(marker.encode(), base64.b64encode(pdf))


def fetch(port: int, size: int) -> tuple[float, int, bytes]:
    """(seconds to the last byte, status, body) of one fetch on a new connection."""
    req = (f"POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Basic dTE6c2VjcmV0\r\n"
           f"MS-ASProtocolVersion: 14.1\r\nUser-Agent: Apple-iPhone15C2/2104.100\r\n"
           f"Content-Type: application/vnd.ms-sync.wbxml\r\nX-Size: {size}\r\n"
           f"Content-Length: {len(REQUEST)}\r\nConnection: close\r\n\r\n").encode() + REQUEST
    s = socket.create_connection(("127.0.0.1", port))
    try:
        buf = bytearray()
        t0 = time.perf_counter()
        s.sendall(req)
        while b"\r\n\r\n" not in buf:
            buf += s.recv(1 << 20)
        head, _, _ = bytes(buf).partition(b"\r\n\r\n")
        hl = len(head) + 4
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(b":") for line in head.split(b"\r\n")[1:])}
        chunked = fields.get(b"transfer-encoding") == b"chunked"
        length = int(fields.get(b"content-length", b"-1"))
        while True:
            if chunked and buf.endswith(b"\r\n0\r\n\r\n"):
                break
            if not chunked and len(buf) - hl >= length:
                break
            more = s.recv(1 << 20)
            if not more:
                break
            buf += more
        dt = time.perf_counter() - t0
    finally:
        s.close()
    status = int(head.split(b" ", 2)[1])
    body = bytes(buf[hl:])
    if chunked:
        out, at = [], 0
        while True:
            eol = body.index(b"\r\n", at)
            n = int(body[at:eol], 16)
            if not n:
                break
            out.append(body[eol + 2:eol + 2 + n])
            at = eol + 4 + n
        body = b"".join(out)
    return dt, status, body


def start(tmp: Path, up: int, stream_seal: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = tmp / f"gateway-{port}.toml"
    cfg.write_text('workers = 1\n' f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[upstream]\nurl = "http://127.0.0.1:{up}"\n' "[admin]\nenabled = false\n"
                   f'[policy]\nsqlite_path = "{tmp}/policy.db"\n'
                   f'[security]\nmaster_key_file = "{tmp}/master.key"\nkey_state_file = "{tmp}/keys.json"\n'
                   f"stream_seal = {'true' if stream_seal else 'false'}\n")
    env = dict(os.environ, PYTHONPATH=str(TREE / "src"), SEG_FAST_STATE_DIR=str(tmp / f"state-{port}"))
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    wait_accepting(port, proc)
    return proc, port


def check(opener, body: bytes, pdf: bytes) -> None:
    (sp,) = scan(body, ["ItemOperations:Data"])
    blob = base64.b64decode(body[sp.offset:sp.offset + sp.length], validate=True)
    if opener("DEV1", "u1", blob) != pdf:
        raise SystemExit("a sealed answer did not open to the file")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2097152,10485760")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {1})
    sizes = [int(s) for s in args.sizes.split(",")]
    pdfs = {n: _make_pdf(random.Random(n), n) for n in sizes}
    answers = {n: fetch_answer(p) for n, p in pdfs.items()}
    up = mail_server(lambda fields: answers[int(fields[b"x-size"])])    # the request's X-Size picks it
    tmp = Path(tempfile.mkdtemp(prefix="seg-stream-seal-"))
    store(tmp)
    paths = {"whole": False, "stream": True}
    gws = {}
    try:
        for name, on in paths.items():
            gws[name] = start(tmp, up, on)
        opener = Opener(str(tmp / "master.key"), str(tmp / "keys.json"))
        times = {n: {p: [] for p in ("direct", *paths)} for n in sizes}
        cpu = {n: {p: 0.0 for p in paths} for n in sizes}
        for n in sizes:
            for name, (_proc, port) in gws.items():      # warm: the key, the thread, buffers
                for _ in range(2):
                    _dt, status, body = fetch(port, n)
                    if status != 200:
                        raise SystemExit(f"{name}: {status}")
                    check(opener, body, pdfs[n])
            for r in range(args.rounds):
                dt, status, _ = fetch(up, n)
                times[n]["direct"].append(dt)
                order = list(gws.items()) if r % 2 == 0 else list(reversed(gws.items()))
                for name, (proc, port) in order:
                    c0 = tree_cpu(proc.pid)
                    dt, status, body = fetch(port, n)
                    cpu[n][name] += tree_cpu(proc.pid) - c0
                    if status != 200:
                        raise SystemExit(f"{name}: {status}")
                    check(opener, body, pdfs[n])
                    times[n][name].append(dt)
        out = {"rounds": args.rounds, "sizes": {}}
        for n in sizes:
            t = times[n]
            row = {"direct_ms": round(statistics.median(t["direct"]) * 1000, 2)}
            for p in paths:
                row[f"{p}_ms"] = round(statistics.median(t[p]) * 1000, 2)
                row[f"{p}_added_ms"] = round(statistics.median(
                    [a - d for a, d in zip(t[p], t["direct"])]) * 1000, 2)
                row[f"{p}_cpu_ms_per_fetch"] = round(cpu[n][p] / args.rounds * 1000, 1)
                row[f"{p}_runs_ms"] = [round(x * 1000, 2) for x in t[p]]
            row["direct_runs_ms"] = [round(x * 1000, 2) for x in t["direct"]]
            out["sizes"][str(n)] = row
            print(f"{n >> 20:3} MB  direct {row['direct_ms']:7.1f} ms   whole {row['whole_ms']:7.1f} "
                  f"(+{row['whole_added_ms']:.1f}, CPU {row['whole_cpu_ms_per_fetch']:.1f})   stream "
                  f"{row['stream_ms']:7.1f} (+{row['stream_added_ms']:.1f}, CPU {row['stream_cpu_ms_per_fetch']:.1f})",
                  flush=True)
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if not kk.endswith("runs_ms")}
                          for k, v in out["sizes"].items()}))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
    finally:
        for proc, _port in gws.values():
            proc.terminate()
            proc.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
