"""The WBXML codec's public face (MS-ASWBXML, protocol 2.5 through 16.1).

    from seg_fast.eas.wbxml import Element, decode, encode, to_xml, from_xml, scan, splice, Span
    from seg_fast.eas.wbxml import encode_parts, splice_parts     # gather output

Tree
    ``Element(tag, children=None, text=None, opaque=None)``; ``tag`` is
    ``"Namespace:Name"`` with the spec's names (``codepages.py``); ``text`` is the
    content of inline strings (STR_I), ``opaque`` of OPAQUE blocks. ``find``,
    ``findall``, ``findtext``, ``iter`` as in ElementTree (``find`` looks at direct
    children only); ``==`` compares tag, text, opaque and children. Elements stay
    out of the cyclic garbage collector (fast trees): never make one its own
    descendant. ``token_of(tag)`` gives the (page, token) of a tag. A decoded
    element's text and opaque are spans of the document (kept alive by the tree;
    a copy of it when the input was not ``bytes``), built into ``str``/``bytes`` on
    first read and copied as they are by encode until reassigned.

decode(data, *, max_depth=64, max_size=64 MiB, max_elements=4_000_000) -> Element
    A canonical document (the usual case: see ``encode``) decodes to a lazy tree:
    one pass checks every token (and every string's UTF-8) and fills a flat array
    of nodes, and an element's children are built as Elements when first read
    (``children``, ``find``, ``iter``, ``==``...). Encoding an element whose
    children were never read, its own tag, text and opaque unchanged, copies its
    bytes whole. Other documents are decoded into a full tree at once.
    Lossless: ``encode(decode(x)) == x`` for every document decode accepts. What a
    document does beyond the canonical encoding (a redundant or repeated
    SWITCH_PAGE, a string split over several STR_I tokens, strings mixed with
    elements, a tag with the content flag but no content, a header other than
    ``03 01 6A 00``) is recorded on the element and replayed by encode as long as
    the element's content still matches it; change the content and that element
    is encoded canonically. Tokens the tables lack are carried, not rejected:
    they decode to ``Namespace:Unknown0xTT`` (``PageNN:Unknown0xTT`` for a page
    the spec does not define) and encode back to the same token. Inline strings
    must be valid UTF-8. Everything else malformed raises ``WBXMLError`` with the
    byte offset (``exc.offset``): truncation, bad mb_u_int32, attributes,
    string-table references,
    ENTITY/PI/EXT/LITERAL tokens, a charset other than UTF-8, a non-minimal
    mb_u_int32, nesting deeper than ``max_depth``, documents larger than
    ``max_size`` or with more than ``max_elements`` elements and string/opaque
    tokens together (each costs about 100 bytes in the tree, so this bounds
    memory too), data after the root.

encode(root, *, max_depth=64) -> bytes
    Canonical form: header ``03 01 6A 00``, SWITCH_PAGE only when the page
    changes, text as one STR_I, then opaque as one OPAQUE, then the children; the
    content flag only when there is content. ``WBXMLError`` for an unknown tag
    name, text containing NUL or lone surrogates, non-bytes opaque, a child that
    is not an Element, nesting deeper than ``max_depth`` (at most 4096).

encode_parts(root, *, max_depth=64, min_ref=32 KiB, max_refs=30) -> list
    ``encode`` as gather output for writev: ``b"".join(parts) == encode(root)``. A
    decoded string or opaque span, an unread subtree, or an assigned ``bytes`` opaque
    of at least ``min_ref`` bytes is a ``memoryview`` of the bytes holding it (the
    document, or the value), not a copy; at most ``max_refs`` of them (an answer's
    parts fit one writev); the bytes in between are copied into ``bytes`` parts.

scan(data, tags, *, elements=(), max_depth=64, max_size=64 MiB, max_spans=1_000_000) -> list[Span]
    One pass, no tree: for each STR_I/OPAQUE token directly inside an element
    whose tag is in ``tags``, a ``Span`` (see its docstring: content offset and
    length, whole token bounds, kind, enclosing path and their offsets, so
    ``span.within("AirSync:Add")`` tells which Add item and
    ``span.within("AirSyncBase:Body")`` which Body). Structural errors raise like
    decode; the scanner does not check UTF-8. Elements with no string content
    (``<Data/>``) yield no span. Each element whose tag is in ``elements`` yields a
    span of kind "element" (reported at its END): the whole element, with the code
    pages in force before and after it. More than ``max_spans`` spans raise
    ``SpanLimitError`` (a WBXMLError): a hostile document cannot make the list
    unbounded; spans of one parent share their path tuples.

splice(data, [(span, value), ...]) -> bytes
    Replaces the content tokens of the spans: a ``str`` value is written as
    STR_I, a bytes-like value as OPAQUE (with its new length prefix); to keep a
    span's kind pass the matching type. Bytes outside the spans are copied as is.
    ``(element_span, None)`` cuts the element out (with the SWITCH_PAGEs right before
    it); ``span.removable(data)`` says whether that keeps every other token's
    meaning (the code page its followers need is not lost), else ValueError.

splice_parts(data, [(span, value), ...], *, min_ref=32 KiB, max_refs=30) -> list
    ``splice`` as gather output: ``b"".join(parts) == splice(data, ...)``; unchanged
    runs of a ``bytes`` document and ``bytes`` values of at least ``min_ref`` bytes are
    memoryviews of them (the proxy sends a transformed answer this way, with writev).

to_xml(root) -> str / from_xml(text) -> Element
    The XML shape libwbxml's ``wbxml2xml -l ACTIVESYNC`` writes (ActiveSync
    DOCTYPE, one element per line, ``xmlns="Namespace:"`` where the namespace
    changes), plus CR written as ``&#13;`` so it survives XML parsing;
    ``dialect="libwbxml"`` reads and writes libwbxml's tag names instead. Opaque
    content of the tags libwbxml base64-encodes (``codepages.BASE64_TAGS``) is
    written as base64 and read back as opaque; other opaque content is written as
    UTF-8 text (lossy for binary: XML is for debugging and differential tests).
"""
from __future__ import annotations

import base64
import sys
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from seg_fast._wbxml import (  # noqa: F401  (re-exported)
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_SIZE,
    DEFAULT_MAX_REFS,
    DEFAULT_MAX_SPANS,
    DEFAULT_MIN_REF,
    Element,
    Span,
    decode,
    encode,
    encode_parts,
    scan,
    splice,
    splice_parts,
    token_of,
)
from seg_fast.eas import codepages
from seg_fast.errors import WBXMLError

__all__ = ["Element", "Span", "decode", "encode", "encode_parts", "scan", "splice", "splice_parts", "to_xml",
           "from_xml", "token_of", "WBXMLError", "cli"]

XML_PROLOGUE = ('<?xml version="1.0"?>\n<!DOCTYPE ActiveSync PUBLIC '
                '"-//MICROSOFT//DTD ActiveSync//EN" "http://www.microsoft.com/">\n')
_ENTITIES = {'"': "&quot;", "'": "&apos;", "\r": "&#13;"}


def _xml_text(el: Element) -> str | None:
    if el.text is not None:
        return escape(el.text, _ENTITIES)
    if el.opaque is not None:
        if el.tag in codepages.BASE64_TAGS:
            return base64.b64encode(bytes(el.opaque)).decode("ascii")
        return escape(bytes(el.opaque).decode("utf-8", "replace"), _ENTITIES)
    return None


def to_xml(root: Element, *, dialect: str = "spec") -> str:
    """libwbxml's XML rendering of a tree (see the module docstring).

    ``dialect="libwbxml"`` writes libwbxml's tag and namespace names.
    """
    if dialect not in ("spec", "libwbxml"):
        raise ValueError("dialect must be 'spec' or 'libwbxml'")
    lib = dialect == "libwbxml"
    out = [XML_PROLOGUE]
    # (element, namespace of the parent, entering?)
    stack: list[tuple[Element, str | None, bool]] = [(root, None, True)]
    while stack:
        el, parent_ns, entering = stack.pop()
        ns, _, name = (codepages.LIBWBXML_NAMES.get(el.tag, el.tag) if lib else el.tag
                       ).partition(":")
        if lib:
            ns = codepages.LIBWBXML_NAMESPACES.get(ns, ns)
        if not entering:
            out.append(f"</{name}>\n")
            continue
        attr = f' xmlns="{ns}:"' if ns != parent_ns else ""
        text = _xml_text(el)
        if el.children:
            out.append(f"<{name}{attr}>\n")
            if text:
                out.append(text)
            stack.append((el, parent_ns, False))
            stack.extend((child, ns, True) for child in reversed(el.children))
        elif text is None:
            out.append(f"<{name}{attr}/>\n")
        else:
            out.append(f"<{name}{attr}>{text}</{name}>\n")
    return "".join(out)


def _libwbxml_to_spec() -> dict[str, str]:
    back = {v: k for k, v in codepages.LIBWBXML_NAMES.items()}
    for ns_spec, ns_lib in codepages.LIBWBXML_NAMESPACES.items():
        for tag in codepages.TOKENS:
            ns, _, name = tag.partition(":")
            if ns == ns_spec:
                back[f"{ns_lib}:{name}"] = tag
    return back


def from_xml(text: str | bytes, *, dialect: str = "spec") -> Element:
    """Parse the libwbxml-shaped XML back into a tree.

    Whitespace between elements is ignored; a leaf's text is kept verbatim.
    ``dialect="libwbxml"`` accepts libwbxml's tag names (``Attendee_Email``, ...).
    """
    if dialect not in ("spec", "libwbxml"):
        raise ValueError("dialect must be 'spec' or 'libwbxml'")
    rename = _libwbxml_to_spec() if dialect == "libwbxml" else {}
    try:
        xroot = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise WBXMLError(f"XML does not parse: {exc}") from None

    def convert(x: ElementTree.Element) -> Element:
        if not x.tag.startswith("{"):
            raise WBXMLError(f"element <{x.tag}> has no namespace")
        ns, _, name = x.tag[1:].partition("}")
        tag = f"{ns.rstrip(':')}:{name}"
        tag = rename.get(tag, tag)
        el = Element(tag)
        if len(x):
            if x.text and x.text.strip():
                el.text = x.text
        elif x.text is not None:
            if tag in codepages.BASE64_TAGS:
                try:
                    el.opaque = base64.b64decode(x.text)
                except ValueError:
                    raise WBXMLError(f"<{name}> holds no valid base64") from None
            else:
                el.text = x.text
        return el

    # iterative: a deep document must not exhaust the Python stack
    root = convert(xroot)
    todo = [(xroot, root)]
    while todo:
        x, el = todo.pop()
        for child in x:
            sub = convert(child)
            el.children.append(sub)
            todo.append((child, sub))
    return root


def cli(argv: list[str]) -> int:
    """seg-fast wbxml decode FILE | encode FILE.xml [-o OUT] | scan FILE TAG..."""
    import argparse

    ap = argparse.ArgumentParser(prog="seg-fast wbxml", description="WBXML <-> XML, and the span scanner")
    sub = ap.add_subparsers(dest="cmd", metavar="decode|encode|scan", required=True)
    lib_help = "libwbxml's tag names in the XML (Attendee_Email, FlagStatus, ...)"
    d = sub.add_parser("decode", help="WBXML file -> XML on stdout")
    d.add_argument("file", metavar="FILE.wbxml")
    d.add_argument("--libwbxml", action="store_true", help=lib_help)
    e = sub.add_parser("encode", help="XML file -> WBXML")
    e.add_argument("file", metavar="FILE.xml")
    e.add_argument("-o", dest="out", metavar="OUT.wbxml", help="write here (default: stdout)")
    e.add_argument("--libwbxml", action="store_true", help=lib_help)
    sc = sub.add_parser("scan", help="list the spans of the named elements",
                        description="Tags are named Namespace:Name, as in the XML (e.g. Email:Subject, "
                                    "AirSyncBase:Data).")
    sc.add_argument("file", metavar="FILE.wbxml")
    sc.add_argument("tags", nargs="+", metavar="TAG", help="Namespace:Name, e.g. Email:Subject")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:         # --help is 0, a usage error 2
        return int(exc.code or 0)
    dialect = "libwbxml" if getattr(args, "libwbxml", False) else "spec"
    try:
        if args.cmd == "decode":
            with open(args.file, "rb") as f:
                sys.stdout.write(to_xml(decode(f.read()), dialect=dialect))
        elif args.cmd == "encode":
            with open(args.file, "rb") as f:
                data = encode(from_xml(f.read(), dialect=dialect))
            if args.out:
                with open(args.out, "wb") as f:
                    f.write(data)
            else:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
        else:
            bad = [t for t in args.tags if ":" not in t]
            if bad:
                print(f"seg-fast wbxml scan: {bad[0]!r}: name tags as Namespace:Name (e.g. Email:Subject)",
                      file=sys.stderr)
                return 2
            with open(args.file, "rb") as f:
                spans = scan(f.read(), args.tags)
            for s in spans:
                print(f"{s.tag}\t{s.kind}\toffset={s.offset}\tlength={s.length}\t"
                      f"{'/'.join(s.path)}")
    except (WBXMLError, OSError) as exc:
        print(f"seg-fast wbxml: {exc}", file=sys.stderr)
        return 1
    return 0
