"""contrib/: the systemd unit passes systemd's own checker, and the logrotate file signals
what the gateway reopens on (the reopen itself: tests/test_logging.py)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from seg_fast.config import load_config

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    seg_fast = shutil.which("seg-fast") or "/bin/true"
    unit = (CONTRIB / "seg-fast.service").read_text().replace("/opt/seg-fast/.venv/bin/seg-fast", seg_fast)
    path = tmp_path / "seg-fast.service"
    path.write_text(unit)
    r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    problems = [line for line in r.stderr.splitlines() if "seg-fast.service" in line]
    assert not problems, r.stderr


def test_unit_and_logrotate_agree_with_the_gateway():
    unit = (CONTRIB / "seg-fast.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit          # SIGHUP re-reads the config
    assert "KillMode=mixed" in unit                              # SIGTERM to the control process drains
    grace = load_config(None, env={}).timeouts.shutdown_grace
    stop = int(unit.split("TimeoutStopSec=", 1)[1].split()[0])
    assert stop > grace                                          # the drain may finish before SIGKILL
    rotate = (CONTRIB / "logrotate").read_text()
    assert "--signal=SIGUSR1" in rotate and "--kill-whom=main" in rotate   # what serve reopens on
