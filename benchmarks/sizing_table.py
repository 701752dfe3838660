"""A sizing summary's runs as the markdown table benchmarks/README.md quotes.

    python benchmarks/sizing_table.py benchmarks/results/sizing-off-20261206-060918.json
    python benchmarks/sizing_table.py --tails benchmarks/results/sizing-off-20261205-194106.json
"""
import sys

from seg_fast.sim.sizing_table import main   # the installed package (scripts/test.sh or demo.sh make .venv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
