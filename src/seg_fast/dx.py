"""Targeted (Dx) logging: every transaction of one device or one user, for a while.

The administrator (console, admin API, ``seg-fast dx``) names a target and a
duration (default 60 minutes); the control process writes the list to
``state_dir/dx/targets.json`` (0600, atomically) and each worker re-reads it when it
changes (checked once a second with its statistics). While the list is empty the
per-transaction cost is one attribute test; a device not on the list costs two dict
lookups.

Each target has its own file, ``state_dir/dx/<kind>-<name>.jsonl`` (0600), rotated
at ``MAX_BYTES`` (one older generation kept, ``.1``), downloadable from the console.
A line holds what the transaction record holds (command, status, decision, timings,
sizes, user, device, client address, mail server, the gateway's own error text) and,
when the exchange hands them over, the request and answer headers with Authorization
cut to its scheme and user, and the WBXML decoded to XML with every body, attachment
and MIME content replaced by its size. Never a password, a token or mail content.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import msgspec

from seg_fast.policy.engine import user_forms
from seg_fast.policy.model import device_key
from seg_fast.statedir import resolve

DX_DIR = "dx"
TARGETS = "targets.json"
DEFAULT_MINUTES = 60.0
MAX_BYTES = 8 * 1024 * 1024
KINDS = ("device", "user")
_SAFE = re.compile(r"[^A-Za-z0-9_.@-]")


class Target(msgspec.Struct, kw_only=True):
    kind: str                      # "device" | "user"
    target: str                    # as the administrator typed it
    until: float                   # Unix time
    started: float = 0.0
    who: str = ""


def dx_dir(config) -> Path:
    return resolve(DX_DIR, config.state_dir)


def norm(kind: str, target: str) -> str:
    """The key a transaction is matched on: device ids as the policy store keys them,
    users by their last form (alice for DOMAIN\\alice and alice@example.com)."""
    return device_key(target) if kind == "device" else user_forms(target)[-1]


def log_name(kind: str, target: str) -> str:
    key = norm(kind, target)
    tag = hashlib.sha256(f"{kind}:{key}".encode()).hexdigest()[:8]
    return f"{kind}-{_SAFE.sub('_', key)[:64]}-{tag}.jsonl"


# -- the control process's side ------------------------------------------------------

def read_targets(directory: Path, now: float | None = None) -> list[Target]:
    now = time.time() if now is None else now
    try:
        raw = (directory / TARGETS).read_bytes()
        targets = msgspec.json.decode(raw, type=list[Target])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return []
    return [t for t in targets if t.until > now]


def _write_targets(directory: Path, targets: list[Target]) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = directory / f".{TARGETS}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, msgspec.json.encode(targets))
    finally:
        os.close(fd)
    os.replace(tmp, directory / TARGETS)


def start(directory: Path, kind: str, target: str, minutes: float = DEFAULT_MINUTES, who: str = "") -> Target:
    if kind not in KINDS:
        raise ValueError(f"unknown Dx target kind {kind!r} (device or user)")
    if not target.strip():
        raise ValueError("a Dx target needs a device id or a user name")
    if not 0 < minutes <= 24 * 60:
        raise ValueError("Dx logging runs between a minute and 24 hours (minutes 1-1440)")
    now = time.time()
    key = norm(kind, target)
    targets = [t for t in read_targets(directory, now) if not (t.kind == kind and norm(t.kind, t.target) == key)]
    new = Target(kind=kind, target=target.strip(), until=now + minutes * 60, started=now, who=who)
    targets.append(new)
    _write_targets(directory, targets)
    return new


def stop(directory: Path, kind: str, target: str) -> bool:
    key = norm(kind, target)
    targets = read_targets(directory)
    left = [t for t in targets if not (t.kind == kind and norm(t.kind, t.target) == key)]
    _write_targets(directory, left)
    return len(left) != len(targets)


def read_log(directory: Path, kind: str, target: str) -> bytes:
    """The target's log, older generation first."""
    path = directory / log_name(kind, target)
    out = b""
    for p in (path.with_name(path.name + ".1"), path):
        try:
            out += p.read_bytes()
        except OSError:
            pass
    return out


# -- what a line may hold ------------------------------------------------------------

# Elements whose text is protocol state, kept as is; every other text or opaque
# content (subjects, addresses, bodies, attachments, MIME, folder names, IMEI and
# phone numbers) is replaced by its size.
KEEP_TEXT = frozenset("""
Status SyncKey CollectionId Class ServerId ParentId Type FilterType WindowSize MoreAvailable HeartbeatInterval
Interval DeletesAsMoves GetChanges Conflict MIMESupport MIMETruncation Truncation TruncationSize
EstimatedDataSize PolicyKey PolicyType Count Range Total NativeBodyType Method ContentType Version
SaveInSentItems Wait MaxFolders MaxItems Supported Model OS OSLanguage UserAgent MobileOperator FriendlyName
EnableOutboundSMS Read Flag Importance MessageClass InternetCPID ContentClass IsDraft Deleted Limit
AllOrNone MaxSize DeleteSubFolders RemoteWipe AccountOnlyRemoteWipe
""".split())
MAX_DECODE = 4 * 1024 * 1024


def safe_headers(headers) -> list[list[str]]:
    """(name, value) pairs as a Dx line shows them: Authorization reduced to its scheme
    and user, cookies and other credentials to their sizes."""
    import base64
    import binascii

    out = []
    for name, value in headers:
        n = name.decode("latin-1") if isinstance(name, (bytes, bytearray)) else str(name)
        v = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
        low = n.lower()
        if low in ("authorization", "proxy-authorization"):
            scheme, _, cred = v.strip().partition(" ")
            shown = scheme
            if scheme.lower() == "basic":
                try:
                    user = base64.b64decode(cred.strip(), validate=True).decode("utf-8", "replace").split(":", 1)[0]
                    shown = f"Basic user={user}"
                except (binascii.Error, ValueError):
                    shown = "Basic (undecodable)"
            v = f"{shown} ({len(cred.strip())} chars)"
        elif low in ("cookie", "set-cookie", "x-ms-credential-service-url"):
            v = f"({len(v)} bytes)"
        out.append([n, v])
    return out


def wbxml_outline(body: bytes) -> str:
    """The WBXML document as XML with every content text cut to its size."""
    from seg_fast.eas.wbxml import Element, decode, to_xml

    if not body:
        return ""
    if len(body) > MAX_DECODE:
        return f"({len(body)} bytes, not decoded)"
    try:
        root = decode(body)
    except Exception as exc:            # noqa: BLE001 - a line says why, the gateway carries on
        return f"({len(body)} bytes, not WBXML: {type(exc).__name__})"

    def cut(el):
        local = el.tag.rsplit(":", 1)[-1]
        text, opaque = el.text, el.opaque
        if local not in KEEP_TEXT:
            if text is not None:
                text = f"({len(text.encode())} bytes)"
            if opaque is not None:
                text, opaque = f"({len(opaque)} bytes)", None
        return Element(el.tag, children=[cut(c) for c in el.children], text=text, opaque=opaque)

    return to_xml(cut(root))


def _render(handed: dict) -> dict:
    """Headers as they are (already reduced), bodies as WBXML outlines, never the bytes."""
    out = {}
    for key in ("request_headers", "answer_headers"):
        if key in handed:
            out[key] = handed[key]
    if "request_body" in handed:
        out["request_xml"] = wbxml_outline(handed["request_body"])
    body = handed.get("answer_body")
    if body is None and "answer_parts" in handed:
        body = b"".join(handed["answer_parts"])
    if body:
        out["answer_xml"] = wbxml_outline(body)
    return out


# -- the worker's side ---------------------------------------------------------------

_encoder = msgspec.json.Encoder()
# What the exchange handed over for targeted transactions still in flight, by id(record);
# empty unless a targeted device or user is mid-transaction (the exchange tests it first).
PENDING: dict[int, dict] = {}
MAX_PENDING = 10_000


def note(rec, key: str, value) -> None:
    """The exchange hands over a request or answer body of a targeted transaction."""
    p = PENDING.get(id(rec))
    if p is not None:
        p[key] = value


def note_answer(rec, headers, body: bytes) -> None:
    """An answer the gateway sent whole (its own, a blocked answer, a transformed one)."""
    p = PENDING.get(id(rec))
    if p is not None:
        p["answer_headers"] = safe_headers([(h[0], h[-1]) for h in headers])
        p["answer_body"] = body


def tap(rec, headers) -> list | None:
    """A streamed answer of a targeted transaction: its headers, and a list for its chunks."""
    p = PENDING.get(id(rec))
    if p is None:
        return None
    p["answer_headers"] = safe_headers([(n, v) for n, _, v in headers])
    parts = p["answer_parts"] = []
    return parts


class Dx:
    """The targets a worker follows, and the writing of their lines."""

    __slots__ = ("directory", "devices", "users", "active", "_mtime", "max_bytes")

    def __init__(self, directory: Path | None = None, max_bytes: int = MAX_BYTES):
        self.directory = directory
        self.devices: dict[str, Target] = {}
        self.users: dict[str, Target] = {}
        self.active = False             # the per-transaction test
        self._mtime = 0.0
        self.max_bytes = max_bytes

    @property
    def targets(self) -> dict:
        return {**{f"device:{k}": t for k, t in self.devices.items()}, **{f"user:{k}": t for k, t in self.users.items()}}

    def refresh(self, now: float | None = None) -> None:
        """Re-read the targets when the file changed; drop expired ones (called once a second)."""
        if self.directory is None:
            return
        now = time.time() if now is None else now
        try:
            mtime = os.stat(self.directory / TARGETS).st_mtime
        except OSError:
            mtime = 0.0
        if mtime != self._mtime:
            self._mtime = mtime
            targets = read_targets(self.directory, now)
            self.devices = {norm(t.kind, t.target): t for t in targets if t.kind == "device"}
            self.users = {norm(t.kind, t.target): t for t in targets if t.kind == "user"}
        else:
            self.devices = {k: t for k, t in self.devices.items() if t.until > now}
            self.users = {k: t for k, t in self.users.items() if t.until > now}
        self.active = bool(self.devices or self.users)

    def wants(self, device_id: str | None, user: str | None) -> list[Target]:
        out = []
        if device_id and self.devices:
            t = self.devices.get(device_key(device_id))
            if t is not None:
                out.append(t)
        if user and self.users:
            t = self.users.get(user_forms(user)[-1])
            if t is not None:
                out.append(t)
        return out

    def begin(self, rec, headers) -> None:
        """A transaction's identity is known: keep its request headers if it is targeted
        (``headers``: the exchange's (name, lower name, value) triples)."""
        if not self.wants(rec.device_id, rec.user):
            return
        if len(PENDING) >= MAX_PENDING:
            PENDING.clear()            # transactions that never finished: never grow without bound
        PENDING[id(rec)] = {"request_headers": safe_headers([(n, v) for n, _, v in headers])}

    def capture(self, rec, extra: dict | None = None) -> None:
        """One transaction of a targeted device or user (rec: observe.Transaction)."""
        handed = PENDING.pop(id(rec), None) if PENDING else None
        targets = self.wants(rec.device_id, rec.user)
        if not targets:
            return
        if handed:
            extra = {**(extra or {}), **_render(handed)}
        entry = {"ts": round(time.time(), 3), "method": rec.method, "command": rec.command, "user": rec.user,
                 "device_id": rec.device_id, "device_type": rec.device_type, "client_ip": rec.client_ip,
                 "status": rec.status, "decision": rec.decision, "bytes_in": rec.bytes_in,
                 "bytes_out": rec.bytes_out, "upstream_ms": rec.upstream_ms, "total_ms": rec.total_ms,
                 "upstream": rec.upstream, "error": rec.error}
        if extra:
            entry.update(extra)
        line = _encoder.encode(entry) + b"\n"
        for t in targets:
            self._append(log_name(t.kind, t.target), line)

    def _append(self, name: str, line: bytes) -> None:
        path = self.directory / name
        try:
            try:
                if os.stat(path).st_size + len(line) > self.max_bytes:
                    os.replace(path, path.with_name(name + ".1"))
            except FileNotFoundError:
                pass
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            pass                    # a full disk must not stop the gateway


# -- seg-fast dx ---------------------------------------------------------------------

def cli(argv: list[str]) -> int:
    import argparse
    import getpass
    import sys

    from seg_fast.config import load_config
    from seg_fast.errors import ConfigError

    ap = argparse.ArgumentParser(prog="seg-fast dx", description="Targeted (Dx) logging for one device or user: "
                                 "every transaction with headers, decoded WBXML (contents cut to sizes) and "
                                 "the decision, in its own file under state_dir/dx.")
    ap.add_argument("--config", help="the gateway's TOML config (for state_dir)")
    sub = ap.add_subparsers(dest="action", required=True)
    for name, text in (("start", "start logging a target"), ("stop", "stop logging a target"),
                       ("log", "print a target's log (JSON lines)")):
        p = sub.add_parser(name, help=text)
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--device", help="EAS DeviceId")
        who.add_argument("--user", help="user name (DOMAIN\\user and user@domain match user)")
        if name == "start":
            p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="how long (default 60)")
    sub.add_parser("list", help="targets and until when")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"seg-fast: {exc}", file=sys.stderr)
        return 2
    directory = dx_dir(config)
    if args.action == "list":
        for t in read_targets(directory):
            print(f"{t.kind}\t{t.target}\tuntil {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t.until))}")
        return 0
    kind, target = ("device", args.device) if args.device else ("user", args.user)
    if args.action == "log":
        sys.stdout.buffer.write(read_log(directory, kind, target))
        return 0
    from seg_fast.admin.console import AuditLog, audit_path
    who = f"cli:{getpass.getuser()}"
    try:
        if args.action == "start":
            t = start(directory, kind, target, args.minutes, who=who)
            AuditLog(audit_path(config)).write(who, "dx_start", kind=kind, target=t.target, until=t.until)
            print(f"Dx logging for {kind} {t.target} until "
                  f"{time.strftime('%H:%M:%S', time.localtime(t.until))}: {directory / log_name(kind, target)}")
        else:
            stopped = stop(directory, kind, target)
            AuditLog(audit_path(config)).write(who, "dx_stop", kind=kind, target=target)
            print(f"Dx logging for {kind} {target} {'stopped' if stopped else 'was not on'}")
    except (ValueError, OSError) as exc:
        print(f"seg-fast dx: {exc}", file=sys.stderr)
        return 1
    return 0
