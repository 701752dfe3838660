"""The [security] section of the gateway config (placeholder; the content work owns it)."""
from __future__ import annotations

import msgspec


class ContentSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    # Largest answer the pipeline buffers to transform; past it the device gets an error.
    max_transform_bytes: int = 64 * 1024 * 1024
