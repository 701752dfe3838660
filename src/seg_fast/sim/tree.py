"""Building and reading WBXML trees in the simulator's handlers.

``E("AirSync:Sync", E("AirSync:Status", 1))`` builds a codec Element: children
are Elements, a str/int becomes the text, bytes become opaque data. The reading
helpers tolerate absent elements (devices omit most of them).
"""
from __future__ import annotations

from typing import Iterator

from seg_fast.eas.wbxml import Element, decode, encode  # noqa: F401  (re-exported)


def E(tag: str, *content: "Element | str | int | bytes | None") -> Element:
    children = []
    text = None
    opaque = None
    for c in content:
        if c is None:
            continue
        if isinstance(c, Element):
            children.append(c)
        elif isinstance(c, (bytes, bytearray, memoryview)):
            opaque = bytes(c)
        else:
            text = str(c)
    return _element(tag, children, text, opaque)


def _element(tag: str, children: list, text: str | None, opaque: bytes | None) -> Element:
    return Element(tag, children=children, text=text, opaque=opaque)


def kids(el: Element | None, tag: str | None = None) -> Iterator[Element]:
    if el is None:
        return iter(())
    if tag is None:
        return iter(el.children)
    return (c for c in el.children if c.tag == tag)


def find(el: Element | None, *path: str) -> Element | None:
    """The first element down ``path`` (tags), or None."""
    for tag in path:
        if el is None:
            return None
        el = next(kids(el, tag), None)
    return el


def text(el: Element | None, *path: str, default: str | None = None) -> str | None:
    el = find(el, *path)
    if el is None:
        return default
    if el.text is not None:
        return el.text
    if el.opaque is not None:
        return el.opaque.decode("utf-8", "replace")
    return ""


def data(el: Element | None, *path: str) -> bytes | None:
    """Opaque content (or the UTF-8 of inline text) down ``path``."""
    el = find(el, *path)
    if el is None:
        return None
    if el.opaque is not None:
        return el.opaque
    return (el.text or "").encode()
