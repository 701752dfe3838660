"""HTTP/1.1 head cost: the compiled fast path (proxy._http1) vs h11, side by side in one run.

    python benchmarks/http1_bench.py [--number 20000] [--repeat 5]

Messages: a realistic EAS Sync request head (an iPhone's, Basic auth) and the Z-Push
Sync answer head of tests/data/real-server/sync1.resp.hdr. h11 gets a fresh
Connection per message and its whole cycle, as the proxy pays it today:

- request:  h11 receive_data + next_event           vs  parse_request
- the same, with h11 then primed for the body and answer  vs  parse_request + prime_h11
- response: h11 send(Request) + receive_data + next_event  vs  write_request + parse_response
- server cycle: h11 receive_data + next_event + send(Response)  vs  parse_request + write_response

Prints CPU µs per head (process time, best of --repeat) and the ratio; writes benchmarks/results/http1_bench.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import pathlib
import sys
import time
import timeit

import h11

from seg_fast.proxy import http1

ROOT = pathlib.Path(__file__).resolve().parent.parent

SYNC_REQUEST = (
    b"POST /Microsoft-Server-ActiveSync?Cmd=Sync&User=jdoe&DeviceId=ApplDNPXK1ABHG7F&DeviceType=iPhone HTTP/1.1\r\n"
    b"Host: mail.example.com\r\n"
    b"Authorization: Basic " + base64.b64encode(b"CORP\\jdoe:correct horse battery staple") + b"\r\n"
    b"MS-ASProtocolVersion: 14.1\r\n"
    b"X-MS-PolicyKey: 3942919513\r\n"
    b"User-Agent: Apple-iPhone9C1/1602.92\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-us\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Content-Type: application/vnd.ms-sync.wbxml\r\n"
    b"Content-Length: 213\r\n"
    b"Connection: keep-alive\r\n\r\n")


def _response_head() -> bytes:
    for cand in (ROOT / "tests" / "data" / "real-server", ROOT.parent / "shared" / "fixtures" / "real-server"):
        if (cand / "sync1.resp.hdr").is_file():
            raw = (cand / "sync1.resp.hdr").read_bytes()
            head = raw.replace(b"\r\n", b"\n").rstrip(b"\n").replace(b"\n", b"\r\n") + b"\r\n\r\n"
            # The capture ends its connection; a kept-alive upstream is what the proxy sees.
            return head.replace(b"Connection: close\r\n", b"")
    raise SystemExit("sync1.resp.hdr not found (tests/data/real-server)")


SYNC_RESPONSE = _response_head()
UP_HEADERS = [(b"Host", b"host", b"mail.internal"), (b"MS-ASProtocolVersion", b"ms-asprotocolversion", b"14.1"),
              (b"Content-Type", b"content-type", b"application/vnd.ms-sync.wbxml")]
ANSWER_HEADERS = [(b"Content-Type", b"application/vnd.ms-sync.wbxml"), (b"MS-Server-ActiveSync", b"14.0"),
                  (b"Content-Length", b"228")]


def h11_request():
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(SYNC_REQUEST)
    return conn.next_event()


def fast_request():
    return http1.parse_request(SYNC_REQUEST)


def fast_primed():
    # The integration seam: the fast head, and h11 primed with a canned head of the same facts.
    return http1.prime_h11(h11.Connection(h11.SERVER), http1.parse_request(SYNC_REQUEST))


def h11_response():
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"POST", target=b"/Microsoft-Server-ActiveSync?Cmd=Sync",
                          headers=[(n, v) for n, _, v in UP_HEADERS] + [(b"Content-Length", b"213")]))
    conn.receive_data(SYNC_RESPONSE)
    return conn.next_event()


def fast_response():
    http1.write_request(b"POST", b"/Microsoft-Server-ActiveSync?Cmd=Sync", UP_HEADERS, http1.FRAMING_LENGTH, 213)
    return http1.parse_response(SYNC_RESPONSE, b"POST")


def h11_cycle():
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(SYNC_REQUEST)
    conn.next_event()
    return conn.send(h11.Response(status_code=200, headers=ANSWER_HEADERS))


_ANSWER_FULL = [(n, n.lower(), v) for n, v in ANSWER_HEADERS]


def fast_cycle():
    head = http1.parse_request(SYNC_REQUEST)
    return http1.write_response(200, b"OK", _ANSWER_FULL, http1.FRAMING_LENGTH, 228, head.keep_alive)


CASES = {"request head": (h11_request, fast_request),
         "head + h11 primed": (h11_request, fast_primed),
         "response head": (h11_response, fast_response),
         "server cycle": (h11_cycle, fast_cycle)}


def per_call_us(fn, number, repeat):
    # CPU time of this process, not wall time: on a shared machine the scheduler's pauses
    # would otherwise land on whichever side happened to be running.
    return min(timeit.Timer(fn, timer=time.process_time).repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    # The same answers first: a benchmark of parsers that disagree measures nothing.
    assert http1.request_event(fast_request()) == h11_request()
    assert http1.response_event(http1.parse_response(SYNC_RESPONSE, b"POST")) == h11_response()
    results = {}
    print(f"{'case':<15}{'h11 µs':>9}{'fast µs':>9}{'ratio':>8}")
    for name, (ref_fn, fast_fn) in CASES.items():
        ref = per_call_us(ref_fn, args.number, args.repeat)
        fast = per_call_us(fast_fn, args.number, args.repeat)
        results[name] = {"h11_us": round(ref, 3), "fast_us": round(fast, 3), "ratio": round(ref / fast, 1)}
        print(f"{name:<15}{ref:>9.2f}{fast:>9.2f}{ref / fast:>7.1f}x")
    out = ROOT / "benchmarks" / "results" / "http1_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": sys.version.split()[0], "h11": h11.__version__, "number": args.number,
                               "repeat": args.repeat, "request_bytes": len(SYNC_REQUEST),
                               "response_bytes": len(SYNC_RESPONSE), "cases": results}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
