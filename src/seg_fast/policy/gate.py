"""Builds the Gatekeeper one gateway worker uses (placeholder until the policy engine lands)."""
from __future__ import annotations

from seg_fast.hooks import AllowAll, Gatekeeper


def build(config) -> Gatekeeper:
    """The gatekeeper for one worker process, from the gateway config."""
    return AllowAll()
