"""What one wake-up of a gateway worker touches: the Python functions it runs, by module.

    python benchmarks/wake_footprint.py [--tree DIR] [--requests 700] [--key K]

On a wake-up from idle a worker's CPU goes on reading its code and data back into caches
(benchmarks/cold_request.py), so what matters is how many distinct functions (and how much of
their bytecode) a wake-up runs, not how often. This starts ``seg-fast serve --worker`` of the
tree as ``cold_request.py`` does (plain HTTP, allow-all policy, a fixed-answer mail server; one
103-byte Sync every 10 ms over 20 keep-alive connections) with a profile hook installed by a
``sitecustomize`` on PYTHONPATH. The hook tells wake-ups apart by trio's ``epoll.poll`` and,
over the measured requests (after 200 warm-up ones), counts for every function the share of
wake-ups it ran in. Printed and written (``results/wake_footprint.json``): wake-ups per
request; per group (trio with outcome, each seg_fast module, C functions) the expected number
of distinct functions per wake-up and of bytecode bytes; the functions that run in at least
15% of wake-ups. The hook slows the worker several times: nothing here is a time.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "benchmarks"))
from cold_request import CLIENT, MAIL, WARMUP  # noqa: E402
from ping_resume_bench import start_worker  # noqa: E402

OUT = HERE / "benchmarks" / "results" / "wake_footprint.json"

# The hook: armed by a file appearing (a signal would be the gateway's own: SIGUSR1 is), checked
# at each epoll.poll; the functions (and C functions) run since the last poll make one wake-up.
HOOK = r'''
import collections, json, os, sys
OUT = os.environ.get("SEG_FAST_WAKE_FOOTPRINT")
if OUT and "--worker" in sys.argv:
    _ran = collections.Counter()
    _cur = set()
    _state = {"armed": False, "done": False, "wakes": 0}

    def _dump():
        rows = [["C", code[1], 0, n, 0] if isinstance(code, tuple)
                else [code.co_filename, code.co_name, code.co_firstlineno, n, len(code.co_code)]
                for code, n in _ran.items()]
        with open(OUT, "w") as f:
            json.dump({"wakes": _state["wakes"], "rows": rows}, f)

    def _hook(frame, event, arg):
        if event == "call":
            _cur.add(frame.f_code)
        elif event == "c_call":
            name = getattr(arg, "__qualname__", "")
            if name == "epoll.poll":
                st = _state
                if st["armed"]:
                    for code in _cur:
                        _ran[code] += 1
                    st["wakes"] += 1
                    if os.path.exists(OUT + ".stop"):
                        st["armed"], st["done"] = False, True
                        _dump()
                elif not st["done"] and os.path.exists(OUT + ".go"):
                    st["armed"] = True
                    open(OUT + ".armed", "w").close()
                _cur.clear()
            _cur.add(("C", name))

    sys.setprofile(_hook)
'''


def group(filename: str) -> str:
    if filename == "C":
        return "C functions"
    if "/trio/" in filename or "/outcome/" in filename or "trio." in filename or "outcome." in filename:
        return "trio (with outcome)"
    if "/seg_fast/" in filename:
        return "seg_fast." + filename.split("/seg_fast/", 1)[1].removesuffix(".py").replace("/", ".")
    return "other"


def wait_for(path: Path, bound: float = 30.0) -> None:
    """Poll for the hook's file (it writes it at the worker's next epoll.poll)."""
    end = time.monotonic() + bound
    while not path.exists():
        if time.monotonic() > end:
            raise RuntimeError(f"the worker's hook did not write {path.name} within {bound:.0f} s")
        time.sleep(0.01)


def measure(tree: str, requests: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="wake-footprint-"))
    (tmp / "sitecustomize.py").write_text(HOOK)
    out = tmp / "footprint.json"
    os.environ["SEG_FAST_WAKE_FOOTPRINT"] = str(out)
    mail = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", MAIL], stdout=subprocess.PIPE, text=True)
    serve = client = None
    try:
        serve, port = start_worker(tree, int(mail.stdout.readline()), cpu=0, prefix="wake-footprint-",
                                   hook_dir=str(tmp))
        threading.Thread(target=serve.stderr.read, daemon=True).start()     # (drained: a full pipe blocks)
        client = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", CLIENT, str(port), "20",
                                   str(WARMUP + requests), "10", str(WARMUP)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def expect(word: str) -> None:
            line = client.stdout.readline().strip()
            if line != word:
                raise RuntimeError(f"client: expected {word!r}, got {line!r}")

        def go() -> None:
            client.stdin.write("\n")
            client.stdin.flush()

        expect("ready")
        go()
        expect("mark")
        out.with_name(out.name + ".go").touch()
        wait_for(out.with_name(out.name + ".armed"))     # at its next poll: the ticker wakes it 5 times a second
        go()
        expect("done")
        out.with_name(out.name + ".stop").touch()
        wait_for(out)
        data = json.loads(out.read_text())
    finally:
        for p in (client, serve, mail):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    wakes = data["wakes"]
    groups: dict[str, dict] = collections.defaultdict(lambda: {"functions_per_wake": 0.0, "bytecode_per_wake": 0.0})
    top = []
    for filename, name, line, n, size in data["rows"]:
        g = groups[group(filename)]
        g["functions_per_wake"] += n / wakes
        g["bytecode_per_wake"] += size * n / wakes
        if n / wakes >= 0.15:
            where = "C" if filename == "C" else "/".join(Path(filename).parts[-2:])
            top.append((round(n / wakes, 2), f"{where}:{name}:{line}", size))
    py = {k: v for k, v in groups.items() if k != "C functions"}
    return {
        "requests": requests, "wakes": wakes, "wakes_per_request": round(wakes / requests, 2),
        "python_functions_per_wake": round(sum(v["functions_per_wake"] for v in py.values()), 1),
        "c_functions_per_wake": round(groups["C functions"]["functions_per_wake"], 1),
        "bytecode_bytes_per_wake": round(sum(v["bytecode_per_wake"] for v in py.values())),
        "by_group": {k: {"functions_per_wake": round(v["functions_per_wake"], 2),
                         "bytecode_per_wake": round(v["bytecode_per_wake"])}
                     for k, v in sorted(groups.items(), key=lambda kv: -kv[1]["functions_per_wake"])},
        "functions_in_15pct_of_wakes": sorted(top, reverse=True),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(HERE))
    ap.add_argument("--requests", type=int, default=700)
    ap.add_argument("--key", default=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    args = ap.parse_args(argv)
    res = measure(args.tree, args.requests)
    res["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["tree"] = args.tree
    print(f"{res['wakes_per_request']} wake-ups per request; per wake-up {res['python_functions_per_wake']} "
          f"Python functions ({res['bytecode_bytes_per_wake']} bytes of bytecode), "
          f"{res['c_functions_per_wake']} C functions")
    for g, v in res["by_group"].items():
        print(f"  {g:40s} {v['functions_per_wake']:6.2f} functions  {v['bytecode_per_wake']:6d} bytes")
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[args.key] = res
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT} [{args.key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
