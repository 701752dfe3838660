"""Email security policy documents (placeholder shape; the content work owns it)."""
from __future__ import annotations

import msgspec


class EmailSecurityPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Hyperlink, attachment and classification policies, one document in the snapshot."""
