"""State files (policy store, admin token, attachment keys) live in state_dir, never
in the current directory: each consumer, through the real CLI in a clean folder."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from seg_fast.admin.server import admin_token, token_path
from seg_fast.config import load_config
from seg_fast.content.keys import Keyring
from seg_fast.content.settings import ContentSettings
from seg_fast.policy.store import SqliteStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
SRC = Path(__file__).resolve().parent.parent / "src"


def _run(args, cwd, state):
    env = {**os.environ, "SEG_FAST_STATE_DIR": str(state), "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "seg_fast", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def dirs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    return work, tmp_path / "state" / "seg-fast"


def test_defaults_resolve_inside_state_dir(tmp_path):
    state = tmp_path / "st"
    cfg = load_config(None, env={"SEG_FAST_STATE_DIR": str(state)})
    assert cfg.state_dir == str(state)
    assert cfg.policy.sqlite_path == str(state / "seg-fast-policy.db")
    assert cfg.security.master_key_file == str(state / "seg-fast-master.key")
    assert cfg.security.key_state_file == str(state / "seg-fast-keys.json")
    assert not state.exists()           # resolving does no I/O; first use creates it


def test_file_state_dir_and_absolute_paths(tmp_path):
    conf = tmp_path / "gw.toml"
    conf.write_text(f'state_dir = "{tmp_path / "s"}"\n[policy]\nsqlite_path = "db/p.db"\n'
                    f'[security]\nmaster_key_file = "{tmp_path / "elsewhere.key"}"\n')
    cfg = load_config(conf, env={})
    assert cfg.policy.sqlite_path == str(tmp_path / "s" / "db" / "p.db")
    assert cfg.security.master_key_file == str(tmp_path / "elsewhere.key")
    assert load_config(None, env={}).state_dir == "/var/lib/seg-fast"


def test_policy_cli_writes_store_in_state_dir(dirs):
    work, state = dirs
    r = _run(["policy", "load", str(EXAMPLES / "baseline.json")], work, state)
    assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == []
    assert (state / "seg-fast-policy.db").is_file()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    r = _run(["policy", "dump"], work, state)
    assert r.returncode == 0 and '"device_id"' in r.stdout
    assert list(work.iterdir()) == []


def test_keys_and_attachment_cli_use_state_dir(dirs, tmp_path):
    work, state = dirs
    r = _run(["keys", "rotate", "--device", "DEV1"], work, state)
    assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == []
    assert (state / "seg-fast-master.key").is_file() and (state / "seg-fast-keys.json").is_file()
    assert stat.S_IMODE((state / "seg-fast-master.key").stat().st_mode) == 0o600
    # An envelope sealed with the keys in the state dir opens with the CLI from elsewhere.
    from seg_fast.content.attachments import seal

    keys = Keyring.from_settings(ContentSettings(master_key_file=str(state / "seg-fast-master.key"),
                                                 key_state_file=str(state / "seg-fast-keys.json")))
    env_file = tmp_path / "a.pdf.segenc"
    env_file.write_bytes(seal(keys, "DEV1", "alice", "a.pdf", "application/pdf", b"%PDF-1.4 hello"))
    r = _run(["attachment", "decrypt", "--device", "DEV1", "--user", "alice", "-o", "-", str(env_file)],
             work, state)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "%PDF-1.4 hello"
    assert list(work.iterdir()) == []


def test_settings_built_in_code_fall_back_to_env_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SEG_FAST_STATE_DIR", str(tmp_path / "envstate"))
    assert SqliteStore("p.db").path == str(tmp_path / "envstate" / "p.db")
    Keyring.from_settings(ContentSettings())
    assert (tmp_path / "envstate" / "seg-fast-master.key").is_file()


def test_admin_token_file_in_state_dir(tmp_path):
    state = tmp_path / "st"
    for store in ("sqlite", "redis"):
        cfg = load_config(None, env={"SEG_FAST_STATE_DIR": str(state), "SEG_FAST_POLICY_STORE": store})
        path = token_path(cfg)
        assert path.parent == state
        token = admin_token(cfg)
        assert path.read_text().strip() == token and len(token) > 20
