"""The test-side reading of Include mode over the corpus's REWRITE_DOMAINS."""
from __future__ import annotations

from seg_fast.sim.oracle import listed  # noqa: F401  (the fleet checks answers with the same rule)


def assert_include_mode(html: str, msg) -> None:
    """Links to listed domains rewritten to awb/awbs, the others as they were, nothing else changed."""
    for url in msg.links:
        esc = url.replace("&", "&amp;")
        tail = esc[esc.index("://"):]
        if listed(url):
            assert ("awbs" if url.startswith("https") else "awb") + tail in html
        else:
            assert esc in html
    assert html.replace("awbs://", "https://").replace("awb://", "http://") == msg.html
