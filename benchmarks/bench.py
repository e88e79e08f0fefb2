"""The matmul benchmark as a script: same options as `triton-dsl bench`.

    python benchmarks/bench.py --M 1 16 256 --NK 4096 --json benchmarks/results/cpu.json
"""
import sys

from triton_dsl.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
