"""Python-level calls a gateway worker makes per proxied request: a count, not a time.

Issue 10 asked for a request cycle of "a handful of Python-level calls, not hundreds".
This runs benchmarks/sizing.py (a short development run, the gateway path only) with a
profile hook (``sys.setprofile``) in every ``seg-fast serve --worker`` process, installed
by a ``sitecustomize`` this script writes to a temp dir on PYTHONPATH, and divides the
calls the workers made by the requests the fleet sent. The count does not depend on how
fast or loaded the machine is, only on what the code does (and, a little, on how many
events each wake-up of the loop finds), so two trees compare on a shared machine where
their CPU times would not. The hook slows the worker several times: this script says
nothing about time.

    python benchmarks/calls_per_request.py                      # this tree
    python benchmarks/calls_per_request.py --tree /tmp/base --tree .   # two trees, same run
    python benchmarks/calls_per_request.py --key NAME -- --devices 300 --rate-scale 10

Counted: Python function calls ("call" events) and calls of C functions from Python
("c_call"), over the whole run, the worker's start-up included (the same in every tree;
``startup_calls`` counts the frames of the import machinery). Also counted: trio's waits
(every wait and checkpoint ends in one of its two traps), each under the two seg_fast lines
that awaited it, so a loop pass per request can be traced to the line that asked for it.
Results go into a key of benchmarks/results/calls_per_request.json.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
OUT = HERE / "benchmarks" / "results" / "calls_per_request.json"
SIZING = ["--devices", "300", "--paths", "gateway", "--rate-scale", "10", "--ramp", "10", "--settle", "5",
          "--hold", "30", "--drain", "10", "--repeat", "1", "--seed", "3", "--tls"]

# Installed into the processes that start gateway workers (serve, and the sizing run's
# ``python -m seg_fast.proxy.forked``, both fork their workers: they inherit the hook) and
# into a worker started as its own interpreter (serve --worker). Counts start afresh in
# each forked child and are written only by a worker: a child that is not the template.
SITECUSTOMIZE = r'''
import os, sys
_out = os.environ.get("SEG_FAST_CALLS_DIR")
_cmd = open("/proc/self/cmdline", "rb").read() if _out else b""
if _out and (b"serve" in _cmd or b"seg_fast.proxy.forked" in _cmd):
    import collections, json, threading, time
    _py, _c, _w = collections.Counter(), collections.Counter(), collections.Counter()
    # trio's two traps every wait and checkpoint ends in: each counted under the trio
    # function the caller entered and the gateway's lines that awaited it (the first two
    # seg_fast frames up the stack), so a wait can be traced to its cause
    _waits = {"wait_task_rescheduled", "cancel_shielded_checkpoint"}
    # a coroutine's frame gets a "call" event at its start and at every resumption: a
    # start is the smallest instruction offset its code is ever entered at (the first seen)
    _starts = {}

    def _hook(frame, event, arg, py=_py, c=_c, w=_w, waits=_waits, starts=_starts):
        if event == "call":
            code = frame.f_code
            py[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
            if code.co_name in waits and "/trio/" in code.co_filename \
                    and frame.f_lasti == starts.setdefault(code, frame.f_lasti):
                entered, f = code.co_name, frame.f_back
                while f is not None and "/trio/" in f.f_code.co_filename:
                    entered, f = f.f_code.co_name, f.f_back
                where = []                # the first two seg_fast frames: the wait and its caller
                while f is not None and len(where) < 2:
                    name = f.f_code.co_filename
                    if "/seg_fast/" in name:
                        where.append(f"{name.split('/seg_fast/')[1]}:{f.f_lineno}")
                    f = f.f_back
                if where:
                    w[(entered, " < ".join(where))] += 1
        elif event == "c_call":
            c[getattr(arg, "__qualname__", None) or repr(arg)] += 1

    _own_worker = b"serve\x00--worker" in _cmd     # a worker started as its own interpreter

    def _is_worker():
        if _own_worker:
            return True
        with open("/proc/self/comm", "rb") as f:
            return f.read().strip() != b"seg-fast-tmpl" and os.getpid() != _root
    _root = os.getpid()

    def _dump():
        if not _is_worker() or not _py:
            return
        path = os.path.join(_out, f"worker-{os.getpid()}.json")
        data = {"py": [[f, n, name, k] for (f, n, name), k in _py.copy().items()],
                "c": list(_c.copy().items()),
                "waits": [[name, where, k] for (name, where), k in _w.copy().items()]}
        tmp = f"{path}.{threading.get_ident()}.tmp"    # the writer thread and the exit may overlap
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)

    def _every_2s():
        while True:
            time.sleep(2)
            _dump()

    def _started():
        # a forked child: its own counts, its own writer thread; a worker ends with
        # os._exit (no atexit), so its counts are written on the way out too
        _py.clear()
        _c.clear()
        _w.clear()
        threading.Thread(target=_every_2s, daemon=True).start()

    _real_exit = os._exit

    def _exit(code, _real_exit=_real_exit):
        sys.setprofile(None)              # the dump's own calls are not the worker's
        _dump()
        _real_exit(code)

    os._exit = _exit
    os.register_at_fork(after_in_child=_started)
    sys.setprofile(_hook)
    if _own_worker:
        import atexit
        atexit.register(_dump)
        threading.Thread(target=_every_2s, daemon=True).start()
'''


def group(filename: str) -> str:
    if filename.startswith("<frozen"):
        return "import machinery"
    if "/trio/" in filename or "/outcome/" in filename or filename.startswith("<attrs generated"):
        return "trio (with outcome)"
    if "/seg_fast/" in filename:
        return "seg_fast." + filename.split("/seg_fast/")[1].removesuffix(".py").replace("/", ".")
    return Path(filename).stem if "/" in filename else filename


def measure(tree: Path, sizing_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="calls-") as tmp:
        tmp = Path(tmp)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (tmp / "counts").mkdir()
        env = dict(os.environ, SEG_FAST_CALLS_DIR=str(tmp / "counts"),
                   PYTHONPATH=os.pathsep.join([str(tree / "src"), str(tmp / "site")]))
        run = subprocess.run([sys.executable, str(tree / "benchmarks" / "sizing.py"), *sizing_args,
                              "--out", str(tmp / "out")], env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"sizing.py failed in {tree}:\n{run.stderr[-2000:]}")
        (summary,) = glob.glob(str(tmp / "out" / "sizing-*[0-9].raw.json"))
        raw = json.loads(Path(summary).read_text())
        (point,) = raw["points"]
        (path_run,) = [r["paths"]["gateway"] for r in point["runs"]]
        requests, failures = path_run["requests_total"], sum(path_run["failures"].values())
        py, c, waits = collections.Counter(), collections.Counter(), collections.Counter()
        for f in glob.glob(str(tmp / "counts" / "worker-*.json")):
            data = json.loads(Path(f).read_text())
            for filename, line, name, k in data["py"]:
                py[(filename, line, name)] += k
            for name, k in data["c"]:
                c[name] += k
            for name, where, k in data.get("waits", []):
                waits[(name, where)] += k
    if not py or not requests:
        raise SystemExit(f"nothing counted in {tree} (requests {requests}): was the worker's hook installed?")
    groups = collections.Counter()
    for (filename, _, _), k in py.items():
        groups[group(filename)] += k
    py_total, c_total = sum(py.values()), sum(c.values())
    top = [[f"{group(f)}:{name}:{line}", round(k / requests, 2)] for (f, line, name), k in py.most_common(25)]
    return {
        "tree": str(tree),
        "commit": subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                                 capture_output=True, text=True).stdout.strip(),
        "requests": requests, "failures": failures,
        "python_calls_per_request": round(py_total / requests, 1),
        "c_calls_per_request": round(c_total / requests, 1),
        "startup_calls": groups["import machinery"],
        "python_calls_per_request_by_group": {g: round(k / requests, 1) for g, k in groups.most_common(15)},
        "top_python_functions_per_request": top,
        "top_c_functions_per_request": [[n, round(k / requests, 2)] for n, k in c.most_common(15)],
        # trio waits per request by the two seg_fast lines that awaited them (the wait < its caller)
        "waits_per_request": round(sum(waits.values()) / requests, 2),
        "waits_per_request_by_site": [[f"{name} {where}", round(k / requests, 3)]
                                      for (name, where), k in waits.most_common(20)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", help="a source tree to count (repeatable; default: this one)")
    ap.add_argument("--key", default="calls_per_request")
    ap.add_argument("sizing_args", nargs="*", help="sizing.py's options, after --")
    args = ap.parse_args()
    sizing_args = args.sizing_args or SIZING
    results = []
    for tree in args.tree or [str(HERE)]:
        r = measure(Path(tree).resolve(), sizing_args)
        results.append(r)
        print(f"{r['commit']}: {r['python_calls_per_request']} Python calls and {r['c_calls_per_request']} "
              f"C calls per request ({r['requests']} requests, {r['failures']} failed)")
        for g, k in list(r["python_calls_per_request_by_group"].items())[:8]:
            print(f"    {k:8.1f}  {g}")
        print(f"  trio waits per request {r['waits_per_request']}, by the lines that waited (the wait < its caller):")
        for site, k in r["waits_per_request_by_site"][:12]:
            print(f"    {k:8.3f}  {site}")
    doc = json.loads(OUT.read_text()) if OUT.exists() else {}
    doc[args.key] = {"sizing_args": sizing_args, "trees": results,
                     "command": "python benchmarks/calls_per_request.py " + " ".join(sys.argv[1:])}
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT} [{args.key}]")


if __name__ == "__main__":
    main()
