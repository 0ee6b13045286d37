"""Benchmarks of the fused ops: timing and memory against other providers, the one-call GPU session
and the compile report. Every script runs as a module from the repository root:

    python -m benchmarks.bench_policy_loss      # bench_logprobs, bench_divergence: per-op sweeps (run.py)
    python -m benchmarks.bench_memory_cpu       # CPU peak memory, chunked torch vs eager
    python -m benchmarks.longcot_memory         # one training step's peak memory vs response length
    python -m benchmarks.longcot_batching       # one update, micro_batch_size vs micro_batch_tokens
    python -m benchmarks.gpu_compile_report     # every Triton launch compiled for sm_80/90/100, no GPU needed
    python -m benchmarks.gpu_session            # the one-call GPU session (--dry-run on a CPU)
    python -m benchmarks.prepare_gpu_wheels     # the wheels a lent GPU lacks, and its command

See benchmarks/README.md. Importing this package imports nothing else (``gpu_compile_report``
must choose Triton's JIT over its interpreter before Triton is imported).
"""
