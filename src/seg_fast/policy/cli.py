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
HEADER_WORDS = {"user", "users", "username", "device type", "device_type", "devicetype", "mail client",
                "mail_client", "client", "user agent", "domain", "domains"}


def first_column(text: str) -> list[str]:
    out = []
    for row in csv.reader(io.StringIO(text)):
        if not row or not row[0].strip():
            continue
        cell = row[0].strip()
        if not out and cell.lower() in HEADER_WORDS:
            continue
        out.append(cell)
    return out


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
            print(f"loaded {args.file}: {len(pf.devices)} device record(s), store version {v}")
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
                print(f"imported {len(devs)} device record(s), store version {v}")
            else:
                values = first_column(text)
                if not values:
                    raise SegFastError(f"{args.file}: no values in the first column")
                v = trio.run(_with_store, args.config, lambda s: _import_list(s, args.kind, values, args.mode))
                print(f"imported {len(values)} {args.kind} ({args.mode} list), store version {v}")
    except OSError as exc:
        print(f"seg-fast policy: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    except SegFastError as exc:
        print(f"seg-fast policy: {exc}", file=sys.stderr)
        return 1
    return 0
