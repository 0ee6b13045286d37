"""Command line shared by the per-op benchmark scripts (bench_policy_loss.py, bench_logprobs.py,
bench_divergence.py): a sweep of shapes x providers x modes, appended to one long-format CSV."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from harness import MODES, RESULTS, Shape, append_csv, env_info, make_inputs, plot, print_rows, run  # noqa: E402
from providers import PROVIDERS  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the performance-bar shapes on a GPU (README.md: bf16, H=4096, V in {128256, 151936}, N in 8k..64k,
# teacher H=5120); small shapes elsewhere (the harness itself is what runs on a CPU)
GPU_DEFAULTS = dict(N=[8192, 16384, 32768, 65536], H=4096, V=[128256, 151936], H_t=5120, dtype="bf16")
CPU_DEFAULTS = dict(N=[512, 1024, 2048], H=256, V=[8192], H_t=320, dtype="fp32")


def main(op: str, argv=None) -> int:
    cuda = torch.cuda.is_available()
    d = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    ap = argparse.ArgumentParser(description=f"Benchmark the {op} op against the other providers.")
    ap.add_argument("--N", type=int, nargs="+", default=d["N"], help="token counts")
    ap.add_argument("--H", type=int, default=d["H"], help="hidden size")
    ap.add_argument("--V", type=int, nargs="+", default=d["V"], help="vocabulary sizes")
    ap.add_argument("--H-t", type=int, default=d["H_t"], help="teacher hidden size (divergence)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=d["dtype"])
    ap.add_argument("--providers", nargs="+", default=None, help="subset of providers (default: all)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence for providers taking [B, T, H]")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions (CUDA uses do_bench)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "bench.csv", help="CSV to append rows to")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--plot", action="store_true", help="render plots from the CSV afterwards")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    env = env_info(device)
    providers = PROVIDERS[op](args.seq_len)
    if args.providers:
        unknown = set(args.providers) - {p.name for p in providers}
        if unknown:
            ap.error(f"unknown providers {sorted(unknown)}; known: {[p.name for p in providers]}")
        providers = [p for p in providers if p.name in args.providers]
    print(f"{op} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})")
    all_rows = []
    for V in args.V:
        for N in args.N:
            shape = Shape(N=N, H=args.H, V=V, H_t=args.H_t if op == "divergence" else None, dtype=DTYPES[args.dtype],
                          seq_len=args.seq_len)
            inputs = make_inputs(shape, device)
            print(f"{shape.label} {args.dtype}")
            for p in providers:
                rows = run(op, p, shape, inputs, args.modes, device, reps=args.reps)
                print_rows(rows)
                all_rows += rows
            del inputs
            if cuda:
                torch.cuda.empty_cache()
    if not args.no_csv:
        path = append_csv(all_rows, env, args.csv)
        print(f"appended {len(all_rows)} rows to {path}")
        if args.plot:
            for p in plot(args.csv, args.csv.parent):
                print(f"plot: {p}")
    return 0
