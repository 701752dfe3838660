"""The test-side reading of Include mode over the corpus's REWRITE_DOMAINS."""
from __future__ import annotations

from seg_fast.sim.corpus import REWRITE_DOMAINS


def listed(url: str) -> bool:
    host = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0].lower()
    return any(host == d or host.endswith("." + d) for d in REWRITE_DOMAINS)


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
