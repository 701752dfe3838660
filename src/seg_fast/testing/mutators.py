"""Mutators: hypothesis strategies that break a valid request on purpose.

Tree mutators keep the document encodable (so it still decodes: the server's
parser accepts it) but break the protocol:

- ``nest``: an element moved under a sibling, or the root wrapped in another
  command's root (wrong nesting);
- ``range``: a numeric leaf (Status, WindowSize, HeartbeatInterval, Type, ...)
  set to a value out of its range (-1, 0, 2**32, 40 digits, "abc");
- ``oversize``: a leaf's text made 4 KiB to 1 MiB long;
- ``unknown``: an element with a token the code page lacks
  (``AirSync:Unknown0x3F``) or on a page the spec lacks (``Page40:Unknown0x05``);
- ``page``: an element's token kept but its code page switched (SyncKey 0x0B on
  page 0 becomes Contacts' 0x0B);
- ``drop``/``dup``: a child removed or repeated; ``newer``: an element of a later
  protocol version inserted (spec.SINCE);
- ``text-opaque``: a leaf's inline string carried as OPAQUE instead.

Byte mutators (``mutated_bytes``) flip, insert, delete and truncate bytes, or
add a SWITCH_PAGE to a page that does not exist: those may not decode at all.

``mutated(tree_strategy)`` draws ``Mutation(doc, ops)`` where ``ops`` names what
was done (shown in failure files), ``doc`` an Element or, after byte damage, bytes.
"""
from __future__ import annotations

from typing import NamedTuple

from hypothesis import strategies as st

from seg_fast.eas import codepages
from seg_fast.eas.wbxml import Element, decode, encode, token_of
from seg_fast.testing import spec

TREE_OPS = ("nest", "range", "oversize", "unknown", "page", "drop", "dup", "newer", "text-opaque")
BYTE_OPS = ("flip", "insert", "delete", "truncate", "switch-page")
OUT_OF_RANGE = ("-1", "0", "4294967296", "9" * 40, "abc", "", " 1", "1.5", "0x10")
NUMERIC = frozenset({"Status", "WindowSize", "HeartbeatInterval", "Wait", "FilterType", "Type", "TruncationSize",
                     "MIMESupport", "MIMETruncation", "Preview", "UserResponse", "OofState", "Estimate", "Count",
                     "MaxItems", "CertificateRetrieval", "MaxCertificates", "MaxAmbiguousRecipients", "Range",
                     "SyncKey", "Importance", "Read", "DeletesAsMoves", "GetChanges", "ConversationMode",
                     "AllOrNone", "MaxSize", "MaxPictures", "ClientId"})
_FREE_TOKENS = {page: [t for t in range(0x05, 0x40) if t not in names] for page, (_, names) in codepages.PAGES.items()}
_UNDEFINED_PAGES = [p for p in range(0, 256) if p not in codepages.PAGES]


class Mutation(NamedTuple):
    doc: Element | bytes
    ops: tuple[str, ...]


def _copy(el: Element) -> Element:
    return decode(encode(el))


def _elements(root: Element) -> list[tuple[Element | None, Element]]:
    """(parent, element) pairs in document order."""
    out = [(None, root)]
    todo = [root]
    while todo:
        el = todo.pop()
        for c in el.children:
            out.append((el, c))
            todo.append(c)
    return out


def _leaf(tag: str, text: str | None = None) -> Element:
    return Element(tag, text=text)


@st.composite
def tree_mutation(draw, root: Element, version: int = 161, op: str | None = None) -> Mutation:
    """One protocol-breaking edit of a copy of ``root``."""
    root = _copy(root)
    op = op or draw(st.sampled_from(TREE_OPS))
    pairs = _elements(root)
    parent, el = pairs[draw(st.integers(0, len(pairs) - 1))]
    name = el.tag.partition(":")[2]
    if op == "nest":
        siblings = [c for c in (parent.children if parent else []) if c is not el]
        if siblings and draw(st.booleans()):
            parent.children.remove(el)
            draw(st.sampled_from(siblings)).children.append(el)
        else:
            other = draw(st.sampled_from([r for r in spec.ROOTS.values() if r != root.tag]))
            root = Element(other, children=[root])
    elif op == "range":
        leaves = [e for _, e in pairs if not e.children and e.tag.partition(":")[2] in NUMERIC] or [el]
        target = draw(st.sampled_from(leaves))
        target.text, target.opaque = draw(st.sampled_from(OUT_OF_RANGE)), None
        name = target.tag.partition(":")[2]
    elif op == "oversize":
        leaves = [e for _, e in pairs if not e.children] or [el]
        target = draw(st.sampled_from(leaves))
        size = draw(st.sampled_from([4096, 65536, 1 << 20]))
        target.text, target.opaque = draw(st.sampled_from("Ax9")) * size, None
        name = target.tag.partition(":")[2]
    elif op == "unknown":
        if draw(st.booleans()):
            page = token_of(el.tag)[0]
            free = _FREE_TOKENS.get(page) or [0x3F]
            tag = codepages.unknown_tag_name(page, draw(st.sampled_from(free)))
        else:
            tag = codepages.unknown_tag_name(draw(st.sampled_from(_UNDEFINED_PAGES)), draw(st.integers(0x05, 0x3F)))
        el.children.insert(draw(st.integers(0, len(el.children))), _leaf(tag, draw(st.sampled_from(["1", "x"]))))
    elif op == "page":
        page, tok = token_of(el.tag)
        others = [p for p, (_, names) in codepages.PAGES.items() if p != page and tok in names]
        if others:
            el.tag = codepages.tag_name(draw(st.sampled_from(others)), tok)
        else:
            el.tag = codepages.unknown_tag_name(draw(st.sampled_from(_UNDEFINED_PAGES)), tok)
    elif op == "drop":
        if el.children:
            del el.children[draw(st.integers(0, len(el.children) - 1))]
        elif parent is not None:
            parent.children.remove(el)
    elif op == "dup":
        (parent or root).children.append(_copy(el) if parent else _leaf(el.tag, "1"))
    elif op == "newer":
        newer = sorted(t for t, since in spec.SINCE.items() if since > version) or sorted(spec.SINCE)
        el.children.append(_leaf(draw(st.sampled_from(newer)), "1"))
    elif op == "text-opaque":
        leaves = [e for _, e in pairs if e.text is not None] or [el]
        target = draw(st.sampled_from(leaves))
        target.opaque, target.text = (target.text or "").encode(), None
        name = target.tag.partition(":")[2]
    else:
        raise ValueError(f"unknown tree mutation {op!r} (have: {', '.join(TREE_OPS)})")
    return Mutation(root, (f"{op}:{name}",))


@st.composite
def byte_mutation(draw, data: bytes, op: str | None = None) -> Mutation:
    """One byte-level edit (the header's 4 bytes are kept, so it is still 'WBXML')."""
    b = bytearray(data)
    op = op or draw(st.sampled_from(BYTE_OPS))
    lo = min(4, len(b))
    i = draw(st.integers(lo, max(lo, len(b) - 1)))
    if op == "flip" and len(b) > lo:
        b[i] = draw(st.integers(0, 255))
    elif op == "insert":
        b[i:i] = bytes(draw(st.lists(st.integers(0, 255), min_size=1, max_size=4)))
    elif op == "delete" and len(b) > lo:
        del b[i:i + draw(st.integers(1, 4))]
    elif op == "truncate":
        del b[i:]
    elif op == "switch-page":
        b[i:i] = bytes([0x00, draw(st.sampled_from(_UNDEFINED_PAGES))])
    return Mutation(bytes(b), (f"{op}@{i}",))


@st.composite
def mutated(draw, trees: st.SearchStrategy, version: str | int = "16.1", max_ops: int = 3,
            byte_level: bool = True) -> Mutation:
    """A tree from ``trees`` with 1..max_ops tree mutations, then maybe byte damage."""
    v = spec.vnum(version) if isinstance(version, str) else version
    doc = draw(trees)
    if not isinstance(doc, Element):           # raw MIME (12.1 SendMail): bytes only
        return draw(byte_mutation(doc))
    ops: tuple[str, ...] = ()
    for _ in range(draw(st.integers(1, max_ops))):
        doc, done = draw(tree_mutation(doc, v))
        ops += done
    if byte_level and draw(st.integers(0, 4)) == 0:
        doc, done = draw(byte_mutation(encode(doc)))
        ops += done
    return Mutation(doc, ops)


def mutated_bytes(data: st.SearchStrategy[bytes], max_ops: int = 3) -> st.SearchStrategy[Mutation]:
    """Byte-level damage to documents drawn from ``data``."""
    @st.composite
    def damaged(draw) -> Mutation:
        doc, ops = draw(data), ()
        for _ in range(draw(st.integers(1, max_ops))):
            doc, done = draw(byte_mutation(doc))
            ops += done
        return Mutation(doc, ops)
    return damaged()
