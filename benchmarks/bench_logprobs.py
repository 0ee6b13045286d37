"""Benchmark `linear_logprobs with entropy` against the other providers.

    python -m benchmarks.bench_logprobs   # the performance-bar shapes on a GPU (README.md), small ones on a CPU
    python -m benchmarks.bench_logprobs --N 8192 --V 151936 --providers rlad-triton cce liger-flce
"""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main("logprobs"))
