"""Per (device, user) keys from the master key file; rotation through the CLI."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from conftest import REPO
from seg_fast.content.keys import KEY_SALT, Keyring, load_master_key
from seg_fast.errors import ConfigError


def test_master_key_created_0600_and_reloaded(tmp_path):
    p = tmp_path / "master.key"
    k1 = load_master_key(p, create=True)
    assert len(k1) == 32 and (p.stat().st_mode & 0o777) == 0o600
    assert load_master_key(p) == k1
    (tmp_path / "raw.key").write_bytes(b"\x01" * 32)
    assert load_master_key(tmp_path / "raw.key") == b"\x01" * 32
    (tmp_path / "bad.key").write_bytes(b"short")
    with pytest.raises(ConfigError, match="bad.key"):
        load_master_key(tmp_path / "bad.key")
    with pytest.raises(ConfigError, match="missing.key"):
        load_master_key(tmp_path / "missing.key")


def test_keys_are_hkdf_per_device_user_generation():
    master = bytes(range(32))
    ring = Keyring(master)
    # Independent HKDF computation with the documented info string.
    info = b"device\0dev1\0user\0corp\\alice\0gen" + (0).to_bytes(4, "big")
    want = HKDF(algorithm=hashes.SHA256(), length=32, salt=KEY_SALT, info=info).derive(master)
    assert ring.key("DEV1", "CORP\\Alice", 0) == want
    keys = {ring.key(d, u, g) for d in ("dev1", "dev2") for u in ("a", "b") for g in (0, 1)}
    assert len(keys) == 8
    kid, key = ring.current("dev1", "a")
    assert kid == bytes(4) + hashlib.sha256(b"seg-fast key id" + master).digest()[:4]
    assert ring.key_for_id(kid, "dev1", "a") == key
    assert ring.key_for_id(b"\0\0\0\0XXXX", "dev1", "a") is None


def test_rotate_bumps_generation_seen_by_other_keyrings(tmp_path, monkeypatch):
    import seg_fast.content.keys as keys_mod

    monkeypatch.setattr(keys_mod, "STATE_CHECK_SECONDS", 0.0)
    state = tmp_path / "keys.json"
    a, b = Keyring(b"k" * 32, state), Keyring(b"k" * 32, state)
    before = b.current("dev1", "u")
    assert a.rotate("Dev1") == 1 and a.rotate("dev1") == 2
    after = b.current("dev1", "u")
    assert after[0][:4] == (2).to_bytes(4, "big") and after[1] != before[1]
    assert b.current("dev2", "u") == Keyring(b"k" * 32).current("dev2", "u")
    state.write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        Keyring(b"k" * 32, state).generation("dev1")


def test_keys_rotate_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"),
               SEG_FAST_SECURITY_MASTER_KEY_FILE=str(tmp_path / "m.key"),
               SEG_FAST_SECURITY_KEY_STATE_FILE=str(tmp_path / "k.json"))
    run = lambda: subprocess.run([sys.executable, "-m", "seg_fast", "keys", "rotate", "--device", "ABC"],
                                 env=env, capture_output=True, text=True, cwd=tmp_path)
    r1, r2 = run(), run()
    assert r1.returncode == 0 and "generation 1" in r1.stdout
    assert r2.returncode == 0 and "generation 2" in r2.stdout
    assert Keyring(load_master_key(tmp_path / "m.key"), tmp_path / "k.json").generation("abc") == 2
