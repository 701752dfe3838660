"""`seg-fast demo`: the mailbox simulator and the gateway in front of it, on one machine.

Prints the device URL, a test account and curl lines that work. The gateway's TLS
certificate is self-signed, made at start-up (curl needs -k); state (policy store,
keys, transaction log) goes into a temporary directory removed at exit.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path

import trio

DEMO_USER = "demo"
DEMO_PASSWORD = "secret"
# A FolderSync request (SyncKey 0) in WBXML, for the curl line.
FOLDERSYNC = bytes.fromhex("03016a00000756520330000101")


def _self_signed(directory: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seg-fast demo")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "demo-cert.pem")
    key_path = os.path.join(directory, "demo-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def _demo_policy_file() -> Path:
    """The demo's embedded policies: the baseline compliance policies of
    examples/policies/baseline.json plus an email security document (links to the
    corpus's first ten domains rewritten, attachments encrypted or blocked)."""
    return Path(__file__).with_name("demo_policies.json")


async def _load_policies(config, path: Path) -> None:
    from seg_fast.policy.model import decode_policy_file
    from seg_fast.policy.store import open_store

    pf = decode_policy_file(path.read_bytes(), what=str(path))
    store = open_store(config.policy)
    await store.open()
    try:
        await store.replace_all(pf.policies, pf.devices)
    finally:
        await store.aclose()


def _port_free(host: str, port: int) -> bool:
    from seg_fast.proxy.instance import bind_error

    return bind_error(host, port) is None


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="seg-fast demo", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8443, help="gateway port (default 8443; 0 = any free port)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--no-tls", action="store_true", help="plain HTTP on the device leg")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0 = run until Ctrl-C)")
    ap.add_argument("--deliver-every", type=float, default=30.0,
                    help="deliver a new message to the demo user every N seconds (0 = never)")
    ap.add_argument("--require-provisioning", action="store_true",
                    help="the simulator answers Status 142 until a device provisions")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seg-fast-demo-") as state:
        try:
            trio.run(_main, args, state)
        except KeyboardInterrupt:
            pass
    print("seg-fast demo stopped", file=sys.stderr)
    return 0


async def _main(args, state: str) -> None:
    # Ctrl-C and SIGTERM are received as signals for the whole run, so no KeyboardInterrupt
    # lands inside a task (a KeyboardInterrupt before this line is caught in cli()).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await _run(args, state, signals)


async def _run(args, state: str, signals) -> None:
    from seg_fast.config import load_config
    from seg_fast.proxy.gateway import Gateway
    from seg_fast.sim.mailbox import MailboxSimulator

    port = args.port
    if port and not _port_free(args.host, port):
        print(f"port {port} is busy; using a free one", file=sys.stderr)
        port = 0
    env = {
        "SEG_FAST_LISTENER_HOST": args.host,
        "SEG_FAST_LISTENER_PORT": str(port),
        "SEG_FAST_LOG_TRANSACTIONS": os.path.join(state, "transactions.jsonl"),
        # Policy store, admin token and attachment keys go into the demo's temp dir.
        "SEG_FAST_STATE_DIR": state,
        "SEG_FAST_ADMIN_PORT": "44444" if _port_free("127.0.0.1", 44444) else "0",
    }
    policies = _demo_policy_file()
    if not args.no_tls:
        cert, key = _self_signed(state)
        env["SEG_FAST_LISTENER_TLS_CERT"] = cert
        env["SEG_FAST_LISTENER_TLS_KEY"] = key
    # Provisioning stays optional so a bare curl can sync; phones provision anyway.
    sim = MailboxSimulator(password=DEMO_PASSWORD, initial_messages=5,
                           require_provisioning=args.require_provisioning)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        env["SEG_FAST_UPSTREAM_URL"] = f"http://127.0.0.1:{sim.port}"
        config = load_config(None, env={**os.environ, **env})
        await _load_policies(config, policies)
        admin_port = await _start_admin(nursery, config)
        gw = Gateway(config)
        await nursery.start(gw.serve)
        # The worker's counters, as serve's workers write them: what the console and /metrics show.
        from seg_fast import stats
        await nursery.start(stats.write_loop, gw, stats.stats_dir(config))
        scheme = "http" if args.no_tls else "https"
        k = "" if args.no_tls else "-k "
        url = f"{scheme}://{args.host}:{gw.port}/Microsoft-Server-ActiveSync"
        query = f"Cmd=FolderSync&User={DEMO_USER}&DeviceId=DEMO0001&DeviceType=iPhone"
        policy_line = (f"{policies}\n                (mail clients allow-listed: an iPhone passes, curl's own User-Agent"
                       " gets Status 129, blocked;\n                 links to contoso.com and nine more domains"
                       " open in the secure browser; attachments encrypted or blocked)")
        admin_line = (f"http://127.0.0.1:{admin_port}/seg/admin (token in {config.policy.sqlite_path}.admin-token)"
                      if admin_port else "not started")
        print(f"""seg-fast demo is running (Ctrl-C stops it).

  device URL    {url}
  account       {DEMO_USER} / {DEMO_PASSWORD}   (any user name works with that password)
  mail server   http://127.0.0.1:{sim.port}  (the mailbox simulator)
  policies      {policy_line}
  admin API     {admin_line}
  transactions  {env['SEG_FAST_LOG_TRANSACTIONS']}

Try it:
  curl {k}-i -X OPTIONS -u {DEMO_USER}:{DEMO_PASSWORD} '{url}'
  printf '\\x03\\x01\\x6a\\x00\\x00\\x07\\x56\\x52\\x03\\x30\\x00\\x01\\x01' | curl {k}-s -u {DEMO_USER}:{DEMO_PASSWORD} \\
      -A 'Apple-iPhone9C1/1602.92' -H 'MS-ASProtocolVersion: 14.1' -H 'Content-Type: application/vnd.ms-sync.wbxml' \\
      --data-binary @- '{url}?{query}' | {shlex.quote(sys.executable)} -m seg_fast wbxml decode /dev/stdin
""", flush=True)
        if args.deliver_every > 0:
            nursery.start_soon(_deliver, sim, args.deliver_every)
        # Ctrl-C, SIGTERM or --seconds end the demo; the temporary state is then removed.
        with trio.move_on_after(args.seconds or float("inf")):
            async for _ in signals:
                break
        gw.drain()
        nursery.cancel_scope.cancel()


async def _start_admin(nursery, config) -> int | None:
    from seg_fast.admin import server as admin

    try:
        return await nursery.start(admin.run, config)
    except Exception as exc:          # the demo runs without the admin API rather than not at all
        print(f"admin API not started: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


async def _deliver(sim, every: float) -> None:
    while True:
        await trio.sleep(every)
        sim.deliver(DEMO_USER, count=1)
