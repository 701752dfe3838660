"""Where the gateway keeps its state: the policy store, the admin token, attachment keys.

A relative state path (``policy.sqlite_path``, ``security.master_key_file``,
``security.key_state_file``) is taken inside the state directory, never the current
directory: a master key or a policy database must not land in whatever folder
``seg-fast`` happened to be started from (a repository, say). The directory is
``state_dir`` in the config (default /var/lib/seg-fast; SEG_FAST_STATE_DIR
overrides it) and is created with mode 0700 on first use.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
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


# renameat2(2) (Linux 3.15+, glibc 2.28+): not in Python's os module
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError):
    _renameat2 = None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing files' names in one step (renameat2 RENAME_EXCHANGE): a reader of
    either name sees one whole file or the other. False if this system or file system
    cannot (the caller renames instead); OSError for anything else."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def create_private(path: str | os.PathLike) -> None:
    """Make ``path`` (if missing) mode 0600 before anything else opens it: SQLite then
    makes the -wal and -shm files with the same mode, whatever the umask."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass


def exposure_warnings(state_dir: str | os.PathLike) -> list[str]:
    """What in the state directory others than its owner can read (keys, tokens, records)."""
    d = Path(state_dir)
    out = []
    try:
        mode = d.stat().st_mode
    except OSError:
        return out
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        out.append(f"state_dir {d} is mode {stat.S_IMODE(mode):04o}: other users can reach the keys and "
                   f"policy records in it; make it 0700 (chmod 700 {d})")
    try:
        entries = list(d.iterdir())
    except OSError:
        return out
    for p in sorted(entries):
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            out.append(f"state file {p} is mode {stat.S_IMODE(st.st_mode):04o}; make it 0600")
    return out
