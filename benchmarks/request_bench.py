"""parse_request cost per request: the original parser (kept as the test oracle) vs the current one.

    python benchmarks/request_bench.py [--number 20000] [--repeat 5]

Both run side by side in one process on the same realistic requests; prints µs per parse
and the ratio, and writes benchmarks/results/request_bench.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import pathlib
import sys
import timeit

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))   # the reference parse_request lives in the tests

from seg_fast.eas.request import encode_base64_query, parse_request  # noqa: E402
from test_request import _reference_parse_request  # noqa: E402  (the original implementation)

PATH = b"/Microsoft-Server-ActiveSync"
DEVICE_HEADERS = [
    (b"host", b"mail.example.com"),
    (b"authorization", b"Basic " + base64.b64encode(b"CORP\\jdoe:correct horse battery staple")),
    (b"ms-asprotocolversion", b"14.1"),
    (b"x-ms-policykey", b"3942919513"),
    (b"user-agent", b"Apple-iPhone9C1/1602.92"),
    (b"content-type", b"application/vnd.ms-sync.wbxml"),
    (b"content-length", b"213"),
]
B64 = encode_base64_query(version="14.1", command="Sync", device_id=bytes.fromhex("0123456789abcdef"),
                          device_type="SmartPhone", policy_key=3942919513, params=[(1, b"7"), (7, b"\x02")])
CASES = {
    "plain": (PATH + b"?Cmd=Sync&User=jdoe&DeviceId=ApplDNPXK1ABHG7F&DeviceType=iPhone", DEVICE_HEADERS),
    "plain+percent": (PATH + b"?Cmd=GetAttachment&AttachmentName=5%3A1%3A0&User=jdoe"
                             b"&DeviceId=ApplDNPXK1ABHG7F&DeviceType=iPhone", DEVICE_HEADERS),
    "base64": (PATH + b"?" + B64.encode(), [h for h in DEVICE_HEADERS if h[0] != b"ms-asprotocolversion"]),
    "options": (PATH, DEVICE_HEADERS[:2] + DEVICE_HEADERS[4:5]),
}


def per_parse_us(parse, target, headers, number, repeat):
    timer = timeit.Timer(lambda: parse("POST", target, headers, "10.0.0.9"))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    results = {}
    print(f"{'case':<15}{'original µs':>13}{'new µs':>9}{'speedup':>9}")
    for name, (target, headers) in CASES.items():
        # Same answer first: a benchmark of a parser that disagrees measures nothing.
        # (the fields added since the original -- auth_scheme, identity -- aside)
        new_req = parse_request("POST", target, headers)
        new_req.auth_scheme, new_req.identity = "", "none"
        assert new_req == _reference_parse_request("POST", target, headers)
        ref = per_parse_us(_reference_parse_request, target, headers, args.number, args.repeat)
        new = per_parse_us(parse_request, target, headers, args.number, args.repeat)
        results[name] = {"original_us": round(ref, 3), "new_us": round(new, 3), "speedup": round(ref / new, 2)}
        print(f"{name:<15}{ref:>13.2f}{new:>9.2f}{ref / new:>8.2f}x")
    out = ROOT / "benchmarks" / "results" / "request_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": sys.version.split()[0], "number": args.number,
                               "repeat": args.repeat, "cases": results}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
