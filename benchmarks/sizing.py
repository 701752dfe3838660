"""The sizing benchmark: devices per core at the BENCH-PROFILE service level.

Same as `seg-fast bench sizing ...`; see benchmarks/README.md.
    python benchmarks/sizing.py --devices 2000 --hold 120
    python benchmarks/sizing.py --search --devices 2000
"""
import sys

from seg_fast.sim.sizing import cli   # the installed package (scripts/test.sh or demo.sh make .venv)

if __name__ == "__main__":
    sys.exit(cli(["sizing", *sys.argv[1:]]))
