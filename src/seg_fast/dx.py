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


# -- the worker's side ---------------------------------------------------------------

_encoder = msgspec.json.Encoder()


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

    def capture(self, rec, extra: dict | None = None) -> None:
        """One transaction of a targeted device or user (rec: observe.Transaction)."""
        targets = self.wants(rec.device_id, rec.user)
        if not targets:
            return
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
