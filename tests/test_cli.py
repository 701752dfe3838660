"""The `seg-fast` command line as a user meets it: every sub-command answers --help."""
from __future__ import annotations

import subprocess
import sys

import pytest

from seg_fast.cli import COMMANDS


def seg_fast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seg_fast", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command):
    r = seg_fast(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and f"seg-fast {command}" in r.stdout
    assert "--help" in r.stdout or "-h" in r.stdout


def test_top_level_lists_every_command_and_needs_one():
    r = seg_fast("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in r.stdout
    bare = seg_fast()
    assert bare.returncode == 2 and "usage: seg-fast COMMAND" in bare.stderr
    unknown = seg_fast("frobnicate")
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr


def test_wbxml_subcommands_have_help_and_scan_names_its_tag_form():
    for sub in ("decode", "encode", "scan"):
        r = seg_fast("wbxml", sub, "--help")
        assert r.returncode == 0 and f"seg-fast wbxml {sub}" in r.stdout, r.stderr
    r = seg_fast("wbxml", "scan", "/dev/null", "Subject")
    assert r.returncode == 2 and "Email:Subject" in r.stderr
