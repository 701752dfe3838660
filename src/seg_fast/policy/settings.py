"""The [policy] section of the gateway config (placeholder; the policy work owns it)."""
from __future__ import annotations

import msgspec


class PolicySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    # Fail closed: with no policy snapshot, devices are blocked unless this is on.
    allow_if_no_policies: bool = False
