"""Where the gateway keeps its state: the policy store, the admin token, attachment keys.

A relative state path (``policy.sqlite_path``, ``security.master_key_file``,
``security.key_state_file``) is taken inside the state directory, never the current
directory: a master key or a policy database must not land in whatever folder
``seg-fast`` happened to be started from (a repository, say). The directory is
``state_dir`` in the config (default /var/lib/seg-fast; SEG_FAST_STATE_DIR
overrides it) and is created with mode 0700 on first use.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/seg-fast"
ENV_STATE_DIR = "SEG_FAST_STATE_DIR"


def default_state_dir() -> str:
    """For settings built without a config file: the environment's, else the default."""
    return os.environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR


def resolve(path: str | os.PathLike, state_dir: str | None = None) -> Path:
    """``path`` itself when absolute, else inside ``state_dir`` (no I/O)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return Path(state_dir or default_state_dir()).expanduser().absolute() / p


def ensure_parent(path: str | os.PathLike) -> Path:
    """Make the folder a state file goes into (mode 0700 for a folder made here)."""
    p = Path(path)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return p
