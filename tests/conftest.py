"""Shared test set-up: hypothesis profiles and the fixtures directory."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The default run (CI's) is derandomized and keeps no example database: the same examples
# on every machine, so a red run is reproducible and a green one is not luck.
# SEG_FAST_HYPOTHESIS=long runs the property tests randomly with many more examples.
settings.register_profile("default", max_examples=300, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SEG_FAST_HYPOTHESIS", "default"))

REPO = Path(__file__).resolve().parent.parent

# State files a test leaves to the defaults (policy store, admin token, keys) go to a
# temp dir of this session, never the repository or /var/lib/seg-fast; subprocesses
# (seg-fast serve, the CLI) inherit it.
os.environ["SEG_FAST_STATE_DIR"] = tempfile.mkdtemp(prefix="seg-fast-test-state-")
atexit.register(shutil.rmtree, os.environ["SEG_FAST_STATE_DIR"], True)
# The load side's corpus pool, built once per seed for the whole session (sim/fleet.POOL_CACHE):
# every sizing test's shards built it themselves, ~2.4 s each.
os.environ["SEG_FAST_CORPUS_CACHE"] = tempfile.mkdtemp(prefix="seg-fast-test-corpus-")
atexit.register(shutil.rmtree, os.environ["SEG_FAST_CORPUS_CACHE"], True)


def _find_fixtures() -> Path:
    # A copy of ../shared/fixtures/real-server ships with the tests.
    for cand in (REPO / "tests" / "data" / "real-server",
                 REPO.parent / "shared" / "fixtures" / "real-server"):
        if cand.is_dir():
            return cand
    raise RuntimeError("real-server fixtures not found (expected ../shared/fixtures/real-server)")


REAL_SERVER = _find_fixtures()

# One SOGo stack (tests/sogo_server.py) for every test_sogo_* module, started on first use.
from sogo_server import sogo  # noqa: E402,F401

# scripts/test.sh runs the suite on two processes (where there are two cores). The modules that run the
# whole pipeline share one of them: the SOGo stack is a session fixture, so spread over two
# processes it would start twice, and two sizing runs at once would pin two gateways and two
# fleets to the same two cores. (xdist's own xdist_group marks rename node ids, which
# pytest 9.2 no longer lets a plugin do, so the grouping is a scheduler of ours.)
WHOLE_RUNS = "whole-runs"
_WHOLE_RUN_MODULES = {"test_sizing_smoke", "test_sizing_tls", "test_sizing_checks", "test_sizing_cgroup",
                      "test_sizing_memory", "test_fleet_parker", "test_fleet_freeze",
                      "test_sogo_fleet", "test_sogo_security", "test_sogo_session"}

assert all((REPO / "tests" / f"{m}.py").exists() for m in _WHOLE_RUN_MODULES), "a whole-run module was renamed"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class WholeRunsTogether(LoadScopeScheduling):
        """xdist's load distribution, test by test, but the whole-run modules as one unit."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
            return WHOLE_RUNS if module in _WHOLE_RUN_MODULES else nodeid

    return WholeRunsTogether(config, log)
