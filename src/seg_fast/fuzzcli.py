"""`seg-fast fuzz`: fuzz an EAS endpoint with the seg_fast.testing kit, or replay a failure.

    seg-fast fuzz --target http://127.0.0.1:8443/Microsoft-Server-ActiveSync \\
        [--user U --password P] [--commands Sync,Ping] [--version 16.1] \\
        [--max-examples N] [--seed S] [--out DIR]
    seg-fast fuzz --replay DIR/http-5xx-Sync-0123456789.json [--target URL]

Only loopback targets unless --i-own-this-server: a fuzzer is an attack tool.
Exit status: 0 no failure, 1 failures found (or the replayed one still fails), 2 usage.
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

EXTRA_HINT = "seg-fast fuzz needs hypothesis: install the 'fuzz' extra, pip install 'seg-fast[fuzz]'"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="seg-fast fuzz", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send generated and mutated ActiveSync requests to an EAS endpoint (a server or a "
                    "gateway), classify the answers and write each failure as a replayable JSON file.",
        epilog="failures: HTTP 5xx (but 501, and 503 with Retry-After), connection reset, no answer within "
               "--deadline, malformed WBXML in a 200 answer, a wrong answer root, a Status value MS-ASCMD does "
               "not define for the command and version. See docs/fuzzing.md.")
    ap.add_argument("--target", metavar="URL", help="http(s)://HOST:PORT[/PATH] (default path "
                    "/Microsoft-Server-ActiveSync)")
    ap.add_argument("--user", default="fuzz", help="Basic auth user (default: fuzz)")
    ap.add_argument("--password", default="secret", help="Basic auth password (default: secret)")
    ap.add_argument("--device-id", default="SEGFASTFUZZ1", help="DeviceId to speak as (default: SEGFASTFUZZ1)")
    ap.add_argument("--commands", metavar="LIST", help="comma-separated commands (default: all the version has)")
    ap.add_argument("--version", metavar="V", default="16.1",
                    help="protocol version(s), comma-separated, or 'all' (12.1,14.0,14.1,16.0,16.1); default 16.1")
    ap.add_argument("--max-examples", type=int, default=200, metavar="N", help="examples to generate (default 200)")
    ap.add_argument("--seed", type=int, metavar="S", help="hypothesis seed (default: random)")
    ap.add_argument("--out", type=Path, default=Path("fuzz-failures"), metavar="DIR",
                    help="where failure files go (default: ./fuzz-failures)")
    ap.add_argument("--mutate", type=float, default=0.5, metavar="P",
                    help="share of requests mutated (0: only valid requests, 1: all mutated; default 0.5)")
    ap.add_argument("--deadline", type=float, default=10.0, metavar="SEC",
                    help="an answer later than this is a hang (default 10)")
    ap.add_argument("--park-wait", type=float, default=0.5, metavar="SEC",
                    help="how long to wait on a long poll (Ping, Sync with Wait) before moving on (default 0.5)")
    ap.add_argument("--ca", metavar="FILE", help="PEM CA bundle to verify an https target with (default: the system's)")
    ap.add_argument("--i-own-this-server", action="store_true",
                    help="allow a target that is not on this machine (only servers you are allowed to attack)")
    ap.add_argument("--replay", type=Path, metavar="FILE", help="send a failure file's request again")
    ap.add_argument("--verbatim", action="store_true",
                    help="with --replay: send the recorded bytes as they were (default: rebuild with a fresh "
                         "policy key)")
    return ap


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def cli(argv: list[str]) -> int:
    ap = parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not args.target and not args.replay:
        print("seg-fast fuzz: give --target URL (or --replay FILE)", file=sys.stderr)
        return 2
    failure = None
    if args.replay:
        try:
            failure = _load(args.replay)
        except ImportError:
            print(EXTRA_HINT, file=sys.stderr)
            return 2
        except (OSError, ValueError) as exc:
            print(f"seg-fast fuzz: {args.replay}: not a failure file ({exc})", file=sys.stderr)
            return 2
    url = args.target or failure.target
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    # Checked before anything is imported or sent: a fuzzer is an attack tool.
    if not args.i_own_this_server and not is_loopback(host):
        print(f"seg-fast fuzz: {host or url!r} is not a loopback address; fuzzing another machine needs "
              "--i-own-this-server (only servers you own or may test)", file=sys.stderr)
        return 2
    try:
        import trio

        from seg_fast.testing import runner, spec
    except ImportError as exc:
        if "hypothesis" in str(exc):
            print(EXTRA_HINT, file=sys.stderr)
            return 2
        raise
    try:
        target = runner.Target.parse(url)
    except ValueError as exc:
        print(f"seg-fast fuzz: {exc}", file=sys.stderr)
        return 2
    device = runner.Device(user=args.user, password=args.password, device_id=args.device_id)
    if failure is not None:
        return _replay(trio, runner, failure, target, device, args)

    versions = spec.VERSIONS if args.version == "all" else tuple(v.strip() for v in args.version.split(","))
    bad = [v for v in versions if v not in spec.VERSIONS]
    if bad:
        print(f"seg-fast fuzz: unknown --version {bad[0]!r} (have: {', '.join(spec.VERSIONS)}, all)", file=sys.stderr)
        return 2
    commands = tuple(c.strip() for c in args.commands.split(",")) if args.commands else spec.COMMANDS
    bad = [c for c in commands if c not in spec.COMMANDS]
    if bad:
        print(f"seg-fast fuzz: unknown command {bad[0]!r} (have: {', '.join(spec.COMMANDS)})", file=sys.stderr)
        return 2
    if not any(spec.FIRST_VERSION.get(c, 0) <= spec.vnum(v) for c in commands for v in versions):
        print("seg-fast fuzz: none of these commands exists in these versions", file=sys.stderr)
        return 2
    fz = runner.Fuzzer(target, device, versions=versions, commands=commands, deadline=args.deadline,
                       park_wait=args.park_wait, out=args.out, mutate=max(0.0, min(1.0, args.mutate)),
                       ssl_context=_ssl_context(args))

    async def main() -> list[Path]:
        await fz.setup()
        return await fz.run(args.max_examples, args.seed)

    t0 = time.monotonic()
    try:
        written = trio.run(main)
    except KeyboardInterrupt:
        written = fz.write_failures()
    elapsed = time.monotonic() - t0
    rate = fz.executions / elapsed if elapsed else 0.0
    counts = ", ".join(f"{k} {n}" for k, n in sorted(fz.verdicts.items()))
    if fz.http:
        counts += "; HTTP " + ", ".join(f"{k}: {n}" for k, n in sorted(fz.http.items()))
    print(f"seg-fast fuzz: {fz.executions} requests to {target.url} in {elapsed:.1f} s "
          f"({rate:.0f}/s): {counts or 'nothing sent'}")
    for path in written:
        f = runner.load_failure(path)
        print(f"\nFAILURE {f.kind} ({f.detail}) on {f.case.command} {f.case.version}"
              f"{' mutated: ' + ', '.join(f.case.ops) if f.case.ops else ''}\n  written to {path}")
        print(shorten(f.request_xml) if f.request_xml else
              f"  request body: {len(f.request.body)} bytes (not decodable WBXML)")
    return 1 if written else 0


def shorten(xml: str, width: int = 160) -> str:
    """Long lines (an oversized string) cut for the terminal; the file keeps them whole."""
    out = []
    for line in xml.splitlines():
        if len(line) > width:
            head, _, rest = line.partition(">")
            text, _, tail = rest.rpartition("<")
            line = f"{head}>{text[:40]}…({len(text)} characters)<{tail}" if tail else line[:width] + "…"
        out.append(line)
    return "\n".join(out)


def _ssl_context(args):
    if not args.ca:
        return None
    import ssl
    return ssl.create_default_context(cafile=args.ca)


def _load(path: Path):
    from seg_fast.testing import runner
    return runner.load_failure(path)


def _replay(trio, runner, failure, target, device, args) -> int:
    answer, verdict = trio.run(lambda: runner.replay(failure, target, device, verbatim=args.verbatim,
                                                     deadline=args.deadline, ssl_context=_ssl_context(args)))
    print(f"recorded: {failure.kind} ({failure.detail}) on {failure.case.command} {failure.case.version}")
    print(shorten(failure.request_xml) if failure.request_xml else
          f"request body: {len(failure.request.body)} bytes (not decodable WBXML)")
    status = f"HTTP {answer.status}" if answer is not None else "no answer"
    print(f"replayed against {target.url}: {status}: {verdict.kind}{' (' + verdict.detail + ')' if verdict.detail else ''}")
    return 1 if verdict.failed else 0
