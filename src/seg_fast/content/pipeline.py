"""Applies a Decision's email-security transforms to answers (placeholder)."""
from __future__ import annotations

from seg_fast.content.model import EmailSecurityPolicy


def transforms_for(policy: EmailSecurityPolicy | None, *, managed: bool, device_id: str, user: str) -> tuple:
    """The transforms one device's requests get under ``policy``."""
    return ()
