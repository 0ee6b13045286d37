"""Benchmark `linear_divergence (generalized JSD)` against the other providers.

    python -m benchmarks.bench_divergence   # the performance-bar shapes on a GPU (README.md), small ones on a CPU
    python -m benchmarks.bench_divergence --N 8192 --V 151936 --providers rlad-triton liger-jsd
"""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main("divergence"))
