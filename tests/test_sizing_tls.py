"""The sizing benchmark's device leg over TLS 1.3: the fleet trusts the run's own CA,
the simulator (direct), the gateway and nginx present its certificate, devices
resume their TLS session on later connections. Time compressed: claims nothing."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import trio

from seg_fast.sim import sizing

DEVICES = 40


def _check(paths: list[str]) -> None:
    opts = sizing.Options(devices=DEVICES, ramp=2.0, settle=1.0, hold=5.0, drain=15.0, paths=paths,
                          shard_size=200, rate_scale=40.0, seed=11, repeat=1, tls=True)
    report = trio.run(sizing.bench, opts, False, DEVICES, lambda _msg: None)
    (run,) = report["points"][0]["runs"]
    assert set(run["paths"]) == set(paths)
    for name, p in run["paths"].items():
        assert p["failures"] == {}, (name, p["failure_samples"])
        assert p["ready"] == DEVICES, name
        assert p["byte_checked"] > 100, name            # answers compared byte for byte
        # one TLS handshake per connection; later ones resume the device's session
        assert p["tls"]["handshakes"] >= DEVICES, (name, p["tls"])
        assert p["tls"]["resumed"] > 0, (name, p["tls"])
    assert not any("plain HTTP" in x for x in report["points"][0]["verdict"]["invalid"])


def test_fleet_over_tls_every_answer_checked():
    paths = ["direct"]
    if importlib.util.find_spec("seg_fast.proxy.server") is not None:
        paths.append("gateway")
    _check(paths)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SEG_FAST_SLOW"), reason="slow: SEG_FAST_SLOW=1 runs it")
@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed")
def test_nginx_over_tls():
    _check(["nginx"])
