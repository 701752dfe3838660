"""Property tests for the WBXML codec (hypothesis).

Run longer with SEG_FAST_HYPOTHESIS=long (see conftest.py).
- random trees over the real tables round-trip exactly, and scan/splice agree
  with the tree;
- random and mutated bytes only ever raise WBXMLError, and whatever decode
  accepts it encodes back to the very same bytes.
"""
from __future__ import annotations

from conftest import REAL_SERVER
from hypothesis import given, strategies as st

from seg_fast.eas import codepages
from seg_fast.eas.wbxml import Element, decode, encode, scan, splice
from seg_fast.errors import WBXMLError

TAGS = sorted(t for t in codepages.TOKENS if t not in codepages.ALIASES)
UNKNOWN = ["AirSync:Unknown0x3F", "Find:Unknown0x0F", "Page99:Unknown0x10", "Page255:Unknown0x3F"]
CAPTURES = [p.read_bytes() for p in sorted(REAL_SERVER.glob("*.wbxml"))]

tag_st = st.one_of(st.sampled_from(TAGS), st.sampled_from(UNKNOWN))
text_st = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                  max_size=40)
leaf_st = st.builds(
    lambda tag, text, opaque, which: Element(
        tag, text=text if which in (1, 3) else None, opaque=opaque if which in (2, 3) else None),
    tag_st, text_st, st.binary(max_size=40), st.integers(0, 3))
tree_st = st.recursive(
    leaf_st,
    lambda kids: st.builds(lambda tag, children: Element(tag, children), tag_st,
                           st.lists(kids, min_size=1, max_size=5)),
    max_leaves=40)


@given(tree_st)
def test_random_trees_roundtrip(root):
    data = encode(root)
    again = decode(data)
    assert again == root
    assert encode(again) == data


@given(tree_st)
def test_scan_finds_every_content_token_of_the_tree(root):
    data = encode(root)
    spans = scan(data, TAGS + UNKNOWN)
    expected = []
    for el in root.iter():   # document order; text is written before opaque
        if el.text is not None:
            expected.append((el.tag, "str", el.text.encode()))
        if el.opaque is not None:
            expected.append((el.tag, "opaque", el.opaque))
    got = [(s.tag, s.kind, data[s.offset:s.offset + s.length]) for s in spans]
    assert got == expected
    for s in spans:
        assert s.token_start < s.offset <= s.offset + s.length < s.token_end <= len(data) \
            or s.kind == "opaque" and s.offset + s.length == s.token_end


@given(tree_st, st.data())
def test_splice_equals_editing_the_tree(root, data_st):
    data = encode(root)
    owners = [el for el in root.iter() if (el.text is None) != (el.opaque is None)]
    spans = scan(data, TAGS + UNKNOWN)
    # spans and single-content elements line up in document order
    singles = [s for s in spans
               if sum(1 for t in spans if t.element_offset == s.element_offset) == 1]
    by_offset = {s.element_offset: s for s in singles}
    assert len(by_offset) == len(owners)
    picks = data_st.draw(st.lists(st.integers(0, max(len(owners) - 1, 0)), unique=True,
                                  max_size=len(owners)))
    ordered = sorted(by_offset.values(), key=lambda s: s.token_start)
    reps = []
    for i in picks:
        value = data_st.draw(st.one_of(text_st, st.binary(max_size=60)))
        reps.append((ordered[i], value))
        el = owners[i]
        el.text, el.opaque = (value, None) if isinstance(value, str) else (None, value)
    assert splice(data, reps) == encode(root)


def _decode_or_error(data: bytes) -> None:
    try:
        root = decode(data)
    except WBXMLError as exc:
        assert 0 <= exc.offset <= len(data) or exc.offset == -1
    else:
        assert encode(root, max_depth=64) == data
    try:
        scan(data, ["AirSyncBase:Data", "AirSync:SyncKey", "Email:Subject"])
    except WBXMLError:
        pass


@given(st.binary(max_size=200))
def test_random_bytes_only_raise_wbxmlerror(data):
    _decode_or_error(data)


@given(st.binary(max_size=120))
def test_random_bodies_behind_a_valid_header(body):
    _decode_or_error(b"\x03\x01\x6a\x00" + body)


@given(st.sampled_from(CAPTURES), st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
              st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_captures_only_raise_wbxmlerror(doc, edits):
    data = bytearray(doc)
    for kind, where, byte in edits:
        if not data:
            break
        i = where % len(data)
        if kind == "flip":
            data[i] = byte
        elif kind == "insert":
            data.insert(i, byte)
        elif kind == "delete":
            del data[i]
        else:
            del data[i:]
    _decode_or_error(bytes(data))


@st.composite
def valid_irregular_documents(draw):
    """Well-formed WBXML that strays from the canonical form in every way decode
    must remember: redundant and repeated SWITCH_PAGE, split and mixed content,
    content flags without content, unknown tokens and pages, other headers."""
    out = bytearray(draw(st.sampled_from([
        b"\x03\x01\x6a\x00", b"\x02\x01\x6a\x00", b"\x01\x04\x6a\x00",
        b"\x03\x01\x6a\x03abc", b"\x03\x81\x01\x6a\x00"])))
    page = 0

    def tag(depth: int) -> None:
        nonlocal page
        for _ in range(draw(st.integers(0, 2))):
            page = draw(st.sampled_from([page, 0, 17, 2, 25, 99]))
            out.extend((0, page))
        tok = draw(st.integers(5, 0x3F))
        if depth >= 5 or draw(st.booleans()):   # no content
            out.append(tok)
            return
        out.append(tok | 0x40)
        for _ in range(draw(st.integers(0, 4))):   # zero items: a flag without content
            what = draw(st.integers(0, 2))
            if what == 0:
                out.append(3)
                out.extend(draw(text_st).encode())
                out.append(0)
            elif what == 1:
                blob = draw(st.binary(max_size=200))
                n, enc = len(blob) >> 7, [len(blob) & 0x7F]
                while n:
                    enc.append(0x80 | (n & 0x7F))
                    n >>= 7
                out.append(0xC3)
                out.extend(reversed(enc))
                out.extend(blob)
            else:
                tag(depth + 1)
        out.append(1)

    tag(0)
    return bytes(out)


@given(valid_irregular_documents())
def test_valid_irregular_documents_roundtrip_exactly(data):
    root = decode(data)
    assert encode(root) == data
    # and the canonical re-encoding of the same tree means the same tree
    assert decode(encode(_plain_copy(root))) == root


def _plain_copy(el: Element) -> Element:
    return Element(el.tag, [_plain_copy(c) for c in el.children], el.text, el.opaque)


@given(tree_st, st.data())
def test_cutting_elements_equals_removing_them_from_the_tree(root, data_st):
    data = encode(root)
    spans = sorted((s for s in scan(data, [], elements=TAGS + UNKNOWN)), key=lambda s: s.offset)
    nodes = list(root.iter())                     # document order of the start tags
    assert [s.tag for s in spans] == [el.tag for el in nodes]
    parent = {id(k): el for el in nodes for k in el.children}
    picks = sorted(set(data_st.draw(st.lists(st.integers(1, max(len(nodes) - 1, 1)), max_size=4))))
    picks = [i for i in picks if i < len(nodes)]
    chosen: list[int] = []
    for i in picks:                               # no element inside another chosen one
        s = spans[i]
        if not any(spans[j].offset <= s.offset < spans[j].offset + spans[j].length for j in chosen):
            chosen.append(i)
    cuts = [(spans[i], None) for i in chosen]
    if not all(spans[i].removable(data) for i in chosen):
        try:
            splice(data, cuts)
        except ValueError:
            return
        raise AssertionError("splice cut an element it called not removable")
    try:
        out = splice(data, cuts)
    except ValueError:
        # Refused together (one cut relied on what another removes): each alone works.
        assert len(chosen) > 1
        for i in chosen:
            start, end = spans[i].cut(data)
            assert splice(data, [(spans[i], None)]) == data[:start] + data[end:]
        return
    kept, cur = [], 0
    for i in chosen:
        start, end = spans[i].cut(data)
        assert spans[i].token_start <= start <= spans[i].offset and end == spans[i].token_end
        kept.append(data[cur:start])
        cur = end
    assert out == b"".join(kept) + data[cur:]       # nothing else changed, byte for byte
    for i in chosen:
        siblings = parent[id(nodes[i])].children
        del siblings[next(k for k, c in enumerate(siblings) if c is nodes[i])]
    assert decode(out) == root


def _mb_u_int32(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def encode_with_switches(root: Element, switches) -> tuple[bytes, list[int]]:
    """``root`` encoded with SWITCH_PAGE runs of ``switches(tag_page)`` pages before tags
    (redundant, repeated, to pages no tag uses), the last switch of a run always to the
    tag's page when the page changes; and the offset of each element's tag in
    document order."""
    from seg_fast.eas.wbxml import token_of

    out = bytearray(b"\x03\x01\x6a\x00")
    offsets: list[int] = []
    page = 0
    # (element, entering?) iteratively: depth is bounded by the strategy anyway
    todo = [(root, True)]
    while todo:
        el, entering = todo.pop()
        if not entering:
            out.append(1)
            continue
        tag_page, tok = token_of(el.tag)
        run = list(switches(tag_page))
        if (run and run[-1] != tag_page) or (not run and tag_page != page):
            run.append(tag_page)
        for p in run:
            out.extend((0, p))
        page = run[-1] if run else page
        offsets.append(len(out))
        has = el.text is not None or el.opaque is not None or bool(el.children)
        out.append(tok | (0x40 if has else 0))
        if not has:
            continue
        if el.text is not None:
            out.append(3)
            out.extend(el.text.encode())
            out.append(0)
        if el.opaque is not None:
            out.append(0xC3)
            out.extend(_mb_u_int32(len(el.opaque)))
            out.extend(el.opaque)
        todo.append((el, False))
        todo.extend((c, True) for c in reversed(el.children))
    return bytes(out), offsets


@given(tree_st, st.data())
def test_every_removable_cut_of_a_switch_heavy_document_decodes(root, data_st):
    # Issue 9: a cut must never leave a SWITCH_PAGE dangling, whatever runs of
    # redundant switches the mail server wrote before the element.
    data, offsets = encode_with_switches(
        root, lambda _page: data_st.draw(st.lists(st.sampled_from([0, 1, 2, 17, 25, 99]), max_size=3)))
    assert decode(data) == root
    spans = {s.offset: s for s in scan(data, [], elements=TAGS + UNKNOWN)}
    assert sorted(spans) == offsets[1:] or sorted(spans) == offsets   # the root is reported too
    for k, off in enumerate(offsets[1:], 1):
        s = spans[off]
        if not s.removable(data):
            continue
        out = splice(data, [(s, None)])
        expected = decode(data)
        nodes = list(expected.iter())
        gone = nodes[k]
        holder = next(el for el in nodes if any(c is gone for c in el.children))
        holder.children = [c for c in holder.children if c is not gone]
        assert decode(out) == expected, (data.hex(), k)


def test_the_issue_9_document_cuts_cleanly():
    data = bytes.fromhex("03016a00" "45" "0000" "0000" "47" "4d033100" "01" "01" "01")
    (add,) = scan(data, [], elements=["AirSync:Add"])
    assert add.removable(data)
    out = splice(data, [(add, None)])
    assert out == bytes.fromhex("03016a00" "45" "01")     # both switches go with the Add
    assert decode(out) == Element("AirSync:Sync")
