"""WBXML codec throughput per document class, side by side with libwbxml in-process (ctypes).

    python benchmarks/wbxml_bench.py [--quick] [--rounds N] [--json PATH]

The peer is libwbxml's strongest form: its tree decoder ``wbxml_tree_from_wbxml``
(bytes -> its node tree, then ``wbxml_tree_destroy``) and its tree encoder
``wbxml_tree_to_wbxml`` (its tree -> bytes, then ``wbxml_free``). Its XML converter
(``wbxml_conv_wbxml2xml_run`` / ``wbxml_conv_xml2wbxml_run``, which also writes or
parses XML text) is a second column. The ctypes signatures follow libwbxml 0.11's
wbxml_tree.h (not shipped by libwbxml2-dev; the symbols are exported) and the
bench checks them at start: libwbxml's tree of each document encodes back to it.

Document classes (EAS answers and requests a gateway reads and writes):
- small-item Syncs: the real server's Sync captures, generated answers of many
  short items, and the simulator's Sync answer (100 plain-text items, 5 KB cap);
- body-heavy Syncs: generated answers with 40-60 KB HTML and MIME bodies up to
  1 MB (BENCH-PROFILE.md), the simulator's answer with whole MIME bodies;
- FolderSync, Provision, Ping: real captures and the simulator's answers.

Our columns: ``decode`` is ``decode(data)``: a canonical document decodes to a lazy
tree (one validating pass fills a flat node array; an element's children become
Elements when first read). ``decode_walk`` is ``decode`` plus building every Element
(``list(tree.iter())``): the cost of a fully read tree, as libwbxml always builds.
``encode`` encodes a fully built tree (every element visited and written token by
token, strings copied from the document's spans), never a lazy one; encoding an
untouched lazy subtree copies its bytes whole, which ``encode_untouched`` shows
separately (not compared with libwbxml: it does less work). ``encode_parts`` encodes
the same fully built tree as gather output (``encode_parts``: a list of parts, strings of
32 KB or more passed as memoryviews of the document instead of copied; the gateway's
transformed answers go out the same way, ``splice_parts`` + writev); checked first:
its parts joined are the document, and decode back to the tree.

Each round times every document with every function back to back (a noisy,
shared machine slows all columns alike; the columns' order turns each round); a class's rate is its bytes over its
summed time; figures are medians of the rounds, ratios are medians of per-round
ratios. glibc's malloc is set (mallopt) to serve every size from the heap and keep
freed memory: otherwise its dynamic mmap threshold lets the allocations of one column
decide whether another column's megabyte buffers come from fresh mmap'ed pages (page
faults on every call) or not, which moved libwbxml's body-heavy rates by 3-5x between
runs. Calls from Python: libwbxml pays one ctypes call (about 1 us, measured and
printed) per function call, as we pay one Python call. Writes
benchmarks/results/wbxml_bench.json.
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import ctypes.util
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from seg_fast.eas.wbxml import Element, decode, encode, encode_parts, scan  # noqa: E402

SCAN_TAGS = ("AirSyncBase:Data", "AirSyncBase:Type", "Email:MIMEData", "ItemOperations:Data",
             "AirSyncBase:FileReference", "AirSyncBase:DisplayName")
DOMAINS = ("contoso.com", "fabrikam.com", "northwindtraders.com", "adventure-works.com",
           "tailspintoys.com", "wingtiptoys.com", "woodgrovebank.com", "litwareinc.com",
           "proseware.com", "lucernepublishing.com", "fourthcoffee.com", "alpineskihouse.com",
           "cpandl.com", "humongousinsurance.com", "margiestravel.com", "treyresearch.net",
           "wideworldimporters.com", "graphicdesigninstitute.com", "blueyonderairlines.com",
           "coho-winery.com")
WORDS = ("quarterly", "report", "meeting", "budget", "review", "the", "and", "of", "project",
         "update", "please", "find", "attached", "schedule", "customer", "order", "invoice")


# ------------------------------------------------------------ documents

def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _html(rng: random.Random, size: int) -> str:
    links = rng.randint(5, 40)
    parts = ["<html><head><meta charset=\"utf-8\"></head><body>"]
    while sum(map(len, parts)) < size:
        url = f"https://www.{rng.choice(DOMAINS)}/p/{rng.randrange(10**6)}?id={rng.randrange(999)}"
        if links > 0 and rng.random() < 0.7:
            parts.append(f"<p>{_words(rng, 20)} <a href=\"{url}\">{_words(rng, 3)}</a></p>\r\n")
            links -= 1
        elif links > 0:
            parts.append(f"<p>{_words(rng, 15)} {url} {_words(rng, 5)}</p>\r\n")
            links -= 1
        else:
            parts.append(f"<p>{_words(rng, 30)}</p>\r\n")
    parts.append("</body></html>")
    return "".join(parts)


def _mime(rng: random.Random, html_size: int, attachment: int) -> str:
    html = _html(rng, html_size)
    alt = ("--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + _words(rng, 200)
           + "\r\n--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html
           + "\r\n--alt--\r\n")
    head = ("From: Alice <alice@contoso.com>\r\nTo: Bob <bob@fabrikam.com>\r\n"
            "Subject: " + _words(rng, 5) + "\r\nMIME-Version: 1.0\r\n")
    if not attachment:
        return head + "Content-Type: multipart/alternative; boundary=alt\r\n\r\n" + alt
    blob = base64.encodebytes(rng.randbytes(attachment)).decode().replace("\n", "\r\n")
    return (head + "Content-Type: multipart/mixed; boundary=mix\r\n\r\n--mix\r\n"
            "Content-Type: multipart/alternative; boundary=alt\r\n\r\n" + alt
            + "--mix\r\nContent-Type: application/pdf; name=r.pdf\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n" + blob + "--mix--\r\n")


def _add(rng: random.Random, server_id: int, body_type: int, data: str) -> Element:
    e = lambda tag, text=None: Element(tag, text=text)  # noqa: E731
    app = Element("AirSync:ApplicationData", [
        e("Email:To", "\"Bob\" <bob@fabrikam.com>"),
        e("Email:From", "\"Alice\" <alice@contoso.com>"),
        e("Email:Subject", _words(rng, 6)),
        e("Email:DateReceived", "2026-11-26T18:09:00.000Z"),
        e("Email:DisplayTo", "Bob"),
        e("Email:ThreadTopic", _words(rng, 6)),
        e("Email:Importance", "1"),
        e("Email:Read", "0"),
        Element("AirSyncBase:Body", [
            e("AirSyncBase:Type", str(body_type)),
            e("AirSyncBase:EstimatedDataSize", str(len(data))),
            e("AirSyncBase:Truncated", "0"),
            e("AirSyncBase:Data", data),
        ]),
        e("Email:MessageClass", "IPM.Note"),
        e("Email:InternetCPID", "65001"),
        Element("Email:Flag"),
        e("Email:ContentClass", "urn:content-classes:message"),
        e("AirSyncBase:NativeBodyType", str(body_type)),
        Element("Email2:ConversationId", opaque=rng.randbytes(16)),
        Element("Email2:ConversationIndex", opaque=rng.randbytes(5)),
    ])
    return Element("AirSync:Add", [e("AirSync:ServerId", f"1:{server_id}"), app])


def sync_answer(adds: list[Element]) -> Element:
    return Element("AirSync:Sync", [Element("AirSync:Collections", [
        Element("AirSync:Collection", [
            Element("AirSync:SyncKey", text="{6be4d335-23cf-4092-adfe-132fec0f50b3}7"),
            Element("AirSync:CollectionId", text="1"),
            Element("AirSync:Status", text="1"),
            Element("AirSync:Commands", adds),
        ])])])


def documents(seed: int = 2026) -> dict[str, bytes]:
    """name -> WBXML Sync answer, deterministic for a seed."""
    rng = random.Random(seed)
    docs: dict[str, bytes] = {}

    def small_items(target: int) -> bytes:
        adds: list[Element] = []
        size = len(encode(sync_answer([])))
        while size < target:
            kind = rng.random()
            body = (_words(rng, rng.randint(20, 120)) if kind < 0.5
                    else _html(rng, rng.randint(300, 1500)))
            adds.append(_add(rng, len(adds) + 1, 1 if kind < 0.5 else 2, body))
            size += len(encode(Element("AirSync:Commands", [adds[-1]]))) - 6
        return encode(sync_answer(adds))

    # one new message with a short plain-text body: the Ping -> Sync answer
    docs["1KB-one-item"] = encode(sync_answer([_add(rng, 1, 1, _words(rng, 90))]))
    docs["100KB-small-items"] = small_items(100 * 1024)
    docs["100KB-large-bodies"] = encode(sync_answer(
        [_add(rng, 1, 2, _html(rng, 60 * 1024)), _add(rng, 2, 2, _html(rng, 40 * 1024))]))
    docs["1MB-small-items"] = small_items(1024 * 1024)
    docs["1MB-large-bodies"] = encode(sync_answer(
        [_add(rng, 1, 4, _mime(rng, 30 * 1024, 700 * 1024)),
         _add(rng, 2, 2, _html(rng, 50 * 1024)),
         _add(rng, 3, 4, _mime(rng, 20 * 1024, 0))]))
    return docs


CAPTURES = (ROOT / "tests" / "data" / "real-server", Path("/work/shared/fixtures/real-server"))
CAPTURE_CLASS = {"sync": "small-item Syncs", "fsync": "FolderSync", "fsb64": "FolderSync",
                 "prov1": "Provision", "prov2": "Provision"}


def capture_documents() -> dict[str, tuple[str, bytes]]:
    """name -> (class, bytes) of the real server's captures (the first directory holding each)."""
    out: dict[str, tuple[str, bytes]] = {}
    for folder in CAPTURES:
        for path in sorted(folder.glob("*.wbxml")) if folder.is_dir() else ():
            kind = CAPTURE_CLASS.get(path.name.split(".")[0].rstrip("0123456789")) or \
                CAPTURE_CLASS.get(path.name.split(".")[0])
            if kind and f"real:{path.name}" not in out:
                out[f"real:{path.name}"] = (kind, path.read_bytes())
    return out


def sim_documents() -> dict[str, tuple[str, bytes]]:
    """name -> (class, bytes): requests and the simulator's answers, driven in-process."""
    import h11

    from seg_fast.sim.commands import ping_answer
    from seg_fast.sim.mailbox import MailboxSimulator
    from seg_fast.sim.tree import E

    sim = MailboxSimulator(password="secret", seed=7, initial_messages=140)
    auth = b"Basic " + base64.b64encode(b"bench:secret")
    state = {"key": None}

    def post(cmd: str, doc: Element) -> bytes:
        body = encode(doc)
        headers = [(b"host", b"sim"), (b"authorization", auth), (b"ms-asprotocolversion", b"14.1"),
                   (b"content-length", str(len(body)).encode())]
        if state["key"]:
            headers.append((b"x-ms-policykey", state["key"].encode()))
        req = h11.Request(method=b"POST", headers=headers, target=(
            f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User=bench&DeviceId=BENCH1&DeviceType=iPhone").encode())
        answer = sim._handle(req, body)
        assert answer.status == 200, (cmd, answer.status)
        return answer.body

    def policy(key: str) -> Element:
        return E("Provision:Provision", E("Provision:Policies", E("Provision:Policy", E(
            "Provision:PolicyType", "MS-EAS-Provisioning-WBXML"), E("Provision:PolicyKey", key))))

    def sync(key: str, options: Element, window: int) -> Element:
        return E("AirSync:Sync", E("AirSync:Collections", E(
            "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", "1"),
            E("AirSync:WindowSize", window), options)))

    docs: dict[str, tuple[str, bytes]] = {}
    req = policy("0")
    docs["sim:Provision.req"] = ("Provision", encode(req))
    first = post("Provision", req)
    docs["sim:Provision.policy"] = ("Provision", first)
    temp = next(decode(first).iter("Provision:PolicyKey")).text
    final = post("Provision", policy(temp))
    docs["sim:Provision.ack"] = ("Provision", final)
    state["key"] = next(decode(final).iter("Provision:PolicyKey")).text
    fs = E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))
    docs["sim:FolderSync.req"] = ("FolderSync", encode(fs))
    docs["sim:FolderSync"] = ("FolderSync", post("FolderSync", fs))
    post("Sync", sync("0", None, 100))
    plain = E("AirSync:Options", E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", 1),
                                   E("AirSyncBase:TruncationSize", 5000)))
    docs["sim:Sync.req"] = ("small-item Syncs", encode(sync("1", plain, 100)))
    docs["sim:Sync.100-plain"] = ("small-item Syncs", post("Sync", sync("1", plain, 100)))
    mime = E("AirSync:Options", E("AirSync:MIMESupport", 2),
             E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", 4)))
    docs["sim:Sync.6-mime"] = ("body-heavy Syncs", post("Sync", sync("2", mime, 6)))
    ping = E("Ping:Ping", E("Ping:HeartbeatInterval", 900), E("Ping:Folders", *[
        E("Ping:Folder", E("Ping:Id", f), E("Ping:Class", "Email")) for f in ("1", "2", "3")]))
    docs["sim:Ping.req"] = ("Ping", encode(ping))
    docs["sim:Ping.changed"] = ("Ping", ping_answer(("1", "3")).body)
    docs["sim:Ping.expired"] = ("Ping", ping_answer(None).body)
    return docs


def classified_documents() -> dict[str, tuple[str, bytes]]:
    """Every document of the bench: name -> (class, bytes)."""
    docs = capture_documents()
    for name, data in documents().items():
        docs[f"gen:{name}"] = ("body-heavy Syncs" if "large-bodies" in name else "small-item Syncs", data)
    docs.update(sim_documents())
    return docs


CLASSES = ("small-item Syncs", "body-heavy Syncs", "FolderSync", "Provision", "Ping")


# ------------------------------------------------------------ libwbxml via ctypes

WBXML_LANG_ACTIVESYNC = 2402   # WBXMLLanguage enum value in libwbxml 0.11
WBXML_GEN_XML_COMPACT = 0
WBXML_VERSION_13 = 0x03
WBXML_CHARSET_UTF_8 = 106


class GenWBXMLParams(ctypes.Structure):
    """WBXMLGenWBXMLParams (wbxml_conv.h)."""
    _fields_ = [("wbxml_version", ctypes.c_int), ("keep_ignorable_ws", ctypes.c_ubyte),
                ("use_strtbl", ctypes.c_ubyte), ("produce_anonymous", ctypes.c_ubyte)]


class LibWBXML:
    """wbxml_conv_wbxml2xml_run / wbxml_conv_xml2wbxml_run in this process."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(ctypes.util.find_library("wbxml2") or "libwbxml2.so.1")
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self.libc.free.argtypes = [ctypes.c_void_p]
        vp, u32 = ctypes.c_void_p, ctypes.c_uint32
        L = self.lib
        for name in ("wbxml_conv_wbxml2xml_create", "wbxml_conv_xml2wbxml_create"):
            getattr(L, name).argtypes = [ctypes.POINTER(vp)]
        for name in ("wbxml_conv_wbxml2xml_run", "wbxml_conv_xml2wbxml_run"):
            getattr(L, name).argtypes = [vp, ctypes.c_char_p, u32, ctypes.POINTER(vp),
                                         ctypes.POINTER(u32)]
        L.wbxml_conv_wbxml2xml_set_language.argtypes = [vp, ctypes.c_int]
        L.wbxml_conv_wbxml2xml_set_gen_type.argtypes = [vp, ctypes.c_int]
        L.wbxml_conv_wbxml2xml_enable_preserve_whitespaces.argtypes = [vp]
        L.wbxml_conv_xml2wbxml_set_version.argtypes = [vp, ctypes.c_int]
        L.wbxml_conv_xml2wbxml_disable_public_id.argtypes = [vp]
        L.wbxml_conv_xml2wbxml_disable_string_table.argtypes = [vp]
        L.wbxml_conv_xml2wbxml_enable_preserve_whitespaces.argtypes = [vp]
        L.wbxml_conv_wbxml2xml_destroy.argtypes = [vp]
        L.wbxml_conv_xml2wbxml_destroy.argtypes = [vp]

        # libwbxml 0.11 wbxml_tree.h (checked against the upstream header; the Debian
        # -dev package ships only wbxml.h/wbxml_conv.h, whose WBXMLGenWBXMLParams we use):
        #   WBXMLError wbxml_tree_from_wbxml(WB_UTINY *wbxml, WB_ULONG wbxml_len,
        #       WBXMLLanguage lang, WBXMLCharsetMIBEnum charset, WBXMLTree **tree);
        #   WBXMLError wbxml_tree_to_wbxml(WBXMLTree *tree, WB_UTINY **wbxml,
        #       WB_ULONG *wbxml_len, WBXMLGenWBXMLParams *params);
        #   void wbxml_tree_destroy(WBXMLTree *tree);   void wbxml_free(void *);
        # (WB_ULONG is unsigned int, the enums are int, WB_BOOL unsigned char.)
        L.wbxml_tree_from_wbxml.argtypes = [ctypes.c_char_p, u32, ctypes.c_int, ctypes.c_int,
                                            ctypes.POINTER(vp)]
        L.wbxml_tree_from_wbxml.restype = ctypes.c_int
        L.wbxml_tree_to_wbxml.argtypes = [vp, ctypes.POINTER(vp), ctypes.POINTER(u32),
                                          ctypes.POINTER(GenWBXMLParams)]
        L.wbxml_tree_to_wbxml.restype = ctypes.c_int
        L.wbxml_tree_destroy.argtypes = [vp]
        L.wbxml_tree_destroy.restype = None
        L.wbxml_free.argtypes = [vp]
        L.wbxml_free.restype = None
        # WBXML 1.3, whitespace kept, no string table, anonymous (public id 1): our header
        self.params = GenWBXMLParams(WBXML_VERSION_13, 1, 0, 1)

    def tree_from_wbxml(self, data: bytes) -> ctypes.c_void_p:
        """libwbxml's tree of a document (free it with tree_destroy)."""
        tree = ctypes.c_void_p()
        rc = self.lib.wbxml_tree_from_wbxml(data, len(data), WBXML_LANG_ACTIVESYNC,
                                            WBXML_CHARSET_UTF_8, ctypes.byref(tree))
        if rc != 0:
            raise RuntimeError(f"wbxml_tree_from_wbxml failed: {rc}")
        return tree

    def tree_destroy(self, tree: ctypes.c_void_p) -> None:
        self.lib.wbxml_tree_destroy(tree)

    def tree_decode(self, data: bytes) -> None:
        """The timed decode: bytes -> libwbxml's tree, freed (as Python frees ours)."""
        self.lib.wbxml_tree_destroy(self.tree_from_wbxml(data))

    def tree_to_wbxml(self, tree: ctypes.c_void_p) -> bytes:
        out, n = ctypes.c_void_p(), ctypes.c_uint32()
        rc = self.lib.wbxml_tree_to_wbxml(tree, ctypes.byref(out), ctypes.byref(n), ctypes.byref(self.params))
        if rc != 0:
            raise RuntimeError(f"wbxml_tree_to_wbxml failed: {rc}")
        data = ctypes.string_at(out, n.value)
        self.lib.wbxml_free(out)
        return data

    def tree_encode(self, tree: ctypes.c_void_p) -> None:
        """The timed encode: libwbxml's tree -> a WBXML buffer, freed."""
        out, n = ctypes.c_void_p(), ctypes.c_uint32()
        if self.lib.wbxml_tree_to_wbxml(tree, ctypes.byref(out), ctypes.byref(n), ctypes.byref(self.params)):
            raise RuntimeError("wbxml_tree_to_wbxml failed")
        self.lib.wbxml_free(out)

    def _take(self, out: ctypes.c_void_p, n: ctypes.c_uint32) -> bytes:
        data = ctypes.string_at(out, n.value)
        self.libc.free(out)
        return data

    def wbxml2xml(self, data: bytes) -> bytes:
        L, conv = self.lib, ctypes.c_void_p()
        if L.wbxml_conv_wbxml2xml_create(ctypes.byref(conv)) != 0:
            raise MemoryError
        try:
            L.wbxml_conv_wbxml2xml_set_language(conv, WBXML_LANG_ACTIVESYNC)
            L.wbxml_conv_wbxml2xml_set_gen_type(conv, WBXML_GEN_XML_COMPACT)
            L.wbxml_conv_wbxml2xml_enable_preserve_whitespaces(conv)
            out, n = ctypes.c_void_p(), ctypes.c_uint32()
            rc = L.wbxml_conv_wbxml2xml_run(conv, data, len(data), ctypes.byref(out),
                                            ctypes.byref(n))
            if rc != 0:
                raise RuntimeError(f"wbxml2xml failed: {rc}")
            return self._take(out, n)
        finally:
            L.wbxml_conv_wbxml2xml_destroy(conv)

    def xml2wbxml(self, xml: bytes, preserve_whitespace: bool = True) -> bytes:
        L, conv = self.lib, ctypes.c_void_p()
        if L.wbxml_conv_xml2wbxml_create(ctypes.byref(conv)) != 0:
            raise MemoryError
        try:
            L.wbxml_conv_xml2wbxml_set_version(conv, WBXML_VERSION_13)
            L.wbxml_conv_xml2wbxml_disable_public_id(conv)
            L.wbxml_conv_xml2wbxml_disable_string_table(conv)
            if preserve_whitespace:
                L.wbxml_conv_xml2wbxml_enable_preserve_whitespaces(conv)
            out, n = ctypes.c_void_p(), ctypes.c_uint32()
            rc = L.wbxml_conv_xml2wbxml_run(conv, xml, len(xml), ctypes.byref(out),
                                            ctypes.byref(n))
            if rc != 0:
                raise RuntimeError(f"xml2wbxml failed: {rc}")
            return self._take(out, n)
        finally:
            L.wbxml_conv_xml2wbxml_destroy(conv)


# ------------------------------------------------------------ timing

COLUMNS = ("decode", "decode_walk", "lib_tree_decode", "lib_conv_decode", "encode", "encode_parts",
           "lib_tree_encode", "lib_conv_encode", "encode_untouched")


def _walk(data: bytes) -> int:
    return len(list(decode(data).iter()))


# CPU time of this process (not wall-clock): on the shared machine a run that waits for a
# core is not counted as slow; both sides are measured the same way.
_clock = time.process_time


def _reps(fn, budget: float) -> int:
    t0 = _clock()
    fn()
    return max(1, int(budget / max(_clock() - t0, 1e-7)))


def _time(fn, reps: int) -> float:
    t0 = _clock()
    for _ in range(reps):
        fn()
    return (_clock() - t0) / reps


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc malloc.h


def steady_malloc() -> None:
    """Every allocation from the heap, freed memory kept (see the module docstring)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    assert libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1     # glibc's largest allowed value
    assert libc.mallopt(M_TRIM_THRESHOLD, 256 << 20) == 1


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timing budget")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "wbxml_bench.json"))
    args = ap.parse_args(argv)
    budget = 0.004 if args.quick else 0.02     # seconds per document, function and round
    steady_malloc()
    lw = LibWBXML()
    docs = classified_documents()
    fns: dict[str, dict[str, object]] = {}
    trees = []
    for name, (kind, data) in docs.items():
        untouched = decode(data)
        assert encode(untouched) == data, name                # lossless, lazily
        tree = decode(data)
        list(tree.iter())                                     # every Element built
        assert encode(tree) == data, name                     # lossless, element by element
        joined = b"".join(encode_parts(tree))                 # gather output: the same bytes
        assert joined == data and decode(joined) == tree, name
        ltree = lw.tree_from_wbxml(data)
        trees.append(ltree)
        # the ctypes signatures hold: libwbxml's tree of the document encodes back to it
        assert lw.tree_to_wbxml(ltree) == data, name
        xml = lw.wbxml2xml(data)
        assert lw.xml2wbxml(xml)
        fns[name] = {
            "decode": lambda d=data: decode(d),
            "decode_walk": lambda d=data: _walk(d),
            "lib_tree_decode": lambda d=data: lw.tree_decode(d),
            "lib_conv_decode": lambda d=data: lw.wbxml2xml(d),
            "encode": lambda t=tree: encode(t),
            "encode_parts": lambda t=tree: encode_parts(t),
            "lib_tree_encode": lambda t=ltree: lw.tree_encode(t),
            "lib_conv_encode": lambda x=xml: lw.xml2wbxml(x),
            "encode_untouched": lambda t=untouched: encode(t),
        }
    reps = {name: {c: _reps(f, budget) for c, f in cols.items()} for name, cols in fns.items()}
    free = ctypes.c_void_p()
    ctypes_call_us = 1e6 * _time(lambda: lw.lib.wbxml_free(free), 20000)
    # per round: seconds per call of every document and column, back to back
    rounds = []
    # The columns' order turns by one each round: a column is not always the one that
    # runs right after another column flushed the caches (or right after its own tree).
    for i in range(args.rounds):
        order = COLUMNS[i % len(COLUMNS):] + COLUMNS[:i % len(COLUMNS)]
        rounds.append({name: {c: _time(cols[c], reps[name][c]) for c in order}
                       for name, cols in fns.items()})
    for ltree in trees:
        lw.tree_destroy(ltree)

    def class_rate(rnd, kind, col):
        names = [n for n, (k, _) in docs.items() if k == kind]
        return sum(len(docs[n][1]) for n in names) / sum(rnd[n][col] for n in names) / 1e6

    classes = []
    print(f"libwbxml via ctypes: {ctypes_call_us:.2f} us per call; medians of {args.rounds} rounds; MB/s = 10**6 "
          "bytes of WBXML per second")
    print(f"{'class':<18}{'docs':>5}{'bytes':>10} | {'decode':>8}{'+walk':>8}{'lib tree':>9}{'ratio':>7}{'walk':>6}"
          f"{'lib conv':>9}{'ratio':>7} | {'encode':>8}{'parts':>9}{'lib tree':>9}{'ratio':>7}{'parts':>7}"
          f"{'lib conv':>9}{'ratio':>7}")
    for kind in CLASSES:
        names = [n for n, (k, _) in docs.items() if k == kind]
        row = {"class": kind, "documents": names, "bytes": sum(len(docs[n][1]) for n in names)}
        for col in COLUMNS:
            row[f"{col}_MBps"] = round(median([class_rate(r, kind, col) for r in rounds]), 1)
        for ours, peer in (("decode", "lib_tree_decode"), ("decode_walk", "lib_tree_decode"),
                           ("decode", "lib_conv_decode"),
                           ("encode", "lib_tree_encode"), ("encode_parts", "lib_tree_encode"),
                           ("encode", "lib_conv_encode")):
            row[f"{ours}_vs_{peer}"] = round(median([class_rate(r, kind, ours) / class_rate(r, kind, peer)
                                                     for r in rounds]), 2)
        # the worst single document of the class, against the tree functions
        row["min_doc_decode_vs_tree"] = round(min(median([r[n]["lib_tree_decode"] / r[n]["decode"] for r in rounds])
                                                  for n in names), 2)
        row["min_doc_decode_walk_vs_tree"] = round(min(median([r[n]["lib_tree_decode"] / r[n]["decode_walk"]
                                                               for r in rounds]) for n in names), 2)
        row["min_doc_encode_vs_tree"] = round(min(median([r[n]["lib_tree_encode"] / r[n]["encode"] for r in rounds])
                                                  for n in names), 2)
        row["min_doc_encode_parts_vs_tree"] = round(min(median([r[n]["lib_tree_encode"] / r[n]["encode_parts"]
                                                                for r in rounds]) for n in names), 2)
        classes.append(row)
        print(f"{kind:<18}{len(names):>5}{row['bytes']:>10} | {row['decode_MBps']:>8.1f}{row['decode_walk_MBps']:>8.1f}"
              f"{row['lib_tree_decode_MBps']:>9.1f}{row['decode_vs_lib_tree_decode']:>6.1f}x"
              f"{row['decode_walk_vs_lib_tree_decode']:>5.1f}x"
              f"{row['lib_conv_decode_MBps']:>9.1f}{row['decode_vs_lib_conv_decode']:>6.1f}x | "
              f"{row['encode_MBps']:>8.1f}{row['encode_parts_MBps']:>9.1f}{row['lib_tree_encode_MBps']:>9.1f}"
              f"{row['encode_vs_lib_tree_encode']:>6.1f}x{row['encode_parts_vs_lib_tree_encode']:>6.1f}x"
              f"{row['lib_conv_encode_MBps']:>9.1f}{row['encode_vs_lib_conv_encode']:>6.1f}x")
    docs_out = []
    for name, (kind, data) in docs.items():
        d = {"document": name, "class": kind, "bytes": len(data)}
        for col in COLUMNS:
            d[f"{col}_MBps"] = round(median([len(data) / r[name][col] / 1e6 for r in rounds]), 1)
        docs_out.append(d)
    summary = {
        "min_class_decode_vs_lib_tree": min(c["decode_vs_lib_tree_decode"] for c in classes),
        "min_class_decode_walk_vs_lib_tree": min(c["decode_walk_vs_lib_tree_decode"] for c in classes),
        "min_class_encode_vs_lib_tree": min(c["encode_vs_lib_tree_encode"] for c in classes),
        "min_class_encode_parts_vs_lib_tree": min(c["encode_parts_vs_lib_tree_encode"] for c in classes),
        "min_doc_decode_vs_lib_tree": min(c["min_doc_decode_vs_tree"] for c in classes),
        "min_doc_encode_vs_lib_tree": min(c["min_doc_encode_vs_tree"] for c in classes),
        "min_doc_encode_parts_vs_lib_tree": min(c["min_doc_encode_parts_vs_tree"] for c in classes),
    }
    print(f"goal >= 10x libwbxml's tree functions on every class: decode {summary['min_class_decode_vs_lib_tree']:.1f}x "
          f"(decode+walk {summary['min_class_decode_walk_vs_lib_tree']:.1f}x), encode {summary['min_class_encode_vs_lib_tree']:.1f}x "
          f"(as parts {summary['min_class_encode_parts_vs_lib_tree']:.1f}x) (worst single document: decode "
          f"{summary['min_doc_decode_vs_lib_tree']:.1f}x, encode {summary['min_doc_encode_vs_lib_tree']:.1f}x)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/wbxml_bench.py" + (" --quick" if args.quick else "")
                   + (f" --rounds {args.rounds}" if args.rounds != 5 else ""),
        "python": platform.python_version(), "machine": platform.machine(),
        "note": "shared 2-core machine; CPU time (process_time); medians of rounds, every column timed back to back; "
                "glibc malloc: mmap threshold 32 MiB, trim threshold 256 MiB (both sides)",
        "load_average_1_5_15min_at_end": [round(x, 1) for x in __import__("os").getloadavg()],
        "rounds": args.rounds, "ctypes_call_us": round(ctypes_call_us, 2),
        "classes": classes, "summary": summary, "documents": docs_out}, indent=1) + "\n")
    print(f"JSON in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
