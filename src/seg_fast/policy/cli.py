"""`seg-fast policy ...`: the policy store from the command line.

    seg-fast policy load FILE.json [--config C]       replace the snapshot (document + devices)
    seg-fast policy dump [--config C]                 print the snapshot as JSON
    seg-fast policy openapi                           print the admin API's OpenAPI document
    seg-fast policy import-csv KIND FILE.csv [--mode allow|block] [--config C]
        KIND: users | device-types | mail-clients   (first column; sets and enables the list)
              domains                                (hyperlink policy domains)
              devices                                (header row names DeviceRecord fields)

The file is validated whole before anything is written; running gateways see the
change within a second.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import sys

import msgspec
import trio

from seg_fast.config import load_config
from seg_fast.errors import SegFastError
from seg_fast.policy.model import (
    DeviceRecord, ListPolicy, PolicyDocument, PolicyFile, check_document, decode_policy_file,
)
from seg_fast.policy.store import open_store

LIST_KINDS = {"users": "user", "device-types": "device_type", "mail-clients": "mail_client"}
# Header cells a one-column list may start with, per kind.
HEADER_WORDS = {
    "users": {"user", "users", "username", "user name", "upn"},
    "device-types": {"device type", "device_type", "devicetype", "device types"},
    "mail-clients": {"mail client", "mail_client", "client", "user agent", "user-agent", "mail clients"},
    "domains": {"domain", "domains"},
}
# Longest value of each kind (a User-Agent is the longest thing a list holds).
MAX_VALUE = {"users": 256, "device-types": 128, "mail-clients": 512, "domains": 253}
_DOMAIN_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def _check_value(kind: str, cell: str) -> str | None:
    """Why ``cell`` is not a valid value of this list kind, or None."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in cell):
        return "contains a control character"
    if len(cell) > MAX_VALUE[kind]:
        return f"is longer than {MAX_VALUE[kind]} characters"
    if kind == "domains":
        name = cell.lower().removeprefix("*.").rstrip(".")
        if "://" in cell or "/" in cell:
            return "is a URL; give the domain alone (e.g. contoso.com)"
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return "is not a domain name"
        if "." not in name or not all(_DOMAIN_LABEL.match(label) for label in name.split(".")):
            return "is not a domain name"
    elif kind in ("users", "device-types") and any(c.isspace() for c in cell):
        return "contains white space"
    return None


def list_from_csv(text: str, kind: str, what: str) -> list[str]:
    """The values of a one-column list CSV (an optional header row first); every row is
    checked and the first bad one is named by its line number."""
    out = []
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if sum(1 for c in cells if c) > 1:
            hint = " (a devices CSV? use `import-csv devices`)" if "device_id" in cells else ""
            raise SegFastError(f"{what} line {line}: one value per row expected, found {len(cells)} columns{hint}")
        cell = next(c for c in cells if c)
        if not out and line == 1 and cell.lower() in HEADER_WORDS[kind]:
            continue
        if not out and line == 1 and any(cell.lower() in words for words in HEADER_WORDS.values()):
            raise SegFastError(f"{what} line 1: header {cell!r} is not a {kind} list")
        problem = _check_value(kind, cell)
        if problem:
            raise SegFastError(f"{what} line {line}: {cell[:80]!r} {problem}")
        out.append(cell)
    return out


def store_name(settings) -> str:
    return f"Redis {settings.redis_url}" if settings.store == "redis" else f"SQLite {settings.sqlite_path}"


def devices_from_csv(text: str) -> list[DeviceRecord]:
    """Rows of DeviceRecord fields; the header names them (device_id required)."""
    reader = csv.DictReader(io.StringIO(text))
    fields = set(DeviceRecord.__struct_fields__)
    if reader.fieldnames is None or "device_id" not in reader.fieldnames:
        raise SegFastError("devices CSV: the header row must name device_id (and any DeviceRecord fields)")
    unknown = [f for f in reader.fieldnames if f not in fields]
    if unknown:
        raise SegFastError(f"devices CSV: unknown column {unknown[0]!r}")
    bools = {"managed", "compliant", "compromised", "encrypted", "eas_profile"}
    out = []
    for line, row in enumerate(reader, start=2):
        obj: dict = {}
        for k, v in row.items():
            v = (v or "").strip()
            if v == "":
                continue
            if k in bools:
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise SegFastError(f"devices CSV line {line}: {k} must be true or false, not {v!r}")
                obj[k] = v.lower() in ("true", "1", "yes")
            elif k == "last_checkin":
                try:
                    obj[k] = float(v)
                except ValueError:
                    raise SegFastError(f"devices CSV line {line}: last_checkin must be Unix seconds") from None
            else:
                obj[k] = v
        try:
            out.append(msgspec.convert(obj, DeviceRecord))
        except msgspec.ValidationError as exc:
            raise SegFastError(f"devices CSV line {line}: {exc}") from None
    return out


async def _with_store(config_path, fn):
    store = open_store(load_config(config_path).policy)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.aclose()


async def _load(store, pf: PolicyFile) -> int:
    return await store.replace_all(pf.policies, pf.devices)


async def _dump(store) -> bytes:
    snap = await store.snapshot()
    pf = PolicyFile(policies=snap.document or PolicyDocument(), devices=snap.devices)
    return msgspec.json.format(msgspec.json.encode(pf), indent=2)


async def _import_list(store, kind: str, values: list[str], mode: str) -> int:
    doc = await store.get_document() or PolicyDocument()
    if kind == "domains":
        from seg_fast.content.model import EmailSecurityPolicy
        sec = doc.security or EmailSecurityPolicy()
        sec = msgspec.structs.replace(sec, hyperlinks=msgspec.structs.replace(sec.hyperlinks, domains=values))
        doc = msgspec.structs.replace(doc, security=sec)
    else:
        field = LIST_KINDS[kind]
        lp = ListPolicy(enabled=True, mode=mode, values=values)
        doc = msgspec.structs.replace(doc, general=msgspec.structs.replace(doc.general, **{field: lp}))
    # Round-trip through the strict decoder: the stored document is always one it accepts.
    check_document(msgspec.json.decode(msgspec.json.encode(doc), type=PolicyDocument))
    return await store.put_document(doc)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="seg-fast policy", description="The policy store.")
    ap.add_argument("--config", help="gateway config (TOML); its [policy] section names the store")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("load", help="replace the snapshot with a JSON policy file")
    p.add_argument("file")
    sub.add_parser("dump", help="print the snapshot as JSON")
    sub.add_parser("openapi", help="print the admin API's OpenAPI document")
    p = sub.add_parser("import-csv", help="load a long list from CSV")
    p.add_argument("kind", choices=[*LIST_KINDS, "domains", "devices"])
    p.add_argument("file")
    p.add_argument("--mode", choices=["allow", "block"], default="allow")
    # --config may come before or after the sub-command
    args, rest = ap.parse_known_args(argv)
    if rest:
        extra = argparse.ArgumentParser(add_help=False)
        extra.add_argument("--config")
        more, unknown = extra.parse_known_args(rest)
        if unknown:
            ap.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.config = more.config or args.config
    try:
        if args.cmd == "load":
            with open(args.file, "rb") as f:
                pf = decode_policy_file(f.read(), what=args.file)
            v = trio.run(_with_store, args.config, lambda s: _load(s, pf))
            print(f"loaded {args.file}: {len(pf.devices)} device record(s), store version {v}"
                  f" ({store_name(load_config(args.config).policy)})")
        elif args.cmd == "dump":
            sys.stdout.buffer.write(trio.run(_with_store, args.config, _dump) + b"\n")
        elif args.cmd == "openapi":
            from seg_fast.admin.api import AdminApi
            from seg_fast.admin.openapi import document
            from seg_fast.policy.gate import PolicyGatekeeper

            cfg = load_config(args.config)
            api = AdminApi(cfg, PolicyGatekeeper(cfg.policy))
            sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(document(api.routes)), indent=2) + b"\n")
        else:
            with open(args.file, encoding="utf-8-sig") as f:
                text = f.read()
            if args.kind == "devices":
                devs = devices_from_csv(text)

                async def put(s):
                    return await s.put_devices(devs)
                v = trio.run(_with_store, args.config, put)
                print(f"imported {len(devs)} device record(s), store version {v}"
                      f" ({store_name(load_config(args.config).policy)})")
            else:
                values = list_from_csv(text, args.kind, args.file)
                if not values:
                    raise SegFastError(f"{args.file}: no values in the first column")
                v = trio.run(_with_store, args.config, lambda s: _import_list(s, args.kind, values, args.mode))
                print(f"imported {len(values)} {args.kind} ({args.mode} list), store version {v}"
                      f" ({store_name(load_config(args.config).policy)})")
    except OSError as exc:
        print(f"seg-fast policy: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    except SegFastError as exc:
        print(f"seg-fast policy: {exc}", file=sys.stderr)
        return 1
    return 0
