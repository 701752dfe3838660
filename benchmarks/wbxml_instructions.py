"""Instructions per call and per byte (valgrind's callgrind: repeatable on a busy machine),
ours against libwbxml's tree functions, one document per class.

    python benchmarks/wbxml_instructions.py [--json PATH]

Each figure is (instructions of a run making N calls - of a run making none) / N, whole
process (Python's call overhead and the frees included on both sides). Wall-clock ratios
are in wbxml_bench.py; this says how much of a gap is work and how much is memory.
Writes benchmarks/results/wbxml_instructions.json (takes ~20 minutes).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = (("small-item Syncs", "gen:1MB-small-items", 3), ("small-item Syncs", "sim:Sync.100-plain", 3),
        ("body-heavy Syncs", "gen:1MB-large-bodies", 3), ("FolderSync", "sim:FolderSync", 200),
        ("Provision", "real:prov1.resp.wbxml", 200), ("Ping", "sim:Ping.req", 200))
FUNCS = ("decode", "decode_walk", "encode", "lib_tree_decode", "lib_tree_encode")
CHILD = r'''
import sys
sys.path.insert(0, sys.argv[1])
import wbxml_bench as wb
from seg_fast.eas.wbxml import decode, encode
func, path, reps = sys.argv[2], sys.argv[3], int(sys.argv[4])
data = open(path, "rb").read()
lw = wb.LibWBXML()
tree = decode(data); list(tree.iter())           # a fully built tree, as the bench encodes
ltree = lw.tree_from_wbxml(data)
f = {"decode": lambda: decode(data), "decode_walk": lambda: list(decode(data).iter()),
     "encode": lambda: encode(tree), "lib_tree_decode": lambda: lw.tree_decode(data),
     "lib_tree_encode": lambda: lw.tree_encode(ltree)}[func]
for _ in range(reps):
    f()
'''


def instructions(func: str, path: Path, reps: int) -> int:
    run = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          "-c", CHILD, str(ROOT / "benchmarks"), func, str(path), str(reps)],
                         capture_output=True, text=True, timeout=1800)
    m = re.search(r"refs:\s+([\d,]+)", run.stderr)
    assert m, run.stderr[-2000:]
    return int(m.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "wbxml_instructions.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tempfile

    import wbxml_bench as wb
    docs = wb.classified_documents()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name, reps in DOCS:
            path = Path(tmp) / name.replace(":", "_")
            path.write_bytes(docs[name][1])
            size = len(docs[name][1])
            row = {"class": kind, "document": name, "bytes": size}
            base = instructions("decode", path, 0)     # the same set-up whatever the function
            for func in FUNCS:
                row[f"{func}_instr_per_call"] = (instructions(func, path, reps) - base) // reps
                row[f"{func}_instr_per_byte"] = round(row[f"{func}_instr_per_call"] / size, 3)
            for ours, peer in (("decode", "lib_tree_decode"), ("decode_walk", "lib_tree_decode"),
                               ("encode", "lib_tree_encode")):
                row[f"{ours}_vs_{peer}"] = round(row[f"{peer}_instr_per_call"] / row[f"{ours}_instr_per_call"], 1)
            rows.append(row)
            print(f"{kind:<18} {name:<24} {size:>8} B | instr/byte decode {row['decode_instr_per_byte']:>7} "
                  f"walk {row['decode_walk_instr_per_byte']:>7} lib {row['lib_tree_decode_instr_per_byte']:>7} | "
                  f"encode {row['encode_instr_per_byte']:>7} lib {row['lib_tree_encode_instr_per_byte']:>7} | "
                  f"fewer: decode {row['decode_vs_lib_tree_decode']}x walk {row['decode_walk_vs_lib_tree_decode']}x "
                  f"encode {row['encode_vs_lib_tree_encode']}x", flush=True)
    Path(args.json).write_text(json.dumps({"command": "python benchmarks/wbxml_instructions.py",
                                           "tool": "valgrind --tool=callgrind (instructions retired)",
                                           "documents": rows}, indent=1) + "\n")
    print(f"JSON in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
