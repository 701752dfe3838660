"""Encoded WBXML subtrees reused across the simulator's answers.

Building a Sync item's ApplicationData (or a fetched attachment's Properties) as a
tree and encoding it costs more than everything else in an answer: bodies of up to
megabytes go through UTF-8 and base64 round trips every time. Here each such subtree
is encoded once per (message, the options that shape it) and kept as bytes; an
answer is encoded with a small placeholder element in its place, and the cached
bytes are put back in, so the answer is byte for byte what encoding the whole tree
gives (tests/test_sim_splice.py compares the two over the corpus).

Why the placeholder needs a fix-up after it: the encoder writes a SWITCH_PAGE only
when a tag's code page differs from the one in force. The placeholder leaves its own
page in force; the real subtree leaves the page of its last tag. So the first tag
after the placeholder (after any END tokens) gets its SWITCH_PAGE added or dropped
to match what encoding the real subtree would have written.

Per-item values inside a cached subtree (the ServerId in attachment FileReferences)
are holes: the template is encoded with a marker string there and split on it.
"""
from __future__ import annotations

from seg_fast.errors import WBXMLError
from seg_fast.sim.tree import E, Element, encode
from seg_fast.eas.wbxml import token_of

HEADER = b"\x03\x01\x6a\x00"
SWITCH_PAGE, END, OPAQUE = 0x00, 0x01, 0xC3
# A hole for a per-item string (never in corpus text: control characters).
HOLE = "\x01seg-hole\x01"
_HOLE_BYTES = HOLE.encode()
# Cached bytes per simulator, at most this many (the oldest templates go first): the
# fleet's pool needs ~75 MB (attachments base64-encoded ~55 MB; whole MIME bodies
# are not copied, see Template ``shared``).
BUDGET = 160 * 1024 * 1024
# A body at least this long is referenced, not copied, when found in a template.
SHARE_MIN = 16384


class Template:
    """A subtree's encoding without the header and without the SWITCH_PAGE before its
    own tag, as pieces with None at its holes; ``end_page`` is the code page its last
    tag leaves. ``shared``: bytes that may appear whole in the encoding (a message's
    MIME sent untruncated) are kept as a reference to that object, not a copy."""
    __slots__ = ("pieces", "end_page", "tag", "size", "facts")

    def __init__(self, el: Element, holes: int = 0, shared: bytes | None = None):
        raw = encode(el)
        if raw[:4] != HEADER:
            raise WBXMLError("unexpected WBXML header from the encoder", 0)
        raw = raw[4:]
        page = token_of(el.tag)[0]
        if page != 0:                  # the standalone document starts on page 0
            raw = raw[2:]
        parts = raw.split(_HOLE_BYTES)
        if len(parts) != holes + 1:
            raise WBXMLError(f"template of {el.tag}: {len(parts) - 1} holes, expected {holes}", 0)
        self.pieces: list[bytes | None] = []
        self.size = 0
        for k, part in enumerate(parts):
            if k:
                self.pieces.append(None)
            at = part.find(shared) if shared is not None and len(shared) >= SHARE_MIN else -1
            if at >= 0:
                self.pieces += [part[:at], shared, part[at + len(shared):]]
                self.size += len(part) - len(shared)
            else:
                self.pieces.append(part)
                self.size += len(part)
        last = el
        while last.children:
            last = last.children[-1]
        self.end_page = token_of(last.tag)[0]
        self.tag = el.tag
        self.facts = None           # what a device's check reads from it (facts.py), set by its builder

    def fill(self, value: str = "") -> bytes:
        return b"".join(self.filled(value))

    def filled(self, value: str = "") -> list[bytes]:
        """The pieces with ``value`` in the holes (joined by whoever copies them last)."""
        if len(self.pieces) == 1:
            return self.pieces
        v = value.encode()
        return [v if p is None else p for p in self.pieces]


class Cache:
    """Templates by key, bounded in bytes (the oldest dropped first); the Sync frames."""
    __slots__ = ("templates", "size", "hits", "misses", "frames", "framed")

    def __init__(self):
        self.templates: dict = {}
        self.size = 0
        self.hits = 0
        self.misses = 0
        self.frames: dict[bool, SyncFrame] = {}
        self.framed = 0             # Sync answers written by a frame (no tree)

    def frame(self, more: bool) -> "SyncFrame":
        self.framed += 1
        f = self.frames.get(more)
        if f is None:
            f = self.frames[more] = SyncFrame(more)
        return f

    def get(self, key, build) -> Template:
        t = self.templates.get(key)
        if t is not None:
            self.hits += 1
            return t
        self.misses += 1
        t = build()
        if t.size <= BUDGET // 4:
            while self.size + t.size > BUDGET:
                old = self.templates.pop(next(iter(self.templates)))
                self.size -= old.size
            self.templates[key] = t
            self.size += t.size
        return t


class Splices:
    """The subtrees one answer puts back: ``placeholder`` stands in for one in the
    tree; ``encode`` encodes the tree and puts them all back."""
    __slots__ = ("items",)

    def __init__(self):
        self.items: list[tuple[bytes, bytes, int, int]] = []

    def placeholder(self, template: Template, value: str = "") -> Element:
        mark = b"\x00seg-splice%04x\x00" % len(self.items)
        packed = token_of(template.tag)
        pattern = bytes((packed[1] | 0x40, OPAQUE, len(mark))) + mark + bytes((END,))
        self.items.append((pattern, template.filled(value), template.end_page, packed[0]))
        return E(template.tag, mark)

    def encode(self, tree: Element) -> bytes:
        data = encode(tree)
        if not self.items:
            return data
        # pieces joined once at the end: a cached body of megabytes is copied once
        # into the answer, not appended to a growing buffer and copied again
        out: list[bytes] = []
        pos = 0
        n = len(data)
        # by position: handlers may make placeholders out of document order (a Sync's
        # Responses are built before its Commands)
        found = sorted((data.index(item[0]), item) for item in self.items)
        for at, (pattern, content, end_page, own_page) in found:
            if at < pos:
                raise WBXMLError("overlapping splices", at)
            out.append(data[pos:at])
            out += content
            q = at + len(pattern)
            while q < n and data[q] == END:
                q += 1
            out.append(data[at + len(pattern):q])
            if q < n:
                if data[q] == SWITCH_PAGE:
                    if data[q + 1] == end_page:        # the real subtree left that page in force
                        q += 2
                elif data[q] & 0x3F >= 5:               # a tag on the placeholder's page
                    if end_page != own_page:
                        out.append(bytes((SWITCH_PAGE, own_page)))
                else:                                   # mixed content: never in these answers
                    raise WBXMLError("content after a spliced element", q)
            pos = q
        out.append(data[pos:])
        return b"".join(out)


# Markers the frame's strings are encoded as (control characters: never a real value)
_MARK = {k: f"\x02{k}\x02" for k in "kisa"}
_SWITCH_TO_0 = bytes((SWITCH_PAGE, 0))


class SyncFrame:
    """A Sync answer of one Collection (no Class) holding only new items — the
    steady state of every device — written as bytes around the items' templates,
    with no tree: the encoder's own output for the same answer, cut where the
    SyncKey, the CollectionId and each item go (tests/test_sim_splice.py compares
    the two). Between two items the first's template may leave another code page in
    force; the next Add then starts with a SWITCH_PAGE to page 0, as the encoder
    writes it."""
    __slots__ = ("head", "after_key", "to_first_add", "add_open", "sid_end", "tail")

    def __init__(self, more: bool):
        m = _MARK
        raw = encode(E("AirSync:Sync", E("AirSync:Collections", E(
            "AirSync:Collection", E("AirSync:SyncKey", m["k"]), E("AirSync:CollectionId", m["i"]),
            E("AirSync:Status", 1), E("AirSync:MoreAvailable") if more else None,
            E("AirSync:Commands", E("AirSync:Add", E("AirSync:ServerId", m["s"]),
                                    E("AirSync:ApplicationData", m["a"])))))))
        pieces = []
        for k in "kisa":
            before, mark, raw = raw.partition(m[k].encode())
            if not mark:
                raise WBXMLError(f"Sync frame: marker {k} not found", 0)
            pieces.append(before)
        pieces.append(raw)
        head, after_key, after_cid, after_sid, after_app = pieces
        add = bytes((token_of("AirSync:Add")[1] | 0x40, token_of("AirSync:ServerId")[1] | 0x40, 0x03))
        app = bytes((token_of("AirSync:ApplicationData")[1] | 0x40, 0x03))
        # what the cuts below assume of the encoder's output (all on page 0)
        if not (after_cid.endswith(add) and after_sid == b"\x00" + bytes((END,)) + app
                and after_app == b"\x00" + bytes((END,)) * 6):
            raise WBXMLError("Sync frame: unexpected encoding", 0)
        self.head = head                             # .. SyncKey's inline string opened
        self.after_key = after_key                   # its end .. CollectionId's string opened
        self.to_first_add = after_cid[:-3]           # its end .. Status, MoreAvailable, Commands
        self.add_open = add                          # Add, ServerId, its string opened
        self.sid_end = after_sid[:-2]                # the string's end, ServerId's END
        self.tail = after_app[3:]                    # after the last Add: Commands .. Sync ended

    def encode(self, key: str, cid: str, items: list) -> bytes:
        """The answer: ``items`` are (ServerId, Template of its ApplicationData), at least one."""
        out = [self.head, key.encode(), self.after_key, cid.encode(), self.to_first_add]
        page = 0
        add_open, sid_end, end = self.add_open, self.sid_end, bytes((END,))
        for sid, t in items:
            if page:
                out.append(_SWITCH_TO_0)
            out += (add_open, sid.encode(), sid_end)
            out += t.filled(sid)
            out.append(end)
            page = t.end_page
        out.append(self.tail)
        return b"".join(out)
