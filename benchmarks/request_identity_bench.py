"""parse_request before and after the identity checks (issue 9): CPU µs per parse.

    python benchmarks/request_identity_bench.py [--before c3be17f] [--number 20000] [--rounds 3]

The parser as it was at ``--before`` (read from git) and the current one run side by
side in one process on benchmarks/request_bench.py's requests, timed with
process_time (CPU, less noisy than wall time on a shared machine); the best of
``--rounds`` interleaved rounds per parser. Writes benchmarks/results/request_identity_bench.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import timeit

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from request_bench import CASES  # noqa: E402
from seg_fast.eas.request import parse_request  # noqa: E402


def old_parser(commit: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:src/seg_fast/eas/request.py"],
                         capture_output=True, check=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "request_before.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("request_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.parse_request


def cpu_us(parse, target, headers, number: int) -> float:
    timer = timeit.Timer(lambda: parse("POST", target, headers, "10.0.0.9"), timer=time.process_time)
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="c3be17f", help="commit of the parser before the identity checks")
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    before = old_parser(args.before)
    results = {}
    print(f"{'case':<15}{'before µs':>11}{'after µs':>10}{'added µs':>10}")
    for name, (target, headers) in CASES.items():
        b = a = float("inf")
        for _ in range(args.rounds):
            b = min(b, cpu_us(before, target, headers, args.number))
            a = min(a, cpu_us(parse_request, target, headers, args.number))
        results[name] = {"before_us": round(b, 3), "after_us": round(a, 3), "added_us": round(a - b, 3)}
        print(f"{name:<15}{b:>11.2f}{a:>10.2f}{a - b:>10.2f}")
    out = ROOT / "benchmarks" / "results" / "request_identity_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": sys.version.split()[0], "before": args.before, "number": args.number,
                               "rounds": args.rounds, "timer": "process_time", "cases": results}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
