"""Attachment keys: one AES-256 key per (device, user, generation), derived with
HKDF-SHA256 from a master key kept in a file outside the policy store.

``seg-fast keys rotate --device ID`` bumps the device's generation (the guide's
"Update Encryption Key"); new envelopes use the new key, and the generation inside
each envelope's key id says which key opens it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from seg_fast.errors import ConfigError
from seg_fast.statedir import ensure_parent, resolve

KEY_SALT = b"seg-fast attachment key v1"
# How often a worker looks at the key state file for rotations.
STATE_CHECK_SECONDS = 1.0


def load_master_key(path: str | os.PathLike, *, create: bool = False) -> bytes:
    """32 bytes from ``path`` (raw, or 64 hex characters); made (mode 0600) if asked."""
    p = Path(path)
    if not p.exists() and create:
        try:
            ensure_parent(p)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another worker made it first
        except OSError:
            pass  # cannot create it: the read below names the file and why
        else:
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex() + "\n")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: master key file cannot be read ({e.strerror})") from None
    text = raw.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(raw) == 32:
        return raw
    raise ConfigError(f"{p}: master key must be 32 bytes or 64 hex characters")


def _norm(s: str) -> bytes:
    # Devices and EAS accounts are matched case-insensitively everywhere else too.
    return s.strip().lower().encode("utf-8")


class Keyring:
    """The keys of one gateway: master key plus per-device generations."""

    def __init__(self, master: bytes, state_file: str | os.PathLike | None = None):
        if len(master) != 32:
            raise ConfigError("master key must be 32 bytes")
        self._master = master
        self.fingerprint = hashlib.sha256(b"seg-fast key id" + master).digest()[:4]
        self._state_file = Path(state_file) if state_file else None
        self._generations: dict[str, int] = {}
        self._state_mtime = None
        self._checked = 0.0
        self._derive = lru_cache(maxsize=4096)(self._derive_uncached)

    @classmethod
    def from_settings(cls, settings) -> "Keyring":
        # Relative names are inside the state directory (config.load_config makes them
        # absolute; settings built in code fall back to SEG_FAST_STATE_DIR or the default).
        master = load_master_key(resolve(settings.master_key_file), create=True)
        return cls(master, resolve(settings.key_state_file) if settings.key_state_file else None)

    def _derive_uncached(self, device: bytes, user: bytes, generation: int) -> bytes:
        info = b"device\0" + device + b"\0user\0" + user + b"\0gen" + struct.pack(">I", generation)
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=KEY_SALT, info=info).derive(self._master)

    def key(self, device_id: str, user: str, generation: int) -> bytes:
        return self._derive(_norm(device_id), _norm(user), generation)

    def key_id(self, generation: int) -> bytes:
        """8 bytes: generation (u32 big-endian) and the master key's fingerprint."""
        return struct.pack(">I", generation) + self.fingerprint

    def generation(self, device_id: str) -> int:
        self._refresh()
        return self._generations.get(device_id.strip().lower(), 0)

    def current(self, device_id: str, user: str) -> tuple[bytes, bytes]:
        """(key id, key) that new envelopes for this device and user use."""
        gen = self.generation(device_id)
        return self.key_id(gen), self.key(device_id, user, gen)

    def key_for_id(self, key_id: bytes, device_id: str, user: str) -> bytes | None:
        if len(key_id) != 8 or key_id[4:] != self.fingerprint:
            return None
        return self.key(device_id, user, struct.unpack(">I", key_id[:4])[0])

    def rotate(self, device_id: str) -> int:
        """Next generation for the device, written to the state file; returns it."""
        if self._state_file is None:
            raise ConfigError("no key state file configured")
        self._checked = 0.0
        self._refresh()
        dev = device_id.strip().lower()
        gen = self._generations.get(dev, 0) + 1
        if gen >= 2**32:
            raise ConfigError(f"device {device_id}: key generations exhausted")
        self._generations[dev] = gen
        ensure_parent(self._state_file)
        tmp = self._state_file.with_name(self._state_file.name + f".{os.getpid()}.tmp")
        # 0600 like every state file (write_text would make it 0644 under the usual umask).
        tmp.unlink(missing_ok=True)     # a leftover keeps its old mode through O_CREAT
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"generations": self._generations}, sort_keys=True))
        os.replace(tmp, self._state_file)
        return gen

    def _refresh(self) -> None:
        if self._state_file is None:
            return
        now = time.monotonic()
        if now - self._checked < STATE_CHECK_SECONDS:
            return
        self._checked = now
        try:
            st = self._state_file.stat()
        except FileNotFoundError:
            self._generations, self._state_mtime = {}, None
            return
        if (st.st_mtime_ns, st.st_size) == self._state_mtime:
            return
        try:
            doc = json.loads(self._state_file.read_text())
            gens = {str(k): int(v) for k, v in doc["generations"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{self._state_file}: key state file is damaged") from None
        self._generations, self._state_mtime = gens, (st.st_mtime_ns, st.st_size)
