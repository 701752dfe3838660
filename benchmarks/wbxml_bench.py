"""WBXML codec throughput, side by side with libwbxml in-process (ctypes).

    python benchmarks/wbxml_bench.py [--quick] [--json PATH]

Sync answers are generated here, deterministically, after BENCH-PROFILE.md: HTML
bodies (Type 2) of 10-60 KB with 5-40 links over 20 domains, MIME bodies (Type 4,
multipart/alternative, a base64 attachment in some), at about 1 KB, 100 KB and
1 MB, each both as many small items and as few large bodies.

Measured on the WBXML size, best of several runs, one process:
- decode: seg-fast bytes -> Element tree; libwbxml wbxml_conv_wbxml2xml_run
  (bytes -> its tree -> XML text, the only decode libwbxml offers);
- encode: seg-fast tree -> bytes; libwbxml wbxml_conv_xml2wbxml_run (XML -> bytes);
- scan: seg-fast span scan for the content pipeline's tags (no libwbxml peer).
Prints a table and the ratios, writes JSON to benchmarks/results/wbxml_bench.json.
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import ctypes.util
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from seg_fast.eas.wbxml import Element, decode, encode, scan  # noqa: E402

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


# ------------------------------------------------------------ libwbxml via ctypes

WBXML_LANG_ACTIVESYNC = 2402   # WBXMLLanguage enum value in libwbxml 0.11
WBXML_GEN_XML_COMPACT = 0
WBXML_VERSION_13 = 0x03


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

def best_rate(fn, size: int, budget: float) -> float:
    """MB/s (10**6 bytes) of the best of 5 rounds, each about budget/5 seconds."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(budget / 5 / once))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return size / best / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timing budget")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "wbxml_bench.json"))
    args = ap.parse_args(argv)
    budget = 0.25 if args.quick else 1.0
    lw = LibWBXML()
    rows = []
    print(f"{'document':<20}{'bytes':>9} | {'decode':>9}{'libwbxml':>9}{'ratio':>7} | "
          f"{'encode':>9}{'libwbxml':>9}{'ratio':>7} | {'scan MB/s':>10}")
    for name, data in documents().items():
        tree = decode(data)
        assert encode(tree) == data
        xml = lw.wbxml2xml(data)
        assert lw.xml2wbxml(xml)  # libwbxml takes its own XML back
        n = len(data)
        r = {
            "document": name, "bytes": n,
            "decode_MBps": best_rate(lambda: decode(data), n, budget),
            "libwbxml_wbxml2xml_MBps": best_rate(lambda: lw.wbxml2xml(data), n, budget),
            "encode_MBps": best_rate(lambda: encode(tree), n, budget),
            "libwbxml_xml2wbxml_MBps": best_rate(lambda: lw.xml2wbxml(xml), n, budget),
            "scan_MBps": best_rate(lambda: scan(data, SCAN_TAGS), n, budget),
        }
        r["decode_ratio"] = r["decode_MBps"] / r["libwbxml_wbxml2xml_MBps"]
        r["encode_ratio"] = r["encode_MBps"] / r["libwbxml_xml2wbxml_MBps"]
        rows.append(r)
        print(f"{name:<20}{n:>9} | {r['decode_MBps']:>9.1f}{r['libwbxml_wbxml2xml_MBps']:>9.1f}"
              f"{r['decode_ratio']:>6.1f}x | {r['encode_MBps']:>9.1f}"
              f"{r['libwbxml_xml2wbxml_MBps']:>9.1f}{r['encode_ratio']:>6.1f}x | "
              f"{r['scan_MBps']:>10.1f}")
    summary = {
        "min_decode_ratio": min(r["decode_ratio"] for r in rows),
        "min_encode_ratio": min(r["encode_ratio"] for r in rows),
        "min_scan_MBps_large_bodies": min(r["scan_MBps"] for r in rows
                                          if "large-bodies" in r["document"]),
    }
    print(f"goals: decode >= 10x libwbxml: {summary['min_decode_ratio']:.1f}x; "
          f"encode >= 10x: {summary['min_encode_ratio']:.1f}x; scanner >= 1000 MB/s on "
          f"large bodies: {summary['min_scan_MBps_large_bodies']:.0f} MB/s")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": platform.python_version(), "machine": platform.machine(),
                               "budget_s": budget, "rows": rows, "summary": summary}, indent=2))
    print(f"MB/s = 10**6 bytes of WBXML per second; JSON in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
