"""`seg-fast sim`: run the mailbox simulator alone.

    seg-fast sim [--host 127.0.0.1] [--port 8088] [--password secret] [--seed 1]
                 [--tls-cert C --tls-key K] [--initial N] [--deliver-every S --deliver-to USER]
                 [--no-provisioning]

Prints one JSON line when listening ({"sim_port": ..., "pid": ...}) so scripts
and benchmarks can start it as a child process and read where it is.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys

import trio


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="seg-fast sim", description="run the ActiveSync mailbox simulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8088, help="0 picks a free port")
    ap.add_argument("--password", default="secret", help="any user name is accepted with this password")
    ap.add_argument("--seed", type=int, default=1, help="corpus seed")
    ap.add_argument("--tls-cert", help="PEM certificate chain (HTTPS instead of HTTP)")
    ap.add_argument("--tls-key", help="PEM private key")
    ap.add_argument("--initial", type=int, default=0, help="messages in a new mailbox's Inbox")
    ap.add_argument("--deliver-every", type=float, default=0.0,
                    help="deliver a message every N seconds to --deliver-to (0 = never)")
    ap.add_argument("--deliver-to", action="append", default=[], help="user for --deliver-every (repeatable)")
    ap.add_argument("--path", action="append", default=[],
                    help="EAS path to serve (repeatable), e.g. /servlet/traveler (IBM Traveler) or /EAS "
                         "(GroupWise); default: /Microsoft-Server-ActiveSync, /servlet/traveler and /EAS")
    ap.add_argument("--negotiate-keytab", help="accept only Kerberos (Negotiate) tokens for this keytab's "
                                               "service (needs python-gssapi)")
    ap.add_argument("--no-provisioning", action="store_true",
                    help="do not require the Provision policy key")
    ap.add_argument("--reactor", action="store_true",
                    help="plain HTTP served by one epoll set for all connections, no task per "
                         "connection or parked Ping (sim/lean_serve.py, as the sizing shards serve it)")
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    return args


def cli(argv: list[str]) -> int:
    args = parse(argv)
    try:
        trio.run(_until_signal, args)
    except KeyboardInterrupt:
        pass
    except OSError as exc:                # one line naming the cause, no traceback
        print(f"seg-fast sim: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print("seg-fast sim: stopped", file=sys.stderr)
    return 0


async def _until_signal(args: argparse.Namespace) -> None:
    """Run until Ctrl-C or SIGTERM, received as signals (no KeyboardInterrupt inside a task)."""
    import signal

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run, args)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


async def run(args: argparse.Namespace, task_status=trio.TASK_STATUS_IGNORED) -> None:
    from seg_fast.sim.mailbox import MailboxSimulator

    ctx = None
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    sim = MailboxSimulator(password=args.password, seed=args.seed, initial_messages=args.initial,
                           require_provisioning=not args.no_provisioning,
                           **({"paths": tuple(args.path)} if args.path else {}))
    if args.negotiate_keytab:
        from seg_fast.sim.negotiate import NegotiateAcceptor

        sim.negotiate = NegotiateAcceptor(args.negotiate_keytab)
    async with trio.open_nursery() as nursery:
        if args.reactor and ctx is None:
            from seg_fast.sim import lean_serve

            await nursery.start(lean_serve.serve, sim, args.host, args.port)
        else:
            await nursery.start(lambda task_status: sim.serve(args.host, args.port, ssl_context=ctx,
                                                              task_status=task_status))
        scheme = "https" if ctx else "http"
        print(json.dumps({"sim_port": sim.port, "pid": os.getpid(),
                          "url": f"{scheme}://{args.host}:{sim.port}"
                                 f"{args.path[0] if args.path else '/Microsoft-Server-ActiveSync'}"}),
              flush=True)
        print(f"seg-fast sim: listening on {scheme}://{args.host}:{sim.port}", file=sys.stderr, flush=True)
        if args.deliver_every > 0 and args.deliver_to:
            nursery.start_soon(_deliver, sim, args.deliver_every, args.deliver_to)
        task_status.started(sim)


async def _deliver(sim, every: float, users: list[str]) -> None:
    while True:
        await trio.sleep(every)
        for user in users:
            sim.deliver(user)
