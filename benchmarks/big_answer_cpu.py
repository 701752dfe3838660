"""Gateway CPU per large email-security answer, through a running `seg-fast serve`.

    python benchmarks/big_answer_cpu.py [--base TREE] [--rounds 3] [--answers 15] [--json PATH]

A stand-in mail server answers every Sync with BENCH-PROFILE's largest case: a Type 4
(MIME) body carrying a 10 MB PDF (corpus message), which the profile's policy seals for a
managed device. `seg-fast serve --workers 1` (pinned to CPU 0) carries ``--answers`` of
them one after the other (each checked: 200 and the sealed size); the CPU of the serve's
process tree over those answers, per answer, is printed: the whole gateway's share of a
large answer (upstream read, transform in its thread, device write), not the transform
alone (benchmarks/transform_steps.py). ``--base TREE``: another checkout (built), run
alternately with this one, for an A/B; medians of ``--rounds``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))
from transform_steps import find_message, policy, sync_answer  # noqa: E402

from seg_fast.eas.wbxml import Element as E, encode  # noqa: E402
from seg_fast.policy.model import DeviceRecord, PolicyDocument  # noqa: E402
from seg_fast.policy.store import SqliteStore  # noqa: E402
from seg_fast.sim.corpus import Corpus  # noqa: E402
from seg_fast.testing.rawhttp import requests  # noqa: E402

REQUEST = encode(E("AirSync:Sync", [E("AirSync:Collections", [E("AirSync:Collection", [
    E("AirSync:SyncKey", text="1"), E("AirSync:CollectionId", text="1")])])]))
HEADERS = {"Authorization": "Basic dTE6c2VjcmV0", "MS-ASProtocolVersion": "14.1",
           "User-Agent": "Apple-iPhone15C2/2104.100", "Content-Type": "application/vnd.ms-sync.wbxml"}
PATH = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=u1&DeviceId=DEV1&DeviceType=iPhone"


def mail_server(answer_for: Callable[[dict[bytes, bytes]], bytes]) -> int:
    """A keep-alive HTTP/1.1 stand-in mail server, a thread per connection: each request
    answered 200 with ``answer_for(its header fields)`` as the WBXML body; its port."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)

    def serve(conn):
        with conn:
            for fields in requests(conn):
                body = answer_for(fields)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def accept():
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return lsock.getsockname()[1]


def store(tmp: Path) -> None:
    async def fill():
        s = SqliteStore(tmp / "policy.db")
        await s.open()
        await s.replace_all(PolicyDocument(security=policy()), [DeviceRecord(
            device_id="DEV1", user="u1", managed=True, compliant=True, compromised=False, encrypted=True,
            platform="Apple", model="iPhone 15", os="17.4", last_checkin=time.time() - 60, eas_profile=True)])
        await s.aclose()
    trio.run(fill)


def tree_stat(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of ``pid`` and its children (the serve and its worker)."""
    user = system = faults = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(name) == pid or int(fields[1]) == pid:
            faults += int(fields[7])
            user += int(fields[11])
            system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick, faults


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the serve and its worker)."""
    user, system, _ = tree_stat(pid)
    return user + system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_accepting(port: int, proc: subprocess.Popen, what: str = "serve", log: Path | None = None) -> None:
    """Until 127.0.0.1:``port`` accepts (30 s at most); SystemExit if ``proc`` exits first
    or the time runs out (``log``: a file whose tail the message carries)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{what} did not start" + (f": {log.read_text()[-2000:]}" if log else ""))
            time.sleep(0.1)


def one_tree(tree: Path, up: int, answers: int, min_size: int) -> float:
    """ms of gateway CPU per answer, one serve of ``tree``."""
    tmp = Path(tempfile.mkdtemp(prefix="seg-big-"))
    store(tmp)
    port = free_port()
    cfg = tmp / "gateway.toml"
    cfg.write_text('workers = 1\n' f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[upstream]\nurl = "http://127.0.0.1:{up}"\n' "[admin]\nenabled = false\n"
                   f'[policy]\nsqlite_path = "{tmp}/policy.db"\n'
                   f'[security]\nmaster_key_file = "{tmp}/master.key"\nkey_state_file = "{tmp}/keys.json"\n')
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), SEG_FAST_STATE_DIR=str(tmp / "state"))
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        wait_accepting(port, proc, f"serve of {tree}")

        def ask():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", PATH, REQUEST, HEADERS)
            r = conn.getresponse()
            body = r.read()
            conn.close()
            if r.status != 200 or len(body) < min_size:
                raise SystemExit(f"{tree}: answer {r.status}, {len(body)} bytes")

        for _ in range(3):            # warm: the master key, the thread, its scratch buffers
            ask()
        c0 = tree_cpu(proc.pid)
        for _ in range(answers):
            ask()
        return (tree_cpu(proc.pid) - c0) / answers * 1000
    finally:
        proc.terminate()
        proc.wait(15)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answers", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    m = find_message(Corpus(1), 10 * 1024 * 1024, "pdf")
    answer = sync_answer(m.mime.decode(), "4", m.attachments[0][0])
    up = mail_server(lambda _fields: answer)
    trees = {"this": Path(__file__).resolve().parent.parent}
    if args.base:
        trees = {"base": args.base.resolve(), **trees}
    runs: dict[str, list] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(one_tree(tree, up, args.answers, len(answer) // 2))
            print(f"{name:5} {runs[name][-1]:7.1f} ms of gateway CPU per answer", flush=True)
    out = {"answer_bytes": len(answer), "answers_per_run": args.answers,
           **{k: {"runs_ms": [round(x, 2) for x in v], "median_ms": round(statistics.median(v), 2)}
              for k, v in runs.items()}}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
