"""`seg-fast` command line: each sub-command lives with the code it drives.

The sub-command's module is imported only when it is asked for, so
`seg-fast wbxml decode` does not pay for trio or the policy store.
"""
from __future__ import annotations

import importlib
import sys

# sub-command -> (module, function taking the remaining argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("seg_fast.proxy.server", "cli", "run the gateway: seg-fast serve --config FILE.toml"),
    "demo": ("seg_fast.demo", "cli", "run the mailbox simulator and the gateway on demo defaults"),
    "wbxml": ("seg_fast.eas.wbxml", "cli", "decode FILE | encode FILE.xml | scan FILE TAG: WBXML <-> XML"),
    "policy": ("seg_fast.policy.cli", "cli", "load FILE | dump | import-csv | openapi: the policy store"),
    "attachment": ("seg_fast.content.cli", "attachment_cli", "decrypt --device ID --user U FILE"),
    "keys": ("seg_fast.content.cli", "keys_cli", "rotate --device ID: new attachment key"),
    "check-config": ("seg_fast.checkconfig", "cli", "--config FILE [--connect]: validate a config (like nginx -t)"),
    "dx": ("seg_fast.dx", "cli", "start|stop|list|log: targeted logging for a device or user"),
    "sim": ("seg_fast.sim.cli", "cli", "run the mailbox simulator alone"),
    "bench": ("seg_fast.sim.sizing", "cli", "sizing [...]: the sizing benchmark"),
    "fuzz": ("seg_fast.fuzzcli", "cli", "--target URL | --replay FILE: fuzz an EAS endpoint (extra: fuzz)"),
}


def usage() -> str:
    lines = ["usage: seg-fast COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from seg_fast import __version__

        print(__version__)
        return 0
    entry = COMMANDS.get(argv[0])
    if entry is None:
        print(f"seg-fast: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = entry
    result = getattr(importlib.import_module(module), func)(argv[1:])
    return int(result or 0)
