"""A running `seg-fast serve` lets a device's socket hold up to sockio.NOTSENT_LOWAT unsent.

trio's SocketStream sets TCP_NOTSENT_LOWAT to 16 KiB, so the kernel took at most 16 KiB
past the device's window and the worker was woken to refill it every 8-16 KiB the device
read. The gateway now sets NOTSENT_LOWAT (1 MiB): a big answer to a device that reads
slowly needs a few wake-ups, and one that stops reading still has at most that much of its
answer in the kernel (the rest stays in the worker's account, max_unsent_bytes). Seen from
outside: the gateway-side socket's send queue (/proc/net/tcp) while the device reads
nothing settles above 256 KiB (trio's setting: under ~80 KiB) and at most NOTSENT_LOWAT
plus one segment (the system's own setting: the whole send buffer, several MB on loopback).
"""
from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec

from processes import REPO, start_serve, stop_process, wait_listening
from redis_server import free_port
from seg_fast.proxy.sockio import NOTSENT_LOWAT
from seg_fast.sim.sizing import policy_file
from seg_fast.testing.rawhttp import requests

ANSWER = 4 * 1024 * 1024              # more than NOTSENT_LOWAT and the device's window together
SEGMENT = 128 * 1024                  # what one write may add past the check (a loopback skb, 64 KiB)


def _mail_server() -> tuple[socket.socket, list[dict]]:
    """Answers every request on its connection with ANSWER bytes (Content-Length)."""
    ls = socket.create_server(("127.0.0.1", 0))
    heads: list[dict] = []

    def serve(conn):
        with conn:
            for fields in requests(conn):
                heads.append(fields)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
                             b"Content-Length: %d\r\n\r\n" % ANSWER + b"x" * ANSWER)

    def accept():
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return ls, heads


def _send_queue(gw_port: int, client_port: int) -> int | None:
    """The gateway-side socket's send queue (bytes written, not yet acknowledged)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == gw_port and int(f[2].split(":")[1], 16) == client_port:
            return int(f[4].split(":")[0], 16)
    return None


def test_a_device_that_reads_nothing_gets_notsent_lowat_in_the_kernel(tmp_path):
    ls, heads = _mail_server()
    port = free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{ls.getsockname()[1]}"\n'
        f'[admin]\nenabled = false\n[log]\ntransactions = ""\n'
        f'[timeouts]\ndevice_write = 60\n')
    # The sizing run's "security off" policies: access decided, answers passed untouched.
    policies = tmp_path / "policies.json"
    policies.write_bytes(msgspec.json.encode(policy_file("off", 0)))
    subprocess.run([sys.executable, "-m", "seg_fast", "policy", "--config", str(cfg), "load", str(policies)],
                   check=True, cwd=tmp_path, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(REPO / "src"), "SEG_FAST_STATE_DIR": str(tmp_path / "state")})
    proc = start_serve(cfg, tmp_path)
    dev = socket.socket()
    try:
        wait_listening(port, proc)
        dev.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # a small window, never read
        dev.connect(("127.0.0.1", port))
        auth = base64.b64encode(b"u1:secret").decode()
        dev.sendall((f"POST /Microsoft-Server-ActiveSync?Cmd=ItemOperations&User=u1&DeviceId=LOWAT1"
                     f"&DeviceType=iPhone HTTP/1.1\r\nHost: gw\r\nAuthorization: Basic {auth}\r\n"
                     f"MS-ASProtocolVersion: 14.1\r\nUser-Agent: Apple-iPhone/1.0\r\n"
                     f"Content-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: 0\r\n\r\n").encode())
        # The queue settles once the kernel takes no more: the same over a second of polls.
        seen: list[int] = []
        end = time.monotonic() + 60
        while time.monotonic() < end:
            q = _send_queue(port, dev.getsockname()[1])
            seen.append(q or 0)
            if len(seen) >= 20 and seen[-1] > 0 and len(set(seen[-20:])) == 1:
                break
            time.sleep(0.05)
        assert heads, "the gateway did not forward the request"
        assert len(seen) >= 20 and len(set(seen[-20:])) == 1, f"send queue did not settle: {seen[-20:]}"
        assert 256 * 1024 < seen[-1] <= NOTSENT_LOWAT + SEGMENT, seen[-1]
        # The device then reads it all: nothing lost, nothing added.
        dev.settimeout(30)
        got = b""
        while b"\r\n\r\n" not in got:
            got += dev.recv(65536)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: %d" % ANSWER in head.lower()
        n = len(body)
        while n < ANSWER:
            chunk = dev.recv(1 << 20)
            assert chunk, "the gateway closed before the whole answer"
            assert chunk == b"x" * len(chunk)
            n += len(chunk)
        assert n == ANSWER
        assert proc.poll() is None
    finally:
        dev.close()
        stop_process(proc)
        ls.close()
