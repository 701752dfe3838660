"""Instructions the device leg's server side spends per resumed TLS 1.3 connection, and where.

valgrind's callgrind counts user-space instructions (the kernel's share is not in them):
the same on a busy machine as on a quiet one, which this shared host's CPU time is not.
A server process with the gateway's own context (``gateway.server_tls_context``, a trustme
ECDSA certificate) accepts loopback connections from a forked client that resumes the
last session each time; each connection is a handshake, one byte each way, a close. It
runs twice, with N and 2N connections, and the difference over N is the cost of one
connection without the start-up. Two server set-ups: OpenSSL's default tickets, and
``num_tickets = 1``.

    python benchmarks/handshake_instructions.py            # ~3 min; results/handshake_instructions.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARM = 50
# exported OpenSSL functions whose inclusive count is worth a line (per connection)
PARTS = ["SSL_do_handshake", "EVP_PKEY_keygen", "EVP_PKEY_derive", "EVP_KDF_derive", "HMAC_Init_ex",
         "SSL_read_ex", "SSL_write_ex", "SSL_new", "SSL_free"]


def serve(n: int, tickets: int | None) -> None:
    """The measured process: N + WARM resumed connections through the gateway's context."""
    sys.path.insert(0, str(HERE.parent / "src"))
    import trustme

    from seg_fast.proxy.gateway import server_tls_context

    ca = trustme.CA()
    cert = ca.issue_cert("gw.test")
    with tempfile.TemporaryDirectory() as d:
        pem = Path(d) / "gw.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
        sctx = server_tls_context(str(pem), str(pem))
    if tickets is not None:
        sctx.num_tickets = tickets
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    port = ls.getsockname()[1]
    if os.fork() == 0:                      # the client: not what is measured (its own output file)
        ls.close()
        session = None
        for _ in range(n + WARM):
            s = cctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="gw.test",
                                 session=session)
            s.sendall(b"x")
            s.recv(1)
            session = s.session
            s.close()
        os._exit(0)
    reused = 0
    for _ in range(n + WARM):
        c, _ = ls.accept()
        s = sctx.wrap_socket(c, server_side=True)
        s.recv(1)
        s.sendall(b"y")
        reused += s.session_reused
        s.close()
    os.wait()
    print(json.dumps({"reused": reused, "connections": n + WARM}))


def counted(n: int, tickets: int | None, outdir: Path) -> dict:
    """callgrind's inclusive counts of the server process for N connections."""
    out = outdir / f"cg.{n}.{tickets}.%p"
    run = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                            __file__, "--serve", str(n)] + ([] if tickets is None else ["--tickets", str(tickets)]),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout, _ = run.communicate()
    if run.returncode:
        raise SystemExit(f"valgrind's run of {n} connections failed (exit {run.returncode})")
    seen = json.loads(stdout.strip().splitlines()[-1])
    server = outdir / f"cg.{n}.{tickets}.{run.pid}"      # valgrind runs python in its own pid: the server
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(server)], capture_output=True,
                          text=True, check=True).stdout
    counts = {"total": int(re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", text).group(1).replace(",", ""))}
    for name in PARTS:
        m = re.search(r"^\s*([\d,]+) \([^)]*\)\s+\?\?\?:" + name + r" \[", text, re.M)
        counts[name] = int(m.group(1).replace(",", "")) if m else 0
    return {"counts": counts, "reused": seen["reused"], "connections": seen["connections"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=200, help="N (the second run makes 2N)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tickets", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.tickets)
        return
    n = args.connections
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for label, tickets in (("default_tickets", None), ("num_tickets_1", 1)):
            one, two = counted(n, tickets, Path(d)), counted(2 * n, tickets, Path(d))
            per = {k: round((two["counts"][k] - one["counts"][k]) / n) for k in one["counts"]}
            rows[label] = {"instructions_per_connection": per,
                           "resumed": [one["reused"], two["reused"]], "connections": [one["connections"],
                                                                                  two["connections"]]}
            print(f"{label}: {per['total']:,} instructions per resumed connection (server, user space); "
                  f"SSL_do_handshake {per['SSL_do_handshake']:,}: X25519 keygen {per['EVP_PKEY_keygen']:,}, "
                  f"derive {per['EVP_PKEY_derive']:,}, key schedule (HKDF) {per['EVP_KDF_derive']:,}; "
                  f"resumed {one['reused']}/{one['connections']} and {two['reused']}/{two['connections']}")
    commit = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "openssl": ssl.OPENSSL_VERSION, "python": sys.version.split()[0],
              "tool": "valgrind --tool=callgrind (user-space instructions), (count(2N) - count(N)) / N",
              "connections": n, "rows": rows}
    path = HERE / "results" / "handshake_instructions.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
