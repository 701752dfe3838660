"""Builds the libwbxml-made WBXML corpus: ``python tests/data/wbxml_corpus/make_corpus.py``.

Every ``*.xml`` here becomes ``*.wbxml`` through Debian's ``xml2wbxml`` (libwbxml2-utils),
so the bytes come from libwbxml's tables, never from ours:

- ``hand/*.xml``: hand-written EAS commands and answers (libwbxml's tag spellings);
- ``tokens/pageNN.xml``: every tag libwbxml's own ActiveSync table lists on page NN,
  read from ``libwbxml2.so`` (``wbxml_tables_get_table``), each with a short text
  (an opaque base64 payload for the tags libwbxml writes as OPAQUE).

libwbxml knows no page 25 (Find) and a few 16.x tokens: ``spec_bytes.py`` holds those
documents as bytes written by hand from MS-ASWBXML's tables. Run with ``--check`` to
verify the committed ``.wbxml`` files are what xml2wbxml makes today.
"""
from __future__ import annotations

import base64
import ctypes
import ctypes.util
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

HERE = Path(__file__).resolve().parent
PROLOGUE = ('<?xml version="1.0"?>\n<!DOCTYPE ActiveSync PUBLIC "-//MICROSOFT//DTD ActiveSync//EN" '
            '"http://www.microsoft.com/">\n')
WBXML_LANG_ACTIVESYNC = 2402
# The tags libwbxml 0.11 encodes as OPAQUE and writes as base64 in XML.
LIB_OPAQUE = {("ResolveRecipients", "Data"), ("Search", "ConversationId"), ("Gal", "Data"),
              ("AirSyncBase", "Content"), ("ItemOperations", "ConversationId"),
              ("ComposeMail", "MIME"), ("Email2", "ConversationId"), ("Email2", "ConversationIndex")}


class TagEntry(ctypes.Structure):
    _fields_ = [("xmlName", ctypes.c_char_p), ("wbxmlCodePage", ctypes.c_ubyte), ("wbxmlToken", ctypes.c_ubyte)]


class NsEntry(ctypes.Structure):
    _fields_ = [("xmlNameSpace", ctypes.c_char_p), ("wbxmlCodePage", ctypes.c_ubyte)]


class LangEntry(ctypes.Structure):
    # libwbxml 0.11 wbxml_tables.h: langID, publicID, tagTable, nsTable, attr, attrValue, ext
    _fields_ = [("langID", ctypes.c_int), ("publicID", ctypes.c_void_p),
                ("tagTable", ctypes.POINTER(TagEntry)), ("nsTable", ctypes.POINTER(NsEntry)),
                ("attrTable", ctypes.c_void_p), ("attrValueTable", ctypes.c_void_p),
                ("extValueTable", ctypes.c_void_p)]


def libwbxml_table() -> dict[int, tuple[str, list[tuple[int, str]]]]:
    """page -> (namespace, [(token, name)]) as libwbxml's ActiveSync table has them."""
    lib = ctypes.CDLL(ctypes.util.find_library("wbxml2") or "libwbxml2.so.1")
    lib.wbxml_tables_get_table.argtypes = [ctypes.c_int]
    lib.wbxml_tables_get_table.restype = ctypes.POINTER(LangEntry)
    lang = lib.wbxml_tables_get_table(WBXML_LANG_ACTIVESYNC).contents
    assert lang.langID == WBXML_LANG_ACTIVESYNC, lang.langID
    spaces: dict[int, str] = {}
    i = 0
    while lang.nsTable[i].xmlNameSpace:
        spaces[lang.nsTable[i].wbxmlCodePage] = lang.nsTable[i].xmlNameSpace.decode().rstrip(":")
        i += 1
    pages: dict[int, tuple[str, list[tuple[int, str]]]] = {p: (ns, []) for p, ns in spaces.items()}
    i = 0
    while lang.tagTable[i].xmlName:
        e = lang.tagTable[i]
        pages[e.wbxmlCodePage][1].append((e.wbxmlToken, e.xmlName.decode()))
        i += 1
    return pages


def token_documents() -> dict[str, str]:
    """tokens/pageNN.xml: every tag of the page, under that page's first tag."""
    out = {}
    for page, (ns, tags) in sorted(libwbxml_table().items()):
        tags = sorted(set(tags))
        names = [name for _, name in tags]
        if len(set(names)) != len(names):      # one name twice on a page: keep the first token
            seen: set[str] = set()
            tags = [(t, n) for t, n in tags if not (n in seen or seen.add(n))]
        root, *rest = tags
        lines = [f'<{root[1]} xmlns="{ns}:">']
        for k, (tok, name) in enumerate(rest):
            if (ns, name) in LIB_OPAQUE:
                body = base64.b64encode(bytes([page, tok, 0, 255, k & 0xFF])).decode()
            else:
                body = escape(f"{name} {page}/0x{tok:02X} caf\u00e9 & <\u65e5>")
            lines.append(f"<{name}>{body}</{name}>")
        lines.append(f"</{root[1]}>")
        out[f"tokens/page{page:02d}.xml"] = PROLOGUE + "\n".join(lines) + "\n"
    return out


def xml2wbxml(xml: Path) -> bytes:
    out = xml.with_suffix(".wbxml.tmp")
    run = subprocess.run(["xml2wbxml", "-a", "-n", "-v", "1.3", "-o", str(out), str(xml)],
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise SystemExit(f"xml2wbxml {xml}: {run.stdout}{run.stderr}")
    data = out.read_bytes()
    out.unlink()
    return data


def main(argv: list[str]) -> int:
    check = "--check" in argv
    for rel, text in token_documents().items():
        path = HERE / rel
        if check:
            assert path.read_text() == text, f"{rel} differs from libwbxml's table"
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    for xml in sorted(HERE.glob("*/*.xml")):
        data = xml2wbxml(xml)
        target = xml.with_suffix(".wbxml")
        if check:
            assert target.read_bytes() == data, f"{target.name} is not what xml2wbxml makes"
        else:
            target.write_bytes(data)
        print(f"{xml.relative_to(HERE)} -> {len(data)} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
