"""Differential tests against libwbxml (Debian libwbxml2-utils) as the oracle.

- every real capture: libwbxml's decoding (wbxml2xml) is the tree we decode;
- a generated corpus covering every token of every page libwbxml knows (0-24):
  libwbxml decodes our encoding to our tree, and libwbxml's encoding (xml2wbxml)
  of our XML is byte for byte our encoding;
- random trees over the same tables, both directions.
libwbxml spells some names differently (codepages.LIBWBXML_NAMES); the tokens
must agree. It knows neither page 25 (Find) nor the 16.x additions elsewhere.
"""
from __future__ import annotations

import random
import shutil
import subprocess

import pytest
from conftest import REAL_SERVER

from seg_fast.eas import codepages
from seg_fast.eas.wbxml import Element, decode, encode, from_xml, to_xml

pytestmark = pytest.mark.skipif(
    shutil.which("wbxml2xml") is None or shutil.which("xml2wbxml") is None,
    reason="libwbxml2-utils not installed (scripts/test.sh installs it)")

LIBWBXML_KNOWS = {
    tag for tag, (page, tok) in codepages.TOKENS.items()
    if page <= codepages.LIBWBXML_LAST_PAGE and tag not in codepages.ALIASES
    and tag not in ("MeetingResponse:ProposedStartTime", "MeetingResponse:ProposedEndTime",
                    "Provision:AccountOnlyRemoteWipe")
}


def lib_decode(data: bytes, tmp_path) -> Element:
    src, out = tmp_path / "in.wbxml", tmp_path / "out.xml"
    src.write_bytes(data)
    run = subprocess.run(["wbxml2xml", "-l", "ACTIVESYNC", "-m", "0", "-k", "-o", str(out),
                          str(src)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    return from_xml(out.read_bytes(), dialect="libwbxml")


def lib_encode(xml: str, tmp_path) -> bytes:
    src, out = tmp_path / "in.xml", tmp_path / "out.wbxml"
    src.write_text(xml)
    run = subprocess.run(["xml2wbxml", "-a", "-n", "-v", "1.3", "-o", str(out), str(src)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    return out.read_bytes()


def trimmed(root: Element) -> Element:
    # xml2wbxml (without -k) trims XML whitespace around text, even written as
    # character references, and writes an emptied text as no content at all
    for el in root.iter():
        if el.text is not None:
            el.text = el.text.strip(" \t\r\n") or None
    return root


def crlf_as_xml_reads_it(root: Element) -> Element:
    # libwbxml writes CR raw; an XML parser reads CR LF and lone CR as LF
    for el in root.iter():
        if el.text is not None:
            el.text = el.text.replace("\r\n", "\n").replace("\r", "\n")
    return root


@pytest.mark.parametrize("path", sorted(REAL_SERVER.glob("*.wbxml")), ids=lambda p: p.name)
def test_captures_decode_like_libwbxml(path, tmp_path):
    data = path.read_bytes()
    assert lib_decode(data, tmp_path) == crlf_as_xml_reads_it(decode(data))


@pytest.mark.parametrize("path", sorted(REAL_SERVER.glob("*.wbxml")), ids=lambda p: p.name)
def test_captures_encode_like_libwbxml(path, tmp_path):
    data = path.read_bytes()
    xml = to_xml(decode(data), dialect="libwbxml")
    assert lib_encode(xml, tmp_path) == encode(trimmed(decode(data)))


TEXTS = ["1", "0", "plain", "a & b < c > d \"q\" 'a'", "line1\r\nline2\nline3\rend",
         "caf\u00e9 \u65e5\u672c \U0001F600", "tab\there", "{6be4d335-23cf-4092-adfe}", "x" * 300]


def _leaf(tag: str, rng: random.Random) -> Element:
    if tag in codepages.BASE64_TAGS:
        return Element(tag, opaque=rng.randbytes(rng.randint(1, 40)))
    if rng.random() < 0.15:
        return Element(tag)
    return Element(tag, text=rng.choice(TEXTS))


def page_document(page: int, rng: random.Random) -> Element:
    """Every token libwbxml knows on one page, under an AirSync root, partly nested."""
    ns = codepages.NAMESPACES[page]
    tags = sorted(t for t in LIBWBXML_KNOWS if codepages.TOKENS[t][0] == page)
    rng.shuffle(tags)
    # a base64 tag holds opaque content, never children: only plain tags head a group
    heads = [t for t in tags if t not in codepages.BASE64_TAGS][::7] or ["AirSync:Add"]
    children = [Element(h) for h in heads]
    for i, tag in enumerate(t for t in tags if t not in heads):
        children[i % len(children)].children.append(_leaf(tag, rng))
    first = min(codepages.PAGES[page][1])
    last = Element(f"{ns}:{codepages.PAGES[page][1][first]}", text="last")
    return Element("AirSync:Sync", [Element("AirSync:Collections", children), last])


def test_corpus_covers_every_token_libwbxml_knows():
    seen = {el.tag for page in range(codepages.LIBWBXML_LAST_PAGE + 1)
            for el in page_document(page, random.Random(page)).iter()}
    assert LIBWBXML_KNOWS <= seen


@pytest.mark.parametrize("page", range(codepages.LIBWBXML_LAST_PAGE + 1))
def test_every_page_both_directions(page, tmp_path):
    root = page_document(page, random.Random(page))
    ours = encode(root)
    assert lib_decode(ours, tmp_path) == crlf_as_xml_reads_it(decode(ours))
    assert lib_encode(to_xml(root, dialect="libwbxml"), tmp_path) == encode(trimmed(root))


def random_tree(rng: random.Random, depth: int = 0) -> Element:
    tag = rng.choice(KNOWN)
    if depth < 6 and rng.random() < 0.45 and tag not in codepages.BASE64_TAGS:
        return Element(tag, [random_tree(rng, depth + 1) for _ in range(rng.randint(1, 5))])
    return _leaf(tag, rng)


KNOWN = sorted(LIBWBXML_KNOWS)


@pytest.mark.parametrize("seed", range(25))
def test_random_trees_both_directions(seed, tmp_path):
    rng = random.Random(1000 + seed)
    root = random_tree(rng)
    if not root.children:
        root = Element("AirSync:Sync", [root])
    ours = encode(root)
    assert lib_decode(ours, tmp_path) == crlf_as_xml_reads_it(decode(ours))
    assert lib_encode(to_xml(root, dialect="libwbxml"), tmp_path) == encode(trimmed(root))


def test_benchmark_documents_through_the_in_process_peer():
    """The benchmark's ctypes binding of libwbxml agrees with us on its documents."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import wbxml_bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    lw = wbxml_bench.LibWBXML()
    for name, doc in wbxml_bench.documents().items():   # the 1 MB documents too
        ours = decode(doc)
        theirs = from_xml(lw.wbxml2xml(doc), dialect="libwbxml")
        assert theirs == crlf_as_xml_reads_it(decode(doc)), name
        xml = to_xml(ours, dialect="libwbxml").encode()
        assert lw.xml2wbxml(xml, preserve_whitespace=False) == encode(trimmed(decode(doc))), name
        # libwbxml's own compact XML, whitespace kept, comes back as the same
        # bytes but for CR, which it writes raw and so loses to XML parsing
        assert lw.xml2wbxml(lw.wbxml2xml(doc)) == encode(crlf_as_xml_reads_it(decode(doc))), name


@pytest.mark.parametrize("seed", range(8))
def test_cuts_of_switch_heavy_documents_decode_in_libwbxml(seed, tmp_path):
    """Issue 9: what splice leaves after cutting an element out of a document full of
    redundant SWITCH_PAGE runs is a document libwbxml reads as the tree without it."""
    from test_wbxml_fuzz import encode_with_switches

    from seg_fast.eas.wbxml import scan, splice

    rng = random.Random(7000 + seed)
    root = Element("AirSync:Sync", [random_tree(rng) for _ in range(3)])
    # libwbxml reads one SWITCH_PAGE before a tag, not a run: redundant ones only
    data, offsets = encode_with_switches(root, lambda page: [page] if rng.random() < 0.5 else [])
    spans = {s.offset: s for s in scan(data, [], elements=KNOWN)}
    cuts = [k for k, off in enumerate(offsets[1:], 1) if spans[off].removable(data)]
    assert cuts
    for k in rng.sample(cuts, min(3, len(cuts))):
        out = splice(data, [(spans[offsets[k]], None)])
        expected = decode(data)
        nodes = list(expected.iter())
        holder = next(el for el in nodes if any(c is nodes[k] for c in el.children))
        holder.children = [c for c in holder.children if c is not nodes[k]]
        assert decode(out) == expected
        assert lib_decode(out, tmp_path) == crlf_as_xml_reads_it(expected)
