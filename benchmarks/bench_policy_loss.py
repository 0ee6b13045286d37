"""Benchmark `linear_policy_loss (TRRD)` against the other providers.

    python benchmarks/bench_policy_loss.py   # the performance-bar shapes on a GPU (README.md), small ones on a CPU
    python benchmarks/bench_policy_loss.py --N 8192 --V 151936 --providers rlad-triton liger-grpo
"""

import sys

from run import main

if __name__ == "__main__":
    sys.exit(main("policy"))
