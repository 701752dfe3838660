"""The admin API on 127.0.0.1:44444 (placeholder until the policy work lands)."""
from __future__ import annotations

import trio


async def run(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin API until cancelled (runs in the control process)."""
    task_status.started()
