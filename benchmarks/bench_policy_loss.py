"""Benchmark `linear_policy_loss (TRRD)` against the other providers.

    python -m benchmarks.bench_policy_loss   # the performance-bar shapes on a GPU (README.md), small ones on a CPU
    python -m benchmarks.bench_policy_loss --N 8192 --V 151936 --providers rlad-triton liger-grpo
"""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main("policy"))
