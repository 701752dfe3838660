"""`seg-fast attachment decrypt` (the secure viewer's side) and `seg-fast keys rotate`
(the guide's Update Encryption Key)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seg_fast.errors import SegFastError


def _keyring(args):
    from seg_fast.config import load_config
    from seg_fast.content.keys import Keyring

    settings = load_config(args.config).security
    return Keyring.from_settings(settings)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="gateway config (TOML) naming security.master_key_file and key_state_file")
    parser.add_argument("--device", required=True, help="EAS DeviceId")


def attachment_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="seg-fast attachment")
    sub = parser.add_subparsers(dest="action", required=True)
    dec = sub.add_parser("decrypt", help="open an attachment envelope")
    _common(dec)
    dec.add_argument("--user", required=True, help="EAS user the attachment was sealed for")
    dec.add_argument("--output", "-o", default=None,
                     help="where to write the attachment (default: its original name in the current folder; - for stdout)")
    dec.add_argument("file")
    args = parser.parse_args(argv)
    from seg_fast.content.attachments import open_envelope

    try:
        blob = Path(args.file).read_bytes()
        name, ctype, data = open_envelope(_keyring(args), args.device, args.user, blob)
    except OSError as e:
        print(f"seg-fast attachment: {args.file}: {e.strerror}", file=sys.stderr)
        return 1
    except SegFastError as e:
        print(f"seg-fast attachment: {args.file}: {e}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    # The original name comes from the envelope: keep only its last component.
    out = Path(args.output) if args.output else Path(Path(name.replace("\\", "/")).name or "attachment")
    out.write_bytes(data)
    print(f"{out}\t{ctype}\t{len(data)} bytes", file=sys.stderr)
    return 0


def keys_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="seg-fast keys")
    sub = parser.add_subparsers(dest="action", required=True)
    rot = sub.add_parser("rotate", help="new attachment key generation for a device")
    _common(rot)
    args = parser.parse_args(argv)
    try:
        gen = _keyring(args).rotate(args.device)
    except SegFastError as e:
        print(f"seg-fast keys: {e}", file=sys.stderr)
        return 1
    print(f"device {args.device}: key generation {gen}")
    return 0
