"""transform_steps.py A/B: a base tree and this one, run alternately, medians per answer.

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace -q)
    python benchmarks/transform_steps_ab.py --base /tmp/base [--runs 3] [--repeat 5] [--json PATH]

Each run is one ``transform_steps.py --repeat N --gil`` process (PYTHONPATH set to the
tree's src, the tree's own copy of the script); base and new alternate so that what
else the machine does falls on both. Per answer: the median over runs of each run's
median thread-CPU ms, wall ms and GIL lag (the longest a thread sleeping 1 ms waited).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def one_run(tree: Path, repeat: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = dict(os.environ, PYTHONPATH=str(tree / "src"))
        subprocess.run([sys.executable, str(tree / "benchmarks" / "transform_steps.py"), "--repeat", str(repeat),
                        "--gil", "--json", f.name], env=env, check=True, stdout=subprocess.DEVNULL, cwd="/")
        return {r["answer"]: r for r in json.loads(Path(f.name).read_text())["rows"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    trees = {"base": args.base.resolve(), "new": HERE}
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    for _ in range(args.runs):
        for name, tree in trees.items():
            runs[name].append(one_run(tree, args.repeat))
    rows = []
    print(f"{'answer':48s} {'cpu ms base':>11s} {'new':>7s} {'lag ms base':>11s} {'new':>6s}")
    for answer in runs["new"][0]:
        row = {"answer": answer}
        for name in trees:
            for key in ("cpu_ms", "wall_ms", "thread_lag_ms"):
                row[f"{key}_{name}"] = round(statistics.median(r[answer][key] for r in runs[name]), 2)
        rows.append(row)
        print(f"{answer:48s} {row['cpu_ms_base']:11.2f} {row['cpu_ms_new']:7.2f} "
              f"{row['thread_lag_ms_base']:11.2f} {row['thread_lag_ms_new']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"python": sys.version.split()[0], "runs": args.runs, "repeat": args.repeat,
                                         "base": str(trees["base"]), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
